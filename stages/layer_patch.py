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

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mechdiff.collect import input_ids_for, length_sorted_batches, scan_layers  # noqa: E402
from mechdiff.change_rank import change_row  # noqa: E402
from mechdiff.layer_patch import (calibration_stats, content_positions, paired_states, patch_batch,  # noqa: E402
                                  patched_positions, rise_intervals, split_sample, summarise)
from mechdiff.layer_refine import refine_scan  # noqa: E402
from mechdiff.prompt_schema import conform  # noqa: E402
from stages.common import (StageError, atomic_write, atomic_write_json, load_pair_params, read_table,  # noqa: E402
                           read_tensors, run_stage)
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
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name in ("--pair", "--filtered", "--cka", "--table", "--chosen", "--fig"):
        ap.add_argument(name, required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
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

    def sample(m: str, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        kept = table[table[f"kept_{m}"] & (table["split"] == split)]
        return kept, split_sample(table, f"kept_{m}", split, lp.patch_prompts, params.seed)

    def batched(recs_all, m: str, pairs_of=patched_positions):
        for batch in length_sorted_batches([len(r["base_input_ids"]) for r in recs_all], params.acts.batch_size):
            recs = [recs_all[i] for i in batch]
            ids = tuple(list(x) for x in zip(*(input_ids_for(r, m) for r in recs)))
            yield recs, ids, [pairs_of(r, m) for r in recs]

    per_prompt: dict[tuple[str, str], list[pd.DataFrame]] = {}  # (mode, split) -> per-prompt rows of every call

    def patch_mode(m: str, at: list[int], split: str = "dev") -> pd.DataFrame:
        """Patching in comparison mode ``m`` at layers ``at`` on ``split``: summary rows per direction and layer."""
        kept, prompts = sample(m, split)
        if prompts.empty:
            raise StageError(f"layer_patch@{args.pair}: no {split} prompt kept in mode {m}; move data.dev_fraction")
        stats = None
        if lp.patch_standardise:  # calibration prompts: kept prompts outside the patched sample (else the sample)
            rest = kept[~kept["id"].isin(set(prompts["id"]))]
            calib = (rest if len(rest) else prompts).head(lp.calibration_prompts).to_dict("records")
            stats = calibration_stats(*models, [(ids, pairs) for _, ids, pairs in batched(calib, m)], at, pads)
        rows = []
        for recs, ids, pairs in batched(prompts.to_dict("records"), m):
            out = patch_batch(*models, ids, pairs, at, (id_map["base_ids"], id_map["tuned_ids"]), pads, stats)
            rows += [{**o, "id": recs[o["prompt"]]["id"]} for o in out]
        per_prompt.setdefault((m, split), []).append(pd.DataFrame(rows))
        return summarise(pd.DataFrame(rows), lp.n_bootstrap, params.seed).assign(mode=m, split=split)

    cka_table = pd.read_csv(args.cka)
    cka = dict(zip(cka_table.loc[cka_table["mode"] == mode, "layer"], cka_table.loc[cka_table["mode"] == mode, "cka_debiased"]))
    # coarse scan in the primary mode, then every layer inside the brackets around the entry and the chosen
    # layers, until the layer before each entry was patched (the entry is then exact); dev prompts only
    summary, chosen, entries = refine_scan(lambda at: patch_mode(mode, at), layers, cka, lp.n_choose,
                                           lp.entry_threshold)
    patched = sorted(int(x) for x in summary["layer"].unique())
    refined = [x for x in patched if x not in layers]
    # the primary mode chooses the layers; `aligned` is reported beside it (issue: same curves in both modes)
    extra = [m for m in ("aligned",) if m != mode and m in params.fairness.modes and table[f"kept_{m}"].any()]
    both = pd.concat([summary, patch_mode(mode, patched, "test")] + [patch_mode(m, patched, "test") for m in extra],
                     ignore_index=True)
    both["scan"] = np.where(both["layer"].isin(layers), "coarse", "refined")
    # each layer's rise from the layer patched before it, with a paired interval over the same prompt resamples
    rises = pd.concat([rise_intervals(pd.concat(frames, ignore_index=True), lp.n_bootstrap, params.seed)
                       .assign(mode=m, split=sp) for (m, sp), frames in per_prompt.items()], ignore_index=True)
    both = both.merge(rises, on=["mode", "split", "direction", "layer"], how="left")
    # the change rank at each entry, from both models' states at the patched prompts' content positions
    states = paired_states(*models, [(ids, pairs) for _, ids, pairs in
                                     batched(sample(mode, "dev")[1].to_dict("records"), mode, content_positions)], entries,
                            pads)
    entry = [{"layer": x, "below": max([y for y in patched if y < x], default=None), **change_row(*states[x])}
             for x in entries]
    chosen = {**chosen, "mode": mode, "chosen_on": "dev", "scan": layers, "stride": lp.scan_stride, "refined": refined,
              "entry": entry}
    atomic_write(args.table, lambda tmp: both.to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write_json(args.chosen, chosen)
    plot(both[(both["mode"] == mode) & (both["split"] == "test")], cka, args.pair, args.fig)
    print(f"layer_patch@{args.pair}: chosen layers {chosen['layers']}")


if __name__ == "__main__":
    run_stage(main)
