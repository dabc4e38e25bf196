"""Prompt rendering with exactly one BOS, padding, and the seeded choice of sampled indices.

A rendered prompt's ids are the tokenizer's own canonical encoding of the text: ``tokenizer(text)`` with
its special tokens for raw prompts (a SentencePiece Llama gives ``[bos] + sentencepiece.encode(text)``;
gluing the BOS string to the text instead loses the first word's ``▁`` under ``LlamaTokenizer(legacy=False)``)
and ``apply_chat_template`` for chat prompts; the character offsets of every token come with them, so the
content span is located without re-tokenizing.

Shapes: B = batch, T = padded length. Padding is recorded in the attention mask (:func:`pad_batch`), never
inferred from pad ids (pad may equal EOS = ``<|eot_id|>``, a real template token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mechdiff.errors import MechdiffError

TEMPLATES = ("raw", "chat")
PADDING_SIDES = ("left", "right")


class RenderError(MechdiffError, ValueError):
    """A prompt cannot be rendered as asked (BOS count, template, pinned date)."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as one model sees it.

    ``ids``: token ids, shape (n_tokens,): the tokenizer's own canonical encoding (``raw``:
    ``tokenizer(text)`` with its special tokens, so a SentencePiece model gives ``[bos] + sp.encode(text)``;
    ``chat``: what ``apply_chat_template(..., tokenize=True)`` gives). ``text``: the rendered string (raw:
    the BOS string, where the encoding adds one, then the user text). ``content_span``: (start, end)
    character span of the user text inside ``text``. ``offsets``: (n_tokens,) character (start, end) of
    each token in ``text`` (a BOS the tokenizer adds spans the BOS string); empty when unknown.
    """

    text: str
    ids: tuple[int, ...]
    template: str
    content_span: tuple[int, int]
    offsets: tuple[tuple[int, int], ...] = ()


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's canonical encoding (``tokenizer(text)``) starts with its BOS."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def check_single_bos(ids: Sequence[int], tokenizer, expect_bos: bool | None = None) -> None:
    """Raise :class:`RenderError` unless ``ids`` (n_tokens,) holds exactly one BOS, at position 0.

    Tokenizers without a BOS token pass, and so do prompts without a BOS where the tokenizer's canonical
    encoding adds none (``expect_bos`` False; default: :func:`adds_bos`, e.g. SmolLM2, whose BOS
    ``<|im_start|>`` is a chat marker). Where the chat template itself writes the BOS string before every
    turn (ChatML-style tokenizers), later occurrences are turn markers: there the rule is a BOS at
    position 0 and never two in a row (the doubled-BOS pitfall)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return
    where = [i for i, t in enumerate(ids) if t == bos_id]
    if not where and not (adds_bos(tokenizer) if expect_bos is None else expect_bos):
        return
    template = str(getattr(tokenizer, "chat_template", None) or "")
    turn_marker = bool(tokenizer.bos_token) and tokenizer.bos_token in template
    ok = (where[:1] == [0] and (len(where) < 2 or where[1] > 1)) if turn_marker else where == [0]
    if not ok:
        raise RenderError(
            f"expected exactly one BOS ({tokenizer.bos_token!r}, id {bos_id}) at position 0, found "
            f"{len(where)} at positions {where[:5]}. A chat template already writes the BOS: tokenize its "
            "output with add_special_tokens=False; raw text must not start with the BOS string.")


def _messages(text: str, system_prompt: str | None) -> list[dict]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
    messages.append({"role": "user", "content": text})
    return messages


def _render_chat(text: str, tokenizer, date: str, system_prompt: str | None) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise RenderError(f"{type(tokenizer).__name__} has no chat template; use template='raw'")
    rendered = tokenizer.apply_chat_template(_messages(text, system_prompt), tokenize=False,
                                             add_generation_prompt=True, date_string=date)
    uses_date = any(k in str(template) for k in ("date_string", "strftime_now"))
    if uses_date and date not in rendered:
        raise RenderError(f"the chat template writes a date but not the pinned {date!r} (it may read the "
                          "clock through strftime_now); pin the date in the template before rendering")
    return rendered


def _content_span(rendered: str, text: str) -> tuple[int, int]:
    for candidate in (text, text.strip()):
        start = rendered.rfind(candidate)
        if candidate and start >= 0:
            return start, start + len(candidate)
    raise RenderError(f"the rendered prompt does not contain the user text {text[:40]!r}")


def _encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def encode_rendered(rendered: str, tokenizer) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Ids and character offsets of an already rendered string (a chat template's output, which writes
    its own special tokens): ``tokenizer(rendered, add_special_tokens=False)``, as
    ``apply_chat_template(tokenize=True)`` does."""
    ids, offsets = _encode(tokenizer, rendered, add_special_tokens=False)
    return tuple(ids), tuple(offsets)


def _chat_ids(out) -> list[int]:
    """The ids of ``apply_chat_template(tokenize=True)``, which returns a list or a BatchEncoding."""
    ids = out["input_ids"] if not isinstance(out, list) else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def canonical_ids(text: str, tokenizer, template: Literal["raw", "chat"] = "raw", date: str = "26 Jul 2024",
                  system_prompt: str | None = None) -> tuple[int, ...]:
    """The tokenizer's own encoding of a prompt, computed independently of :func:`render_prompt`:
    ``tokenizer(text)`` with its special tokens (raw), or ``apply_chat_template(..., tokenize=True)``."""
    if template == "raw":
        return tuple(tokenizer(text)["input_ids"])
    out = tokenizer.apply_chat_template(_messages(text, system_prompt), tokenize=True, add_generation_prompt=True,
                                        date_string=date)
    return tuple(_chat_ids(out))


def render_prompt(text: str, tokenizer, template: Literal["raw", "chat"] = "raw",
                  date: str = "26 Jul 2024", system_prompt: str | None = None) -> RenderedPrompt:
    """Render ``text`` for ``tokenizer`` as its canonical encoding: ``raw`` is ``tokenizer(text)`` with
    the tokenizer's own special tokens (its BOS where it adds one; never a BOS string glued to the text,
    which SentencePiece tokenizers segment differently); ``chat`` applies the tokenizer's chat template
    (which writes the BOS itself) with ``date_string`` pinned and a generation prompt, tokenized with
    ``add_special_tokens=False``. The single BOS is asserted."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template == "raw":
        if system_prompt is not None:
            raise RenderError("a system prompt needs template='chat'; raw prompts have no system turn")
        ids, offsets = _encode(tokenizer, text, add_special_tokens=True)
        # the BOS the tokenizer adds shows in `text` as its string; every other token's offsets shift past it
        prefix = tokenizer.bos_token if (ids and ids[0] == tokenizer.bos_token_id and
                                         not text.startswith(str(tokenizer.bos_token))) else ""
        if prefix:
            offsets = [(0, len(prefix))] + [(a + len(prefix), b + len(prefix)) for a, b in offsets[1:]]
        rendered, span = prefix + text, (len(prefix), len(prefix) + len(text))
    else:
        rendered = _render_chat(text, tokenizer, date, system_prompt)
        span = _content_span(rendered, text)
        ids, offsets = _encode(tokenizer, rendered, add_special_tokens=False)
    check_single_bos(ids, tokenizer)
    return RenderedPrompt(text=rendered, ids=tuple(ids), template=template, content_span=span,
                          offsets=tuple(offsets))


def pad_batch(batch: Sequence[Sequence[int]], pad_id: int,
              side: Literal["left", "right"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one length. Returns ``input_ids`` and ``attention_mask``, both (B, T)
    int64, with T the longest length."""
    if side not in PADDING_SIDES:
        raise ValueError(f"side must be one of {PADDING_SIDES}, got {side!r}")
    if not batch or any(len(x) == 0 for x in batch):
        raise ValueError("pad_batch needs a non-empty batch of non-empty sequences")
    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, seq in enumerate(batch):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[b, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[b, cols] = 1
    return input_ids, attention_mask


def sample_indices(n_available: int, n: int, seed: int) -> np.ndarray:
    """``min(n, n_available)`` distinct sorted indices in ``range(n_available)``, from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_available, size=min(n, n_available), replace=False)).astype(np.int64)
