"""Stage cka: layer-wise linear CKA (biased, debiased, permutation null, prompt bootstrap) per mode, and
the spectrum of the change ``H_tuned - H_base`` per layer (how many directions carry it).

    python -m stages.cka --pair cultural --acts artifacts/acts/cultural --table artifacts/results/cultural/cka.csv \
        --metrics artifacts/results/cultural/cka.json --fig figs/cka_cultural.png \
        --change-rank artifacts/results/cultural/change_rank.csv
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechdiff.rq1.layer_scan import change_rows, cka_by_layer  # noqa: E402
from stages.acts_io import load_mode, read_fingerprint  # noqa: E402
from stages.common import (atomic_write, atomic_write_json, load_pair_params, run_stage, save_figure,  # noqa: E402
                           stage_parser)


def plot(table: pd.DataFrame, pair: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, sub in table.groupby("mode", sort=True):
        line = ax.plot(sub["layer"], sub["cka_debiased"], marker="o", label=f"{mode} (debiased)")[0]
        ax.fill_between(sub["layer"], sub["ci_low"], sub["ci_high"], color=line.get_color(), alpha=0.2)
        ax.plot(sub["layer"], sub["cka_biased"], ls="--", color=line.get_color(), alpha=0.6, label=f"{mode} (biased)")
        ax.plot(sub["layer"], sub["null_q95"], ls=":", color="grey")
    ax.set(xlabel="layer (block index)", ylabel="linear CKA base vs tuned", title=f"CKA by layer: {pair}")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    args = stage_parser(__doc__, "--pair", "--acts", "--table", "--metrics", "--fig", "--change-rank").parse_args()
    params = load_pair_params(args.params, args.pair)
    fp = read_fingerprint(args.acts)
    tables, changes = [], []
    device = "cuda" if torch.cuda.is_available() else "cpu"  # float64 Gram products: seconds on a GPU, hours
    for mode in fp["modes"]:                                    # on a CPU for 8B-sized states
        index, states = load_mode(args.acts, mode)
        if not len(index):
            continue
        states = {layer: (Hb.to(device), Ht.to(device)) for layer, (Hb, Ht) in states.items()}
        groups = index["id"].astype("category").cat.codes.to_numpy()
        t = cka_by_layer(states, groups, params.cka.n_permutations, params.cka.n_bootstrap, params.seed)
        tables.append(t.assign(mode=mode))
        changes += change_rows(states, mode)
    table = pd.concat(tables, ignore_index=True)
    atomic_write(args.table, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    metrics = {mode: {"min_cka_debiased": float(sub["cka_debiased"].min()),
                      "layer_of_min": int(sub.loc[sub["cka_debiased"].idxmin(), "layer"]),
                      "by_layer": {str(r.layer): round(float(r.cka_debiased), 6) for r in sub.itertuples()}}
               for mode, sub in table.groupby("mode", sort=True)}
    atomic_write_json(args.metrics, metrics)
    change = pd.DataFrame(changes)
    atomic_write(args.change_rank, lambda tmp: change.to_csv(tmp, index=False, float_format="%.6g"))
    plot(table, args.pair, args.fig)
    print(f"cka@{args.pair}: " + "; ".join(f"{m} min {v['min_cka_debiased']:.4f} at layer {v['layer_of_min']}"
                                          for m, v in metrics.items()))
    primary = change[change["mode"] == params.fairness.primary_mode]
    print(f"cka@{args.pair}: change rank (90% energy) by layer ({params.fairness.primary_mode}): "
          + ", ".join(f"{r.layer}: {r.rank_90}" for r in primary.itertuples()))


if __name__ == "__main__":
    run_stage(main)
