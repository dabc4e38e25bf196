"""Stage churn (RQ4): head churn base vs tuned from the attribution scores (important heads, top-k Jaccard,
Spearman, split-half noise floor, prompt bootstrap); runs no model.

    python -m stages.churn --pair cultural --scores artifacts/results/cultural/attribution.parquet \
        --metrics artifacts/results/cultural/attribution.json --fig figs/attribution_cultural.png \
        [--head-patch artifacts/results/cultural/head_patch.csv]
"""

from __future__ import annotations


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mechdiff.data.target import resolve as resolve_target  # noqa: E402
from mechdiff.rq4 import churn as ch  # noqa: E402
from stages.common import (atomic_write, atomic_write_json, finite, load_pair_params, read_table,  # noqa: E402
                           run_stage, stage_parser)


def plot(heads: np.ndarray, mean_scores: dict, imp: dict, pair: str, path: str, label: str) -> None:
    """Per-layer head scores (mean over prompts, nats of the target log-prob) of both models."""
    layers, n_heads = np.unique(heads[:, 0]), int(heads[:, 1].max()) + 1
    rows = np.searchsorted(layers, heads[:, 0])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for ax, m in zip(axes[:2], ("base", "tuned")):
        grid = np.full((len(layers), n_heads), np.nan)
        grid[rows, heads[:, 1]] = mean_scores[m]
        lim = float(np.abs(mean_scores[m]).max()) or 1.0
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.scatter(heads[imp[m], 1], rows[imp[m]], marker="o", facecolors="none", edgecolors="k", s=40)
        ax.set(title=f"{m} (o = important)", xlabel="head", ylabel="layer", yticks=range(len(layers)),
               yticklabels=layers)
        fig.colorbar(im, ax=ax, label=f"{label} (nats)")
    ax = axes[2]
    ax.scatter(mean_scores["base"], mean_scores["tuned"], c=rows, cmap="viridis", s=14)
    ax.axline((0, 0), slope=1, color="grey", ls=":")
    ax.set(xlabel=f"base {label} (nats)", ylabel=f"tuned {label} (nats)", title=f"head attribution: {pair}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def churn(args, params) -> None:
    c, pair = params.churn, params.pairs[args.pair]
    target = resolve_target(pair.target)
    table = read_table(args.scores)
    column = "score_ig" if "score_ig" in table.columns else "score"
    heads, sc, metric, _ = ch.score_arrays(table, column)
    rule = ch.rule_for(target.units, c.z, c.math_nats, c.refusal_pp)
    out = ch.summarise(sc, metric, heads, rule, c.top_k, c.n_bootstrap, c.n_splits, params.seed)
    out.update(pair=args.pair, domain=pair.domain, target=target.measure, score=column,
               metric_mean={m: float(v.mean()) for m, v in metric.items()},
               completeness=ch.completeness(table))
    if args.head_patch:
        out["head_patch_agreement"] = ch.patch_agreement(pd.read_csv(args.head_patch), heads, sc, c.top_k)
    imp = {m: ch.important(sc[m], metric[m], heads[:, 0], rule) for m in sc}
    atomic_write_json(args.metrics, finite(out))
    plot(heads, {m: v.mean(0) for m, v in sc.items()}, imp, args.pair, args.fig, column)
    print(f"churn@{args.pair}: churn {out['churn']:.3f} {out['churn_ci']}, noise floor "
          f"{out['noise_floor']['churn_mean']:.3f}, Jaccard {out['jaccard']:.3f}, Spearman {out['spearman']:.3f}")


def main() -> None:
    ap = stage_parser(__doc__, "--pair", "--scores", "--metrics", "--fig", raw_doc=True)
    ap.add_argument("--head-patch", default=None)
    args = ap.parse_args()
    churn(args, load_pair_params(args.params, args.pair))


if __name__ == "__main__":
    run_stage(main)
