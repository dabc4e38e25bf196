"""collect_acts output: its unfinished-work folder and shards while it runs, the assembled directory, and
reading it back (index tables and per-layer state matrices of both models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mechdiff.fingerprint import StaleCacheError, check_fingerprint
from stages.common import StageError, atomic_dir, atomic_write, atomic_write_json, read_table, read_tensors


def open_partial(out: str | Path, fp: dict, what: str) -> Path:
    """The unfinished-work folder of ``out`` (``<parent>/.<name>.partial``), which keeps finished shards until
    the stage completes: resumed when its fingerprint is ``fp``, emptied otherwise; ``fp`` recorded in it."""
    partial = Path(out).parent / f".{Path(out).name}.partial"
    if (partial / "fingerprint.json").exists():
        try:
            check_fingerprint(fp, json.loads((partial / "fingerprint.json").read_text()), "unfinished collect_acts work")
            print(f"{what}: resuming from finished shards in {partial}")
        except StaleCacheError as err:
            print(f"{what}: discarding unfinished work ({err})")
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(partial / "fingerprint.json", fp)
    return partial


def write_shard(path: Path, tensors: dict, fp: dict) -> None:
    """One shard of activations (safetensors, ``fp`` in its metadata), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"fingerprint": json.dumps(fp, sort_keys=True)}  # one key: safetensors' metadata map is unordered
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def assemble(out: str | Path, partial: Path, plans: dict, fp: dict, layers: list[int], batch: dict) -> None:
    """Write ``out`` from the finished shards in ``partial`` (then removed): per mode ``index.parquet`` (its
    plan) and the shards, ``fingerprint.json`` (``fp`` with the layers and modes) and ``batch.json``."""
    with atomic_dir(out) as tmp:
        for mode, plan in plans.items():
            (tmp / mode).mkdir()
            plan.to_parquet(tmp / mode / "index.parquet", index=False)
            for shard in sorted((partial / mode).glob("shard-*.safetensors")) if len(plan) else []:
                shutil.copy2(shard, tmp / mode / shard.name)
        atomic_write_json(tmp / "fingerprint.json", {**fp, "layers": layers, "modes": list(plans)})
        atomic_write_json(tmp / "batch.json", batch)
    shutil.rmtree(partial)


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
