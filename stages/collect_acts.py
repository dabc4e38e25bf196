"""Stage collect_acts: residual stream of both models at the same aligned positions, per mode.

    python -m stages.collect_acts --pair cultural --filtered data/filtered/cultural --out artifacts/acts/cultural

Writes ``<out>/<mode>/shard-NNNNN.safetensors`` (tensors ``base.layers.{i}.resid_post`` and
``tuned.layers.{i}.resid_post``, (n_positions, d) each), ``<out>/<mode>/index.parquet`` (one row per
position, see :func:`mechdiff.models.collect_acts.position_plan`) and ``<out>/fingerprint.json``. Finished shards
are kept in ``<out parent>/.<out name>.partial`` until the stage completes, so a killed run resumes from them.

Several GPUs: start one worker per GPU, then the stage itself, which finds every shard finished and only
assembles them, reading the model configs but not the weights (shard s belongs to worker s mod n; a
shard's content does not depend on who computed it, so the result is byte-identical to a single run):

    for i in 0 1; do CUDA_VISIBLE_DEVICES=$i python -m stages.collect_acts ... --worker $i/2 & done; wait
    python -m stages.collect_acts ...          # (or dvc repro collect_acts@<pair>)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mechdiff.data.prompt_schema import conform
from mechdiff.fingerprint import digest
from mechdiff.models.batch_size import resolve_batch_size
from mechdiff.models.collect_acts import (LazyModels, WorkerError, capture_shard, iter_shards, parse_worker, plan_positions,
                                   position_plan, probe_capture, scan_layers)
from mechdiff.models.load import load_pair_configs
from mechdiff.models.oom import HalveOnOOM
from stages.acts_fingerprint import fingerprint
from stages.acts_io import assemble, open_partial, write_shard
from stages.common import atomic_write_json, load_pair_params, progress, read_table, run_stage, stage_parser
from stages.pair_io import load_models


def collect_mode(models, prompts, plan, mode, layers, params, partial: Path, fp: dict, pad_ids,
                 halve: HalveOnOOM, batch_size: int, worker: tuple[int, int] = (0, 1)) -> None:
    """Capture every shard of ``mode`` not already finished in ``partial`` whose index ``s`` has
    ``s % n == i`` for ``worker = (i, n)`` (:func:`mechdiff.models.collect_acts.capture_shard`) and write it there."""
    t0, n_tok, where = time.perf_counter(), 0, plan_positions(plan)
    n_shards = -(-plan["prompt"].nunique() // params.acts.shard_prompts)
    for s, batches in progress(iter_shards(plan, prompts, mode, params.acts.shard_prompts, batch_size),
                               f"collect_acts {mode}", total=n_shards, unit="shard"):
        path = partial / mode / f"shard-{s:05d}.safetensors"
        if path.exists() or s % worker[1] != worker[0]:
            continue
        merged, tokens = capture_shard(models, prompts, mode, batches, where, layers, pad_ids, halve)
        n_tok += tokens
        write_shard(path, merged, fp)
        print(f"collect_acts {mode} shard {s}: {n_tok / (time.perf_counter() - t0):.0f} tokens/s", flush=True)


def choose_batch_size(models, prompts, layers, pad_ids, acts, partial: Path) -> dict:
    """``{"batch_size", "how", "device"}``: ``acts.batch_size``, or with ``acts.auto_batch`` on a GPU the
    largest power of two that fits the longest prompts (mechdiff.models.batch_size). Found once: an unfinished run's
    choice (``batch.json`` in the partial folder) is reused, so resumed shards batch the same way."""
    saved = partial / "batch.json"
    if saved.exists():
        return json.loads(saved.read_text())
    device = str(next(models["base"].parameters()).device)
    size, how = resolve_batch_size("auto" if acts.auto_batch else acts.batch_size, device,
                                   lambda b: probe_capture(models, prompts, layers, pad_ids, b),
                                   limit=max(1, min(256, len(prompts))))
    batch = {"batch_size": size, "how": how, "device": device}
    atomic_write_json(saved, batch)
    print(f"collect_acts: batch size {size} ({how})")
    return batch


def main() -> None:
    ap = stage_parser(__doc__, "--pair", "--filtered", "--out")
    ap.add_argument("--worker", help="i/n: compute only shards s with s %% n == i into the unfinished-work folder "
                                     "and exit (one worker per GPU); a run without it then assembles them")
    args = ap.parse_args()
    worker = parse_worker(args.worker)
    params = load_pair_params(args.params, args.pair)
    pair, acts = params.pairs[args.pair], params.acts
    torch.manual_seed(params.seed)
    prompts = conform(read_table(Path(args.filtered) / "prompts.parquet"))
    models = LazyModels(lambda: load_models(params, pair))  # loaded at the first shard that needs computing
    try:
        configs = dict(zip(("base", "tuned"), load_pair_configs(pair, params.fairness.trust_remote_code)))
    except Exception:  # noqa: BLE001 - loading the models instead gives the loader's message (bad id, gated, ...)
        configs = {side: models[side].config for side in models}
    layers = scan_layers(configs["base"].num_hidden_layers, params.layers.scan_stride)
    pad_ids = {s: (c.pad_token_id if c.pad_token_id is not None else 0) for s, c in configs.items()}
    fp = fingerprint(params, pair, layers, digest(prompts["id"].tolist()))
    partial = open_partial(args.out, fp, f"collect_acts@{args.pair}")
    plans = {m: position_plan(prompts, m, params.fairness.n_sampled_positions, params.seed) for m in params.fairness.modes}
    if worker[1] > 1 and acts.auto_batch and not (partial / "batch.json").exists():
        raise WorkerError("acts.auto_batch with --worker: the workers must batch alike, so the probe runs once "
                          "first. Fix: start the same command without --worker and stop it once it prints "
                          "'collect_acts: batch size' (batch.json is then recorded), or set acts.auto_batch: false")
    batch = choose_batch_size(models, prompts, layers, pad_ids, acts, partial)
    halve = HalveOnOOM(what="collect_acts batch")  # one per run: the first halving is logged once
    for mode, plan in plans.items():
        if len(plan):
            collect_mode(models, prompts, plan, mode, layers, params, partial, fp, pad_ids, halve, batch["batch_size"],
                         worker)
    if args.worker:
        print(f"collect_acts@{args.pair}: worker {args.worker} finished its shards in {partial}")
        return
    assemble(args.out, partial, plans, fp, layers, batch)
    print(f"collect_acts@{args.pair}: layers {layers}; positions per mode "
          f"{ {m: len(p) for m, p in plans.items()} } -> {args.out}"
          + ("" if models.loaded else " (nothing left to compute: assembled without loading the models)"))


if __name__ == "__main__":
    run_stage(main)
