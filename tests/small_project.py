"""A small on-disk project for stage tests: two tiny models with real tokenizer files, a prepared
prompt set and a params file pointing at them. Nothing is downloaded; everything lives in ``tmp``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny import spare_bos
from tests.tokenizers_fixture import base_tokenizer, extended_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EN = ["the cat sat on the mat", "the mat", "the cat sat", "on the mat the cat sat"]
KK = ["сәлем әлем", "қазақ тілі", "сәлем қазақ", "әлем тілі"]


def _model(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=332, eos_token_id=333, pad_token_id=336)
    return LlamaForCausalLM(cfg).eval()


def build(tmp: Path, planted_layer: int = 2) -> Path:
    """Write models, prompts and params under ``tmp``; returns the params path."""
    tb, tt = base_tokenizer(), extended_tokenizer()
    base = _model(len(tb), 0)
    tuned = _model(len(tb), 0)
    tuned.resize_token_embeddings(len(tt))
    with torch.no_grad():
        w = tuned.model.layers[planted_layer].mlp.down_proj.weight
        w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    spare_bos(base, tuned, planted_layer, bos_id=332)  # the patch never writes the BOS: the edit leaves it alone
    for name, model, tok in (("base", base, tb), ("tuned", tuned, tt)):
        model.save_pretrained(tmp / "models" / name)
        tok.save_pretrained(tmp / "models" / name)
    rows = [{"id": f"{lang}-{i}-{r}", "text": (" " if r else "") + t, "language": lang, "task": "topic",
             "group": f"{lang}-{i}-{r}", "split": "dev" if i % 2 else "test", "answer": None, "choices": None,
             "topic": None, "target": False, "source": "fixture"}
            for r in range(3) for lang, texts in (("en", EN), ("kk", KK)) for i, t in enumerate(texts)]
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(tmp / "data" / "prepared.parquet", index=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pairs"] = {"small": {"base": str(tmp / "models" / "base"), "tuned": str(tmp / "models" / "tuned"),
                                 "domain": "cultural", "tokenizer_policy": "shared_vocab_required",
                                 "datasets": {"world": {"kind": "world", "task": "world"}}}}
    params["acts"].update(shard_prompts=4, batch_size=3)
    params["cka"].update(n_permutations=20, n_bootstrap=20)
    params["layers"].update(scan_stride=1, patch_prompts=12)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m stages.<name> args`` from the repository root."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=600)
    if check:
        assert p.returncode == 0, f"stage {name} failed:\n{p.stdout}\n{p.stderr}"
    return p
