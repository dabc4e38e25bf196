"""Stage steer_select (RQ3): choose k, alpha and the best layer on dev and hold the choice to the test split
(``test_confirmed``, ``confirmed_minimal_k``: the verdict counts only a confirmed k); runs no model, so
changing a success threshold never reruns one (selection: mechdiff.rq3.steer_select).

    python -m stages.steer_select --table artifacts/results/cultural/steer.csv \
        --info artifacts/results/cultural/steer_subspace.json --curve artifacts/results/cultural/steer_curve.csv \
        --metrics artifacts/results/cultural/steer.json --fig figs/steer_cultural.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mechdiff.rq3 import steer_select  # noqa: E402
from stages.common import (atomic_write, atomic_write_json, finite, load_stage_params, run_stage,  # noqa: E402
                           save_figure, stage_parser)

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
    save_figure(fig, path)


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
    ap = stage_parser(__doc__, "--table", "--info", "--curve", "--metrics", "--fig", raw_doc=True)
    args = ap.parse_args()
    select(args, load_stage_params(args.params))


if __name__ == "__main__":
    run_stage(main)
