"""Pre-flight: check a run's pairs before any long job.

    python -m mechdiff.models.preflight [--params params.yaml] [--pair cultural]

For every pair: the model ids resolve (a local directory with a config, or a Hub id reachable at the
pinned revision; gated, missing and offline cases each get the fix), the two architectures are
layer-compatible, the activations fit on disk (estimated from the params) and the models fit in GPU
memory. Prints one line per check and exits 1 if any check fails. Hub look-ups use one short request
each (no retries), so an unreachable id answers in seconds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mechdiff.models.architecture import ArchitectureMismatch, check_compatible
from mechdiff.params.config import Params, PairSpec, ParamsError, load_params

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Check:
    """One pre-flight finding: ``ok`` and a one-line message (with the fix when not ok)."""

    name: str
    ok: bool
    message: str


def _hub_error(model_id: str, revision: str | None, err: Exception) -> str:
    kind = type(err).__name__
    rev = f" at revision {revision!r}" if revision else ""
    if kind == "GatedRepoError":
        return (f"{model_id} is gated: accept its licence on the Hub page, then `huggingface-cli login` "
                "(or set HF_TOKEN) with an account that has access")
    if kind == "RepositoryNotFoundError":
        return f"{model_id} does not exist or is private: check the spelling, or log in with a token that can see it"
    if kind == "RevisionNotFoundError":
        return f"{model_id} has no revision{rev}: pin an existing commit sha in params.yaml"
    return (f"cannot reach the Hub for {model_id}{rev} ({kind}: {str(err).splitlines()[0][:120]}); check the network, "
            "or pre-download the model and point the pair at the local directory")


def resolve(model_id: str, revision: str | None, timeout: float = 10.0) -> tuple[Check, object | None]:
    """Whether ``model_id`` resolves, and its config when it does (local dir or Hub)."""
    from transformers import AutoConfig

    path = Path(model_id)
    if path.is_dir():
        if not (path / "config.json").exists():
            return Check(f"resolve {model_id}", False, f"{model_id} is a directory without config.json: "
                         "point the pair at a save_pretrained directory, or run `dvc repro build_models`"), None
        return Check(f"resolve {model_id}", True, "local directory"), AutoConfig.from_pretrained(model_id)
    if model_id.count("/") != 1 or model_id.startswith((".", "/")):
        return Check(f"resolve {model_id}", False, f"{model_id} is neither an existing directory nor a Hub id "
                     "(owner/name): fix the pair's base/tuned in params.yaml"), None
    try:
        from huggingface_hub import HfApi, hf_hub_download

        info = HfApi().model_info(model_id, revision=revision, timeout=timeout)
        cfg_path = hf_hub_download(model_id, "config.json", revision=info.sha)
        return Check(f"resolve {model_id}", True, f"Hub revision {info.sha}"), AutoConfig.from_pretrained(
            str(Path(cfg_path).parent))
    except Exception as err:  # noqa: BLE001 - each Hub failure becomes one actionable line
        return Check(f"resolve {model_id}", False, _hub_error(model_id, revision, err)), None


def activation_bytes(params: Params, n_prompts: int, n_layers: int, hidden: int) -> int:
    """Estimated size of one pair's activations: both models, every mode and scanned layer."""
    n_scanned = len(range(params.layers.scan_stride - 1, n_layers, params.layers.scan_stride))
    rows = n_prompts * (params.fairness.n_sampled_positions + 1) * len(params.fairness.modes)
    return 2 * rows * n_scanned * hidden * BYTES[params.acts.dtype]


def param_bytes(config) -> int:
    """Approximate weight bytes of a Llama-style model from its config (bf16/fp32 per params)."""
    h, n, v, i = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return n * per_layer + 2 * v * h


def check_pair(name: str, pair: PairSpec, params: Params, n_prompts: int, free_disk: int,
               gpu_free: int | None) -> list[Check]:
    """Every check for one pair."""
    checks, configs = [], []
    for model_id, rev in ((pair.base, pair.base_revision), (pair.tuned, pair.tuned_revision)):
        c, cfg = resolve(model_id, rev)
        checks.append(c)
        configs.append(cfg)
    if None in configs:
        return checks
    try:
        check_compatible(*configs, pair.base, pair.tuned)
        checks.append(Check("architecture", True, f"{configs[0].num_hidden_layers} layers, hidden {configs[0].hidden_size}"))
    except ArchitectureMismatch as err:
        checks.append(Check("architecture", False, str(err)))
    need = activation_bytes(params, n_prompts, configs[0].num_hidden_layers, configs[0].hidden_size)
    checks.append(Check("disk", need < free_disk, f"activations need about {need / 2**30:.2f} GiB for {n_prompts} "
                        f"prompts; {free_disk / 2**30:.1f} GiB free" + ("" if need < free_disk else
                        ": free space, or lower fairness.n_sampled_positions / the datasets' n")))
    if gpu_free is not None:
        weights = sum(param_bytes(c) for c in configs) * BYTES[params.acts.dtype]
        ok = weights < gpu_free
        checks.append(Check("gpu memory", ok, f"both models need about {weights / 2**30:.1f} GiB; "
                            f"{gpu_free / 2**30:.1f} GiB free" + ("" if ok else ": use two GPUs (one model each) "
                            "or device_map='auto'")))
    return checks


def _n_prompts(name: str, pair: PairSpec) -> int:
    prepared = Path("data/prepared") / f"{name}.parquet"
    if prepared.exists():
        import pandas as pd
        return len(pd.read_parquet(prepared, columns=["id"]))
    return sum(spec.n or 1000 for spec in pair.datasets.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--pair", action="append")
    args = ap.parse_args(argv)
    try:
        params = load_params(Path(args.params).read_text(encoding="utf-8"), args.params)
    except (ParamsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    gpu_free = (sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
                if torch.cuda.is_available() else None)
    free = shutil.disk_usage(".").free
    failed = False
    for name in args.pair or sorted(params.pairs):
        if name not in params.pairs:
            print(f"[FAIL] {name}: not a pair in {args.params} (pairs: {sorted(params.pairs)})")
            failed = True
            continue
        pair = params.pairs[name]
        for c in check_pair(name, pair, params, _n_prompts(name, pair), free, gpu_free):
            print(f"[{'ok' if c.ok else 'FAIL'}] {name}: {c.name}: {c.message}")
            failed |= not c.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
