"""Reading collect_acts output: index tables and per-layer state matrices of both models."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from mechdiff.fingerprint import check_fingerprint
from stages.common import StageError, read_table, read_tensors


def read_fingerprint(acts_dir: Path) -> dict:
    """The fingerprint collect_acts stored with the activations."""
    path = Path(acts_dir) / "fingerprint.json"
    if not path.exists():
        raise StageError(f"{acts_dir} has no fingerprint.json; rerun collect_acts (dvc repro)")
    return json.loads(path.read_text())


def load_mode(acts_dir: Path, mode: str) -> tuple[pd.DataFrame, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """(index table, {layer: (base (n, d), tuned (n, d))}) of one mode, float32, shards concatenated.

    Every shard's stored fingerprint must match the directory's (a mixed cache is refused).
    """
    fp = read_fingerprint(acts_dir)
    index = read_table(Path(acts_dir) / mode / "index.parquet")
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in sorted((Path(acts_dir) / mode).glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            stored = json.loads((f.metadata() or {}).get("fingerprint", "{}"))
        check_fingerprint({k: v for k, v in fp.items() if k not in ("layers", "modes")}, stored,
                          f"activation shard {shard}")
        for name, t in read_tensors(shard).items():
            parts.setdefault(name, []).append(t.float())
    layers = sorted({int(n.split(".")[2]) for n in parts})
    states = {layer: (torch.cat(parts[f"base.layers.{layer}.resid_post"]),
                      torch.cat(parts[f"tuned.layers.{layer}.resid_post"])) for layer in layers}
    ids = index["id"].tolist() if "id" in index else [str(i) for i in range(len(index))]
    for layer, pair in states.items():
        for side, x in zip(("base", "tuned"), pair):
            if x.shape[0] != len(index):
                raise StageError(f"{acts_dir}/{mode}: layer {layer} has {x.shape[0]} rows but the index has "
                                 f"{len(index)}; the activations are incomplete: rerun collect_acts")
            bad = ~torch.isfinite(x).all(dim=-1)
            if bad.any():
                row = int(bad.nonzero()[0])
                raise StageError(f"{acts_dir}/{mode}: {side}.layers.{layer}.resid_post holds a non-finite value "
                                 f"(NaN or Inf) at row {row}, prompt {ids[row]!r}; the stored activations are "
                                 "corrupt: delete the directory and rerun collect_acts (dvc repro -f -s collect_acts@<pair>)")
    return index, states
