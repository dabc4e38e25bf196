"""Stage layer_patch: cross-model layer patching at the scanned layers, and the layers for RQ2-RQ4.

The coarse scan (every ``layers.scan_stride`` blocks) is refined: every layer inside the brackets around
the entry and the chosen layers is patched too (``scan`` = coarse / refined in the table), so the entry
is exact; the change rank at the entry is read from both models' states there (layers.json ``entry``).
Layers are chosen on dev prompts only (calibration prompts too); every patched layer is then patched
again on test prompts, which the table reports beside dev (``split``) and the report reads.

    python -m stages.layer_patch --pair cultural --filtered data/filtered/cultural \
        --cka artifacts/results/cultural/cka.csv --table artifacts/results/cultural/layer_patch.csv \
        --chosen artifacts/results/cultural/layers.json --fig figs/layer_patch_cultural.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechdiff.data.prompt_schema import conform  # noqa: E402
from mechdiff.models.collect_acts import scan_layers  # noqa: E402
from mechdiff.rq1.layer_patch import scan_pair  # noqa: E402
from stages.common import (StageError, atomic_write, atomic_write_json, load_pair_params, read_table,  # noqa: E402
                           read_tensors, run_stage, save_figure, stage_parser)
from stages.pair_io import load_models  # noqa: E402


def plot(summary: pd.DataFrame, cka: dict, pair: str, path: str) -> None:
    top = sorted(cka, key=lambda k: cka[k])[:3]
    sub = summary[summary["layer"].isin(top)]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, (direction, d) in enumerate(sub.groupby("direction", sort=True)):
        ax.bar(np.arange(len(d)) + 0.4 * i, d["fraction_closed"].fillna(0), width=0.4, label=direction)
        ax.set_xticks(np.arange(len(d)) + 0.2, [f"layer {x}" for x in d["layer"]])
    ax.set(ylabel="fraction of KL gap closed", title=f"Layer patching, top-3 CKA-divergent layers: {pair}")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    args = stage_parser(__doc__, "--pair", "--filtered", "--cka", "--table", "--chosen", "--fig").parse_args()
    params = load_pair_params(args.params, args.pair)
    pair, mode, lp = params.pairs[args.pair], params.fairness.primary_mode, params.layers
    torch.manual_seed(params.seed)
    models = list(load_models(params, pair))
    n_layers = models[0].config.num_hidden_layers
    if lp.skip_scan:
        bad = [x for x in lp.fallback if x >= n_layers]
        if bad:
            raise StageError(f"layers.fallback {bad} out of range for a {n_layers}-layer model; set layers.fallback")
        atomic_write_json(args.chosen, {"layers": lp.fallback, "reasons": ["layers.skip_scan: fallback"], "mode": mode})
        return
    layers = scan_layers(n_layers, lp.scan_stride)
    id_map = read_tensors(Path(args.filtered) / "id_map.safetensors")
    table = conform(read_table(Path(args.filtered) / "prompts.parquet"))
    pads = tuple(m.config.pad_token_id if m.config.pad_token_id is not None else 0 for m in models)
    cka_table = pd.read_csv(args.cka)
    cka = dict(zip(cka_table.loc[cka_table["mode"] == mode, "layer"], cka_table.loc[cka_table["mode"] == mode, "cka_debiased"]))
    both, chosen = scan_pair(models, table, (id_map["base_ids"], id_map["tuned_ids"]), pads, cka, layers, lp, mode,
                             params.fairness.modes, params.seed, params.acts.batch_size, args.pair)
    atomic_write(args.table, lambda tmp: both.to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write_json(args.chosen, chosen)
    plot(both[(both["mode"] == mode) & (both["split"] == "test")], cka, args.pair, args.fig)
    print(f"layer_patch@{args.pair}: chosen layers {chosen['layers']}")


if __name__ == "__main__":
    run_stage(main)
