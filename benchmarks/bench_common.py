"""Shared helpers of the benchmark scripts: models of fixed shapes, environment record, round-robin timing.

Not part of the product: imported by ``benchmarks/bench_*.py`` only (they put this folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Llama-3.1-8B: hidden 4096, 32 layers, 32 query heads, 8 KV heads, MLP 14336, vocab 128256.
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
    "organism": dict(vocab_size=720, hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def commit() -> str:
    """``MECHDIFF_COMMIT`` if set (the device copy has no .git), else ``git rev-parse HEAD`` (+dirty)."""
    if os.environ.get("MECHDIFF_COMMIT"):
        return os.environ["MECHDIFF_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_info(device: str) -> dict:
    import transformers

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": device, "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda if dev.type == "cuda" else None,
            "threads": torch.get_num_threads(), "commit": commit(),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "argv": " ".join(sys.argv)}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_llama(shape: str, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 attn: str = "sdpa"):
    """A Llama of ``shape`` with the architecture's random initialisation, built directly on ``device``
    in ``dtype`` (no float32 copy), in eval mode with gradients off (as ``mechdiff.models.load.load_model``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape])
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_dir(path: str, device: str, dtype: torch.dtype):
    from mechdiff.models.load import load_model

    return load_model(str(path), dtype=dtype, device=device, attn_implementation="sdpa")


def model_from_args(args, seed: int = 0):
    """(model, description) from ``--model DIR`` or ``--shape``; ``--dtype`` names the torch dtype."""
    dtype = getattr(torch, args.dtype)
    if args.model:
        return load_dir(args.model, args.device, dtype), f"{args.model} ({args.dtype})"
    shape = args.shape or ("8b" if args.device.startswith("cuda") else "organism")
    what = "Llama-3.1-8B-shaped" if shape == "8b" else "organism-shaped"
    return random_llama(shape, args.device, dtype, seed), f"random {what} Llama ({args.dtype}, sdpa)"


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable, device: str) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def round_robin(fns: dict[str, Callable], device: str, warmup: int, repeats: int,
                log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Warm each function up, then time the functions in turn ``repeats`` times (interleaved, so drift
    of clocks or temperature hits all alike). Returns every repeat's seconds per name."""
    for name, fn in fns.items():
        for _ in range(warmup):
            time_once(fn, device)
        if log:
            log(f"warmed up {name}")
    secs = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            secs[name].append(time_once(fn, device)[1])
        if log:
            log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {s[-1]:.3f}s" for n, s in secs.items()))
    return secs


def median(xs) -> float:
    return float(statistics.median(xs))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(out: dict, device: str, path: str | None) -> dict:
    """Add the peak GPU memory (on CUDA), print the result as JSON and write it to ``path`` if given."""
    if device.startswith("cuda"):
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
    return out
