"""Interventions on the residual stream as forward hooks, and the batched sweep over settings (RQ3, RQ4).

An :class:`Intervention` rewrites the residual stream after each block in ``layers``:
``h -> h + coef * (h U) U^T + (role vectors)``, which covers the operations of RQ3:

* :func:`ablation` ``h - h P`` (``P = U U^T``), at every position: remove the subspace from the tuned model;
* :func:`scaling` ``h + alpha h P``: the seed's steering formula (``steer.mode: scale``); it multiplies
  the component the base already has, so it cannot create a behaviour the base lacks;
* :func:`addition`: additive steering (``steer.mode: add``, the default): vectors placed by position role
  (:func:`mechdiff.models.measures.position_roles`): ``end`` = the prompt's last token (where the fine-tune writes
  its decision), ``answer`` = answer tokens (where it writes the answer), ``all`` = everywhere.

Sweep (:func:`sweep`). S settings on N prompts run in ONE batched pass per prompt batch: the batch is
replicated setting-major (row ``r`` belongs to setting ``r // N``) and one hook per block applies a per-row
transform (:class:`InterventionStack`). Setting 0 is :func:`identity`, so the clean model is measured in
the same pass with the same numerics. The blocks below the first intervened one run once on one copy of
the rows (:func:`shared_prefix`, prefix reuse).

Legend: S settings, N prompts, R = S * N rows, T tokens, D d_model, K rank (zero-padded to the largest).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mechdiff.models.architecture import adapter_for
from mechdiff.models.hooks import hooks, output_tensor, replace_output
from mechdiff.models.measures import ROLES, plain_kv, roles_in_effect
from mechdiff.rq3.subspace import orthonormal_basis

__all__ = ["Intervention", "InterventionStack", "ablation", "addition", "identity", "intervene", "scaling",
           "shared_prefix", "steer_resid_post_hook", "sweep"]


# --------------------------------------------------------------------------------------------------
# interventions


@dataclass(frozen=True)
class Intervention:
    """``h -> h + coef * (h U) U^T + sum_role [position has role] * bias[role]`` on the outputs of ``layers``.

    ``basis`` (D, K) float64 with orthonormal columns (K may be 0); ``biases`` maps roles of
    :data:`ROLES` to (D,) vectors; ``label`` names the setting in result tables.
    """

    basis: torch.Tensor
    coef: float
    layers: tuple[int, ...]
    biases: dict = field(default_factory=dict)
    label: str = ""

    def apply(self, h: torch.Tensor, roles: torch.Tensor | None = None) -> torch.Tensor:
        """Reference (one setting, float64) transform of states ``h`` (R, T, D) with ``roles`` (R, T)."""
        x = h.double()
        U = self.basis.to(x.device, torch.float64)
        out = x + self.coef * ((x @ U) @ U.T)
        roles = roles_in_effect() if roles is None else roles
        for i, role in enumerate(ROLES):
            if role in self.biases:
                sel = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if i == 0 else \
                    (roles == i).to(x.device) if roles is not None else torch.zeros(x.shape[:-1], dtype=torch.bool)
                out = out + sel[..., None] * self.biases[role].to(x.device, torch.float64)
        return out.to(h.dtype)


def _checked(U) -> torch.Tensor:
    return orthonormal_basis(U, None).cpu()


def _vector(v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu()
    if not torch.isfinite(v).all():
        raise ValueError("the steering vector holds NaN or Inf")
    return v


def identity(d: int, layers: Sequence[int] = (), label: str = "clean") -> Intervention:
    """The no-op setting (measures the clean model inside a sweep)."""
    return Intervention(torch.zeros(d, 0, dtype=torch.float64), 0.0, tuple(layers), {}, label)


def ablation(U, layers: Sequence[int], label: str = "") -> Intervention:
    """Remove span(U): ``h - h U U^T`` (U (D, K) orthonormal) at every position."""
    return Intervention(_checked(U), -1.0, tuple(layers), {}, label)


def scaling(U, alpha: float, layers: Sequence[int], label: str = "") -> Intervention:
    """Scale the component in span(U) by ``1 + alpha``: ``h + alpha h U U^T``, at every position."""
    return Intervention(_checked(U), float(alpha), tuple(layers), {}, label)


def addition(vector=None, layers: Sequence[int] = (), label: str = "", end=None, answer=None) -> Intervention:
    """Add fixed vectors (D,): ``vector`` at every position (ActAdd), ``end`` at the prompt's last token,
    ``answer`` at answer tokens (see :func:`position_roles`)."""
    biases = {r: _vector(v) for r, v in (("all", vector), ("end", end), ("answer", answer)) if v is not None}
    if not biases:
        raise ValueError("addition needs at least one of vector, end, answer")
    d = next(iter(biases.values())).numel()
    return Intervention(torch.zeros(d, 0, dtype=torch.float64), 0.0, tuple(layers), biases, label)


class InterventionStack:
    """The settings of one layer's hook, as per-row tensors: rows ``[s*N, (s+1)*N)`` get setting ``s``.

    Settings not active at ``layer`` act as the identity there.
    """

    def __init__(self, interventions: Sequence[Intervention], layer: int, device=None,
                 dtype: torch.dtype = torch.float32):
        d = _width(interventions)
        k = max([iv.basis.shape[1] for iv in interventions] + [1])
        S = len(interventions)
        self.bases = torch.zeros(S, d, k, dtype=dtype, device=device)  # (S, D, K), zero-padded
        self.coefs = torch.zeros(S, dtype=dtype, device=device)  # (S,)
        self.biases = torch.zeros(S, len(ROLES), d, dtype=dtype, device=device)  # (S, roles, D)
        for s, iv in enumerate(interventions):
            if layer not in iv.layers:
                continue
            self.bases[s, :, : iv.basis.shape[1]] = iv.basis.to(device, dtype)
            self.coefs[s] = iv.coef
            for role, v in iv.biases.items():
                self.biases[s, ROLES.index(role)] = v.to(device, dtype)
        self.n_settings = S
        self.active = bool(self.coefs.abs().sum() > 0 or self.biases.abs().sum() > 0)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Transform states h (R, T, D) row by row (R must be a multiple of S); computed in the stack's dtype."""
        R, T, D = h.shape
        S = self.n_settings
        if R % S:
            raise ValueError(f"{R} rows cannot be split over {S} settings")
        x = h.to(self.bases.dtype).reshape(S, R // S, T, D)  # (S, N, T, D)
        coord = torch.einsum("sntd,sdk->sntk", x, self.bases)  # (S, N, T, K)
        out = x + torch.einsum("sntk,sdk->sntd", coord, self.bases) * self.coefs[:, None, None, None]
        out = out + self.biases[:, 0, None, None, :]
        roles = roles_in_effect()
        if roles is not None:
            onehot = torch.stack([roles == 1, roles == 2], -1).to(x.device, x.dtype)  # (R, T, 2)
            onehot = onehot.reshape(S, R // S, T, 2)
            out = out + torch.einsum("sntr,srd->sntd", onehot, self.biases[:, 1:])
        return out.reshape(R, T, D).to(h.dtype)


def _is_identity(iv: Intervention) -> bool:
    return iv.coef == 0 and not any(bool(v.abs().sum() > 0) for v in iv.biases.values())


def _width(interventions: Sequence[Intervention]) -> int:
    widths = {iv.basis.shape[0] for iv in interventions} | {v.numel() for iv in interventions
                                                            for v in iv.biases.values()}
    if len(widths) != 1:
        raise ValueError(f"interventions disagree on d_model: {sorted(widths)}")
    return widths.pop()


def steer_resid_post_hook(stack: InterventionStack) -> Callable:
    """Forward hook applying ``stack`` to a block's output (tuple or tensor)."""
    def hook(_module, _inputs, output):
        return replace_output(output, stack(output_tensor(output)))

    return hook


@contextlib.contextmanager
def intervene(model: torch.nn.Module, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Hooks applying the per-row settings at every block some setting uses; removed on exit."""
    adapter = adapter_for(model)
    p = next(model.parameters())
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    layers = sorted({i for iv in interventions for i in iv.layers})
    bad = [i for i in layers if not 0 <= i < adapter.n_layers]
    if bad:
        raise ValueError(f"intervention layers {bad} out of range for a {adapter.n_layers}-layer model")
    post = []
    for i in layers:
        stack = InterventionStack(interventions, i, p.device, dtype)
        if stack.active:
            post.append((adapter.layers[i], steer_resid_post_hook(stack)))
    with hooks(post=post):
        yield


# --------------------------------------------------------------------------------------------------
# the batched sweep


@contextlib.contextmanager
def shared_prefix(model: torch.nn.Module, n_settings: int, first_layer: int) -> Iterator[None]:
    """Run the blocks below ``first_layer`` (which no setting touches) on ONE copy of the replicated rows.

    Inside a sweep the S copies of the prompt batch are identical until the first intervened block, so
    those blocks run on the first N = R / S rows and the last of them tiles its output back to R rows
    (prefix reuse). This holds for cache-free forwards (teacher-forced scoring) and for the prefill of a
    greedy decode: there each such block's fresh KV-cache entries are tiled to R rows too, so the decode
    steps that follow (whose tokens differ per setting) run every block on all R rows as usual.
    Restored on exit.
    """
    layers = adapter_for(model).layers[:first_layer] if n_settings > 1 else []
    originals = [(layer.forward, "forward" in vars(layer)) for layer in layers]
    state = {"rows": None}  # R, seen by the first block (the others get N rows)

    def wrap(orig, idx: int, first: bool, last: bool):
        def forward(hidden_states, *args, **kwargs):
            cache = kwargs.get("cache")
            prefill = cache is not None and _tileable(cache, idx) and cache.get_seq_length(idx) == 0
            if args or (kwargs.get("use_cache") and not prefill) or (cache is not None and not prefill):
                state["rows"] = None
                return orig(hidden_states, *args, **kwargs)
            if first:
                state["rows"] = hidden_states.shape[0]
            R = state["rows"]
            if R is None or R % n_settings:  # not a replicated sweep batch: leave it alone
                return orig(hidden_states, *args, **kwargs)
            n = R // n_settings

            def cut(x):  # per-row tensors (mask, rotary tables, position ids) keep the first copy
                if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == R:
                    return x[:n]
                return tuple(cut(y) for y in x) if isinstance(x, tuple) else x
            out = orig(hidden_states[:n], **{k: cut(v) for k, v in kwargs.items()})
            if prefill:  # this block's cache now holds N rows: tile it like the hidden states
                entry = cache.layers[idx]
                entry.keys = entry.keys.repeat(n_settings, *[1] * (entry.keys.dim() - 1))
                entry.values = entry.values.repeat(n_settings, *[1] * (entry.values.dim() - 1))
            h = output_tensor(out)
            return replace_output(out, h.repeat(n_settings, *[1] * (h.dim() - 1)) if last else h)
        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = wrap(originals[i][0], i, i == 0, i == len(layers) - 1)
        yield
    finally:
        for layer, (orig, own) in zip(layers, originals):
            if own:
                layer.forward = orig
            else:
                del layer.forward  # back to the class's forward


def _tileable(cache, idx: int) -> bool:
    """A KV cache whose entry ``idx`` is :func:`mechdiff.models.measures.plain_kv` (its rows can be tiled)."""
    layers = getattr(cache, "layers", None)
    return layers is not None and idx < len(layers) and plain_kv(layers[idx]) and hasattr(cache, "get_seq_length")


def sweep(model: torch.nn.Module, interventions: Sequence[Intervention], measure: Callable,
          seqs: Sequence, max_rows: int = 2048, reuse_prefix: bool = True) -> list:
    """Run ``measure(model, rows)`` once per chunk of settings, on the prompts replicated setting-major.

    ``seqs`` holds N per-prompt items (e.g. token-id lists or (prompt, continuation) tuples);
    ``measure`` returns a tensor (or tuple of tensors) with the row axis first. Settings are chunked so
    that a forward holds at most ``max_rows`` rows (at least one setting per chunk). With
    ``reuse_prefix``, blocks below the first intervened one run once per chunk (:func:`shared_prefix`).

    Returns
    -------
    list of Tensor, one per output of ``measure``, each of shape (S, N, ...).
    """
    n = len(seqs)
    per_chunk = max(1, max_rows // max(n, 1))
    outs: list[list[torch.Tensor]] = []
    for start in range(0, len(interventions), per_chunk):
        chunk = interventions[start:start + per_chunk]
        used = [i for iv in chunk if not _is_identity(iv) for i in iv.layers]
        first = min(used) if used and reuse_prefix else 0
        with intervene(model, chunk), shared_prefix(model, len(chunk), first):
            res = measure(model, list(seqs) * len(chunk))
        res = res if isinstance(res, tuple) else (res,)
        outs.append([r.reshape(len(chunk), n, *r.shape[1:]) for r in res])
    return [torch.cat(parts) for parts in zip(*outs)]
