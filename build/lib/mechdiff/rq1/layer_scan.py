"""RQ1 layer scan (the cka stage): linear CKA between base and tuned states per scanned layer, with honest
statistics, and the spectrum of the change ``H_tuned - H_base`` per layer.

For each layer: biased and debiased CKA (float64), a permutation null (whole prompts of the tuned states
permuted against the base's, so positions keep their place in a prompt) with its p-value and that
p-value's floor ``1 / (1 + n_perm)``, and a bootstrap interval resampling prompts. Inputs are the aligned
content positions captured by collect_acts (BOS and template special tokens are never among them).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from mechdiff.rq1.change_rank import change_row
from mechdiff.rq1.cka import bootstrap_ci, linear_cka, permutation_null


def cka_row(X: torch.Tensor, Y: torch.Tensor, groups: np.ndarray, n_perm: int, n_boot: int, seed: int) -> dict:
    """CKA statistics of one layer: X, Y (n, d) aligned states of base and tuned; ``groups`` (n,) prompt ids."""
    boot = bootstrap_ci(X, Y, groups, n_boot=n_boot, seed=seed, debiased=True)
    perm = permutation_null(X, Y, n_perm=n_perm, seed=seed, debiased=True, groups=groups)
    return {"cka_biased": linear_cka(X, Y), "cka_debiased": boot.estimate, "ci_low": boot.low,
            "ci_high": boot.high, "null_mean": float(np.mean(perm.null)), "null_q95": float(np.quantile(perm.null, 0.95)),
            "p_value": perm.p_value, "p_floor": 1.0 / (1 + n_perm), "n_positions": int(X.shape[0]), "n_prompts": int(len(np.unique(groups))),
            "d_model": int(X.shape[1])}


def cka_by_layer(states: Mapping[int, tuple[torch.Tensor, torch.Tensor]], groups: np.ndarray, n_perm: int,
                 n_boot: int, seed: int) -> pd.DataFrame:
    """One row per layer (ascending) of :func:`cka_row`; ``states[layer] = (X_base, Y_tuned)``."""
    rows = [{"layer": layer, **cka_row(*states[layer], groups, n_perm, n_boot, seed)} for layer in sorted(states)]
    return pd.DataFrame(rows)


def change_rows(states: Mapping[int, tuple[torch.Tensor, torch.Tensor]], mode: str) -> list[dict]:
    """One row per layer (ascending): relative size of the change and the directions holding 90% / 99% of it
    (:func:`mechdiff.rq1.change_rank.change_row`); ``states[layer] = (H_base, H_tuned)``, (n, d) each."""
    return [{"mode": mode, "layer": layer, **change_row(Hb, Ht)} for layer, (Hb, Ht) in sorted(states.items())]
