"""Activation patching: run a model with a site's values replaced at chosen positions.

Shapes: ``positions`` (n_sel, 2) rows ``(batch, token)``; ``values`` (n_sel, d) for those rows;
logits come back as (n_out, vocab) float32 at ``logit_positions``. Patching a model with its own
activations is an exact no-op (tested).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mechdiff.models.architecture import adapter_for, parse_site
from mechdiff.models.hooks import hooks, output_tensor, replace_output
from mechdiff.stats import resample_counts


def replace_resid_post_hook(positions: torch.Tensor, values: torch.Tensor):
    """Forward hook writing ``values`` into a block's output at ``positions``."""
    b, p = positions[:, 0], positions[:, 1]

    def hook(_module, _inputs, output):
        h = output_tensor(output).clone()
        h[b.to(h.device), p.to(h.device)] = values.to(h.device, h.dtype)
        return replace_output(output, h)

    return hook


def replace_o_proj_in_pre_hook(positions: torch.Tensor, values: torch.Tensor, cols: slice | None = None):
    """Forward-pre hook writing ``values`` into ``o_proj``'s input (optionally only columns ``cols``)."""
    b, p = positions[:, 0], positions[:, 1]
    cols = cols if cols is not None else slice(None)

    def hook(_module, args):
        x = args[0].clone()
        x[b.to(x.device), p.to(x.device), cols] = values.to(x.device, x.dtype)
        return (x,) + tuple(args[1:])

    return hook


@torch.no_grad()
def run_patched(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, site: str,
                positions: torch.Tensor, values: torch.Tensor, logit_positions: torch.Tensor) -> torch.Tensor:
    """Logits (n_out, vocab) float32 of ``model`` with ``site`` replaced by ``values`` at ``positions``."""
    module = adapter_for(model).module(site)
    _, kind = parse_site(site)
    if kind == "attn.o_proj_in":
        ctx = hooks(pre=[(module, replace_o_proj_in_pre_hook(positions, values))])
    else:
        ctx = hooks(post=[(module, replace_resid_post_hook(positions, values))])
    device = next(model.parameters()).device  # inputs follow the model
    with ctx:
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    rows, cols = logit_positions[:, 0].to(logits.device), logit_positions[:, 1].to(logits.device)
    return logits[rows, cols].float().cpu()


def fraction_closed(gap: float, remaining: float, eps: float = 1e-9) -> float:
    """Share of a divergence ``gap`` closed by an intervention that leaves ``remaining``.

    Returns ``nan`` when there is no gap to close (``gap <= eps``), never a division by zero.
    """
    if not math.isfinite(gap) or gap <= eps:
        return float("nan")
    return 1.0 - remaining / gap


def bootstrap_closed(gap: np.ndarray, remaining: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     eps: float = 1e-9) -> np.ndarray:
    """Fractions of the mean gap closed (:func:`fraction_closed` of the means) on prompt resamples.

    ``gap`` and ``remaining`` (n_prompts, m): one row per prompt, one column per quantity (a layer and
    direction, an arm, ...), the rows paired across columns, so every column is resampled with the same
    prompts. Returns (n_boot, m), ``nan`` where a resample has no gap to close. The draws depend only on
    ``seed`` and ``n_prompts``: two calls on the same prompts (in the same order) resample them alike.
    """
    gap, remaining = np.asarray(gap, np.float64), np.asarray(remaining, np.float64)
    n = len(gap)
    counts = resample_counts(n, n_boot, seed).astype(np.float64) / n  # (n_boot, n)
    g, r = counts @ gap, counts @ remaining
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isfinite(g) & (g > eps), 1.0 - r / g, np.nan)
