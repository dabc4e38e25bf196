"""How many directions does the fine-tune's change occupy at a layer?

Given the paired residual states of both models at the same aligned positions, ``H_b`` and ``H_t``
(``[n, d]``, row i of both is the same prompt position), the change is ``D = H_t - H_b``. Its singular
value spectrum says how many directions carry it: a rank-r update of an MLP's ``down_proj`` at block L
(e.g. a LoRA) makes ``D`` after block L exactly rank <= r (every row is the update applied to the same
block's MLP activations), while a distributed change, a layer above a planted one (after nonlinear
mixing), or a rank-r attention edit (whose output the same block's MLP reads and answers) can spread over
many directions.

``D`` is not centred: a constant shift of every row is a change too (one direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChangeSpectrum:
    """Energy spectrum of the change at one layer.

    ``energy``: fraction of ``||D||_F^2`` in each singular direction, descending (sums to 1; empty when
    there is no change). ``relative_change``: ``||D||_F / ||H_b||_F`` (0 for identical states).
    """

    energy: tuple[float, ...]
    relative_change: float

    def rank_at(self, fraction: float) -> int:
        """Fewest directions holding at least ``fraction`` of the change's energy (0: no change)."""
        total = 0.0
        for i, e in enumerate(self.energy):
            total += e
            if total >= fraction - 1e-12:
                return i + 1
        return len(self.energy)

    @property
    def participation_ratio(self) -> float:
        """``(sum e)^2 / sum e^2``: 1 for a single direction, r for r equal ones, 0 without change."""
        s2 = sum(e * e for e in self.energy)
        return 1.0 / s2 if s2 > 0 else 0.0


def change_spectrum(H_base: torch.Tensor, H_tuned: torch.Tensor, no_change_below: float = 1e-7) -> ChangeSpectrum:
    """Spectrum of ``H_tuned - H_base`` (``[n, d]`` each, paired rows), computed in float64.

    A relative change ``||D|| / ||H_base||`` at or below ``no_change_below`` counts as no change (float32
    round-off of identical computations is far below it; any real edit is far above).
    """
    if H_base.shape != H_tuned.shape or H_base.ndim != 2:
        raise ValueError(f"paired states must both be [n, d], got {tuple(H_base.shape)} and {tuple(H_tuned.shape)}")
    Hb = H_base.double()
    D = H_tuned.double() - Hb
    ref = torch.linalg.matrix_norm(Hb).item()
    rel = torch.linalg.matrix_norm(D).item() / ref if ref > 0 else 0.0
    if not rel > no_change_below:
        return ChangeSpectrum((), float(rel))
    G = D.T @ D if D.shape[0] >= D.shape[1] else D @ D.T  # squared singular values = its eigenvalues
    e = torch.linalg.eigvalsh(G).flip(0).clamp_min(0.0)
    return ChangeSpectrum(tuple(float(x) for x in (e / e.sum())), float(rel))


def change_row(H_base: torch.Tensor, H_tuned: torch.Tensor) -> dict:
    """Summary of :func:`change_spectrum` for paired states (``[n, d]`` each): relative size, the fewest
    directions holding 90% / 99% of the change, the share of the top one / four, participation ratio."""
    spec = change_spectrum(H_base, H_tuned)
    return {"relative_change": spec.relative_change, "rank_90": spec.rank_at(0.90), "rank_99": spec.rank_at(0.99),
            "top1_energy": spec.energy[0] if spec.energy else 0.0, "top4_energy": sum(spec.energy[:4]),
            "participation_ratio": spec.participation_ratio}
