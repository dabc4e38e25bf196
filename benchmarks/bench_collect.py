"""Benchmark: ``collect_acts`` end to end (both models, shards written) against the plain forward.

Runs the stage's own per-mode loop, ``stages.collect_acts.collect_mode`` (position plan from
``mechdiff.models.collect_acts.position_plan``, length-sorted batches from ``iter_shards``, ``capture_plan_batch``
for the base and the tuned model, finiteness checks, reordering and the safetensors shard written
atomically), on synthetic prompts, into a fresh temporary directory per repeat. The reference is the
plain forward (no hooks, nothing kept) of both models over exactly the same padded batches. Both are
timed round-robin after a warm-up; tokens/s counts every input token of both models.

Default on CUDA: two random Llama-3.1-8B-shaped models (bf16, SDPA, different seeds) as the pair,
256 prompts of 512 tokens, batch 8, every 2nd layer (16 of 32), last token + 8 sampled positions per
prompt, one shard of 256 prompts (params.yaml ``acts.shard_prompts``).

Prints one JSON object (environment, shapes, per-repeat seconds, medians, tokens/s, the ratio
``collect / plain`` in tokens/s, and the shard sizes written).

Usage::

    python benchmarks/bench_collect.py --device cuda
    python benchmarks/bench_collect.py --device cpu --prompts 32 --length 64 --threads 1     # organism shape
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from mechdiff.data.rendering import pad_batch  # noqa: E402
from mechdiff.models.collect_acts import capture_plan_batch, input_ids_for, iter_shards, position_plan, scan_layers  # noqa: E402
from stages.collect_acts import collect_mode  # noqa: E402

MODE = "strict"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="base model directory (the tuned side: --tuned)")
    p.add_argument("--tuned", default=None, help="tuned model directory (default: --model again)")
    p.add_argument("--shape", choices=sorted(bc.SHAPES), default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--length", type=int, default=None, help="tokens per prompt (512 CUDA, 64 CPU)")
    p.add_argument("--min-length", type=int, default=None, help="draw lengths in [min-length, length]")
    p.add_argument("--batch", type=int, default=8, help="params acts.batch_size")
    p.add_argument("--shard-prompts", type=int, default=256, help="params acts.shard_prompts")
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--sampled", type=int, default=8, help="params fairness.n_sampled_positions")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tmp", default=None, help="where shards are written (default: the system temp dir)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time capture_plan_batch alone over the same batches (no tables, no writing) and "
                        "the safetensors write of shards of the same size alone")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.length = a.length or (512 if cuda else 64)
    return a


def synthetic_prompts(n: int, length: int, min_length: int | None, vocab: int, seed: int = 0) -> pd.DataFrame:
    """The filtered-prompt table columns collect_acts reads, for ``MODE`` (both models read the same ids:
    a same-tokenizer pair; every content position after BOS is an aligned pair)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = length if min_length is None else int(rng.integers(min_length, length + 1))
        ids = [1] + rng.integers(3, vocab, t - 1).tolist()
        pos = np.arange(1, t, dtype=np.int64)
        rows.append({"id": f"p{i:05d}", "language": "en", "task": "chat", "split": "dev",
                     "base_input_ids": ids, "tuned_input_ids": ids,
                     f"kept_{MODE}": True, f"pos_base_{MODE}": pos, f"pos_tuned_{MODE}": pos})
    return pd.DataFrame(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    dtype = getattr(torch, args.dtype)
    if args.model:
        models = {"base": bc.load_dir(args.model, dev, dtype), "tuned": bc.load_dir(args.tuned or args.model, dev, dtype)}
        name = f"{args.model} / {args.tuned or args.model} ({args.dtype})"
    else:
        shape = args.shape or ("8b" if dev.startswith("cuda") else "organism")
        models = {"base": bc.random_llama(shape, dev, dtype, seed=0), "tuned": bc.random_llama(shape, dev, dtype, seed=1)}
        name = f"two random {shape}-shaped Llamas ({args.dtype}, sdpa, seeds 0 and 1)"
    cfg = models["base"].config
    layers = scan_layers(cfg.num_hidden_layers, args.stride)
    pad_ids = {s: 0 for s in models}
    prompts = synthetic_prompts(args.prompts, args.length, args.min_length, cfg.vocab_size)
    plan = position_plan(prompts, MODE, args.sampled, seed=0)
    params = SimpleNamespace(acts=SimpleNamespace(shard_prompts=args.shard_prompts, batch_size=args.batch))
    fp = {"benchmark": "bench_collect"}
    n_tokens = 2 * sum(len(x) for x in prompts["base_input_ids"])
    bc.log(f"{name}; {len(prompts)} prompts; {len(plan)} positions; layers {layers}")
    batches = [b for _, bs in iter_shards(plan, prompts, MODE, args.shard_prompts, args.batch) for b in bs]
    padded = {side: [pad_batch([input_ids_for(prompts.iloc[r], MODE)[side == "tuned"] for r in b], pad_ids[side], "right")
                     for b in batches] for side in models}

    @torch.inference_mode()
    def plain():
        for k in range(len(batches)):
            for side, model in models.items():
                ids, mask = padded[side][k]  # host tensors, moved like capture_plan_batch moves them
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)

    root = Path(args.tmp or tempfile.gettempdir())
    written = {}
    extra = {}  # arguments the stage's loop takes in this version of stages/collect_acts.py
    accepted = inspect.signature(collect_mode).parameters
    if "halve" in accepted:
        from mechdiff.models.oom import HalveOnOOM

        extra["halve"] = HalveOnOOM(log=lambda m: bc.log(m), what="collect_acts batch")
    if "batch_size" in accepted:  # the batch size the stage chose (here: fixed, --batch)
        extra["batch_size"] = args.batch

    def collect():
        partial = Path(tempfile.mkdtemp(prefix="bench_collect_", dir=root))
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the stage prints a progress line per shard
                collect_mode(models, prompts, plan, MODE, layers, params, partial, fp, pad_ids, **extra)
            shards = sorted((partial / MODE).glob("shard-*.safetensors"))
            written.update(n_shards=len(shards), shard_bytes=sum(s.stat().st_size for s in shards))
            if not written.get("checked"):
                from safetensors.torch import load_file

                t = load_file(str(shards[0]))
                written["tensors_per_shard"] = len(t)
                written["shard0_rows"] = int(next(iter(t.values())).shape[0])
                written["checked"] = True
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    fns = {"plain": plain, "collect_acts": collect}
    if args.breakdown:
        cap_in = {side: [([input_ids_for(prompts.iloc[r], MODE)[side == "tuned"] for r in b],
                          [plan.loc[plan["prompt"] == r, f"{side}_pos"].to_numpy() for r in b]) for b in batches]
                  for side in models}

        def capture_only():
            for k in range(len(batches)):
                for side, model in models.items():
                    capture_plan_batch(model, *cap_in[side][k], layers, pad_ids[side])

        esize = torch.finfo(dtype).bits // 8
        shard_sizes = [int(plan["prompt"].isin(chunk).sum()) for chunk in
                       [sorted(plan["prompt"].unique())[i:i + args.shard_prompts]
                        for i in range(0, plan["prompt"].nunique(), args.shard_prompts)]]
        fake = [{f"{side}.layers.{layer}.resid_post": torch.randn(n, cfg.hidden_size).to(dtype)
                 for side in models for layer in layers} for n in shard_sizes]

        def write_only():
            from safetensors.torch import save_file

            d = Path(tempfile.mkdtemp(prefix="bench_write_", dir=root))
            try:
                for k, tensors in enumerate(fake):
                    save_file(tensors, str(d / f"shard-{k:05d}.safetensors"), metadata={"fingerprint": "{}"})
            finally:
                shutil.rmtree(d, ignore_errors=True)

        fns.update(capture_only=capture_only, write_only=write_only)
        written["write_only_bytes"] = sum(n * cfg.hidden_size * esize * 2 * len(layers) for n in shard_sizes)
    secs = bc.round_robin(fns, dev, args.warmup, args.repeats, bc.log)
    med = {k: bc.median(v) for k, v in secs.items()}
    tps = {k: n_tokens / v for k, v in med.items()}
    ratio = med["plain"] / med["collect_acts"]
    out = {"benchmark": "bench_collect", **bc.env_info(dev), "model": name,
           "attn_implementation": cfg._attn_implementation, "dtype": args.dtype, "mode": MODE,
           "prompts": args.prompts, "length": args.length, "min_length": args.min_length, "batch": args.batch,
           "shard_prompts": args.shard_prompts, "n_batches_per_model": len(batches), "layers": layers,
           "positions_per_prompt": args.sampled + 1, "positions": len(plan), "tokens_both_models": n_tokens,
           "shards": written, "shard_dir": str(root), "warmup": args.warmup, "repeats": args.repeats,
           "seconds": secs, "median_s": med, "tokens_per_s": tps,
           "ratio_collect_over_plain_tokens_per_s": ratio, "target_ratio>=0.80": ratio >= 0.80}
    if args.breakdown:
        out["breakdown_note"] = ("capture_only: capture_plan_batch over the same batches, inputs prepared "
                                 "beforehand; write_only: save_file of shards of the same shapes; the rest of "
                                 "collect_acts - capture_only - write_only is the stage's table work per batch "
                                 "and the reordering of the rows")
        out["ratio_capture_only_over_plain_tokens_per_s"] = med["plain"] / med["capture_only"]
        out["collect_minus_capture_only_minus_write_only_s"] = med["collect_acts"] - med["capture_only"] - med["write_only"]
    return bc.emit(out, dev, args.out)


if __name__ == "__main__":
    main()
