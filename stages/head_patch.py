"""Stage head_patch (RQ3): per-head zero / mean ablation and base->tuned swap at the chosen layers.

    python -m stages.head_patch --pair cultural --filtered data/filtered/cultural \
        --layers artifacts/results/cultural/layers.json --table artifacts/results/cultural/head_patch.csv \
        --metrics artifacts/results/cultural/head_patch.json --fig figs/head_patch_cultural.png

Metric: the log-probability of the target continuation (the refusal opening; the correct answer).
All heads of a layer run in one batched forward with prefix reuse (mechdiff.head_patch). A head is above
noise when its Benjamini-Hochberg q-value, over every head x kind x layer of a split of this run, is at most
``head_patch.fdr``. The top heads are the (at most ``top_m``) heads above noise on dev, largest effect first,
confirmed on test against random head sets of the same size; with no head above noise none is named, and the
metrics say so per kind (``above_noise``: count, heads and a sentence per kind; ``saw_change``: the kinds
that found a head).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechdiff import head_patch as hp  # noqa: E402
from mechdiff import steering  # noqa: E402
from mechdiff.rendering import pad_batch  # noqa: E402
from mechdiff.target import resolve as resolve_target  # noqa: E402
from stages.common import (StageError, atomic_write, atomic_write_json, finite, load_pair_params,  # noqa: E402
                           progress, read_table, run_stage)
from stages.pair_io import load_pair  # noqa: E402


def plot(table: pd.DataFrame, pair: str, path: str) -> None:
    """Histogram of head importance (|change of the target log-prob|, test split) per kind and layer."""
    layers = sorted(table["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        sub = table[(table["layer"] == layer) & (table["split"] == "test") & (table["heads"].str.count(" ") == 0)]
        for kind, d in sub.groupby("kind", sort=True):
            ax.hist(d["effect"].abs(), bins=min(20, max(3, len(d))), alpha=0.5, label=kind)
        ax.set(title=f"layer {layer}", xlabel="|effect| on target log-prob (nats)", ylabel="heads")
        ax.legend(fontsize=7)
    fig.suptitle(f"Head importance: {pair} (swap: base head into tuned; zero/mean: churn tuned - base)", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def plot_cumulative(curves: dict, pair: str, path: str) -> None:
    """Fraction of the whole layer's effect recovered by the top-m heads (test split), per ranking, with
    the random sets' 5-95% band."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for ax, (layer, cum) in zip(axes[0], curves.items()):
        for order, d in cum.groupby("order", sort=True):
            d = d.sort_values("m")
            if order == "random":
                ax.fill_between(np.log2(d["m"]), d["fraction_q05"], d["fraction_q95"], color="grey", alpha=0.3,
                                label="random sets (5-95%)")
                ax.plot(np.log2(d["m"]), d["fraction_of_layer"], color="grey", ls="--")
            else:
                ax.plot(np.log2(d["m"]), d["fraction_of_layer"], marker="o", label=f"top-m by {order} rank")
        sizes = sorted(cum["m"].unique())
        ax.set_xticks(np.log2(sizes), [str(m) for m in sizes])
        ax.set(title=f"layer {layer}", xlabel="heads patched together (m)", ylabel="fraction of the layer's effect")
        ax.legend(fontsize=7)
    fig.suptitle(f"Cumulative head effect: {pair}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


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
    source = hp.o_proj_inputs(base, ib, mb, layer)
    dev = [r["split"] == "dev" for r in rows]
    means = [hp.head_means(hp.o_proj_inputs(m, i, k, layer), k, n_heads, use=dev)
             for m, i, k in ((base, ib, mb), (tuned, it, mt))]
    return pads, rb, rt, source, means


def sweep_layer(base, tuned, toks, rows, layer, q, seed):
    """Single-head settings of every kind in both models and the per-split summary (p-values; which heads
    are above noise is decided over the whole run, see main)."""
    pads, rb, rt, source, means = _layer_inputs(base, tuned, toks, rows, layer)
    settings = hp.single_head_settings(tuned.config.num_attention_heads, q.kinds)
    lp_t = hp.head_sweep(tuned, rt, pads[1], layer, settings, means[1], source, q.max_rows).numpy()
    in_base = [i for i, s in enumerate(settings) if s.kind != "swap"]
    lp_b = np.full_like(lp_t, np.nan)
    lp_b[in_base] = hp.head_sweep(base, rb, pads[0], layer, [settings[i] for i in in_base], means[0], None,
                                  q.max_rows).numpy()
    split = np.array([r["split"] for r in rows])
    return pd.concat([hp.summarise_heads(lp_t, lp_b, settings, np.flatnonzero(split == sp), q.n_bootstrap, seed)
                      .assign(layer=layer, split=sp) for sp in ("dev", "test")], ignore_index=True)


def confirm_layer(base, tuned, toks, rows, layer, table, q, seed, min_fraction, scores=None):
    """The top heads above noise on dev (at most ``top_m``; none when no head is above noise), their
    confirmation on test against random sets, and the cumulative effect of the top-m heads (by patching rank
    when a head is above noise, by attribution rank) against random sets. ``table``: this layer's flagged
    summary."""
    pads, _, rt, source, means = _layer_inputs(base, tuned, toks, rows, layer)
    n_heads = tuned.config.num_attention_heads
    rank_kind = "swap" if "swap" in q.kinds else q.kinds[0]
    dev = table[(table["split"] == "dev") & (table["kind"] == rank_kind)]
    above = hp.heads_above_noise(dev, rank_kind)
    top = tuple(sorted(above[:q.top_m]))
    split = np.array([r["split"] for r in rows])
    test = np.flatnonzero(split == "test")
    gap = float(table.loc[table["split"] == "test", "gap"].iloc[0])
    if top:
        sets = [top] + hp.random_head_sets(n_heads, len(top), q.n_random, seed + layer, exclude=top)
        conf_settings = [hp.HeadSetting("none")] + [hp.HeadSetting(rank_kind, s) for s in sets]
        lp_c = hp.head_sweep(tuned, rt, pads[1], layer, conf_settings, means[1], source, q.max_rows).numpy()
        confirm = {"kind": rank_kind, "top_heads": list(top), **hp.confirm_top(lp_c, test, gap, min_fraction)}
    else:
        confirm = {"kind": rank_kind, "top_heads": [], "confirmed": False, "beats_random": False,
                   "text": hp.noise_summary(dev, [rank_kind], q.fdr, f" at layer {layer} on dev")[rank_kind]["text"]
                   + "; no top heads to confirm"}
    order = dev["effect"].abs().sort_values(ascending=False, kind="stable").index
    rest = [int(h) for h in dev.loc[order, "head"] if int(h) not in above]
    rankings = {"patching": above + rest} if top else {}  # the heads above noise first
    by_attr = attribution_ranking(scores, layer, {r["id"] for r in rows if r["split"] == "dev"})
    if by_attr is not None:
        rankings["attribution"] = by_attr
    cum_settings, meta = hp.cumulative_settings(rank_kind, rankings, n_heads, q.n_random, seed + layer)
    lp_cum = hp.head_sweep(tuned, rt, pads[1], layer, cum_settings, means[1], source, q.max_rows).numpy()
    cumulative = hp.cumulative_table(lp_cum, test, meta).assign(layer=layer, kind=rank_kind)
    return confirm, cumulative


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--pair", "--filtered", "--layers", "--table", "--metrics", "--fig"):
        ap.add_argument(name, required=True)
    ap.add_argument("--attribution", help="attribution.parquet of the pair (adds the attribution-rank curve)")
    ap.add_argument("--cumulative-fig", help="figure of the cumulative top-m head effect")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_pair_params(args.params, args.pair)
    q = params.head_patch
    torch.manual_seed(params.seed)
    pair, (base, tuned), toks, frame = load_pair(params, args.pair, args.filtered)
    task = resolve_target(pair.target)
    target = steering.cap_parts(steering.prompt_parts(frame, task), q.max_prompts, params.seed)["target"]
    conts = steering.continuation_texts(target, task)
    modes = [m for m in dict.fromkeys([params.fairness.primary_mode, "strict", "base_ids"]) if m != "aligned"]
    rows = hp.aligned_rows(target, toks, conts, modes)
    if min(sum(r["split"] == sp for r in rows) for sp in ("dev", "test")) < 2:
        raise StageError(f"head_patch@{args.pair}: fewer than 2 target prompts per split read token-aligned by both "
                         "models (strict or base_ids mode); the swap needs them")
    layers = [int(x) for x in json.loads(Path(args.layers).read_text())["layers"]]
    scores = read_table(args.attribution) if args.attribution else None
    tables = [sweep_layer(base, tuned, toks, rows, layer, q, params.seed)
              for layer in progress(layers, f"head_patch@{args.pair} sweep", unit="layer")]
    # above noise: Benjamini-Hochberg over every head x kind x layer of a split of this run
    table = hp.flag_above_noise(pd.concat(tables, ignore_index=True), q.fdr, family=("split",))
    per_layer, curves = {}, {}
    for layer in progress(layers, f"head_patch@{args.pair} confirm", unit="layer"):
        at = table[table["layer"] == layer]
        confirm, cum = confirm_layer(base, tuned, toks, rows, layer, at, q, params.seed,
                                     params.success.target_effect_min, scores)
        curves[layer] = cum
        test = at[at["split"] == "test"]
        noise = hp.noise_summary(test, q.kinds, q.fdr, f" at layer {layer} on test")
        per_layer[str(layer)] = {"gap_logprob": float(test["gap"].iloc[0]), "confirm_top": confirm,
                                 "cumulative": cum.drop(columns=["layer"]).to_dict("records"),
                                 "n_above_noise": {k: v["n_above_noise"] for k, v in noise.items()},
                                 "saw_change": [k for k, v in noise.items() if v["n_above_noise"]],
                                 "above_noise": noise,
                                 "max_abs_effect": {k: float(d["effect"].abs().max()) for k, d in test.groupby("kind")}}
    metrics = {"pair": args.pair, "task": task.task, "metric": "log-prob of the target continuation (nats)",
               "n_prompts": {sp: sum(r["split"] == sp for r in rows) for sp in ("dev", "test")},
               "modes": {m: sum(r["mode"] == m for r in rows) for m in ("strict", "base_ids")},
               "noise_rule": f"above noise: Benjamini-Hochberg q <= {q.fdr:g} over all heads x kinds x layers of a "
                             "split (two-sided one-sample t-test of the per-prompt effects)",
               "per_layer": per_layer}
    atomic_write(args.table, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write_json(args.metrics, finite(metrics))
    plot(table, args.pair, args.fig)
    if args.cumulative_fig:
        plot_cumulative(curves, args.pair, args.cumulative_fig)
    summary = ", ".join(f"L{k}: top {v['confirm_top']['top_heads']} confirmed={v['confirm_top']['confirmed']}"
                        if v["confirm_top"]["top_heads"] else f"L{k}: {v['confirm_top']['text']}"
                        for k, v in per_layer.items())
    print(f"head_patch@{args.pair}: layers {layers}; {summary}")


if __name__ == "__main__":
    run_stage(main)
