"""Stage attribution (RQ4): grad x activation per attention head in both models, then head churn.

Two steps, two DVC stages, so that a churn threshold never reruns a model:

    python -m stages.attribution scores --pair cultural --filtered data/filtered/cultural \
        --out artifacts/results/cultural/attribution.parquet
    python -m stages.attribution churn --pair cultural --scores artifacts/results/cultural/attribution.parquet \
        --metrics artifacts/results/cultural/attribution.json --fig figs/attribution_cultural.png \
        [--head-patch artifacts/results/cultural/head_patch.csv]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechdiff import attribution as attr  # noqa: E402
from mechdiff import churn as ch  # noqa: E402
from mechdiff.collect import input_ids_for, scan_layers  # noqa: E402
from mechdiff.models import load_model, load_tokenizer, pair_devices  # noqa: E402
from mechdiff.sources import conform  # noqa: E402
from mechdiff.target import resolve as resolve_target  # noqa: E402
from stages.common import (atomic_write, atomic_write_json, atomic_write_parquet, finite, load_pair_params,  # noqa: E402
                           read_table, run_stage)



def scores(args, params) -> None:
    pair, mode, ap, acts = params.pairs[args.pair], params.fairness.primary_mode, params.attribution, params.acts
    target = resolve_target(pair.target)
    prompts = conform(read_table(f"{args.filtered}/prompts.parquet"))
    records = attr.select_prompts(prompts, target, mode, ap.max_prompts, params.seed).to_dict("records")
    texts = [attr.target_continuation(r, target, " " if params.fairness.template == "raw" else "") for r in records]
    devices = pair_devices(acts.device, torch.cuda.device_count())  # as every stage places the pair
    sides = (("base", pair.base, pair.base_revision), ("tuned", pair.tuned, pair.tuned_revision))
    tables = []
    for s, (name, mid, rev) in enumerate(sides):
        if s == 1 and (mid, rev) == sides[0][1:]:  # a model against itself: identical scores
            tables.append(tables[0].assign(model="tuned"))
            continue
        torch.manual_seed(params.seed)
        tok = load_tokenizer(*(sides[0][1:] if mode == "base_ids" else (mid, rev)),
                             trust_remote_code=params.fairness.trust_remote_code)
        model = load_model(mid, rev, dtype=getattr(torch, acts.dtype), device=devices[s],
                           trust_remote_code=params.fairness.trust_remote_code,
                           attn_implementation=acts.attn_implementation,
                           allow_pickle=params.fairness.allow_pickle_weights)
        layers = scan_layers(model.config.num_hidden_layers, params.layers.scan_stride)
        cont = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        res = attr.attribute(model, [input_ids_for(r, mode)[s] for r in records], cont, pad, layers, ap.batch_size,
                             ap.ig_steps)
        langs = dict(zip((r["id"] for r in records), (r["language"] for r in records)))
        table = attr.score_table([r["id"] for r in records], name, res)
        tables.append(table.assign(language=table["id"].map(langs)))
        del model
    atomic_write_parquet(args.out, pd.concat(tables, ignore_index=True))
    print(f"attribution@{args.pair}: {len(records)} prompts x {tables[0][['layer', 'head']].drop_duplicates().shape[0]}"
          f" heads, target {target.name} ({target.measure}), mode {mode}")


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
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="step", required=True)
    s = sub.add_parser("scores")
    for name in ("--pair", "--filtered", "--out"):
        s.add_argument(name, required=True)
    c = sub.add_parser("churn")
    for name in ("--pair", "--scores", "--metrics", "--fig"):
        c.add_argument(name, required=True)
    c.add_argument("--head-patch", default=None)
    for p in (s, c):
        p.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_pair_params(args.params, args.pair)
    (scores if args.step == "scores" else churn)(args, params)


if __name__ == "__main__":
    run_stage(main)
