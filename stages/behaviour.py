"""Stage behaviour (RQ1): the behavioural gap of a pair -- the same measures on both models, with intervals.

    python -m stages.behaviour --pair cultural --filtered data/filtered/cultural \
        --table artifacts/results/cultural/behaviour.csv --metrics artifacts/results/cultural/behaviour.json \
        --fig figs/behaviour_cultural.png

Measures and intervals: :mod:`mechdiff.rq1.behaviour`. The table has one row per measure (base, tuned,
delta tuned - base, 95% bootstrap intervals by prompt); the metrics JSON holds the same numbers keyed by
measure for ``dvc metrics show``, ``masked_mass`` (per language, the next-token probability each model puts
outside the shared ids: what the logit mask of the comparisons removes), and ``math_outcomes``: per model, how many math answers were ``correct``,
``wrong`` or could not be judged and why (:data:`mechdiff.data.answers.OUTCOMES`; they add up to the math prompts).
How a math reference is judged (exact value or math-verify equivalence) follows its dataset's
``answer_format`` (:func:`mechdiff.data.answers.answer_kind`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mechdiff.data.target import resolve as resolve_target  # noqa: E402
from mechdiff.rq1 import behaviour as bg  # noqa: E402
from stages.common import (StageError, atomic_write, atomic_write_json, finite, load_pair_params,  # noqa: E402
                           read_tensors, run_stage, save_figure, stage_parser)
from stages.pair_io import load_pair  # noqa: E402

RATES = ("refusal_rate", "false_refusal", "math_acc", "mc_acc")


def plot(table, pair: str, path: str) -> None:
    """Rates of both models with 95% intervals (left); the perplexity per character (right)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [3, 1]})
    rates = table.set_index("measure").loc[list(RATES)]
    x = np.arange(len(rates))
    for i, side in enumerate(("base", "tuned")):
        v = rates[side].to_numpy(float)
        err = np.abs(np.stack([v - rates[f"{side}_lo"], rates[f"{side}_hi"] - v]).astype(float))
        ax.bar(x + 0.4 * i, np.nan_to_num(v), width=0.4, yerr=np.nan_to_num(err), label=side, capsize=2)
    ax.set_xticks(x + 0.2, [f"{m}\n(n={n})" for m, n in zip(rates.index, rates["n"])], fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="rate", title=f"behaviour: {pair}")
    ax.legend(fontsize=7)
    ppl = table.set_index("measure").loc["ppl_char"]
    bx.bar([0, 1], [np.nan_to_num(ppl["base"]), np.nan_to_num(ppl["tuned"])], color=["C0", "C1"])
    bx.set_xticks([0, 1], ["base", "tuned"])
    bx.set(title="ppl per char (neutral)")
    save_figure(fig, path)


def metrics_of(table, sizes: dict, pair: str, math_outcomes: dict | None = None) -> dict:
    """``{measure: {base, tuned, delta, *_lo, *_hi, n}}`` with NaN -> None (strict JSON), and the math
    outcome counts per model (``{"base": {outcome: rows}, "tuned": ...}``)."""
    per = {r["measure"]: {k: r[k] for k in r if k not in ("measure", "prompts", "description")}
           for r in table.to_dict("records")}
    return finite({"pair": pair, "prompt_sets": sizes, "measures": per, "math_outcomes": math_outcomes or {}})


def main() -> None:
    args = stage_parser(__doc__, "--pair", "--filtered", "--table", "--metrics", "--fig", raw_doc=True).parse_args()
    params = load_pair_params(args.params, args.pair)
    p = params.behaviour
    torch.manual_seed(params.seed)
    pair, models, toks, frame = load_pair(params, args.pair, args.filtered)
    formats = {name: spec.answer_format for name, spec in pair.datasets.items()}
    sets = bg.prompt_sets(frame, p.max_prompts, params.seed, answer_formats=formats,
                          goal=resolve_target(pair.target))
    if not any(sets.sizes().values()):
        raise StageError(f"behaviour@{args.pair}: no prompt has a task this stage measures (topic/refusal questions, "
                         f"math, mc, neutral); check pairs.{args.pair}.datasets")
    per_model = [bg.measure_model(m, t, sets, col, p.batch_size)
                 for m, t, col in zip(models, toks, ("base_input_ids", "tuned_input_ids"))]
    table = bg.gap_table(*per_model, n_boot=p.n_bootstrap, seed=params.seed)
    atomic_write(args.table, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    outcomes = {side: bg.math_outcome_counts(m) for side, m in zip(("base", "tuned"), per_model)}
    metrics = metrics_of(table, sets.sizes(), args.pair, outcomes)
    metrics["masked_mass"] = bg.masked_mass(models, frame, read_tensors(Path(args.filtered) / "id_map.safetensors"))
    atomic_write_json(args.metrics, metrics)
    plot(table, args.pair, args.fig)
    for r in table.to_dict("records"):
        if r["n"]:
            print(f"behaviour@{args.pair}: {r['measure']:<14} base {r['base']:.4g}  tuned {r['tuned']:.4g}  "
                  f"delta {r['delta']:+.4g} [{r['delta_lo']:+.3g}, {r['delta_hi']:+.3g}]  (n={r['n']})")
    if len(sets.math):
        for side, counts in outcomes.items():
            print(f"behaviour@{args.pair}: math outcomes {side:<5} "
                  + ", ".join(f"{k} {v}" for k, v in counts.items() if v))


if __name__ == "__main__":
    run_stage(main)
