"""The one loader of models: a Hugging Face Hub id and a local directory (the embedded organisms,
``save_pretrained`` output) take exactly the same path. Failures become one :class:`ModelLoadError` naming
the id and a fix about that model.

The lookups here serve the tokenizer loader too (:mod:`mechdiff.fairness.tokenizer_load`): :func:`model_file` (one
file of a local directory or a Hub repository), :func:`model_config` (the config, no weights),
:func:`check_local` and :func:`load_fix` (the fix a load failure names).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mechdiff.errors import MechdiffError
from mechdiff.params.config import built_by_build_models

_ROOT = Path(__file__).resolve().parents[2]  # the project root, where build_models writes artifacts/models


class ModelLoadError(MechdiffError):
    """A model or tokenizer could not be loaded; the message names the id and what to do."""


def _looks_local(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or Path(model_id).exists()


def load_fix(model_id: str, revision: str | None) -> str:
    """What to do when ``model_id`` (a local directory or a Hub id) does not load: the text after ``Fix:``."""
    if _looks_local(model_id):
        if built_by_build_models(model_id, _ROOT):
            return ("build the embedded organisms with `python -m stages.build_models` (or `dvc repro`), or point "
                    "the pair's base/tuned in params.yaml at a directory written by save_pretrained")
        return (f"check that {model_id} is the model's own directory (config.json, the weights and the tokenizer "
                "files: tokenizer.json, or tokenizer.model with tokenizer_config.json), e.g. fetched with "
                "`huggingface-cli download <hub id> --local-dir <dir>` at the revision you validated, and point "
                "the pair's base/tuned in params.yaml at it")
    rev = f" at revision {revision!r}" if revision else ""
    return (f"check the spelling of the Hub id{rev}, accept the model's licence and log in "
            "(`huggingface-cli login`) if it is gated, or pre-download it into the local cache / a local "
            "directory when this machine is offline")


def check_local(model_id: str, what: str, revision: str | None) -> None:
    """Raise :class:`ModelLoadError` when ``model_id`` looks like a local path but is no directory; ``what``:
    ``"model"`` or ``"tokenizer"``, for the message."""
    path = Path(model_id).expanduser()
    if _looks_local(model_id) and not path.is_dir():
        raise ModelLoadError(f"cannot load {what} {model_id!r}: no such local directory (and it is not a "
                             f"Hub id of the form owner/name). Fix: {load_fix(model_id, revision)}")


def model_file(model_id: str, name: str, revision: str | None) -> Path | None:
    """The path of file ``name`` of a local directory or a Hub repository (fetched into the cache), or
    None where it has none."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path / name if (path / name).is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(model_id, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False)
    except Exception:  # noqa: BLE001 - the loader itself reports an unreachable id
        return None
    return Path(found) if found else None


def model_config(model_id: str, revision: str | None, trust_remote_code: bool):
    """The model's config (``AutoConfig``, no weights), or None where there is none or it cannot be read."""
    if model_file(model_id, "config.json", revision) is None:
        return None
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a config the loader cannot read is reported when the model loads
        return None
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_pair_compatible(pair, trust_remote_code: bool = False) -> tuple:
    """Stop before any long job when a pair's two configs (read without weights) are not layer-compatible:
    :func:`mechdiff.models.architecture.check_compatible` names both models and every field that differs
    (layers, hidden size, heads, head dimension, ...). A side without a readable config is left to the
    loaders, whose errors name it. Returns the (base, tuned) configs, None where unreadable."""
    from mechdiff.models.architecture import check_compatible

    configs = [model_config(m, r, trust_remote_code) for m, r in ((pair.base, pair.base_revision),
                                                                  (pair.tuned, pair.tuned_revision))]
    if all(c is not None for c in configs):
        check_compatible(*configs, pair.base, pair.tuned)
    return tuple(configs)


def load_pair_configs(pair, trust_remote_code: bool = False) -> tuple:
    """``(base, tuned)`` model configs (no weights) at the pair's pinned revisions; raises what ``AutoConfig``
    raises (a side without a readable config: the model loader's error names it)."""
    from transformers import AutoConfig

    return tuple(AutoConfig.from_pretrained(m, revision=r, trust_remote_code=trust_remote_code)
                 for m, r in ((pair.base, pair.base_revision), (pair.tuned, pair.tuned_revision)))


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
    if requested.startswith("cuda") or requested == "split":
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= n_gpus:
            seen = f"{n_gpus} CUDA device{'s' if n_gpus != 1 else ''}" if n_gpus else "no CUDA device"
            raise ModelLoadError(f"params key 'acts.device' is {requested!r} but this machine has {seen}; set "
                                 "acts.device: auto (a GPU when there is one, else the CPU) or cpu")
    return requested, requested


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _check_weight_format(model_id: str, allow_pickle: bool) -> None:
    """A local directory holding only pickle weights is refused unless ``allow_pickle``."""
    path = Path(model_id)
    if allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(f"{model_id} holds weights only as {', '.join(pickles[:3])} (a pickle format: loading "
                             "it can run code); convert them to safetensors (model.save_pretrained(dir)), or set "
                             "fairness.allow_pickle_weights: true if you trust the file")


def load_model(model_id: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False,
               attn_implementation: str | None = None, allow_pickle: bool = False):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode on ``device`` with gradients off
    (``device="split"``: spread over every GPU with accelerate's ``device_map="auto"``). Weights load from
    safetensors only, unless ``allow_pickle`` (params ``fairness.allow_pickle_weights``).

    Raises :class:`ModelLoadError` for a missing directory, pickle-only weights, an unknown or gated Hub id,
    a missing revision or unreadable weights.
    """
    from transformers import AutoModelForCausalLM

    check_local(model_id, "model", revision)
    _check_weight_format(model_id, allow_pickle)
    kwargs = {"revision": revision, "dtype": dtype, "trust_remote_code": trust_remote_code,
              "use_safetensors": None if allow_pickle else True}
    if str(device) == "split":
        kwargs["device_map"] = "auto"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model {model_id!r}{f' (revision {revision})' if revision else ''}: "
                             f"{type(err).__name__}: {first_line(err)}. Fix: {load_fix(model_id, revision)}") from err
    if str(device) != "split":
        model.to(device)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def first_line(err: Exception) -> str:
    """The first line of an exception's message (empty when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else ""
