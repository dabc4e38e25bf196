"""Logit masking to the shared vocabulary, aligned through the id map, and KL on the shared support.

Shapes: ``...`` = any leading axes (batch, position); V = a model's logit width (its embedding rows,
which may exceed ``len(tokenizer)``); n_shared = shared strings. Masking then softmax renormalises, so
a KL on the shared support is a conditional KL: always read it together with the mass each model put
outside the shared ids (``lost_mass``), which is computed in float64 from the unmasked softmax.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from mechdiff.data.rendering import pad_batch


def _as_ids(ids) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("the allowed id set is empty")
    return ids


def allowed_mask(allowed_ids, vocab_size: int) -> torch.Tensor:
    """(V,) bool mask, True at ``allowed_ids`` ((k,) ints)."""
    ids = _as_ids(allowed_ids)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"allowed ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return mask


def _to_mask(allowed, vocab_size: int) -> torch.Tensor:
    allowed = torch.as_tensor(np.asarray(allowed) if not torch.is_tensor(allowed) else allowed)
    if allowed.dtype == torch.bool:
        if allowed.shape[-1] != vocab_size:
            raise ValueError(f"allowed mask has width {allowed.shape[-1]}, logits have {vocab_size}")
        return allowed
    return allowed_mask(allowed, vocab_size)


def lost_mass(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax probability outside ``allowed`` ((V,) or (..., V) bool), per row: shape (...), float64."""
    x = logits.double()
    outside = x.masked_fill(allowed, float("-inf"))
    return torch.exp(torch.logsumexp(outside, dim=-1) - torch.logsumexp(x, dim=-1))


@torch.no_grad()
def masked_mass_at_last(model, ids, allowed_ids, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Probability mass (n_prompts,) float64 the model puts outside ``allowed_ids`` ((k,) ints) at each prompt's
    last token; ``ids``: token ids per prompt (unpadded lists)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        input_ids, mask = (t.to(device) for t in pad_batch(ids[i:i + batch_size], pad_id, "right"))
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        last = logits[torch.arange(len(mask), device=device), mask.sum(1) - 1]
        out.append(lost_mass(last, allowed_mask(allowed_ids, last.shape[-1]).to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def mask_logits(logits: torch.Tensor, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    """Set logits outside the allowed set to -inf.

    ``logits`` (..., V); ``allowed`` (k,) ids, or a bool mask (V,) or (..., V) (one set per row).
    Returns ``masked`` (..., V), same dtype, and ``lost`` (...) float64, the softmax probability
    outside the allowed set. The argmax of ``masked`` is always allowed.
    """
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError("logits contain NaN or +inf")
    mask = _to_mask(allowed, logits.shape[-1])
    masked = logits.masked_fill(~mask, float("-inf"))
    if not torch.isfinite(masked).any(dim=-1).all():
        raise ValueError("some rows have no finite logit inside the allowed set")
    return masked, lost_mass(logits, mask)


def _id_map(id_map) -> tuple[torch.Tensor, torch.Tensor]:
    """(base_ids, tuned_ids), each (n_shared,) int64, from a VocabReport or a pair of arrays."""
    base, tuned = (id_map.base_ids, id_map.tuned_ids) if hasattr(id_map, "base_ids") else id_map
    base, tuned = _as_ids(base), _as_ids(tuned)
    if base.shape != tuned.shape:
        raise ValueError(f"id map halves differ in length: {base.numel()} vs {tuned.numel()}")
    return base, tuned


def gather_shared(logits_base: torch.Tensor, logits_tuned: torch.Tensor,
                  id_map) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both models' logits (..., V_base) and (..., V_tuned) to the shared strings, in id-map
    order: returns ``lb``, ``lt`` of shape (..., n_shared) where index k is the same string in both.
    ``id_map``: a :class:`~mechdiff.fairness.vocab.VocabReport` or ``(base_ids, tuned_ids)``."""
    base, tuned = _id_map(id_map)
    for name, logits, ids in (("base", logits_base, base), ("tuned", logits_tuned, tuned)):
        if ids.max() >= logits.shape[-1]:
            raise ValueError(f"{name} id {int(ids.max())} is outside its logits' width {logits.shape[-1]}")
    return logits_base.index_select(-1, base), logits_tuned.index_select(-1, tuned)


class SharedKL(NamedTuple):
    """KL on the shared support and the mass each model put outside it; each (...), float64."""

    kl: torch.Tensor
    lost_base: torch.Tensor
    lost_tuned: torch.Tensor


def shared_kl(logits_base: torch.Tensor, logits_tuned: torch.Tensor, id_map,
              direction: Literal["tuned||base", "base||tuned"] = "tuned||base") -> SharedKL:
    """KL between the two next-token distributions renormalised on the shared ids (float64).

    ``direction`` ``"tuned||base"`` is KL(P_tuned || P_base). Inputs as in :func:`gather_shared`.
    """
    if direction not in ("tuned||base", "base||tuned"):
        raise ValueError(f"direction must be 'tuned||base' or 'base||tuned', got {direction!r}")
    base, tuned = _id_map(id_map)
    lb, lt = gather_shared(logits_base, logits_tuned, (base, tuned))
    logp_b, logp_t = lb.double().log_softmax(-1), lt.double().log_softmax(-1)  # (..., n_shared)
    logp, logq = (logp_t, logp_b) if direction == "tuned||base" else (logp_b, logp_t)
    p = logp.exp()
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    return SharedKL(kl=kl,
                    lost_base=lost_mass(logits_base, allowed_mask(base, logits_base.shape[-1])),
                    lost_tuned=lost_mass(logits_tuned, allowed_mask(tuned, logits_tuned.shape[-1])))
