"""Per-prompt segmentation comparison between a base and a tuned tokenizer, in three modes.

``strict``: the prompt counts only if both tokenizers give the same token-string sequence (same
vocabulary with a different merge priority is caught: strings, not the vocabulary, are compared).
``aligned``: native tokenizations, compared at position pairs whose character END offsets coincide
(both models have read exactly the same text); the last content token is always a pair.
``base_ids``: the base tokenizer's ids go to both models; valid only when the tuned vocabulary is an
id-preserving superset of the base.

Offsets come from ``return_offsets_mapping=True`` (character offsets). A byte-level token that ends
inside a multi-byte character (Cyrillic is 2 bytes) shares its character's offsets with the next
token, so a token is a boundary only if the next token ends strictly later.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mechdiff.data.rendering import RenderedPrompt, sample_indices
from mechdiff.errors import MechdiffError
from mechdiff.fairness.vocab import special_token_ids

MODES = ("strict", "aligned", "base_ids")
Mode = Literal["strict", "aligned", "base_ids"]


class BaseIdsUnavailable(MechdiffError, ValueError):
    """``base_ids`` mode asked for while the tuned vocabulary is not an id-preserving superset."""


BASE_IDS_REFUSAL = (
    "mode 'base_ids' feeds base-tokenizer ids to the tuned model, which is only meaningful when every "
    "base token string exists in the tuned vocabulary with the same id. The tuned vocabulary is not an "
    "id-preserving superset of the base (see VocabReport.id_preserving_superset); use mode 'strict' or "
    "'aligned'.")


@dataclass(frozen=True)
class Segmentation:
    """One tokenizer's view of one string; every field has shape (n_tokens,).

    ``ends``: character end offsets relative to the content span's start; ``boundary``: the token ends
    on a character boundary; ``content``: not a special token and ending inside the content span.
    """

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    ends: tuple[int, ...]
    boundary: tuple[bool, ...]
    content: tuple[bool, ...]

    @property
    def content_index(self) -> np.ndarray:
        """(n_content,) int64 positions of content tokens."""
        return np.flatnonzero(np.asarray(self.content, dtype=bool)).astype(np.int64)


def segment(text: str, tokenizer, span: tuple[int, int] | None = None, *,
            encoded: tuple[Sequence[int], Sequence[tuple[int, int]]] | None = None) -> Segmentation:
    """Tokenize ``text`` (``add_special_tokens=False``) with offsets; ``span`` = (start, end) character
    span of the content (default: all of ``text``). ``encoded``: the (ids, character offsets into
    ``text``) of a rendered prompt, used instead of re-tokenizing (a raw prompt's canonical encoding
    adds its BOS through the tokenizer, not through the text)."""
    if encoded is None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        encoded = (enc["input_ids"], enc["offset_mapping"])
    ids, offsets = list(encoded[0]), [tuple(o) for o in encoded[1]]
    ends = [int(e) for _, e in offsets]
    if any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"{type(tokenizer).__name__} returned non-monotone end offsets for {text[:40]!r}")
    start, stop = span if span is not None else (0, len(text))
    boundary = [i == len(ends) - 1 or ends[i] < ends[i + 1] for i in range(len(ends))]
    special = special_token_ids(tokenizer)
    content = [t not in special and start < e <= stop for t, e in zip(ids, ends)]
    return Segmentation(ids=tuple(ids), tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
                        ends=tuple(e - start for e in ends), boundary=tuple(boundary), content=tuple(content))


@dataclass(frozen=True)
class ModeInputs:
    """What one mode feeds and compares: ``base_input_ids`` (n_b,), ``tuned_input_ids`` (n_t,),
    ``pairs`` (n_pairs, 2) int64 of (base position, tuned position), last content pair last;
    ``kept`` is False when the prompt is dropped in this mode (then ``pairs`` is empty)."""

    mode: str
    base_input_ids: tuple[int, ...]
    tuned_input_ids: tuple[int, ...]
    pairs: np.ndarray = field(repr=False)
    kept: bool


@dataclass(frozen=True)
class PromptAlignment:
    """Both native segmentations of one prompt and how they line up.

    ``identical``: the strict criterion (same token strings); ``pairs`` (n_pairs, 2) int64: content
    positions whose character end offsets coincide, ascending, always ending with the last content
    token of each; ``id_preserving_superset``: whether ``base_ids`` mode is allowed.
    """

    base: Segmentation
    tuned: Segmentation
    identical: bool
    pairs: np.ndarray = field(repr=False)
    id_preserving_superset: bool

    @property
    def n_content(self) -> int:
        """Content tokens in the base tokenization (the denominator of position retention)."""
        return int(self.base.content_index.size)

    def inputs(self, mode: Mode) -> ModeInputs:
        """Input ids for each model and the compared position pairs under ``mode``."""
        base, tuned = self.base.content_index, self.tuned.content_index
        if mode == "strict":
            pairs = np.stack([base, tuned], axis=1) if self.identical else np.zeros((0, 2), np.int64)
            return ModeInputs(mode, self.base.ids, self.tuned.ids, pairs, self.identical)
        if mode == "aligned":
            return ModeInputs(mode, self.base.ids, self.tuned.ids, self.pairs, len(self.pairs) > 0)
        if mode == "base_ids":
            if not self.id_preserving_superset:
                raise BaseIdsUnavailable(BASE_IDS_REFUSAL)
            return ModeInputs(mode, self.base.ids, self.base.ids, np.stack([base, base], axis=1), True)
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _pairs(base: Segmentation, tuned: Segmentation) -> np.ndarray:
    """(n_pairs, 2) content positions with coinciding boundary ends, plus the last content pair."""
    def ends(seg: Segmentation) -> dict[int, int]:
        return {seg.ends[i]: int(i) for i in seg.content_index if seg.boundary[i]}
    eb, et = ends(base), ends(tuned)
    pairs = [(eb[e], et[e]) for e in sorted(eb.keys() & et.keys())]
    if base.content_index.size and tuned.content_index.size:
        last = (int(base.content_index[-1]), int(tuned.content_index[-1]))
        pairs = [p for p in pairs if p[0] < last[0] and p[1] < last[1]] + [last]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def _identical(base: Segmentation, tuned: Segmentation, same_text: bool) -> bool:
    if same_text:
        return base.tokens == tuned.tokens
    return [base.tokens[i] for i in base.content_index] == [tuned.tokens[i] for i in tuned.content_index]


def align_prompt(text: str, tok_base, tok_tuned, *, id_preserving_superset: bool = False,
                 tuned_text: str | None = None, base_span: tuple[int, int] | None = None,
                 tuned_span: tuple[int, int] | None = None, base_encoded=None, tuned_encoded=None) -> PromptAlignment:
    """Segment ``text`` with both tokenizers and align them.

    With one shared string (raw prompts, or one chat template for both) leave ``tuned_text`` out;
    ``identical`` then compares whole token-string sequences. With each model's own template pass
    ``tuned_text`` and both content spans: only tokens inside the spans are content, their ends are
    measured from each span's start, and ``identical`` compares the content tokens. The two spans
    must hold the same characters (strip prompts first: Llama-3.1's template trims message content).
    ``base_encoded`` / ``tuned_encoded``: (ids, offsets) of rendered prompts (see :func:`segment`).
    """
    same = tuned_text is None
    if not same:
        b, t = base_span or (0, len(text)), tuned_span or (0, len(tuned_text))
        if text[b[0]:b[1]] != tuned_text[t[0]:t[1]]:
            raise ValueError(f"the content spans differ ({text[b[0]:b[1]][:40]!r} vs "
                             f"{tuned_text[t[0]:t[1]][:40]!r}); strip the prompt text before rendering")
    base = segment(text, tok_base, base_span, encoded=base_encoded)
    tuned = segment(text if same else tuned_text, tok_tuned, base_span if same else tuned_span,
                    encoded=tuned_encoded)
    return PromptAlignment(base=base, tuned=tuned, identical=_identical(base, tuned, same),
                           pairs=_pairs(base, tuned), id_preserving_superset=id_preserving_superset)


def align_rendered(base: RenderedPrompt, tuned: RenderedPrompt, tok_base, tok_tuned, *,
                   id_preserving_superset: bool = False) -> PromptAlignment:
    """:func:`align_prompt` on two rendered prompts (shared or native templates), segmented from their
    own ids and offsets where they carry them; checks that the segmentation reproduces each prompt's ids."""
    def enc(r: RenderedPrompt):
        return (r.ids, r.offsets) if len(r.offsets) == len(r.ids) and r.ids else None

    kw = {"id_preserving_superset": id_preserving_superset, "base_encoded": enc(base), "tuned_encoded": enc(tuned)}
    if base.text == tuned.text and base.content_span == tuned.content_span:
        out = align_prompt(base.text, tok_base, tok_tuned, **kw)
    else:
        out = align_prompt(base.text, tok_base, tok_tuned, tuned_text=tuned.text, base_span=base.content_span,
                           tuned_span=tuned.content_span, **kw)
    if out.base.ids != base.ids or out.tuned.ids != tuned.ids:
        raise ValueError("re-tokenizing the rendered prompts did not reproduce their ids")
    return out


def sample_pairs(pairs: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` pairs drawn among all but the last of ``pairs`` (n_pairs, 2), then the last pair:
    shape (min(n, n_pairs - 1) + 1, 2)."""
    if len(pairs) == 0:
        return pairs
    return np.concatenate([pairs[:-1][sample_indices(len(pairs) - 1, n, seed)], pairs[-1:]])


def _mode_stats(alignments: Sequence[PromptAlignment], mode: str) -> dict[str, Any]:
    available = mode != "base_ids" or all(a.id_preserving_superset for a in alignments)
    views = [a.inputs(mode) for a in alignments] if available else []
    n_pos = sum(a.n_content for a in alignments)
    kept_pos = sum(len(v.pairs) for v in views)
    n_kept = sum(v.kept for v in views)
    return {"available": available, "n_kept": n_kept,
            "prompt_retention": n_kept / len(alignments) if alignments else 0.0,
            "n_positions": n_pos, "n_kept_positions": kept_pos,
            "position_retention": kept_pos / n_pos if n_pos else 0.0}


def summarize_alignments(alignments: Sequence[PromptAlignment], languages: Sequence[str],
                         modes: Sequence[str] = MODES) -> dict[str, dict[str, Any]]:
    """Per language (and ``"all"``): prompt count, segmentation-identity rate, and per mode the kept
    prompts, prompt retention, kept positions and position retention (kept pairs over base content
    tokens). ``base_ids`` reads ``available: False`` and zero retention when it is not allowed."""
    if len(alignments) != len(languages):
        raise ValueError(f"{len(alignments)} alignments but {len(languages)} languages")
    groups: dict[str, list[PromptAlignment]] = defaultdict(list)
    for a, lang in zip(alignments, languages):
        groups[lang].append(a)
    groups = {**dict(sorted(groups.items())), "all": list(alignments)}
    return {lang: {"n_prompts": len(group),
                   "segmentation_identity_rate": (sum(a.identical for a in group) / len(group)
                                                  if group else 0.0),
                   "modes": {m: _mode_stats(group, m) for m in modes}}
            for lang, group in groups.items()}
