"""Stage steer_sweep (RQ3): rank-k subspaces at the chosen layers; ablate in the tuned model, steer the base.

    python -m stages.steer_sweep --pair cultural --filtered data/filtered/cultural \
        --layers artifacts/results/cultural/layers.json --table artifacts/results/cultural/steer.csv \
        --info artifacts/results/cultural/steer_subspace.json

The subspace is fitted on the dev split, every (k, alpha) setting and its random control run in one batched
pass per prompt batch, on dev and test (the random draws on the target prompts only: their effect is all the
control uses, so their side-effect columns are empty), plus the language and prompt-format transfer probes
(mechdiff.rq3.steer_sweep). The steer_select stage (``stages/steer_select.py``) chooses k, alpha and the layer
without running a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from mechdiff.data.target import resolve as resolve_target
from mechdiff.rq3 import steer_sweep
from stages.common import (StageError, atomic_write, atomic_write_json, finite, load_pair_params, progress, run_stage,
                           stage_parser)
from stages.pair_io import load_pair


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
    parts = steer_sweep.cap_parts(task.parts(frame), p.max_prompts, params.seed)
    for split in ("dev", "test"):
        if (parts["target"]["split"] == split).sum() < 2:
            raise StageError(f"steer_sweep@{args.pair}: fewer than 2 target prompts ({task.name} target, measure "
                             f"{task.measure}) in the {split} split; add target prompts to pairs.{args.pair}.datasets "
                             "(or name them in its target.prompts) or move data.dev_fraction")
    modes = list(dict.fromkeys([params.fairness.primary_mode, "base_ids", "aligned"]))
    rows, info = [], {"pair": args.pair, "task": task.task, "mode": p.mode, "layers": {}}
    layers = [int(x) for x in json.loads(Path(args.layers).read_text())["layers"]]
    for layer in progress(layers, f"steer_sweep@{args.pair}", unit="layer"):
        r, sub_info, sub = steer_sweep.run_layer(base, tuned, toks, parts, layer, p, task, modes, params.seed)
        lang, lang_note = steer_sweep.language_rows(base, tuned, toks, parts, layer, p, task, modes, params.seed)
        fmt, fmt_note = steer_sweep.format_rows(base, tuned, toks, parts, layer, sub, p, task, params.fairness)
        rows += r + lang + fmt
        info["layers"][str(layer)] = {"subspace": sub_info, "notes": {"language": lang_note, "format": fmt_note}}
    atomic_write(args.table, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g"))
    atomic_write_json(args.info, finite(info))
    print(f"steer_sweep@{args.pair}: {len(rows)} rows over layers {sorted(info['layers'])}")


def main() -> None:
    ap = stage_parser(__doc__, "--pair", "--filtered", "--layers", "--table", "--info", raw_doc=True)
    args = ap.parse_args()
    sweep(args, load_pair_params(args.params, args.pair))


if __name__ == "__main__":
    run_stage(main)
