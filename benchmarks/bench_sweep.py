"""Benchmark: the batched RQ3 sweeps against their per-setting loops.

1. Steering sweep: greedy decoding of ``--new`` tokens plus teacher-forced scoring for every (k, alpha)
   setting (clean + 6 ranks x 4 strengths = 25 settings, as params.yaml) in ONE batched pass per prompt
   batch (``mechdiff.models.interventions.sweep``), against a Python loop over the settings, each run as its own
   batch. Both sides run the stage's measure, ``score_and_decode`` (one prompt pass serves decoding and
   scoring); ``--separate`` also times the two as separate passes.
2. Head patching: every head of a layer ablated (zero, mean, swap) with the layers below it run once
   and only the layers from it on run on the batch of ablated copies (``mechdiff.rq3.head_sweep.head_sweep``),
   against one full forward per (kind, head).

Prints one JSON object: device, versions, shapes, every repeat's seconds and medians, the ratios
``loop / batched`` and the largest absolute differences between the two results (they must agree).

The model is the cultural organism when ``artifacts/models/cultural`` exists (``--model`` overrides),
else a random Llama of the organisms' shape. On a GPU, pass ``--model`` an 8B-shaped random model
directory and ``--device cuda``, or ``--shape 8b`` (random Llama-3.1-8B-shaped weights built in
bf16 on the device, no directory needed).

Usage::

    python benchmarks/bench_sweep.py                   # CPU, organisms if built
    python benchmarks/bench_sweep.py --threads 1       # on a shared, loaded CPU box
    python benchmarks/bench_sweep.py --shape 8b --device cuda --prompts 50 --length 64 --new 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_common as bc  # noqa: E402
from mechdiff.data.rendering import pad_batch  # noqa: E402
from mechdiff.models import interventions  # noqa: E402
from mechdiff.models import measures  # noqa: E402
from mechdiff.rq3 import head_sweep as hw  # noqa: E402
from mechdiff.rq3.subspace import random_subspace  # noqa: E402

KS, ALPHAS = (1, 2, 3, 4, 6, 8), (0.5, 1.0, 2.0, 3.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the cultural organism if built)")
    p.add_argument("--shape", choices=["organism", "8b"], default=None,
                   help="random weights of this shape instead of a directory (8b: Llama-3.1-8B, bf16)")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--length", type=int, default=24, help="prompt tokens")
    p.add_argument("--new", type=int, default=16, help="greedy tokens decoded per setting")
    p.add_argument("--layer", type=int, default=None, help="steered / patched layer (default: n_layers // 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-rows", type=int, default=512, help="rows per batched forward (params steer.max_rows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared, loaded box)")
    p.add_argument("--out", default=None, help="also write the JSON here (after each part)")
    p.add_argument("--parts", nargs="+", choices=["steering", "heads"], default=["steering", "heads"])
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="weights of --shape 8b (default bfloat16); float32 shows whether bf16 rounding explains "
                        "greedy tokens that differ between the batched sweep and the loop")
    p.add_argument("--divergences", action="store_true",
                   help="for rows whose greedy tokens differ between batched and loop, the logit gap of the two "
                        "candidates where they first differ (ties that round differently, or a real difference)")
    p.add_argument("--separate", action="store_true",
                   help="also time decoding and scoring as two passes (the measure before score_and_decode)")
    return p.parse_args(argv)


def load(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.shape == "8b":  # Llama-3.1-8B shape, random weights (bf16 unless --dtype), built on the device
        dtype = args.dtype or "bfloat16"
        if dtype == "float32" and args.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = False  # true float32 products (TF32 rounds to 10 bits)
        return (bc.random_llama("8b", args.device, getattr(torch, dtype), seed=0),
                f"random Llama-3.1-8B-shaped ({dtype}, sdpa)")
    path = Path(args.model) if args.model else ROOT / "artifacts" / "models" / "cultural"
    if path.is_dir() and args.shape is None:
        name = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        model = LlamaForCausalLM.from_pretrained(path)
    else:  # the organisms' shape, random weights
        torch.manual_seed(0)
        model, name = LlamaForCausalLM(LlamaConfig(vocab_size=720, hidden_size=128, intermediate_size=352,
                                                   num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=256)), "random organism-shaped Llama"
    return model.to(args.device).eval(), name


def timed(fn, repeats: int, device: str, warmup: int = 1, what: str = ""):
    out, secs = None, []
    for _ in range(warmup):  # not timed: kernel selection, allocator growth, first-call library work
        t0 = time.perf_counter()
        fn()
        bc.log(f"{what} warm-up {time.perf_counter() - t0:.2f}s")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
        bc.log(f"{what} {secs[-1]:.2f}s")
    return out, secs


def with_peak(device: str, fn):
    """``(fn(), peak GiB of CUDA memory allocated during it, weights included)``; None on the CPU."""
    if not device.startswith("cuda"):
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, round(torch.cuda.max_memory_allocated() / 2**30, 2)


def divergences(model, settings, cont, a, b, limit: int = 64) -> dict:
    """Where the greedy tokens of two runs first differ (at most ``limit`` rows): the gap between the
    two candidates' logits there, recomputed by one cache-free forward of the common prefix under the
    row's setting. A gap near rounding size means the runs tie and round differently."""
    diff = (a != b).any(-1).nonzero().tolist()  # (setting, prompt) pairs
    gaps = []
    for s_, n_ in diff[:limit]:
        t = int((a[s_, n_] != b[s_, n_]).nonzero()[0])
        prefix = list(cont[n_][0]) + a[s_, n_, :t].tolist()
        logits = interventions.sweep(model, [settings[s_]], lambda m, r: measures.next_token_logits(m, r, 0), [prefix])[0][0, 0]
        top = logits.topk(2).values
        gaps.append({"setting": s_, "prompt": n_, "step": t, "logit_gap": float(
            (logits[a[s_, n_, t]] - logits[b[s_, n_, t]]).abs()), "top2_gap": float(top[0] - top[1]),
            "logit_scale": float(logits.abs().max())})
    g = [x["logit_gap"] for x in gaps]
    return {"rows_differing": len(diff), "rows_examined": len(gaps),
            "max_logit_gap": max(g) if g else None, "median_logit_gap": statistics.median(g) if g else None,
            "rows": gaps}


def steering_bench(model, rows, layer, args) -> dict:
    """The stage's steering measure (``score_and_decode``: one prompt pass for greedy decoding and
    teacher-forced scoring) batched vs looped; with ``--separate`` also the two measures run as separate
    passes (the pre-fusion measure), batched and looped, in the same run."""
    d = model.config.hidden_size
    basis = random_subspace(d, max(KS), seed=0)
    settings = [interventions.identity(d)] + [interventions.addition(a * 4.0 * basis[:, :k].sum(1) / k ** 0.5, (layer,))
                                   for k in KS for a in ALPHAS]  # clean + 24 (k, alpha) settings
    cont = [(r, r[-3:]) for r in rows]

    def fused(m, r):  # what steer_measures.evaluate runs per setting: tokens, continuation log-prob
        lp, _, tokens = measures.score_and_decode(m, r, 0, args.new)
        return tokens, lp

    def separate(m, r):  # decode and teacher-forced scoring as two passes over the prompts
        return measures.greedy_decode(m, [p for p, _ in r], 0, args.new), measures.continuation_scores(m, r, 0)[0]

    def batched(measure):
        return interventions.sweep(model, settings, measure, cont, max_rows=args.max_rows)

    def loop(measure):
        outs = [interventions.sweep(model, [iv], measure, cont) for iv in settings]
        return [torch.cat([o[i] for o in outs]) for i in range(2)]

    def compare(a, b) -> dict:
        (ga, la), (gb, lb) = a, b
        return {"greedy_tokens_equal": bool(torch.equal(ga, gb)),
                "greedy_tokens_equal_fraction": float((ga == gb).float().mean()),
                "first_token_equal_fraction": float((ga[..., 0] == gb[..., 0]).float().mean()),
                "max_abs_diff_logprob": float((la - lb).abs().max())}

    (fb, tb), peak_b = with_peak(args.device, lambda: timed(lambda: batched(fused), args.repeats, args.device,
                                                            what="steering batched"))
    (fl, tl), peak_l = with_peak(args.device, lambda: timed(lambda: loop(fused), args.repeats, args.device,
                                                            what="steering loop"))
    per = max(1, args.max_rows // len(rows)) * len(rows)
    out = {"settings": len(settings), "rows_per_batch": min(per, len(settings) * len(rows)), "new_tokens": args.new,
           "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "measure": "score_and_decode",
           "batched_s": tb, "loop_s": tl, "batched_median_s": statistics.median(tb),
           "loop_median_s": statistics.median(tl),
           "ratio_loop_over_batched": statistics.median(tl) / statistics.median(tb), **compare(fb, fl),
           "peak_gib_batched": peak_b, "peak_gib_loop": peak_l}
    if args.divergences:
        out["first_divergences"] = divergences(model, settings, cont, fb[0], fl[0])
    if args.separate:
        (sb, tsb), peak_sb = with_peak(args.device, lambda: timed(lambda: batched(separate), args.repeats,
                                                                  args.device, what="separate batched"))
        sl, tsl = timed(lambda: loop(separate), args.repeats, args.device, what="separate loop")
        out["separate_passes"] = {
            "batched_s": tsb, "loop_s": tsl, "batched_median_s": statistics.median(tsb),
            "loop_median_s": statistics.median(tsl),
            "ratio_loop_over_batched": statistics.median(tsl) / statistics.median(tsb),
            "ratio_separate_batched_over_fused_batched": statistics.median(tsb) / statistics.median(tb),
            "peak_gib_batched": peak_sb,
            "vs_loop": compare(sb, sl), "fused_vs_separate_batched": compare(fb, sb)}
    return out


def heads_bench(model, rows, layer, args) -> dict:
    n_heads = model.config.num_attention_heads
    pairs = [(r[:-3], r[-3:]) for r in rows]
    ids, mask = pad_batch(rows, 0, "right")
    ids, mask = ids.to(args.device), mask.to(args.device)
    src = hw.o_proj_inputs(model, ids, mask, layer) * 0.5  # a stand-in "other model" for the swap
    mean = hw.head_means(hw.o_proj_inputs(model, ids, mask, layer), mask, n_heads)
    settings = hw.single_head_settings(n_heads, ["zero", "mean", "swap"])
    fast, tf = timed(lambda: hw.head_sweep(model, pairs, 0, layer, settings, mean, src), args.repeats, args.device,
                     what="heads prefix reuse")
    slow, ts = timed(lambda: hw.head_sweep_full(model, pairs, 0, layer, settings, mean, src), args.repeats, args.device,
                     what="heads full")
    return {"settings": len(settings), "layer": layer, "n_layers": model.config.num_hidden_layers,
            "prefix_reuse_s": tf, "full_forwards_s": ts, "prefix_reuse_median_s": statistics.median(tf),
            "full_forwards_median_s": statistics.median(ts),
            "ratio_full_over_prefix_reuse": statistics.median(ts) / statistics.median(tf),
            "max_abs_diff_logprob": float((fast - slow).abs().max())}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name = load(args)
    layer = args.layer if args.layer is not None else model.config.num_hidden_layers // 2
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    rows = [[1] + torch.randint(3, vocab, (args.length - 1 - (i % 5),), generator=g).tolist()
            for i in range(args.prompts)]
    out = {"benchmark": "bench_sweep", "device": args.device, "model": name, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           **{k: v for k, v in bc.env_info(args.device).items() if k in ("device_name", "commit", "date_utc", "argv")},
           "layer": layer, "n_layers": model.config.num_hidden_layers, "warmup_runs": 1,
           "prompts": args.prompts, "prompt_tokens": args.length, "targets": {}}
    bc.log(f"{name}; layer {layer}; {args.prompts} prompts x {args.length} tokens; parts {args.parts}")
    if "steering" in args.parts:
        sw = out["steering_sweep"] = steering_bench(model, rows, layer, args)
        out["targets"]["steering_sweep>=4"] = sw["ratio_loop_over_batched"] >= 4
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if "heads" in args.parts:
        hd = out["head_patch"] = heads_bench(model, rows, layer, args)
        out["targets"]["head_patch_prefix_reuse"] = 0.9 * hd["n_layers"] / (hd["n_layers"] - layer)
        out["targets"]["head_patch_prefix_reuse_met"] = \
            hd["ratio_full_over_prefix_reuse"] >= 0.9 * hd["n_layers"] / (hd["n_layers"] - layer)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
