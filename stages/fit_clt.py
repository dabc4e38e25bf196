"""Stage fit_clt (RQ2): cross-model linear map base -> tuned at the chosen layers (not a cross-layer
transcoder), scored on held-out prompts against baselines, and the mapped patch vs the real patch.

    python -m stages.fit_clt --pair cultural --acts artifacts/acts/cultural --filtered data/filtered/cultural \
        --chosen artifacts/results/cultural/layers.json --maps artifacts/clt/cultural \
        --metrics artifacts/results/cultural/clt.json --fig figs/clt_cultural.png
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mechdiff.data.prompt_schema import conform  # noqa: E402
from mechdiff.rq2 import fit_clt as fc  # noqa: E402
from mechdiff.rq2 import mapped_patch as mp  # noqa: E402
from stages.acts_io import load_mode, read_fingerprint  # noqa: E402
from stages.common import (StageError, atomic_dir, atomic_write_json, finite, load_pair_params, read_table,  # noqa: E402
                           read_tensors, run_stage, save_figure, stage_parser)
from stages.pair_io import load_models  # noqa: E402

BARS = ("map", "procrustes", "identity", "shuffled", "mean")


def plot(fits: dict, patch: dict, pair: str, path: str) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    for i, name in enumerate(BARS):
        r2 = [(f.scores["heldout"].get(name) or {}).get("r2_uniform", np.nan) for f in fits.values()]
        ax.bar(np.arange(len(fits)) + 0.16 * i, np.clip(r2, -0.5, None), width=0.16, label=name)
    ax.set_xticks(np.arange(len(fits)) + 0.32, [f"layer {x}" for x in fits])
    ax.set(ylabel="held-out R2 (uniform)", title=f"Base->tuned linear map: {pair}", ylim=(-0.5, 1.05))
    ax.legend(fontsize=7)
    for i, arm in enumerate(mp.ARMS):
        bx.bar(np.arange(len(patch)) + 0.16 * i, [np.nan_to_num(s[f"{arm}_closed"]) for s in patch.values()],
               width=0.16, label=arm)
    bx.set_xticks(np.arange(len(patch)) + 0.32, [f"layer {x}" for x in patch])
    bx.set(ylabel="fraction of KL gap closed", title="mapped vs real patch", ylim=(-1, 1.1))
    bx.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = stage_parser(__doc__, "--pair", "--acts", "--filtered", "--chosen", "--maps", "--metrics", "--fig")
    args = ap.parse_args()
    params = load_pair_params(args.params, args.pair)
    pair, mode, clt, acts = params.pairs[args.pair], params.fairness.primary_mode, params.clt, params.acts
    torch.manual_seed(params.seed)
    fp = read_fingerprint(args.acts)
    chosen = json.loads(Path(args.chosen).read_text())["layers"]
    layers, uncaptured = fc.captured_layers(chosen, fp["layers"])
    if not layers:
        raise StageError(f"none of the chosen layers {chosen} was captured (captured: {fp['layers']}); "
                         "rerun collect_acts with a layers.scan_stride that covers them")
    for layer, used in uncaptured.items():
        print(f"fit_clt@{args.pair}: note: chosen layer {layer} lies between the layers collect_acts captured "
              f"(layers.scan_stride {params.layers.scan_stride}); the map is fitted at captured layer {used} instead")
    index, states = load_mode(args.acts, mode)
    if not len(index):
        raise StageError(f"{args.acts}: no captured positions in the primary mode {mode!r}; see fairness.json")
    ids = index["id"].astype(str).to_numpy()
    prompts = conform(read_table(Path(args.filtered) / "prompts.parquet"))
    classes = fc.prompt_classes(prompts)
    rows, test = fc.split_rows(ids, clt.n_positions, clt.heldout_fraction, clt.cv_folds, params.seed,
                               strata=[classes.get(i, "unlabelled") for i in ids])
    kw = {"lambdas": clt.lambdas, "cv_folds": clt.cv_folds, "prior": clt.prior, "pca_dim": clt.pca_dim}
    fits = {layer: fc.fit_layer(states[layer][0][rows], states[layer][1][rows], ids[rows], test, map_kwargs=kw,
                                seed=params.seed, n_random=clt.n_random) for layer in layers}

    models = list(load_models(params, pair))  # as collect_acts: the map's inputs match
    pads = tuple(m.config.pad_token_id if m.config.pad_token_id is not None else 0 for m in models)
    held = prompts[prompts[f"kept_{mode}"] & prompts["id"].astype(str).isin(set(ids[rows][test]))]
    held = held.sample(n=min(clt.patch_prompts, len(held)), random_state=params.seed).sort_index()
    records = held.to_dict("records")
    patched = mp.patched_states(*models, records, mode, layers, pads, acts.batch_size)  # the ceiling's rows
    fits = {layer: fc.with_ceiling(f, *patched[layer], len(records), kw) for layer, f in fits.items()}
    id_map = read_tensors(Path(args.filtered) / "id_map.safetensors")
    maps = {layer: {"mapped": f.ridge, "ceiling": f.ceiling, "random": f.random} for layer, f in fits.items()}
    patch_rows = mp.mapped_patch(*models, records, mode, maps,
                                 (id_map["base_ids"], id_map["tuned_ids"]), pads, clt.patch_alpha, acts.batch_size)
    patch = mp.summarise_patch(patch_rows, clt.agreement_tolerance, classes, seed=params.seed)

    metrics = {"mode": mode, "alpha": clt.patch_alpha, "tolerance": clt.agreement_tolerance,
               "chosen_layers": chosen, "fitted_instead": {str(k): v for k, v in uncaptured.items()},
               "n_positions": len(rows), "below_min_positions": int(len(rows) < clt.min_positions),
               **fc.layer_report(fits, patch)}
    config = {"pair": args.pair, "mode": mode, "layers": layers, "clt": dataclasses.asdict(clt), "seed": params.seed,
              "acts_fingerprint": fp, "heldout_prompts": sorted(set(ids[rows][test])),
              "patch_prompts": held["id"].astype(str).tolist(), "arms": mp.ARM_DOC}
    with atomic_dir(args.maps) as tmp:
        # "mechdiff.xmodel_map": the format name from before mechdiff.rq2.fit_clt was renamed, kept byte-identical
        save_file(fc.map_tensors(fits), str(tmp / "maps.safetensors"), metadata={"format": "mechdiff.xmodel_map"})
        atomic_write_json(tmp / "config.json", finite(config))
    atomic_write_json(args.metrics, finite(metrics))
    plot(fits, patch, args.pair, args.fig)
    print(f"fit_clt@{args.pair}: note: {len(rows)} positions < clt.min_positions {clt.min_positions}"
          if metrics["below_min_positions"] else f"fit_clt@{args.pair}: {len(rows)} positions")
    print("\n".join(fc.report_lines(args.pair, fits, patch, clt.agreement_tolerance)))


if __name__ == "__main__":
    run_stage(main)
