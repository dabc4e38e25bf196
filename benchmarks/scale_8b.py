"""Issue 10's scale run: every pipeline stage on a Llama-3.1-8B-shaped pair in bfloat16 on one GPU.

    python benchmarks/scale_8b.py --out /tmp/scale8b [--layer 21 --rank 1] [--only build|stages]

1. ``build``: a random-weight Llama-3.1-8B-shaped base (hidden 4096, 32 layers, 32 / 8 heads, MLP 14336)
   with a 128,256-entry tokenizer constructed here (a byte-level BPE trained on the organisms' world
   corpus, widened Llama-3-style: fillers, then 256 reserved specials), and a tuned copy whose only
   change is a seeded rank-``--rank`` update of ``layers[--layer].mlp.down_proj``
   (:func:`mechdiff.organisms.planted.plant_random_edit`). Both are saved with ``save_pretrained`` (bf16).
2. ``stages``: the stage commands of ``dvc.yaml`` for a pair ``scale8b`` (``${key}`` substituted; each
   stage once its inputs exist), run one by one as subprocesses against a params file that points
   the pair at the two models, with ``acts.dtype: bfloat16`` and smaller sweeps. Every stage's wall
   time, peak GPU memory (``torch.cuda.max_memory_allocated``, all devices, via
   ``benchmarks/stage_peak.py``) and peak host memory are recorded. A finished stage is skipped on a
   rerun, so the run can span several calls.

Finally it reads back whether the planted layer and rank were recovered: the change rank of
``cka`` (``change_rank.csv``: no change below the planted layer, ``rank`` directions at it) and the
entry layer of ``layer_patch``. Writes ``scale8b.json`` (and every stage's log) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAIR = "scale8b"
MODELS = Path("artifacts/scale8b_models")

# Smaller sweeps than the default so the whole run fits a few minutes of GPU time.
OVERRIDES = {
    "acts": {"dtype": "bfloat16", "batch_size": 128},
    "behaviour": {"max_prompts": 64, "n_bootstrap": 200},
    "cka": {"n_permutations": 20, "n_bootstrap": 20},
    "layers": {"patch_prompts": 64},
    "clt": {"n_positions": 4000, "min_positions": 1000, "patch_prompts": 32},
    "steer": {"ks": [1, 2, 4], "alphas": [1.0, 2.0], "max_prompts": 32, "n_bootstrap": 100, "max_rows": 2048},
    "head_patch": {"max_prompts": 32, "n_random": 5, "n_bootstrap": 100, "max_rows": 2048},
    "attribution": {"max_prompts": 32},
}


def sync_code(workdir: Path) -> None:
    """Copy the code and the pipeline files of this checkout into ``workdir`` and run from there."""
    import shutil

    global ROOT
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("mechdiff", "stages", "benchmarks", "data/sources"):
        shutil.copytree(ROOT / name, workdir / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, workdir / name)
    ROOT = workdir


def build(layer: int, rank: int, relative_norm: float, seed: int, shape: str, device: str) -> dict:
    """Build and save the pair; returns its ground truth and timings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.bench_common import SHAPES, default_dtype
    from mechdiff.organisms import world
    from mechdiff.organisms.build_models import weight_delta_ranks
    from mechdiff.organisms.planted import EDITED_MODULE, plant_random_edit
    from mechdiff.organisms.tokenizer_build import train_bpe, widen_vocab

    t0 = time.perf_counter()
    docs = [world.document_text(d) for d in world.training_documents(8000, seed)]
    vocab = SHAPES[shape]["vocab_size"]
    tok = widen_vocab(train_bpe(docs, min(4000, vocab // 2)), vocab)
    cfg = LlamaConfig(**{**SHAPES[shape], "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                         "pad_token_id": tok.pad_token_id, "max_position_embeddings": 8192})
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(cfg)
    t_init = time.perf_counter()
    model.save_pretrained(MODELS / "base")
    tok.save_pretrained(MODELS / "base")
    name = f"model.layers.{layer}.{EDITED_MODULE}.weight"
    before = model.get_parameter(name).detach().clone()
    edit = plant_random_edit(model, layer, rank, relative_norm, seed + 1)
    ranks = weight_delta_ranks({name: before.float()}, {name: model.get_parameter(name).detach().float()}, rtol=1e-2)
    model.save_pretrained(MODELS / "tuned")
    tok.save_pretrained(MODELS / "tuned")
    return {"layer": layer, "rank": rank, "relative_norm": relative_norm, "edit": edit, "delta_rank_rtol_1e-2": ranks,
            "vocab": len(tok), "params": sum(p.numel() for p in model.parameters()),
            "init_s": round(t_init - t0, 1), "build_s": round(time.perf_counter() - t0, 1)}


def write_params(path: Path, dtype: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    world_ds = next(iter(params["pairs"].values()))["datasets"]
    params["pairs"] = {PAIR: {"description": "random Llama-3.1-8B-shaped base vs a copy with a planted edit",
                              "base": str(MODELS / "base"), "tuned": str(MODELS / "tuned"),
                              "base_revision": None, "tuned_revision": None, "domain": "cultural",
                              "tokenizer_policy": "shared_vocab_required", "datasets": world_ds}}
    for section, values in OVERRIDES.items():
        params[section].update(values)
    params["acts"]["dtype"] = dtype
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_commands(pair: str = PAIR, report: bool = True) -> list[tuple[str, list[str], list[str], list[str]]]:
    """``(name, argv, deps, outs)`` of every per-pair stage of ``pair`` (and the report), in ``dvc.yaml`` order."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, st in dvc.items():
        if name == "build_models" or (name == "report" and not report):
            continue
        body = st.get("do", st)
        sub = (lambda s: s.replace("${key}", pair))
        cmd = sub(" ".join(body["cmd"].split()))
        deps = [sub(d) for d in body.get("deps", []) if isinstance(d, str)]
        outs = [sub(next(iter(o)) if isinstance(o, dict) else o)
                for key in ("outs", "metrics", "plots") for o in body.get(key, [])]
        out.append((name, cmd.split(), deps, outs))
    return out


def run_stages(out: Path, pair: str = PAIR, report: bool = True, deadline: float | None = None,
               reserve_s: float = 150.0) -> list[dict]:
    """Run ``pair``'s stages one by one (each once its inputs exist; a stage finished in an earlier call is
    skipped). With ``deadline`` (a ``time.perf_counter()`` value), no stage starts less than ``reserve_s``
    before it: the run stops cleanly and a later call resumes. Returns one row per stage."""
    rows = []
    pending = stage_commands(pair, report)
    produced = {o for _, _, _, outs in pending for o in outs}
    while pending:
        ready = [s for s in pending if all(Path(d).exists() for d in s[2] if d in produced)]
        if not ready:
            raise SystemExit(f"no stage can run; waiting: {[s[0] for s in pending]}")
        name, argv, _, outs = ready[0]
        pending.remove(ready[0])
        done = ROOT / f".{pair}_done" / name
        if done.exists() and all(Path(o).exists() for o in outs):
            rows.append({**json.loads(done.read_text()), "earlier_call": True})
            continue
        if deadline is not None and time.perf_counter() > deadline - reserve_s:
            print(json.dumps({"stopped_before": name, "pair": pair}), flush=True)
            return rows + [{"stage": name, "not_run": "deadline"}]
        assert argv[:2] == ["python", "-m"], argv
        peak_file = out / f"peak_{pair}_{name}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "stage_peak.py"), str(peak_file), *argv[2:]]
        t0 = time.perf_counter()
        with open(out / f"log_{pair}_{name}.txt", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        peak = json.loads(peak_file.read_text()) if peak_file.exists() else {}
        row = {"pair": pair, "stage": name, "rc": rc, "wall_s": round(wall, 1),
               "host_peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), **peak}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if rc != 0:
            print((out / f"log_{pair}_{name}.txt").read_text()[-3000:])
            raise SystemExit(f"stage {name} of {pair} failed")
        done.parent.mkdir(exist_ok=True)
        done.write_text(json.dumps(row))
    return rows


def recovered(layer: int, rank: int) -> dict:
    import pandas as pd

    res = Path("artifacts/results") / PAIR
    change = pd.read_csv(res / "change_rank.csv")
    change = change[change["mode"] == "strict"].set_index("layer")
    below = change[change.index < layer]
    chosen = json.loads((res / "layers.json").read_text())
    lp = pd.read_csv(res / "layer_patch.csv")
    lp = lp[(lp["mode"] == "strict") & (lp["direction"] == "base->tuned")
            & (lp.get("split", "test") == "test")].set_index("layer")["fraction_closed"]  # test: chosen on dev
    return {"change_rank_90_by_layer": {int(k): int(v) for k, v in change["rank_90"].items()},
            "top1_energy_at_planted": float(change.loc[layer, "top1_energy"]),
            "rank_99_at_planted": int(change.loc[layer, "rank_99"]),
            "no_change_below": bool((below["rank_90"] == 0).all()),
            "rank_recovered": int(change.loc[layer, "rank_99"]) == rank,
            "patch_fraction_by_layer": {int(k): round(float(v), 4) for k, v in lp.items()},
            "chosen_layers": chosen["layers"], "chosen_reasons": chosen["reasons"],
            "layer_recovered": chosen["layers"][0] == layer and lp.get(layer, 0.0) >= 0.5
            and all(v < 0.5 for k, v in lp.items() if k < layer)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layer", type=int, default=21)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--relative-norm", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["build", "stages"])
    ap.add_argument("--shape", default="8b", help="8b; organism: a CPU smoke test of this script")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", help="run in this copy of the repository (code refreshed on every call, models "
                                      "and outputs kept), e.g. /tmp/scale8b on a machine whose checkout is "
                                      "re-synced")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if args.workdir:
        sync_code(Path(args.workdir))
    os.chdir(ROOT)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = ROOT / "scale8b_summary.json"  # kept in the (work) checkout across calls; copied to --out
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if args.only in (None, "build") and not (MODELS / "tuned" / "config.json").exists():
        summary["build"] = build(args.layer, args.rank, args.relative_norm, args.seed, args.shape, args.device)
        print(json.dumps(summary["build"]), flush=True)
        summary_path.write_text(json.dumps(summary, indent=1))
    if args.only in (None, "stages"):
        # the (work) checkout's own params.yaml: every stage reads it
        write_params(ROOT / "params.yaml", "bfloat16" if args.device.startswith("cuda") else "float32")
        summary["stages"] = run_stages(out)
        summary["recovered"] = recovered(args.layer, args.rank)
        print(json.dumps(summary["recovered"]), flush=True)
    import torch

    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary_path.write_text(json.dumps(summary, indent=1))
    (out / "scale8b.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
