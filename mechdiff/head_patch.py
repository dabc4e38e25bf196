"""RQ3 head importance: per-head zero ablation, mean ablation and cross-model swap, all heads at once.

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
mechanism as the steering sweep: :func:`mechdiff.interventions.shared_prefix`); only the continuation's
positions reach ``lm_head``. Tested equal to the full forward (:func:`head_sweep_full`).

Legend: S settings, N prompts, R = S * N rows, T tokens, D d_model, H query heads, E head_dim, C
continuation length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mechdiff.architecture import adapter_for
from mechdiff.hooks import hooks
from mechdiff.interventions import shared_prefix
from mechdiff.measures import summed_logprob
from mechdiff.rendering import pad_batch
from mechdiff.stats import percentile_interval, resample_indices

KINDS = ("none", "zero", "mean", "swap")

__all__ = ["HeadSetting", "KINDS", "bh_qvalues", "cumulative_settings", "cumulative_sizes",
           "cumulative_table", "edit_o_proj_in_pre_hook", "flag_above_noise", "head_means", "head_sweep",
           "head_sweep_full", "heads_above_noise", "noise_summary", "o_proj_inputs",
           "random_head_sets", "single_head_settings", "summarise_heads", "t_test_p_values"]


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
    per forward on one copy (:func:`mechdiff.interventions.shared_prefix`), and only the continuation's
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
# summaries


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    f = d
    for m in range(1, 400):  # the fraction's even and odd terms, m(b-m)x/... and -(a+m)(a+b+m)x/...
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + num * d)
            c = guard(1.0 + num / c)
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_test_p_values(per_prompt: np.ndarray) -> np.ndarray:
    """Two-sided one-sample t-test p-values (K,) of per-prompt effects ``per_prompt`` (K, N) against a mean
    of 0: ``t = mean / (sd / sqrt(N))`` with N - 1 degrees of freedom (Student's t, not the normal: with tens
    of prompts the normal tail, at the small p that a correction over many heads reads, is too light).

    No spread (every prompt moves by the same amount): p = 1 for an effect of exactly 0 (the head's edit
    changed nothing, e.g. a swap of identical inputs), 0 otherwise. NaN for a row with a non-finite value
    or fewer than 2 prompts.
    """
    x = np.asarray(per_prompt, float)
    out = np.full(x.shape[0], np.nan)
    n = x.shape[1]
    for k, row in enumerate(x):
        if n < 2 or not np.isfinite(row).all():
            continue
        mean, sd = float(row.mean()), float(row.std(ddof=1))
        if sd == 0.0 or not sd > 1e-12 * abs(mean):  # identical values up to rounding
            out[k] = 1.0 if mean == 0.0 else 0.0
            continue
        t2 = n * mean * mean / (sd * sd)
        out[k] = _betainc((n - 1) / 2.0, 0.5, (n - 1) / (n - 1 + t2))  # P(|T_{N-1}| >= |t|)
    return out


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (K,) of ``p`` (K,): ``q_(i) = min_{j >= i} p_(j) * m / j`` over
    the ascending order, capped at 1; ``q <= alpha`` rejects exactly the BH step-up set at FDR ``alpha``.
    NaN p-values are not tested (not counted in m) and get NaN."""
    p = np.asarray(p, float)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def summarise_heads(lp_tuned: np.ndarray, lp_base: np.ndarray, settings: Sequence[HeadSetting], cols: np.ndarray,
                    n_boot: int, seed: int) -> pd.DataFrame:
    """Per edited setting (setting 0 must be ``none``): the change of the target log-prob and its noise.

    ``lp_tuned``/``lp_base`` (S, N): continuation log-probs of each setting in the tuned and the base model
    (NaN rows where a setting was not run in that model, e.g. ``swap`` in the base); ``cols`` the prompts
    summarised. Columns: ``delta_tuned``/``delta_base`` (mean change vs clean, nats), ``churn`` = delta_tuned -
    delta_base (how differently the two models use the head), ``fraction_closed`` = share of the
    base-to-tuned log-prob gap closed in the tuned model, ``effect`` (the model-difference measure: the
    swap's delta, or the churn), ``se`` and ``ci_low``/``ci_high`` (bootstrap over prompts) and ``p_value``
    (two-sided t-test of the per-prompt effects, :func:`t_test_p_values`). Which heads are above noise
    depends on every test of the run: :func:`flag_above_noise` adds it.
    """
    if settings[0].kind != "none":
        raise ValueError("setting 0 must be the clean run (kind 'none')")
    t, b = lp_tuned[:, cols], lp_base[:, cols]
    gap = float(t[0].mean() - b[0].mean())
    boot = resample_indices(len(cols), n_boot, seed)
    rows = []
    for s, st in enumerate(settings[1:], start=1):
        d_t, d_b = t[s] - t[0], b[s] - b[0]
        effect_pp = d_t if st.kind == "swap" else d_t - d_b  # per prompt
        means = effect_pp[boot].mean(1)
        se = float(means.std()) if np.isfinite(means).all() else float("nan")
        effect = float(effect_pp.mean())
        swap = st.kind == "swap"
        rows.append({"kind": st.kind, "heads": " ".join(map(str, st.heads)),
                     "head": st.heads[0] if len(st.heads) == 1 else -1, "delta_tuned": float(d_t.mean()),
                     "delta_base": float("nan") if swap else float(d_b.mean()),
                     "churn": float((d_t - d_b).mean()) if st.kind != "swap" else float("nan"),
                     "fraction_closed": -float(d_t.mean()) / gap if abs(gap) > 1e-6 else float("nan"),
                     "effect": effect, "se": se, **dict(zip(("ci_low", "ci_high"), percentile_interval(means))),
                     "p_value": float(t_test_p_values(effect_pp[None])[0]),
                     "gap": gap, "n_prompts": len(cols)})
    return pd.DataFrame(rows)


def flag_above_noise(table: pd.DataFrame, fdr: float, family: Sequence[str] = ()) -> pd.DataFrame:
    """``table`` with ``q_value`` (Benjamini-Hochberg over every row with the same values of the ``family``
    columns, e.g. ``("split",)``: all heads x kinds x layers of one split of a stage run; ``()``: the whole
    table) and ``above_noise`` = ``q_value <= fdr``; rows with a NaN ``p_value`` are not tested and never
    above noise."""
    p = table["p_value"].to_numpy(float)
    q = np.full(len(p), np.nan)
    groups = table.groupby(list(family), sort=False).indices.values() if family else [np.arange(len(p))]
    for idx in groups:  # positions
        q[idx] = bh_qvalues(p[idx])
    return table.assign(q_value=q, above_noise=q <= fdr)


def heads_above_noise(table: pd.DataFrame, kind: str) -> list[int]:
    """Single heads of ``kind`` flagged ``above_noise`` in ``table`` (one layer, one split), largest
    ``|effect|`` first (ties by head index)."""
    d = table[(table["kind"] == kind) & (table["head"] >= 0) & table["above_noise"].astype(bool)]
    d = d.assign(a=-d["effect"].abs()).sort_values(["a", "head"], kind="stable")
    return [int(h) for h in d["head"]]


def noise_summary(table: pd.DataFrame, kinds: Sequence[str], fdr: float, where: str = "") -> dict:
    """Which kinds of patching saw a change in ``table`` (one layer, one split, flagged by
    :func:`flag_above_noise`): per kind ``{"n_above_noise", "n_heads", "heads" (largest |effect| first),
    "text"}``; ``text`` names the heads, or says that no head is above noise at the BH level ``fdr``."""
    out = {}
    for kind in kinds:
        heads = heads_above_noise(table, kind)
        n = int(((table["kind"] == kind) & (table["head"] >= 0)).sum())
        rule = f"BH q <= {fdr:g}"
        text = (f"{len(heads)} of {n} heads above noise ({rule}) for {kind}{where}: {', '.join(map(str, heads))}"
                if heads else f"no head above noise ({rule}) for {kind}{where}")
        out[kind] = {"n_above_noise": len(heads), "n_heads": n, "heads": heads, "text": text}
    return out


# --------------------------------------------------------------------------------------------------
# rows both models read position by position, and the top-head confirmation


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


def confirm_top(lp: np.ndarray, cols: np.ndarray, gap: float, min_fraction: float) -> dict:
    """Top-set row 1 against random-set rows 2.. (row 0 clean), on prompts ``cols``: effects (mean change of
    the target log-prob), the top set's fraction of the gap closed, its percentile among the random sets,
    and ``confirmed``: larger in magnitude than every random set AND closing at least ``min_fraction`` of
    the base-to-tuned gap (a statistically clear but negligible effect is not a finding; no gap, no
    confirmation)."""
    eff = (lp[:, cols] - lp[0, cols]).mean(1)
    top, rand = float(eff[1]), eff[2:]
    frac = -top / gap if abs(gap) > 1e-6 else float("nan")
    return {"top_effect": top, "top_fraction_closed": frac, "random_effect_mean": float(rand.mean()),
            "random_abs_q95": float(np.quantile(np.abs(rand), 0.95)),
            "percentile_abs": float((np.abs(rand) < abs(top)).mean()),
            "beats_random": bool(abs(top) > np.abs(rand).max()),
            "confirmed": bool(abs(top) > np.abs(rand).max() and abs(frac) >= min_fraction)}


# --------------------------------------------------------------------------------------------------
# cumulative effect of the top heads


def cumulative_sizes(n_heads: int) -> list[int]:
    """Set sizes 1, 2, 4, ... below ``n_heads``, then ``n_heads`` (the whole layer)."""
    sizes, m = [], 1
    while m < n_heads:
        sizes.append(m)
        m *= 2
    return sizes + [n_heads]


def cumulative_settings(kind: str, rankings: Mapping[str, Sequence[int]], n_heads: int, n_random: int,
                        seed: int) -> tuple[list[HeadSetting], list[dict]]:
    """Settings for the cumulative-effect curve of one layer, clean first then the whole layer: for every
    size m of :func:`cumulative_sizes`, the top-m heads of each ranking (``rankings``: name -> heads, most
    important first) and ``n_random`` random sets of m heads. Returns the settings and, per setting,
    ``{"order": ranking name | "random" | "clean" | "layer", "m": size}``."""
    settings, meta = [HeadSetting("none"), HeadSetting(kind, tuple(range(n_heads)))], \
        [{"order": "clean", "m": 0}, {"order": "layer", "m": n_heads}]
    for m in cumulative_sizes(n_heads):
        for name, ranking in rankings.items():
            settings.append(HeadSetting(kind, tuple(sorted(int(h) for h in list(ranking)[:m]))))
            meta.append({"order": name, "m": m})
        for heads in random_head_sets(n_heads, m, n_random, seed + m):
            settings.append(HeadSetting(kind, heads))
            meta.append({"order": "random", "m": m})
    return settings, meta


def cumulative_table(lp: np.ndarray, cols: np.ndarray, meta: Sequence[Mapping]) -> pd.DataFrame:
    """Fraction of the whole layer's effect recovered by each top-m set, on prompts ``cols``.

    ``lp`` (S, N) target log-probs of :func:`cumulative_settings`' settings. One row per (order, m):
    ``effect`` (mean change of the target log-prob vs clean), ``fraction_of_layer`` (effect / the whole
    layer's effect; NaN when the layer has no effect), and for ``random`` the mean and the 5% / 95%
    quantiles over its sets.
    """
    eff = (lp[:, cols] - lp[0, cols]).mean(1)
    full = float(eff[1])

    def frac(x):
        return x / full if abs(full) > 1e-9 else np.full_like(np.asarray(x, float), np.nan)

    frame = pd.DataFrame(list(meta)).assign(effect=eff)[2:]
    rows = []
    for (order, m), d in frame.groupby(["order", "m"], sort=True):
        f = frac(d["effect"].to_numpy())
        rows.append({"order": order, "m": int(m), "effect": float(d["effect"].mean()),
                     "fraction_of_layer": float(np.mean(f)), "fraction_q05": float(np.quantile(f, 0.05)),
                     "fraction_q95": float(np.quantile(f, 0.95)), "n_sets": len(d), "layer_effect": full})
    return pd.DataFrame(rows)
