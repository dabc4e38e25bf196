"""Stage report: figures A-D, the verdict per pair, report.md and a self-contained report.html.

    python -m stages.report --results artifacts/results --acts artifacts/acts --figs figs --out report

Reads every pair's results (no model runs, so a report-only threshold reruns only this stage):
behaviour, CKA, layer patch, chosen layers, map (fit_clt), steering (steer_select, steer_curve), churn
(attribution.json) and fairness, plus each pair's activation fingerprint. Writes

* ``figs/report_A.png`` CKA curve (strict and aligned, bootstrap band) + layer-patch bars;
  ``report_B.png`` map R2 with baselines + mapped vs real patch; ``report_C.png`` effect vs k with the
  side-effect ribbon, ablation and steering; ``report_D.png`` churn with intervals and the split-half
  floor, top-k Jaccard and Spearman;
* ``<out>/metrics/<pair>.json``: the verdict and the at most 15 numbers it rests on (intervals as their own
  keys, rounded), one file per pair, so ``dvc metrics show`` prints one readable row per pair;
* ``<out>/plots/{cka,layer_patch,steering,head_cumulative,churn}.json``: the curves of every pair as tidy rows
  for ``dvc plots show`` / ``dvc plots diff`` (templates in ``.dvc/plots``, titles and axis labels in
  dvc.yaml's top-level ``plots``);
* ``<out>/headline.json`` (every headline number per pair, read by benchmarks/bench_builds.py),
  ``<out>/headline.csv``, ``<out>/verdict.json`` (labels, criteria, reasons, fingerprints), ``<out>/report.md``
  and ``<out>/report.html``: a verdict card per pair (label, one sentence, the three numbers with 95%
  intervals), the headline table, the figures (embedded as data URIs: renders offline), per-pair evidence,
  and fingerprints and method notes collapsed.

The verdict rules are :mod:`mechdiff.verdict`'s; the report's numbers, figures and pages are
:mod:`mechdiff.report`'s.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechdiff.report.document import FIGS, document
from mechdiff.report.figures import (cka_and_layer_patch_figure, head_churn_figure, linear_map_figure, png_bytes,
                                     steering_figure)
from mechdiff.report.numbers import evidence, headline, metrics_row
from mechdiff.report.plot_data import plot_data
from mechdiff.report.render_html import to_html
from mechdiff.report.render_markdown import to_markdown
from mechdiff.verdict import Thresholds, verdict
from stages.common import (atomic_write, atomic_write_json, atomic_write_text, finite, load_stage_params, run_stage,
                           stage_parser)
from stages.report_io import load_pair_results


def main() -> None:
    ap = stage_parser(__doc__, "--results", "--acts", "--figs", "--out", raw_doc=True)
    args = ap.parse_args()
    params = load_stage_params(args.params)
    s, r = params.success, params.report
    t = Thresholds(policy_max_k=s.policy_max_k, sharp_entry_min=r.sharp_entry_min, map_r2_min=s.map_r2_min,
                   agreement_tolerance=params.clt.agreement_tolerance, null_cka_min=r.null_cka_min,
                   null_kl_max=r.null_kl_max)
    results, acts, figs, out = Path(args.results), Path(args.acts), Path(args.figs), Path(args.out)
    data = {p: load_pair_results(results, acts, p) for p in params.pairs}
    domains = {p: params.pairs[p].domain for p in params.pairs}
    verdicts = {p: verdict(domains[p], evidence(data[p]), t) for p in data}
    heads = {p: headline(p, domains[p], data[p], verdicts[p]) for p in data}
    fig_paths = {letter: figs / f"report_{letter}.png" for letter in FIGS}
    pngs = {}
    for letter, draw in zip(FIGS, (cka_and_layer_patch_figure, linear_map_figure, steering_figure,
                                   head_churn_figure)):
        pngs[letter] = png_bytes(draw(data))
        atomic_write(fig_paths[letter], lambda tmp: tmp.write_bytes(pngs[letter]))
    blocks = document(data, domains, verdicts, t, params.fairness.trust_remote_code,
                      params.fairness.allow_pickle_weights)
    rel = {k: Path("..") / v if not v.is_absolute() else v for k, v in fig_paths.items()}
    atomic_write_text(out / "report.md", to_markdown(blocks, rel))
    atomic_write_text(out / "report.html", to_html(blocks, pngs))
    atomic_write_json(out / "headline.json", finite(heads))
    metrics = out / "metrics"
    for stale in metrics.glob("*.json") if metrics.is_dir() else ():  # a pair no longer in params (run outside DVC)
        if stale.stem not in data:
            stale.unlink()
    for p in data:
        atomic_write_json(metrics / f"{p}.json", finite(metrics_row(domains[p], data[p], verdicts[p])))
    for name, rows in plot_data(data).items():
        atomic_write_json(out / "plots" / name, finite(rows))
    atomic_write(out / "headline.csv", lambda tmp: pd.DataFrame(
        [{"pair": p, "verdict": verdicts[p]["label"], **heads[p]} for p in data]).to_csv(tmp, index=False))
    atomic_write_json(out / "verdict.json", finite({p: {"domain": domains[p], **verdicts[p],
                                                        "trust_remote_code": params.fairness.trust_remote_code,
                                                        "fingerprint": data[p]["fingerprint"]} for p in data}))
    for p in data:
        print(f"report: {p}: {verdicts[p]['label']}")
        for line in verdicts[p]["reasons"]:
            print(f"    {line}")


if __name__ == "__main__":
    run_stage(main)
