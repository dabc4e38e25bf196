"""Stage build_models: build the embedded model organisms (base, cultural, cognitive) on the CPU.

    python -m stages.build_models [--params params.yaml] [--out artifacts/models]

Writes ``<out>/{base,cultural,cognitive}/`` (``save_pretrained``: safetensors + tokenizer files +
``ground_truth.json``) and ``<out>/build_report.json`` (params, behaviour measured on the
held-out world prompts, and the acceptance gaps). The ``null`` pair needs nothing: it reuses ``base``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

from stages import OMP_POLICY_FROM_USER

# Before torch loads OpenMP. Training owns the machine in `dvc repro` (stages run one at a time), and
# there OpenMP's default policy (workers spin briefly before sleeping) trains 1.5x faster than PASSIVE
# (0.13 vs 0.20 s per pretraining step on an idle 2-core box). Sharing the cores with another torch
# process is where spinning hurts (~17x slower, 147 s vs 8 s for 20 steps): set OMP_WAIT_POLICY=PASSIVE
# there (the tests do); an explicit setting always wins. The policy never changes the numerics.
if not OMP_POLICY_FROM_USER:
    os.environ.pop("OMP_WAIT_POLICY", None)

import torch  # noqa: E402
import transformers  # noqa: E402

from mechdiff.behaviour import evaluate_world  # noqa: E402
from mechdiff.config import OrganismParams  # noqa: E402
from mechdiff.organisms import acceptance, build_organisms  # noqa: E402
from stages.common import ROOT, atomic_dir, atomic_write_json, load_stage_params, run_stage  # noqa: E402

NAMES = ("base", "cultural", "cognitive")
N_THREADS = 2  # fixed: bit-identical weights need the same thread count on the same machine


def setup_determinism(threads: int = N_THREADS) -> None:
    """Fixed thread count and deterministic kernels (same seed -> bit-identical weights)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def build(p: OrganismParams, out: Path, log=print) -> dict:
    """Build, evaluate and write every organism under ``out``; returns the report."""
    setup_determinism()
    t0 = time.perf_counter()
    organisms, info = build_organisms(p, log=log)
    t_build = time.perf_counter() - t0
    evals = {name: evaluate_world(o.model, o.tokenizer, p.seed) for name, o in organisms.items()}
    t_eval = time.perf_counter() - t0 - t_build
    for name in NAMES:
        o = organisms[name]
        o.ground_truth["behaviour"] = evals[name]
        with atomic_dir(out / name) as tmp:
            o.model.save_pretrained(tmp)  # safetensors (the only format in transformers 5)
            o.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "ground_truth.json", o.ground_truth)
    gaps = acceptance(evals)
    report = {"params": dataclasses.asdict(p), "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "wall_s": {"build": t_build, "evaluate": t_eval, "total": time.perf_counter() - t0, **{
                  k: v for k, v in info.items() if k.endswith("_wall_s")}},
              "training": {k: v for k, v in info.items() if not k.endswith("_wall_s")},
              "behaviour": evals, "acceptance": gaps, "all_ok": all(g["ok"] for g in gaps.values())}
    # the copy inside the models directory holds no wall times, so identical weights give an identical
    # directory hash and a rebuild does not invalidate every downstream stage
    atomic_write_json(out / "build_report.json", {k: v for k, v in report.items() if k != "wall_s"})
    for name, g in gaps.items():
        log(f"  {'ok ' if g['ok'] else 'MISS'} {name}: {g['value']:.3f} (target {g['target']})")
    log(f"build_models: {report['wall_s']['total']:.1f}s -> {out}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "models"))
    ap.add_argument("--report", help="also write the build report here (the stage's DVC metrics file)")
    args = ap.parse_args()
    params = load_stage_params(args.params)
    report = build(params.organisms, Path(args.out))
    if args.report:
        atomic_write_json(args.report, report)


if __name__ == "__main__":
    run_stage(main)
