"""Benchmark: head importance three ways, on the same prompts and continuation tokens.

* ``per_head_full``: every head of layer ``--layer`` zero-ablated, one full forward per head
  (``mechdiff.rq3.head_sweep.head_sweep_full``): the reference loop;
* ``prefix_reuse``: the same ablations in one batched pass that runs the blocks below the layer once
  and only blocks >= layer on the batch of ablated copies (``mechdiff.rq3.head_sweep.head_sweep``);
  its log-probs must equal the loop's (largest absolute difference reported);
* ``attribution``: grad x activation scores of ALL heads of ALL scanned layers (every ``--stride``-th
  layer) from one forward and one backward per batch (``mechdiff.rq4.attribution.attribute``).

The issue's targets: prefix reuse >= 0.9 * n_layers / (n_layers - layer) times faster than the loop;
attribution of all scanned layers >= 8x faster than the per-head loop for one layer.

Prints one JSON object (environment, shapes, per-repeat seconds, medians, ratios, agreement).

Usage::

    python benchmarks/bench_heads.py --device cuda --layer 22            # 8B-shaped random, bf16
    python benchmarks/bench_heads.py --device cpu --threads 1             # organism-shaped random
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from mechdiff.models.collect_acts import scan_layers  # noqa: E402
from mechdiff.rq3 import head_sweep as hw  # noqa: E402
from mechdiff.rq4.attribution import attribute  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None)
    p.add_argument("--shape", choices=sorted(bc.SHAPES), default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--length", type=int, default=64, help="prompt tokens")
    p.add_argument("--cont", type=int, default=3, help="continuation tokens scored")
    p.add_argument("--layer", type=int, default=None, help="ablated layer (default: n_layers * 11 // 16, 22 of 32)")
    p.add_argument("--stride", type=int, default=2, help="attribution scans every stride-th layer")
    p.add_argument("--batch", type=int, default=None, help="attribution batch size (default: all prompts)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    model, name = bc.model_from_args(args)
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    layer = args.layer if args.layer is not None else n_layers * 11 // 16
    scanned = scan_layers(n_layers, args.stride)
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, cfg.vocab_size, (args.length - 1 - (i % 5),), generator=g).tolist()
               for i in range(args.prompts)]
    conts = [torch.randint(3, cfg.vocab_size, (args.cont,), generator=g).tolist() for _ in prompts]
    rows = list(zip(prompts, conts))
    settings = [hw.HeadSetting("zero", (h,)) for h in range(n_heads)]
    bc.log(f"{name}; layer {layer}; {len(prompts)} prompts; attribution layers {scanned}")

    fns = {
        "per_head_full": lambda: hw.head_sweep_full(model, rows, 0, layer, settings),
        "prefix_reuse": lambda: hw.head_sweep(model, rows, 0, layer, settings),
        "attribution": lambda: attribute(model, prompts, conts, 0, scanned, args.batch or len(prompts)),
    }
    secs = bc.round_robin(fns, dev, args.warmup, args.repeats, bc.log)
    med = {k: bc.median(v) for k, v in secs.items()}

    slow, fast, attr = (fns[k]() for k in ("per_head_full", "prefix_reuse", "attribution"))
    clean = hw.head_sweep_full(model, rows, 0, layer, [hw.HeadSetting("none")])[0]
    full_over_prefix = med["per_head_full"] / med["prefix_reuse"]
    full_over_attr = med["per_head_full"] / med["attribution"]
    prefix_target = 0.9 * n_layers / (n_layers - layer)
    out = {"benchmark": "bench_heads", **bc.env_info(dev), "model": name,
           "attn_implementation": cfg._attn_implementation, "dtype": args.dtype,
           "prompts": args.prompts, "prompt_tokens": args.length, "continuation_tokens": args.cont,
           "n_layers": n_layers, "n_heads": n_heads, "ablated_layer": layer, "ablation": "zero, one head at a time",
           "attribution_layers": scanned, "attribution_heads_scored": len(scanned) * n_heads,
           "attribution_batch": args.batch or len(prompts), "warmup": args.warmup, "repeats": args.repeats,
           "seconds": secs, "median_s": med,
           "ratio_per_head_full_over_prefix_reuse": full_over_prefix,
           "target_prefix_reuse": prefix_target, "target_prefix_reuse_met": full_over_prefix >= prefix_target,
           "ratio_per_head_full_over_attribution": full_over_attr,
           "target_attribution>=8": full_over_attr >= 8,
           "max_abs_diff_logprob_prefix_vs_full": float((fast - slow).abs().max()),
           "max_abs_logprob": float(slow.abs().max()),
           "max_abs_diff_attribution_clean_metric_vs_clean_logprob":
               float((torch.as_tensor(attr.metric, dtype=torch.float64) - clean).abs().max()),
           "attribution_score_shape": list(attr.score.shape)}
    return bc.emit(out, dev, args.out)


if __name__ == "__main__":
    main()
