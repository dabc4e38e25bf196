"""Per-head edits of the head_patch stage (RQ3): zero / mean ablation and cross-model swap, all heads at once.

A head is its slice ``[h * head_dim, (h + 1) * head_dim)`` of the ``o_proj`` input (grouped-query
attention safe: key/value heads are shared, the per-query-head outputs are not; P33, P34). A
:class:`HeadSetting` edits a set of heads of one layer in one way: ``zero``, ``mean`` (the head's mean
output over the prompt set's real tokens, P31) or ``swap`` (the other model's output of the same
head on the same tokens). ``none`` is the clean run. No edit writes position 0 (the BOS, the attention
sink): the hook leaves the first ``protect`` positions of every row as they are, and the mean is taken
over the dev prompts' real tokens after the BOS (:func:`head_means`), so the test split is never seen
by what it is scored with.

All settings of a layer run in ONE batched forward (row ``r`` = setting ``r // N``, prompt ``r % N``), and
the unchanged layers below the edited layer run once on one copy of the prompts (prefix reuse, the same
mechanism as the steering sweep: :func:`mechdiff.models.interventions.shared_prefix`); only the continuation's
positions reach ``lm_head``. Tested equal to the full forward (:func:`head_sweep_full`).

Legend: S settings, N prompts, R = S * N rows, T tokens, D d_model, H query heads, E head_dim, C
continuation length.

Which heads are above noise: :mod:`mechdiff.rq3.head_stats`; the stage's per-layer ranking, confirmation and
cumulative curve: :mod:`mechdiff.rq3.head_patch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechdiff.data.rendering import pad_batch
from mechdiff.models.architecture import adapter_for
from mechdiff.models.hooks import hooks
from mechdiff.models.interventions import shared_prefix
from mechdiff.models.measures import summed_logprob

KINDS = ("none", "zero", "mean", "swap")

__all__ = ["HeadSetting", "KINDS", "aligned_rows", "edit_o_proj_in_pre_hook", "head_means", "head_sweep",
           "head_sweep_full", "o_proj_inputs", "random_head_sets", "single_head_settings"]


@dataclass(frozen=True)
class HeadSetting:
    """Edit ``heads`` of the patched layer by ``kind`` (one of :data:`KINDS`)."""

    kind: str
    heads: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"head edit kind must be one of {KINDS}, got {self.kind!r}")


def single_head_settings(n_heads: int, kinds: Sequence[str]) -> list[HeadSetting]:
    """The clean setting followed by every (kind, single head)."""
    return [HeadSetting("none")] + [HeadSetting(k, (h,)) for k in kinds for h in range(n_heads)]


# --------------------------------------------------------------------------------------------------
# the hook


def edit_o_proj_in_pre_hook(settings: Sequence[HeadSetting], n_prompts: int, n_heads: int,
                            mean: torch.Tensor | None = None, source: torch.Tensor | None = None,
                            protect: int = 1):
    """Forward-pre hook on ``o_proj`` editing head slices row by row.

    ``mean`` (H, E): per-head mean output; ``source`` (N, T, H * E): the other model's ``o_proj`` input on
    the same padded tokens (needed by ``swap``). Input rows must be ``len(settings) * n_prompts``. The
    first ``protect`` positions (the BOS sink; every row starts with one BOS) are never written.
    """
    S = len(settings)
    sel = torch.zeros(S, n_heads)
    for s, st in enumerate(settings):
        sel[s, list(st.heads)] = 1.0
    is_mean = torch.tensor([st.kind == "mean" for st in settings], dtype=torch.bool)
    is_swap = torch.tensor([st.kind == "swap" for st in settings], dtype=torch.bool)
    if is_mean.any() and mean is None or is_swap.any() and source is None:
        raise ValueError("mean ablation needs `mean` (H, E) and swap needs `source` (N, T, H*E)")

    def hook(_module, args):
        x = args[0]  # (R, T, H*E)
        R, T, W = x.shape
        if R != S * n_prompts:
            raise ValueError(f"o_proj input has {R} rows, expected {S} settings x {n_prompts} prompts")
        xs = x.reshape(S, n_prompts, T, n_heads, W // n_heads)  # (S, N, T, H, E)
        keep = (torch.arange(T, device=x.device) >= protect).to(x.dtype)  # (T,): 0 at the protected positions
        m = sel.to(x.device, x.dtype)[:, None, None, :, None] * keep[None, None, :, None, None]  # (S, 1, T, H, 1)
        value = torch.zeros_like(xs)
        if is_mean.any():
            value[is_mean.to(x.device)] = mean.to(x.device, x.dtype)  # broadcast (H, E)
        if is_swap.any():
            src = source.to(x.device, x.dtype).reshape(n_prompts, T, n_heads, W // n_heads)
            value[is_swap.to(x.device)] = src
        out = xs * (1 - m) + value * m
        return (out.reshape(R, T, W),) + tuple(args[1:])

    return hook


# --------------------------------------------------------------------------------------------------
# sweeps


def _continuation_positions(rows: Sequence[tuple[Sequence[int], Sequence[int]]]):
    """Right-padded ids/mask of prompt+continuation, positions (N, C) predicting the continuation and
    targets (N, C) with -1 where a row's continuation is shorter than C."""
    width = max(len(c) for _, c in rows)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    tgt = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        pos[i, : len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        tgt[i, : len(c)] = torch.as_tensor(list(c))
    return pos, tgt


@torch.no_grad()
def o_proj_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """The ``o_proj`` input (N, T, H * E) of block ``layer`` (all positions)."""
    got = {}
    o_proj = adapter_for(model).layers[layer].self_attn.o_proj
    dev = next(model.parameters()).device  # inputs follow the model
    with hooks(pre=[(o_proj, lambda _m, args: got.__setitem__("x", args[0].detach().clone()))]):
        model.model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False)
    return got["x"]


def head_means(o_in: torch.Tensor, attention_mask: torch.Tensor, n_heads: int, skip_first: bool = True,
               use=None) -> torch.Tensor:
    """Per-head mean output (H, E) over real tokens (mask (N, T)) of the prompts selected by ``use`` ((N,)
    bool, e.g. the dev split; None: all); the BOS sink is skipped by default."""
    m = attention_mask.to(o_in.device).bool().clone()
    if use is not None:
        m &= torch.as_tensor(np.asarray(use, dtype=bool), device=m.device)[:, None]
    if skip_first:
        m[:, 0] = False
    x = o_in[m].double()  # (n_tokens, H*E)
    return x.mean(0).reshape(n_heads, -1).to(o_in.dtype)


@torch.no_grad()
def head_sweep(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, layer: int,
               settings: Sequence[HeadSetting], mean: torch.Tensor | None = None,
               source: torch.Tensor | None = None, max_rows: int = 2048) -> torch.Tensor:
    """Continuation log-prob (S, N) float64 of every setting, with prefix reuse.

    ``rows`` are (prompt ids, continuation ids) per prompt; ``source`` (N, T, H*E) must come from the
    same right-padded prompt+continuation ids (see :func:`o_proj_inputs`). The settings' rows are the
    prompts replicated setting-major, at most ``max_rows`` per forward; the blocks below ``layer`` run once
    per forward on one copy (:func:`mechdiff.models.interventions.shared_prefix`), and only the continuation's
    positions reach ``lm_head``.
    """
    adapter = adapter_for(model)
    dev = next(model.parameters()).device
    ids, mask = pad_batch([list(p) + list(c) for p, c in rows], pad_id, "right")
    ids, mask = ids.to(dev), mask.to(dev)
    pos, tgt = (x.to(dev) for x in _continuation_positions(rows))
    n = len(rows)
    per_chunk = max(1, max_rows // n)
    out = []
    for start in range(0, len(settings), per_chunk):
        chunk = list(settings[start:start + per_chunk])
        hook = edit_o_proj_in_pre_hook(chunk, n, adapter.n_heads, mean, source)
        rep = len(chunk)
        with hooks(pre=[(adapter.layers[layer].self_attn.o_proj, hook)]), shared_prefix(model, rep, layer):
            hidden = model.model(input_ids=ids.repeat(rep, 1), attention_mask=mask.repeat(rep, 1),
                                 use_cache=False).last_hidden_state  # (R, T, D), after the final norm
        at = pos.repeat(rep, 1)  # (R, C)
        hidden = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # (R, C, D)
        out.append(summed_logprob(model, hidden, tgt.repeat(rep, 1)).reshape(rep, n).cpu())
    return torch.cat(out)


@torch.no_grad()
def head_sweep_full(model, rows, pad_id: int, layer: int, settings: Sequence[HeadSetting],
                    mean: torch.Tensor | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for :func:`head_sweep`: one full forward per setting, no prefix reuse (S, N)."""
    adapter = adapter_for(model)
    dev = next(model.parameters()).device
    ids, mask = pad_batch([list(p) + list(c) for p, c in rows], pad_id, "right")
    ids, mask = ids.to(dev), mask.to(dev)
    pos, tgt = _continuation_positions(rows)
    out = []
    for st in settings:
        hook = edit_o_proj_in_pre_hook([st], len(rows), adapter.n_heads, mean, source)
        with hooks(pre=[(adapter.layers[layer].self_attn.o_proj, hook)]):
            hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        sel = hidden.gather(1, pos.to(dev)[..., None].expand(-1, -1, hidden.shape[-1]))  # (N, C, D)
        out.append(summed_logprob(model, sel, tgt.to(dev)).cpu())
    return torch.stack(out)


def random_head_sets(n_heads: int, m: int, n_sets: int, seed: int,
                     exclude: Sequence[int] = ()) -> list[tuple[int, ...]]:
    """``n_sets`` random sets of ``m`` heads (seeded), avoiding ``exclude`` when enough heads remain."""
    rng = np.random.default_rng(seed)
    pool = [h for h in range(n_heads) if h not in set(exclude)]
    pool = pool if len(pool) >= m else list(range(n_heads))
    return [tuple(sorted(int(h) for h in rng.choice(pool, size=m, replace=False))) for _ in range(n_sets)]


# --------------------------------------------------------------------------------------------------
# rows both models read position by position


def aligned_rows(frame, toks, continuations: Sequence[str], modes: Sequence[str]) -> list[dict]:
    """Per prompt, ``(prompt ids, continuation ids)`` for the base and the tuned model such that both
    sequences line up token by token (needed by the cross-model swap): the first of ``modes`` among
    ``strict`` (identical token strings, each model its own ids) and ``base_ids`` (both read the base
    ids) that keeps the prompt and its continuation. Prompts neither mode keeps are left out."""
    tb, tt = toks
    out = []
    for r, cont in zip(frame.to_dict("records"), continuations):
        cb = tb(cont, add_special_tokens=False)["input_ids"]
        ct = tt(cont, add_special_tokens=False)["input_ids"]
        for mode in modes:
            if mode == "base_ids" and r.get("kept_base_ids"):
                pb = list(map(int, r["base_input_ids"]))
                out.append({"base": (pb, cb), "tuned": (pb, cb), "mode": mode, "split": r["split"], "id": r["id"]})
                break
            if mode == "strict" and r.get("kept_strict") and \
                    tb.convert_ids_to_tokens(cb) == tt.convert_ids_to_tokens(ct):
                out.append({"base": (list(map(int, r["base_input_ids"])), cb),
                            "tuned": (list(map(int, r["tuned_input_ids"])), ct), "mode": mode, "split": r["split"],
                            "id": r["id"]})
                break
    return out
