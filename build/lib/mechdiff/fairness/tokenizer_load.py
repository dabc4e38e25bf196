"""The one tokenizer loader: a Hugging Face Hub id and a local directory take exactly the same path (the
model's files are found by :func:`mechdiff.models.load.model_file`); failures become one
:class:`~mechdiff.models.load.ModelLoadError` naming the id and a fix about that model.

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

from mechdiff.data.rendering import adds_bos
from mechdiff.models.load import ModelLoadError, check_local, first_line, load_fix, model_config, model_file

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")
MIN_TOKENS = 300  # a tokenizer of this many tokens or fewer is degenerate (the organisms have 600 / 720)
# Probe strings for the SentencePiece check at load: spaces (leading, doubled, trailing), digits,
# punctuation, newlines and tabs, Cyrillic (Kazakh), CJK and an emoji (byte fallback).
SP_PROBES = ("The cat sat on the mat.", " leading space", "Hello,  world!!", "x   y  ", "a\n\nb\tc",
             "12345 + 67,890 = ?", "Қазақ тілі — мемлекеттік тіл.", "日本語のテキスト", "emoji 🙂 end", "  two")


class TokenizerSanityError(ModelLoadError):
    """A tokenizer loaded but cannot be the model's: degenerate, larger than the embedding, missing the
    BOS its config names, or disagreeing with its own SentencePiece file."""


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

    tok_json, tok_model = model_file(model_id, "tokenizer.json", revision), None
    tok_config = _read_json(model_file(model_id, "tokenizer_config.json", revision))
    custom = bool(tok_config.get("auto_map")) and trust_remote_code
    if tok_json is None and not custom:
        tok_model = model_file(model_id, "tokenizer.model", revision)
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
    check_local(model_id, "tokenizer", revision)
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
                             f"{first_line(err)}. Fix: {load_fix(model_id, revision)}") from err
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
    cfg = model_config(model_id, revision, trust_remote_code)
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
    jinja = model_file(model_id, "chat_template.jinja", revision)
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    template = _read_json(model_file(model_id, "tokenizer_config.json", revision)).get("chat_template")
    if isinstance(template, list):  # named templates as saved by transformers
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    return template if isinstance(template, str) else (json.dumps(template, sort_keys=True) if template else None)


def load_pair_tokenizers(pair, trust_remote_code: bool = False) -> tuple:
    """``(base, tuned)`` tokenizers of a :class:`~mechdiff.params.config.PairSpec`, each with its chat-template
    override (``base_chat_template`` / ``tuned_chat_template``) applied."""
    base_t, tuned_t = pair.chat_templates()
    return (load_tokenizer(pair.base, pair.base_revision, trust_remote_code, chat_template=base_t),
            load_tokenizer(pair.tuned, pair.tuned_revision, trust_remote_code, chat_template=tuned_t))
