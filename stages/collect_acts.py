"""Stage collect_acts: residual stream of both models at the same aligned positions, per mode.

    python -m stages.collect_acts --pair cultural --filtered data/filtered/cultural --out artifacts/acts/cultural

Writes ``<out>/<mode>/shard-NNNNN.safetensors`` (tensors ``base.layers.{i}.resid_post`` and
``tuned.layers.{i}.resid_post``, (n_positions, d) each), ``<out>/<mode>/index.parquet`` (one row per
position, see :func:`mechdiff.collect.position_plan`) and ``<out>/fingerprint.json``. Finished shards
are kept in ``<out parent>/.<out name>.partial`` until the stage completes, so a killed run resumes from them.

Several GPUs: start one worker per GPU, then the stage itself, which finds every shard finished and only
assembles them, reading the model configs but not the weights (shard s belongs to worker s mod n; a
shard's content does not depend on who computed it, so the result is byte-identical to a single run):

    for i in 0 1; do CUDA_VISIBLE_DEVICES=$i python -m stages.collect_acts ... --worker $i/2 & done; wait
    python -m stages.collect_acts ...          # (or dvc repro collect_acts@<pair>)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mechdiff.errors import MechdiffError
from mechdiff.collect import capture_plan_batch, check_finite, input_ids_for, iter_shards, position_plan, scan_layers
from mechdiff.fingerprint import StaleCacheError, check_fingerprint, digest, library_versions
from mechdiff.models import effective_chat_template
from mechdiff.batch_size import resolve_batch_size
from mechdiff.oom import HalveOnOOM
from mechdiff.prompt_schema import conform
from stages.pair_io import load_models
from stages.common import (atomic_dir, atomic_write, atomic_write_json, file_digest, load_pair_params, progress,
                           read_table, run_stage)


def local_hash(model_id: str) -> str:
    """Digest of a local model directory's weight and tokenizer files (empty for Hub ids); files over
    64 MiB are sampled as track_inputs samples them (an 8B model is not read whole on every run)."""
    path = Path(model_id)
    if not path.is_dir():
        return ""
    return digest({p.name: file_digest(p) for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".json")})


def fingerprint(params, pair, layers, prompts_digest) -> dict:
    acts = params.acts
    return {"base": pair.base, "base_revision": str(pair.base_revision), "base_files": local_hash(pair.base),
            "tuned": pair.tuned, "tuned_revision": str(pair.tuned_revision), "tuned_files": local_hash(pair.tuned),
            "template": digest([params.fairness.template, params.fairness.template_date, params.fairness.system_prompt,
                                params.fairness.native_templates]),
            "chat_templates": digest([effective_chat_template(m, r, o) for (m, r), o in zip(
                ((pair.base, pair.base_revision), (pair.tuned, pair.tuned_revision)), pair.chat_templates())]),
            "dtype": acts.dtype, "attn_implementation": acts.attn_implementation,
            "sites": digest([f"layers.{i}.resid_post" for i in layers]), "prompts": prompts_digest,
            "positions": digest([params.fairness.n_sampled_positions, params.seed, list(params.fairness.modes)]),
            "shard_prompts": str(acts.shard_prompts), "versions": digest(library_versions())}


def collect_mode(models, prompts, plan, mode, layers, params, partial: Path, fp: dict, pad_ids,
                 halve: HalveOnOOM, batch_size: int, worker: tuple[int, int] = (0, 1)) -> None:
    """Capture every shard of ``mode`` not already finished in ``partial`` whose index ``s`` has
    ``s % n == i`` for ``worker = (i, n)``; ``halve`` runs each batch (an out-of-memory batch is halved
    and retried)."""
    t0, n_tok = time.perf_counter(), 0
    # per prompt row of the filtered table: its plan rows' positions per side and its row count, looked up
    # once (per-prompt pandas filtering inside the batch loop cost ~1.4 s per 256-prompt shard on an H100)
    where = {r: {side: g[f"{side}_pos"].to_numpy() for side in models} for r, g in plan.groupby("prompt", sort=False)}
    counts = {r: len(v["base"]) for r, v in where.items()}
    n_shards = -(-plan["prompt"].nunique() // params.acts.shard_prompts)
    for s, batches in progress(iter_shards(plan, prompts, mode, params.acts.shard_prompts, batch_size),
                               f"collect_acts {mode}", total=n_shards, unit="shard"):
        path = partial / mode / f"shard-{s:05d}.safetensors"
        if path.exists() or s % worker[1] != worker[0]:
            continue
        tensors: dict[str, list] = {}
        for batch in batches:
            for side, model in models.items():
                def run(rows, side=side, model=model):
                    ids = [input_ids_for(prompts.iloc[r], mode)[side == "tuned"] for r in rows]
                    return capture_plan_batch(model, ids, [where[r][side] for r in rows], layers, pad_ids[side])

                for rows, out in halve(run, batch):
                    for layer, t in out.items():
                        check_finite(t, f"{side} layers.{layer}.resid_post", [prompts.iloc[r]["id"] for r in rows])
                        tensors.setdefault(f"{side}.layers.{layer}.resid_post", []).append((rows, t))
                n_tok += sum(len(input_ids_for(prompts.iloc[r], mode)[side == "tuned"]) for r in batch)
        chunk = sorted(r for b in batches for r in b)
        order = {r: k for k, r in enumerate(chunk)}
        merged = {name: _in_prompt_order(parts, counts, order) for name, parts in tensors.items()}
        (partial / mode).mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": json.dumps(fp, sort_keys=True)}  # one key: safetensors' metadata map is unordered
        atomic_write(path, lambda tmp, m=merged: save_file(m, str(tmp), metadata=meta))
        print(f"collect_acts {mode} shard {s}: {n_tok / (time.perf_counter() - t0):.0f} tokens/s", flush=True)


class LazyModels(Mapping):
    """``{"base": model, "tuned": model}``, loaded by ``load()`` on first access of a model (iterating the
    sides does not load), so a run that finds every shard finished only assembles them."""

    def __init__(self, load: Callable[[], tuple]):
        self._load, self._models = load, None

    def __getitem__(self, side: str):
        if self._models is None:
            self._models = dict(zip(("base", "tuned"), self._load()))
        return self._models[side]

    def __iter__(self):
        return iter(("base", "tuned"))

    def __len__(self) -> int:
        return 2

    @property
    def loaded(self) -> bool:
        return self._models is not None


def load_configs(params, pair) -> tuple:
    """``(base, tuned)`` model configs (no weights) at the pair's pinned revisions."""
    from transformers import AutoConfig

    trc = params.fairness.trust_remote_code
    return tuple(AutoConfig.from_pretrained(m, revision=r, trust_remote_code=trc)
                 for m, r in ((pair.base, pair.base_revision), (pair.tuned, pair.tuned_revision)))


def _in_prompt_order(parts, counts: dict, order) -> torch.Tensor:
    """Concatenate per-batch tensors (rows grouped by batch; ``counts[r]`` rows for prompt r) into the
    plan's prompt order."""
    rows, keys = [], []
    for batch, t in parts:
        for r, block in zip(batch, torch.split(t, [counts[r] for r in batch])):
            rows.append(block)
            keys.append(order[r])
    return torch.cat([rows[k] for k in sorted(range(len(keys)), key=keys.__getitem__)]).contiguous()


def choose_batch_size(models, prompts, layers, pad_ids, acts, partial: Path) -> dict:
    """``{"batch_size", "how"}``: ``acts.batch_size``, or with ``acts.auto_batch`` on a GPU the largest
    power of two that fits the longest prompts (mechdiff.batch_size). Found once: an unfinished run's
    choice (``batch.json`` in the partial folder) is reused, so resumed shards batch the same way."""
    saved = partial / "batch.json"
    if saved.exists():
        return json.loads(saved.read_text())
    device = str(next(models["base"].parameters()).device)
    longest = sorted(range(len(prompts)), key=lambda r: -len(prompts.iloc[r]["base_input_ids"]))

    def probe(b: int) -> None:
        for side, model in models.items():
            ids = [input_ids_for(prompts.iloc[r], "base_ids")[side == "tuned"] for r in longest[:b]]
            capture_plan_batch(model, ids, [np.array([len(i) - 1]) for i in ids], layers, pad_ids[side])

    size, how = resolve_batch_size("auto" if acts.auto_batch else acts.batch_size, device, probe,
                                   limit=max(1, min(256, len(prompts))))
    batch = {"batch_size": size, "how": how, "device": device}
    atomic_write_json(saved, batch)
    print(f"collect_acts: batch size {size} ({how})")
    return batch


class WorkerError(MechdiffError):
    """A ``--worker`` request that cannot be honoured (malformed, or workers that would batch differently)."""


def parse_worker(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)`` (a single run)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise WorkerError(f"--worker {text!r}: expected i/n with 0 <= i < n, e.g. --worker 0/2")
    return i, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name in ("--pair", "--filtered", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--params", default="params.yaml")
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
        configs = dict(zip(("base", "tuned"), load_configs(params, pair)))
    except Exception:  # noqa: BLE001 - loading the models instead gives the loader's message (bad id, gated, ...)
        configs = {side: models[side].config for side in models}
    layers = scan_layers(configs["base"].num_hidden_layers, params.layers.scan_stride)
    pad_ids = {s: (c.pad_token_id if c.pad_token_id is not None else 0) for s, c in configs.items()}
    fp = fingerprint(params, pair, layers, digest(prompts["id"].tolist()))
    partial = Path(args.out).parent / f".{Path(args.out).name}.partial"
    if (partial / "fingerprint.json").exists():
        try:
            check_fingerprint(fp, json.loads((partial / "fingerprint.json").read_text()), "unfinished collect_acts work")
            print(f"collect_acts@{args.pair}: resuming from finished shards in {partial}")
        except StaleCacheError as err:
            print(f"collect_acts@{args.pair}: discarding unfinished work ({err})")
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(partial / "fingerprint.json", fp)
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
    with atomic_dir(args.out) as tmp:
        for mode, plan in plans.items():
            (tmp / mode).mkdir()
            plan.to_parquet(tmp / mode / "index.parquet", index=False)
            for shard in sorted((partial / mode).glob("shard-*.safetensors")) if len(plan) else []:
                shutil.copy2(shard, tmp / mode / shard.name)
        atomic_write_json(tmp / "fingerprint.json", {**fp, "layers": layers, "modes": list(plans)})
        atomic_write_json(tmp / "batch.json", batch)
    shutil.rmtree(partial)
    print(f"collect_acts@{args.pair}: layers {layers}; positions per mode "
          f"{ {m: len(p) for m, p in plans.items()} } -> {args.out}"
          + ("" if models.loaded else " (nothing left to compute: assembled without loading the models)"))


if __name__ == "__main__":
    run_stage(main)
