"""RQ3, the head_patch stage's science: which heads of a chosen layer carry the fine-tune's change.

Per layer (:func:`sweep_layer`): every single-head edit of every kind (:mod:`mechdiff.rq3.head_sweep`) in both
models, summarised per split with p-values (:func:`mechdiff.rq3.head_stats.summarise_heads`); which heads are
above noise is decided over the whole run (:func:`mechdiff.rq3.head_stats.flag_above_noise`). Then
(:func:`confirm_layer`): the top heads above noise on dev (at most ``top_m``), confirmed on test against
random head sets of the same size, and the cumulative effect of the top-m heads (:func:`cumulative_settings`,
:func:`cumulative_table`), by patching rank and by attribution rank (:func:`attribution_ranking`), against
random sets. :func:`layer_metrics` and :func:`run_metrics` gather the stage's metrics.

The swap source and the mean-ablation means come from the base / both models' ``o_proj`` inputs; the means
over the dev prompts only, so the test split never feeds the mean it is ablated with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mechdiff.data.rendering import pad_batch
from mechdiff.rq3.head_stats import confirm_top, heads_above_noise, noise_summary, summarise_heads
from mechdiff.rq3.head_sweep import (HeadSetting, head_means, head_sweep, o_proj_inputs, random_head_sets,
                                 single_head_settings)

__all__ = ["attribution_ranking", "confirm_layer", "cumulative_settings", "cumulative_sizes", "cumulative_table",
           "layer_metrics", "run_metrics", "summary_line", "sweep_layer"]


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


# --------------------------------------------------------------------------------------------------
# one layer: sweep, ranking, confirmation


def attribution_ranking(scores: pd.DataFrame | None, layer: int, ids: set) -> list[int] | None:
    """Heads of ``layer`` by mean |grad x act| in the tuned model over prompts ``ids`` (most important
    first), or None without attribution scores."""
    if scores is None:
        return None
    d = scores[(scores["model"] == "tuned") & (scores["layer"] == layer)]
    d = d[d["id"].isin(ids)] if d["id"].isin(ids).any() else d
    if not len(d):
        return None
    mean = d.assign(a=d["score"].abs()).groupby("head")["a"].mean()
    return [int(h) for h in mean.sort_values(ascending=False, kind="stable").index]


def _layer_inputs(base, tuned, toks, rows, layer):
    """Pad ids, the base model's o_proj input at ``layer`` (the swap source) and both models' head means
    (over the dev prompts only, so the test split never feeds the mean it is ablated with)."""
    pads = [t.pad_token_id if t.pad_token_id is not None else t.eos_token_id for t in toks]
    rb, rt = [r["base"] for r in rows], [r["tuned"] for r in rows]
    (ib, mb), (it, mt) = (pad_batch([p + c for p, c in x], pad, "right") for x, pad in ((rb, pads[0]), (rt, pads[1])))
    n_heads = tuned.config.num_attention_heads
    source = o_proj_inputs(base, ib, mb, layer)
    dev = [r["split"] == "dev" for r in rows]
    means = [head_means(o_proj_inputs(m, i, k, layer), k, n_heads, use=dev)
             for m, i, k in ((base, ib, mb), (tuned, it, mt))]
    return pads, rb, rt, source, means


def sweep_layer(base, tuned, toks, rows, layer, q, seed):
    """Single-head settings of every kind in both models and the per-split summary (p-values; which heads
    are above noise is decided over the whole run, :func:`mechdiff.rq3.head_stats.flag_above_noise`).

    ``toks`` = (base tokenizer, tuned tokenizer); ``rows``: :func:`mechdiff.rq3.head_sweep.aligned_rows` of the
    target prompts; ``q``: :class:`mechdiff.params.config.HeadPatchParams`."""
    pads, rb, rt, source, means = _layer_inputs(base, tuned, toks, rows, layer)
    settings = single_head_settings(tuned.config.num_attention_heads, q.kinds)
    lp_t = head_sweep(tuned, rt, pads[1], layer, settings, means[1], source, q.max_rows).numpy()
    in_base = [i for i, s in enumerate(settings) if s.kind != "swap"]
    lp_b = np.full_like(lp_t, np.nan)
    lp_b[in_base] = head_sweep(base, rb, pads[0], layer, [settings[i] for i in in_base], means[0], None,
                               q.max_rows).numpy()
    split = np.array([r["split"] for r in rows])
    return pd.concat([summarise_heads(lp_t, lp_b, settings, np.flatnonzero(split == sp), q.n_bootstrap, seed)
                      .assign(layer=layer, split=sp) for sp in ("dev", "test")], ignore_index=True)


def confirm_layer(base, tuned, toks, rows, layer, table, q, seed, min_fraction, scores=None):
    """The top heads above noise on dev (at most ``top_m``; none when no head is above noise), their
    confirmation on test against random sets, and the cumulative effect of the top-m heads (by patching rank
    when a head is above noise, by attribution rank) against random sets. ``table``: this layer's flagged
    summary; ``scores``: the pair's attribution table (or None); other arguments as :func:`sweep_layer`.
    Returns the confirmation (dict) and the cumulative curve (:func:`cumulative_table` rows with ``layer``,
    ``kind``)."""
    pads, _, rt, source, means = _layer_inputs(base, tuned, toks, rows, layer)
    n_heads = tuned.config.num_attention_heads
    rank_kind = "swap" if "swap" in q.kinds else q.kinds[0]
    dev = table[(table["split"] == "dev") & (table["kind"] == rank_kind)]
    above = heads_above_noise(dev, rank_kind)
    top = tuple(sorted(above[:q.top_m]))
    split = np.array([r["split"] for r in rows])
    test = np.flatnonzero(split == "test")
    gap = float(table.loc[table["split"] == "test", "gap"].iloc[0])
    if top:
        sets = [top] + random_head_sets(n_heads, len(top), q.n_random, seed + layer, exclude=top)
        conf_settings = [HeadSetting("none")] + [HeadSetting(rank_kind, s) for s in sets]
        lp_c = head_sweep(tuned, rt, pads[1], layer, conf_settings, means[1], source, q.max_rows).numpy()
        confirm = {"kind": rank_kind, "top_heads": list(top), **confirm_top(lp_c, test, gap, min_fraction)}
    else:
        confirm = {"kind": rank_kind, "top_heads": [], "confirmed": False, "beats_random": False,
                   "text": noise_summary(dev, [rank_kind], q.fdr, f" at layer {layer} on dev")[rank_kind]["text"]
                   + "; no top heads to confirm"}
    order = dev["effect"].abs().sort_values(ascending=False, kind="stable").index
    rest = [int(h) for h in dev.loc[order, "head"] if int(h) not in above]
    rankings = {"patching": above + rest} if top else {}  # the heads above noise first
    by_attr = attribution_ranking(scores, layer, {r["id"] for r in rows if r["split"] == "dev"})
    if by_attr is not None:
        rankings["attribution"] = by_attr
    cum_settings, meta = cumulative_settings(rank_kind, rankings, n_heads, q.n_random, seed + layer)
    lp_cum = head_sweep(tuned, rt, pads[1], layer, cum_settings, means[1], source, q.max_rows).numpy()
    cumulative = cumulative_table(lp_cum, test, meta).assign(layer=layer, kind=rank_kind)
    return confirm, cumulative


def layer_metrics(table: pd.DataFrame, layer: int, confirm: dict, cumulative: pd.DataFrame, kinds: Sequence[str],
                  fdr: float) -> dict:
    """One layer's entry of the stage's metrics from its flagged summary ``table`` (both splits): the test
    split's log-prob gap (nats), the top-set confirmation and cumulative curve of :func:`confirm_layer`, and
    per kind the heads above noise on test (:func:`mechdiff.rq3.head_stats.noise_summary`) and the largest
    ``|effect|``."""
    test = table[table["split"] == "test"]
    noise = noise_summary(test, kinds, fdr, f" at layer {layer} on test")
    return {"gap_logprob": float(test["gap"].iloc[0]), "confirm_top": confirm,
            "cumulative": cumulative.drop(columns=["layer"]).to_dict("records"),
            "n_above_noise": {k: v["n_above_noise"] for k, v in noise.items()},
            "saw_change": [k for k, v in noise.items() if v["n_above_noise"]],
            "above_noise": noise,
            "max_abs_effect": {k: float(d["effect"].abs().max()) for k, d in test.groupby("kind")}}


def run_metrics(pair: str, task: str, rows: Sequence[dict], fdr: float, per_layer: Mapping[str, dict]) -> dict:
    """The stage's metrics: the pair, its target's ``task``, the prompts per split and per mode of the aligned
    ``rows``, the noise rule at the BH level ``fdr`` and ``per_layer`` (:func:`layer_metrics` by layer)."""
    return {"pair": pair, "task": task, "metric": "log-prob of the target continuation (nats)",
            "n_prompts": {sp: sum(r["split"] == sp for r in rows) for sp in ("dev", "test")},
            "modes": {m: sum(r["mode"] == m for r in rows) for m in ("strict", "base_ids")},
            "noise_rule": f"above noise: Benjamini-Hochberg q <= {fdr:g} over all heads x kinds x layers of a "
                          "split (two-sided one-sample t-test of the per-prompt effects)",
            "per_layer": per_layer}


def summary_line(pair: str, layers: Sequence[int], per_layer: Mapping[str, dict]) -> str:
    """The line the stage prints: per layer the confirmed top heads, or why there are none."""
    summary = ", ".join(f"L{k}: top {v['confirm_top']['top_heads']} confirmed={v['confirm_top']['confirmed']}"
                        if v["confirm_top"]["top_heads"] else f"L{k}: {v['confirm_top']['text']}"
                        for k, v in per_layer.items())
    return f"head_patch@{pair}: layers {layers}; {summary}"
