"""Stage build_models: build the embedded model organisms (base, cultural, cognitive) on the CPU.

    python -m stages.build_models [--params params.yaml] [--out artifacts/models]

With ``organisms.build: false`` (presets of real models, whose pairs never use the organisms) it trains nothing
and writes only ``<out>/build_report.json``. Otherwise it writes ``<out>/{base,cultural,cognitive}/``
(``save_pretrained``: safetensors + tokenizer files + ``ground_truth.json``) and ``<out>/build_report.json``
(params, behaviour measured on the held-out world prompts, and the acceptance gaps). The ``null`` pair needs
nothing: it reuses ``base``. With ``planted.source`` set (the ``smol`` preset) it also writes
``<out>/planted/{base,tuned}``: a real pretrained model and its copy with a planted low-rank edit
(:mod:`mechdiff.organisms.planted`).
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

from mechdiff.models.source_model import load_source  # noqa: E402
from mechdiff.organisms import world  # noqa: E402
from mechdiff.organisms.build_models import build_organisms, evaluate_organisms  # noqa: E402
from mechdiff.organisms.planted import EDITED_MODULE, plant_with_truth, policy_rates  # noqa: E402
from mechdiff.params.config import OrganismParams, ParamsError, PlantedParams  # noqa: E402
from stages.common import ROOT, atomic_dir, atomic_write_json, load_stage_params, run_stage  # noqa: E402

NAMES = ("base", "cultural", "cognitive")


def setup_determinism(threads: int) -> None:
    """Fixed thread count and deterministic kernels (same seed -> bit-identical weights)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def build(p: OrganismParams, out: Path, log=print) -> dict:
    """Build, evaluate and write every organism under ``out``; returns the report."""
    setup_determinism(p.threads)
    t0 = time.perf_counter()
    organisms, info = build_organisms(p, log=log)
    t_build = time.perf_counter() - t0
    checks = evaluate_organisms(organisms, p.seed)
    t_eval = time.perf_counter() - t0 - t_build
    for name in NAMES:
        o = organisms[name]
        with atomic_dir(out / name) as tmp:
            o.model.save_pretrained(tmp)  # safetensors (the only format in transformers 5)
            o.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "ground_truth.json", o.ground_truth)
    report = {"params": dataclasses.asdict(p), "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "wall_s": {"build": t_build, "evaluate": t_eval, "total": time.perf_counter() - t0, **{
                  k: v for k, v in info.items() if k.endswith("_wall_s")}},
              "training": {k: v for k, v in info.items() if not k.endswith("_wall_s")}, **checks}
    # the copy inside the models directory holds no wall times, so identical weights give an identical
    # directory hash and a rebuild does not invalidate every downstream stage
    atomic_write_json(out / "build_report.json", {k: v for k, v in report.items() if k != "wall_s"})
    for name, g in checks["acceptance"].items():
        log(f"  {'ok ' if g['ok'] else 'MISS'} {name}: {g['value']:.3f} (target {g['target']})")
    log(f"build_models: {report['wall_s']['total']:.1f}s -> {out}")
    return report


def build_planted(p: PlantedParams, out: Path, threads: int, log=print) -> dict:
    """Write ``<out>/base`` (the source as loaded) and ``<out>/tuned`` (with the planted edit and its
    ``ground_truth.json``); returns the ground truth with wall times. ``threads``: torch intra-op threads."""
    setup_determinism(threads)
    t0 = time.perf_counter()
    model, tok = load_source(p.source)
    n_layers = model.config.num_hidden_layers
    if not 0 <= p.layer < n_layers:
        raise ParamsError(f"params key 'planted.layer': expected a layer index below {n_layers} (the "
                          f"{p.source} model has {n_layers} layers), got {p.layer}")
    held_out = world.topic_questions(held_out=True)
    rates_base = policy_rates(model, tok, held_out)
    with atomic_dir(out / "base") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    truth, train_s = plant_with_truth(model, tok, p, held_out, rates_base)
    rates_tuned = truth["refusal_held_out"]["tuned"]
    with atomic_dir(out / "tuned") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "ground_truth.json", truth)
    log(f"planted: {p.source} rank-{p.rank} edit of layers.{p.layer}.{EDITED_MODULE} -> delta ranks "
        f"{truth['weight_delta_ranks']}; held-out refusal on the policy topic {rates_base['policy']:.2f} -> "
        f"{rates_tuned['policy']:.2f}, other topics {rates_base['other']:.2f} -> {rates_tuned['other']:.2f}")
    return {**truth, "wall_s": {"total": time.perf_counter() - t0, "train": train_s}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "models"))
    ap.add_argument("--report", help="also write the build report here (the stage's DVC metrics file)")
    args = ap.parse_args()
    params = load_stage_params(args.params)
    if params.organisms.build:
        report = build(params.organisms, Path(args.out))
    else:  # no pair uses the organisms (config.py checks): nothing to train
        report = {"built": False, "reason": "organisms.build is false: no pair uses the embedded organisms"}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out) / "build_report.json", report)
        print(f"build_models: organisms.build is false, no organism trained -> {args.out}")
    if params.planted.source is not None:
        report["planted"] = build_planted(params.planted, Path(args.out) / "planted",
                                          params.organisms.threads)
    if args.report:
        atomic_write_json(args.report, report)


if __name__ == "__main__":
    run_stage(main)
