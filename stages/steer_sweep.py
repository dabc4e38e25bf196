"""Stage steer_sweep (RQ3): rank-k subspaces at the chosen layers; ablate in the tuned model, steer the base.

    python -m stages.steer_sweep sweep --pair cultural --filtered data/filtered/cultural \
        --layers artifacts/results/cultural/layers.json --table artifacts/results/cultural/steer.csv \
        --info artifacts/results/cultural/steer_subspace.json
    python -m stages.steer_sweep select --table artifacts/results/cultural/steer.csv \
        --info artifacts/results/cultural/steer_subspace.json --curve artifacts/results/cultural/steer_curve.csv \
        --metrics artifacts/results/cultural/steer.json --fig figs/steer_cultural.png

``sweep`` runs the models: the subspace is fitted on the dev split, every (k, alpha) setting and its
random control run in one batched pass per prompt batch, on dev and test (the random draws on the target
prompts only: their effect is all the control uses, so their side-effect columns are empty), plus the language and
prompt-format transfer probes. ``select`` runs no model: it chooses k, alpha and the best layer on dev and
holds the choice to the test split (``test_confirmed``, ``confirmed_minimal_k``: the verdict counts only a
confirmed k), so changing a success threshold never reruns a model (sweep: mechdiff.steering; selection: mechdiff.steer_select).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechdiff import steer_select  # noqa: E402
from mechdiff import steering  # noqa: E402
from mechdiff.target import resolve as resolve_target  # noqa: E402
from stages.common import (StageError, atomic_write, atomic_write_json, finite, load_pair_params,  # noqa: E402
                           load_stage_params, progress, run_stage)
from stages.pair_io import load_pair  # noqa: E402

PANELS = (("ablate_tuned", "layer", "ablate in tuned (chosen layer)"),
          ("ablate_tuned", "all", "ablate in tuned (all layers)"), ("steer_base", "layer", "steer base"))


def plot(curve: pd.DataFrame, layer: int, pair: str, path: str, target: float) -> None:
    """Effect vs k (test, alpha chosen on dev) for the fitted subspace (band: 95% CI) and the random draws
    (mean; band: lowest draw to their 95th percentile, see steer_select.curve_rows); the ribbons are the side
    effects (perplexity increase, accuracy drop), hatched red where one exceeds its limit."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2), sharey=True)
    for ax, (direction, site, title) in zip(axes, PANELS):
        sub = curve[(curve["layer"] == layer) & (curve["direction"] == direction) & (curve["site"] == site)]
        for name, d in sub.groupby("subspace", sort=True):
            ax.plot(d["k"], d["effect"], marker="o", label=f"{name} subspace")
            ax.fill_between(d["k"], d["effect_lo"], d["effect_hi"], alpha=0.15)
        fit = sub[sub["subspace"] == "fitted"].sort_values("k")
        ax.fill_between(fit["k"], 0, fit["ppl_increase"].clip(lower=0), color="grey", alpha=0.3,
                        label="side effect: ppl increase (fraction)")
        ax.fill_between(fit["k"], 0, fit["side_drop_pp"].clip(lower=0) / 100, color="purple", alpha=0.15,
                        label="side effect: accuracy drop (pp / 100)")
        for k in fit.loc[~fit["side_ok"], "k"]:
            ax.axvspan(k - 0.3, k + 0.3, color="red", alpha=0.1, hatch="//")
        ax.axhline(target, ls=":", color="black", lw=0.8)
        ax.set(title=title, xlabel="rank k")
    axes[0].set_ylabel("target effect (test)")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"RQ3 steer / ablate vs k: {pair}, layer {layer}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)



def sweep(args, params) -> None:
    """Model work: fit, sweep every setting on dev and test, and the transfer probes; writes the table."""
    p = params.steer
    torch.manual_seed(params.seed)
    pair, (base, tuned), toks, frame = load_pair(params, args.pair, args.filtered)
    task = resolve_target(pair.target)
    d_model = base.config.hidden_size
    if max(p.ks) > d_model:
        raise StageError(f"steer.ks has k = {max(p.ks)}, more than the model's hidden size {d_model}: a rank-k "
                         f"subspace needs k <= {d_model}; lower steer.ks in params.yaml")
    parts = steering.cap_parts(steering.prompt_parts(frame, task), p.max_prompts, params.seed)
    for split in ("dev", "test"):
        if (parts["target"]["split"] == split).sum() < 2:
            raise StageError(f"steer_sweep@{args.pair}: fewer than 2 target prompts ({task.name} target, measure "
                             f"{task.measure}) in the {split} split; add target prompts to pairs.{args.pair}.datasets "
                             "(or name them in its target.prompts) or move data.dev_fraction")
    modes = list(dict.fromkeys([params.fairness.primary_mode, "base_ids", "aligned"]))
    rows, info = [], {"pair": args.pair, "task": task.task, "mode": p.mode, "layers": {}}
    layers = [int(x) for x in json.loads(Path(args.layers).read_text())["layers"]]
    for layer in progress(layers, f"steer_sweep@{args.pair}", unit="layer"):
        r, sub_info, sub = steering.run_layer(base, tuned, toks, parts, layer, p, task, modes, params.seed)
        lang, lang_note = steering.language_rows(base, tuned, toks, parts, layer, p, task, modes, params.seed)
        fmt, fmt_note = steering.format_rows(base, tuned, toks, parts, layer, sub, p, task, params.fairness)
        rows += r + lang + fmt
        info["layers"][str(layer)] = {"subspace": sub_info, "notes": {"language": lang_note, "format": fmt_note}}
    atomic_write(args.table, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write_json(args.info, finite(info))
    print(f"steer_sweep@{args.pair}: {len(rows)} rows over layers {sorted(info['layers'])}")


def select(args, params) -> None:
    """No model: choose k and alpha on dev, report on test, transfers at the choice, curve and figure."""
    p, s = params.steer, params.success
    rows = pd.read_csv(args.table).to_dict("records")
    info = json.loads(Path(args.info).read_text())
    limits = (s.target_effect_min, p.max_neutral_drop_pp, p.max_ppl_increase)
    per_layer = {}
    for layer, linfo in info["layers"].items():
        main = [r for r in rows if r["layer"] == int(layer)]
        choice = steer_select.select(main, *limits)
        clean = {f"{r['model']}_{r['split']}": r["rate"] for r in main
                 if r["direction"] == "clean" and r.get("probe") == "main"}
        per_layer[layer] = {**linfo, "clean_rate": clean, **choice,
                            "transfer": steer_select.transfer_summary(main, int(layer), choice, linfo["notes"])}
    # the layer is chosen on dev only; the test split then confirms (or not) that layer's choice
    best = min(per_layer, key=lambda x: (per_layer[x]["minimal_k"] is None, per_layer[x]["minimal_k"] or 0, int(x)))
    curve = pd.DataFrame(steer_select.curve_rows(rows, p.max_neutral_drop_pp, p.max_ppl_increase))
    metrics = {**{k: info[k] for k in ("pair", "task", "mode")}, "best_layer": int(best),
               **{k: per_layer[best][k] for k in ("minimal_k", "test_confirmed", "confirmed_minimal_k")},
               "target_effect_min": s.target_effect_min,
               "max_neutral_drop_pp": p.max_neutral_drop_pp, "max_ppl_increase": p.max_ppl_increase,
               "per_layer": per_layer}
    atomic_write(args.curve, lambda tmp: curve.to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write_json(args.metrics, finite(metrics))
    plot(curve, int(best), info["pair"], args.fig, s.target_effect_min)
    print(f"steer_select@{info['pair']}: best layer {best}, minimal k {metrics['minimal_k']} (dev), "
          f"confirmed on test: {metrics['test_confirmed']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("sweep", help="fit and sweep (runs the models)")
    for name in ("--pair", "--filtered", "--layers", "--table", "--info"):
        a.add_argument(name, required=True)
    b = sub.add_parser("select", help="choose on dev, report on test (no model)")
    for name in ("--table", "--info", "--curve", "--metrics", "--fig"):
        b.add_argument(name, required=True)
    for x in (a, b):
        x.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    if args.command == "sweep":
        sweep(args, load_pair_params(args.params, args.pair))
    else:
        select(args, load_stage_params(args.params))


if __name__ == "__main__":
    run_stage(main)
