"""Activation patching: run a model with a site's values replaced at chosen positions.

Shapes: ``positions`` (n_sel, 2) rows ``(batch, token)``; ``values`` (n_sel, d) for those rows;
logits come back as (n_out, vocab) float32 at ``logit_positions``. Patching a model with its own
activations is an exact no-op (tested).
"""

from __future__ import annotations

import math

import torch

from mechdiff.architecture import adapter_for, parse_site
from mechdiff.hooks import hooks, output_tensor, replace_output


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
