"""Stage head_patch (RQ3): per-head zero / mean ablation and base->tuned swap at the chosen layers.

    python -m stages.head_patch --pair cultural --filtered data/filtered/cultural \
        --layers artifacts/results/cultural/layers.json --table artifacts/results/cultural/head_patch.csv \
        --metrics artifacts/results/cultural/head_patch.json --fig figs/head_patch_cultural.png

Metric: the log-probability of the target continuation (the refusal opening; the correct answer).
All heads of a layer run in one batched forward with prefix reuse (mechdiff.rq3.head_sweep; per-layer ranking,
confirmation and cumulative curve: mechdiff.rq3.head_patch). A head is above noise when its Benjamini-Hochberg
q-value, over every head x kind x layer of a split of this run, is at most ``head_patch.fdr``. The top heads
are the (at most ``top_m``) heads above noise on dev, largest effect first, confirmed on test against random
head sets of the same size; with no head above noise none is named, and the metrics say so per kind
(``above_noise``: count, heads and a sentence per kind; ``saw_change``: the kinds that found a head).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechdiff.data.target import resolve as resolve_target  # noqa: E402
from mechdiff.rq3 import head_patch as hp  # noqa: E402
from mechdiff.rq3.head_stats import flag_above_noise  # noqa: E402
from mechdiff.rq3.head_sweep import aligned_rows  # noqa: E402
from mechdiff.rq3.steer_sweep import cap_parts  # noqa: E402
from stages.common import (StageError, atomic_write, atomic_write_json, finite, load_pair_params, progress,  # noqa: E402
                           read_table, run_stage, save_figure, stage_parser)
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
    save_figure(fig, path)


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
    save_figure(fig, path)


def main() -> None:
    ap = stage_parser(__doc__, "--pair", "--filtered", "--layers", "--table", "--metrics", "--fig", raw_doc=True)
    ap.add_argument("--attribution", help="attribution.parquet of the pair (adds the attribution-rank curve)")
    ap.add_argument("--cumulative-fig", help="figure of the cumulative top-m head effect")
    args = ap.parse_args()
    params = load_pair_params(args.params, args.pair)
    q = params.head_patch
    torch.manual_seed(params.seed)
    pair, (base, tuned), toks, frame = load_pair(params, args.pair, args.filtered)
    task = resolve_target(pair.target)
    target = cap_parts(task.parts(frame), q.max_prompts, params.seed)["target"]
    modes = [m for m in dict.fromkeys([params.fairness.primary_mode, "strict", "base_ids"]) if m != "aligned"]
    rows = aligned_rows(target, toks, task.continuations(target), modes)
    if min(sum(r["split"] == sp for r in rows) for sp in ("dev", "test")) < 2:
        raise StageError(f"head_patch@{args.pair}: fewer than 2 target prompts per split read token-aligned by both "
                         "models (strict or base_ids mode); the swap needs them")
    layers = [int(x) for x in json.loads(Path(args.layers).read_text())["layers"]]
    scores = read_table(args.attribution) if args.attribution else None
    tables = [hp.sweep_layer(base, tuned, toks, rows, layer, q, params.seed)
              for layer in progress(layers, f"head_patch@{args.pair} sweep", unit="layer")]
    # above noise: Benjamini-Hochberg over every head x kind x layer of a split of this run
    table = flag_above_noise(pd.concat(tables, ignore_index=True), q.fdr, family=("split",))
    per_layer, curves = {}, {}
    for layer in progress(layers, f"head_patch@{args.pair} confirm", unit="layer"):
        at = table[table["layer"] == layer]
        confirm, curves[layer] = hp.confirm_layer(base, tuned, toks, rows, layer, at, q, params.seed,
                                                  params.success.target_effect_min, scores)
        per_layer[str(layer)] = hp.layer_metrics(at, layer, confirm, curves[layer], q.kinds, q.fdr)
    metrics = hp.run_metrics(args.pair, task.task, rows, q.fdr, per_layer)
    atomic_write(args.table, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write_json(args.metrics, finite(metrics))
    plot(table, args.pair, args.fig)
    if args.cumulative_fig:
        plot_cumulative(curves, args.pair, args.cumulative_fig)
    print(hp.summary_line(args.pair, layers, per_layer))


if __name__ == "__main__":
    run_stage(main)
