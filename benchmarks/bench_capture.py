"""Benchmark: residual-stream capture against the plain forward, naive hooks, nnsight and TransformerLens.

On one batch (default 8 x 512 tokens on GPU, every token attended) of a Llama (default on CUDA: random
Llama-3.1-8B-shaped weights in bf16, SDPA attention), the residual stream after every ``--stride``-th
block (``mechdiff.models.collect_acts.scan_layers``: 16 of 32 layers at stride 2) is captured by

* ``plain``: the forward alone, nothing captured (the floor);
* ``capture_all`` (a): ``mechdiff.models.capture.capture`` with ``positions=None``: every token of every scanned
  layer to host memory;
* ``capture_kept`` (b): the same call with the positions ``collect_acts`` keeps: the last token plus
  ``--sampled`` sampled positions per prompt;
* ``hooks_cpu`` (c): plain forward hooks calling ``.cpu()`` on each block output;
* ``nnsight_host`` (d): nnsight ``trace`` with ``.save()`` of the same block outputs, then ``.cpu()``
  (``nnsight_gpu``: the same without the copy to host, for reference; ``nnsight_kept_host``: the
  careful user's baseline for collect_acts' workload: the kept positions gathered on the GPU, then
  copied, compared with (b));
* ``tl_host`` (e): TransformerLens ``run_with_cache`` with a names filter on ``blocks.{i}.hook_resid_post``,
  then ``.cpu()``. TransformerLens 4 has no ``HookedTransformer``: its ``TransformerBridge`` wraps a
  Hugging Face model (here a copy of the same random model) and switches it to eager attention, which
  is its default; ``tl_sdpa_host`` is the same bridge switched back to SDPA, for reference.

nnsight and TransformerLens get their own copies of the model (both wrap or modify the model they
are given), so the mechdiff paths run on an untouched model. Methods are timed round-robin after
warm-up; each repeat is one forward of the batch, timed with ``torch.cuda.synchronize`` around it.

Prints one JSON object: environment (device name, versions, commit), shapes, every repeat's seconds,
medians, tokens/s, the ratios the issue asks for and the largest differences between the captured
tensors of each method and ``capture_all``.

Usage::

    python benchmarks/bench_capture.py --device cuda                          # 8B-shaped, bf16
    python benchmarks/bench_capture.py --device cpu --model artifacts/models/base --dtype float32 --threads 1
    python benchmarks/bench_capture.py --device cpu --shape organism --dtype float32 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from mechdiff.models.capture import capture  # noqa: E402
from mechdiff.models.collect_acts import scan_layers  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="model directory (e.g. artifacts/models/base)")
    p.add_argument("--shape", choices=sorted(bc.SHAPES), default=None,
                   help="random weights of this shape (default: 8b on CUDA, organism on CPU)")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="tokens per prompt (default 512 on CUDA, 128 on CPU)")
    p.add_argument("--stride", type=int, default=2, help="scan every stride-th layer (params layers.scan_stride)")
    p.add_argument("--sampled", type=int, default=8, help="sampled positions per prompt besides the last")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out (e.g. nnsight tl)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.seq = a.seq or (512 if cuda else 128)
    return a


def block_out(o):
    return o[0] if isinstance(o, tuple) else o


def build_nnsight(model):
    from nnsight import NNsight

    import nnsight
    return NNsight(copy.deepcopy(model)), getattr(nnsight, "__version__", None)


def offline_tokenizer(vocab_size: int):
    """A word-level tokenizer saved to and reloaded from a temp dir (TransformerLens re-loads it by path)."""
    import tokenizers
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tk = tokenizers.Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0")
    d = tempfile.mkdtemp(prefix="bench_tok_")
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def _stub_datasets() -> None:
    """Stand-ins for the three ``datasets`` names TransformerLens imports at import time (data-set
    loading only, never used by a forward); used only if the real package fails to import."""
    import types

    for mod in [m for m in sys.modules if m == "datasets" or m.startswith(("datasets.", "transformer_lens"))]:
        del sys.modules[mod]
    root = types.ModuleType("datasets")
    arrow, iterable, load = (types.ModuleType(f"datasets.{n}") for n in ("arrow_dataset", "iterable_dataset", "load"))
    arrow.Dataset = type("Dataset", (), {})
    iterable.IterableDataset = type("IterableDataset", (), {})

    def load_dataset(*_a, **_k):
        raise RuntimeError("datasets is stubbed in this benchmark")

    load.load_dataset = root.load_dataset = load_dataset
    root.arrow_dataset, root.iterable_dataset, root.load = arrow, iterable, load
    sys.modules.update({"datasets": root, "datasets.arrow_dataset": arrow, "datasets.iterable_dataset": iterable,
                        "datasets.load": load})


def build_tl(model, device, dtype, notes: dict):
    import importlib.metadata as md

    try:
        from transformer_lens.model_bridge import TransformerBridge
    except Exception as err:  # noqa: BLE001
        if "datasets" not in repr(err) and "pyarrow" not in repr(err):
            raise
        notes["transformer_lens_datasets_stubbed"] = f"{type(err).__name__}: {err}"
        _stub_datasets()
        from transformer_lens.model_bridge import TransformerBridge

    hf = copy.deepcopy(model)
    bridge = TransformerBridge.boot_transformers("random-llama (benchmark)", hf_model=hf,
                                                 tokenizer=offline_tokenizer(model.config.vocab_size),
                                                 device=device, dtype=dtype)
    return bridge, hf, md.version("transformer-lens")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    model, model_name = bc.model_from_args(args)
    cfg = model.config
    layers = scan_layers(cfg.num_hidden_layers, args.stride)
    sites = [f"layers.{i}.resid_post" for i in layers]
    B, T = args.batch, args.seq
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    ids[:, 0] = 1
    ids, mask = ids.to(dev), torch.ones(B, T, dtype=torch.long, device=dev)
    rng = np.random.default_rng(2)
    sel = torch.as_tensor(np.concatenate([
        np.stack([np.full(args.sampled + 1, b), np.append(np.sort(rng.choice(T - 1, args.sampled, replace=False)), T - 1)], 1)
        for b in range(B)]), dtype=torch.long)  # (B * (sampled + 1), 2): sampled positions, then the last token
    bc.log(f"model {model_name}; layers {layers}; batch {B} x {T}")

    out = {"benchmark": "bench_capture", **bc.env_info(dev), "model": model_name,
           "attn_implementation": cfg._attn_implementation, "dtype": args.dtype, "batch": B, "seq": T,
           "tokens_per_batch": B * T, "layers": layers, "n_layers": cfg.num_hidden_layers,
           "kept_positions_per_prompt": args.sampled + 1, "warmup": args.warmup, "repeats": args.repeats,
           "bytes_to_host_all": B * T * len(layers) * cfg.hidden_size * torch.finfo(getattr(torch, args.dtype)).bits // 8,
           "skipped": {}}

    @torch.inference_mode()
    def plain():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def capture_all():
        return capture(model, ids, mask, sites)

    def capture_kept():
        return capture(model, ids, mask, sites, positions=sel)

    @torch.inference_mode()
    def hooks_cpu():
        got = {}
        hs = [model.model.layers[i].register_forward_hook(
            lambda _m, _a, o, s=s: got.__setitem__(s, block_out(o).detach().reshape(B * T, -1).cpu()))
            for i, s in zip(layers, sites)]
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for h in hs:
                h.remove()
        return got

    fns = {"plain": plain, "capture_all": capture_all, "capture_kept": capture_kept, "hooks_cpu": hooks_cpu}

    if "nnsight" not in args.skip:
        try:
            nmodel, out["nnsight_version"] = build_nnsight(model)

            def nnsight_run(to_host: bool):
                saved = []
                with torch.inference_mode(), nmodel.trace(ids, attention_mask=mask, use_cache=False):
                    for i in layers:
                        saved.append(block_out(nmodel.model.layers[i].output).save())
                if to_host:
                    return {s: t.reshape(B * T, -1).cpu() for s, t in zip(sites, saved)}
                return dict(zip(sites, saved))

            sel_dev = sel.to(dev)

            def nnsight_kept_host():
                """The careful nnsight user's version of collect_acts' workload: save on the GPU, gather the
                kept positions there, then copy only those rows to host."""
                saved = []
                with torch.inference_mode(), nmodel.trace(ids, attention_mask=mask, use_cache=False):
                    for i in layers:
                        saved.append(block_out(nmodel.model.layers[i].output).save())
                return {s: t[sel_dev[:, 0], sel_dev[:, 1]].cpu() for s, t in zip(sites, saved)}

            fns["nnsight_host"] = lambda: nnsight_run(True)
            fns["nnsight_gpu"] = lambda: nnsight_run(False)
            fns["nnsight_kept_host"] = nnsight_kept_host
        except Exception as err:  # noqa: BLE001 -- benchmark-only extra: record why it is missing
            out["skipped"]["nnsight"] = f"{type(err).__name__}: {err}"
            bc.log(f"nnsight skipped: {err}")

    if "tl" not in args.skip:
        try:
            bridge, tl_hf, out["transformer_lens_version"] = build_tl(model, dev, getattr(torch, args.dtype), out)
            names = [f"blocks.{i}.hook_resid_post" for i in layers]
            out["tl_attn_implementation"] = tl_hf.config._attn_implementation

            def tl_run():
                with torch.inference_mode():
                    _, cache = bridge.run_with_cache(ids, names_filter=names)
                return {s: cache[n].reshape(B * T, -1).cpu() for s, n in zip(sites, names)}

            fns["tl_host"] = tl_run
        except Exception as err:  # noqa: BLE001
            out["skipped"]["transformer_lens"] = f"{type(err).__name__}: {err}"
            bc.log(f"TransformerLens skipped: {err}")

    secs = bc.round_robin(fns, dev, args.warmup, args.repeats, bc.log)

    # agreement: every method's captured tensors against capture_all (first and last scanned layer)
    ref = capture_all()
    kept = capture_kept()
    flat_sel = (sel[:, 0] * T + sel[:, 1]).cpu()
    diffs = {"capture_kept": max(float((kept[s].float() - ref[s][flat_sel].float()).abs().max()) for s in sites)}
    if "nnsight_kept_host" in fns:
        got = fns["nnsight_kept_host"]()
        diffs["nnsight_kept_host"] = max(float((got[s].float() - ref[s][flat_sel].float()).abs().max()) for s in sites)

    def diff_of(name):
        got = fns[name]()
        diffs[name] = max(float((got[s].float() - ref[s].float()).abs().max()) for s in (sites[0], sites[-1]))

    for name in ("hooks_cpu", "nnsight_host", "tl_host"):
        if name in fns:
            diff_of(name)

    if "tl_host" in fns:  # reference: the same bridge with SDPA attention (not TransformerLens' default)
        try:
            tl_hf.set_attn_implementation("sdpa")
            out["tl_sdpa_attn_implementation"] = tl_hf.config._attn_implementation
            fns["tl_sdpa_host"] = fns["tl_host"]
            secs.update(bc.round_robin({"tl_sdpa_host": fns["tl_sdpa_host"]}, dev, args.warmup, args.repeats, bc.log))
            diff_of("tl_sdpa_host")
        except Exception as err:  # noqa: BLE001
            out["skipped"]["tl_sdpa_host"] = f"{type(err).__name__}: {err}"
    out["max_abs_diff_vs_capture_all"] = diffs
    out["ref_abs_max_last_layer"] = float(ref[sites[-1]].float().abs().max())

    med = {k: bc.median(v) for k, v in secs.items()}
    out["seconds"] = secs
    out["median_s"] = med
    out["tokens_per_s"] = {k: B * T / v for k, v in med.items()}

    def ratio(a, b):  # speed of a relative to b = time b / time a
        return med[b] / med[a] if a in med and b in med else None

    out["ratios"] = {
        "capture_all_over_plain": ratio("capture_all", "plain"),
        "capture_kept_over_plain": ratio("capture_kept", "plain"),
        "hooks_cpu_over_plain": ratio("hooks_cpu", "plain"),
        "capture_all_over_nnsight_host": ratio("capture_all", "nnsight_host"),
        "capture_kept_over_nnsight_kept_host": ratio("capture_kept", "nnsight_kept_host"),
        "nnsight_kept_host_over_plain": ratio("nnsight_kept_host", "plain"),
        "capture_all_over_tl_host": ratio("capture_all", "tl_host"),
        "capture_all_over_tl_sdpa_host": ratio("capture_all", "tl_sdpa_host"),
        "capture_all_over_hooks_cpu": ratio("capture_all", "hooks_cpu"),
    }
    r = out["ratios"]
    out["targets"] = {
        "capture_all_over_plain>=0.90": None if r["capture_all_over_plain"] is None else r["capture_all_over_plain"] >= 0.90,
        "capture_all_over_nnsight>=3": None if r["capture_all_over_nnsight_host"] is None else r["capture_all_over_nnsight_host"] >= 3,
        "capture_all_over_tl>=3": None if r["capture_all_over_tl_host"] is None else r["capture_all_over_tl_host"] >= 3,
    }

    return bc.emit(out, dev, args.out)


if __name__ == "__main__":
    main()
