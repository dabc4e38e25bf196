"""filter_shared: apply the cross-tokenizer fairness contract to a pair's prompt set.

For every prompt: render it (one BOS, pinned template date), tokenize it for both models, align the
two segmentations, and record per comparison mode (``strict``, ``aligned``, ``base_ids``) whether the
prompt is kept and which (base position, tuned position) pairs are compared. The result is a table
(one row per prompt, see :func:`filter_prompts`) and a JSON-ready report.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pandas as pd

from mechdiff.data.rendering import (RenderedPrompt, adds_bos, canonical_ids, check_single_bos, encode_rendered,
                                render_prompt)
from mechdiff.errors import MechdiffError
from mechdiff.fairness.alignment import MODES, PromptAlignment, align_rendered, summarize_alignments
from mechdiff.fairness.tokenizer_load import sentencepiece_file, tokenizer_info
from mechdiff.fairness.vocab import VocabReport
from mechdiff.params.config import FairnessParams


class NoPromptsLeft(MechdiffError):
    """No prompt survives the fairness filter in the mode the headline numbers use."""


class RenderMismatch(MechdiffError):
    """A rendered prompt's ids are not the tokenizer's own canonical encoding of the same text."""


def render_for_pair(text: str, tok_base, tok_tuned, fairness: FairnessParams) -> tuple[RenderedPrompt, RenderedPrompt]:
    """The prompt as each model sees it. Raw prompts are each tokenizer's canonical encoding of the
    text (its own BOS); chat prompts share the base's rendered string unless ``native_templates``."""
    kw = {"template": fairness.template, "date": fairness.template_date, "system_prompt": fairness.system_prompt}
    base = render_prompt(text, tok_base, **kw)
    if fairness.native_templates or fairness.template == "raw":
        return base, render_prompt(text, tok_tuned, **kw)
    ids, offsets = encode_rendered(base.text, tok_tuned)
    check_single_bos(ids, tok_tuned)
    return base, RenderedPrompt(text=base.text, ids=ids, template=base.template, content_span=base.content_span,
                                offsets=offsets)


@lru_cache(maxsize=8)
def _sentencepiece(path: str):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=path)


def check_render(rendered: RenderedPrompt, text: str, tok, fairness: FairnessParams, *, pair: str, side: str,
                 prompt_id: str, shared_text: str | None = None) -> None:
    """Raise :class:`RenderMismatch` unless ``rendered.ids`` equal ``tok``'s canonical encoding of the
    prompt, computed on its own path: ``tok(text)`` (raw), ``apply_chat_template(tokenize=True)`` (chat),
    or the shared chat string tokenized with ``add_special_tokens=False``; a tokenizer built from a
    SentencePiece model must also give ``[bos] + sentencepiece.encode(text)`` for raw prompts."""
    if shared_text is not None:
        checks = [("the shared chat string tokenized with add_special_tokens=False",
                   tuple(tok(shared_text, add_special_tokens=False)["input_ids"]))]
    else:
        how = "tokenizer(text)" if fairness.template == "raw" else "apply_chat_template(tokenize=True)"
        checks = [(how, canonical_ids(text, tok, fairness.template, fairness.template_date, fairness.system_prompt))]
    sp_file = sentencepiece_file(tok)
    if sp_file and fairness.template == "raw" and shared_text is None:
        head = [tok.bos_token_id] if adds_bos(tok) else []
        checks.append((f"[bos] + sentencepiece.encode(text) with {sp_file}",
                       tuple(head + _sentencepiece(sp_file).encode(text))))
    for how, expected in checks:
        if tuple(rendered.ids) != tuple(expected):
            at = next((i for i, (a, b) in enumerate(zip(rendered.ids, expected)) if a != b),
                      min(len(rendered.ids), len(expected)))
            model = tokenizer_info(tok).get("model", side)
            raise RenderMismatch(
                f"filter_shared@{pair}: the {side} model {model!r} renders prompt {prompt_id!r} as "
                f"{list(rendered.ids[at:at + 6])} from position {at}, but its canonical encoding ({how}) has "
                f"{list(expected[at:at + 6])} there. Fix: load {model} from tokenizer files that agree with "
                f"each other (its published tokenizer.json, or tokenizer.model with tokenizer_config.json), or set "
                f"pairs.{pair}.{side}_chat_template to the model's own template; no prompt is compared in a form "
                "the model would not see")


def _mode_columns(a: PromptAlignment, modes: Sequence[str]) -> dict[str, object]:
    cols: dict[str, object] = {}
    for mode in MODES:
        if mode == "base_ids" and not a.id_preserving_superset or mode not in modes:
            kept, pairs = False, np.zeros((0, 2), np.int64)
        else:
            view = a.inputs(mode)
            kept, pairs = view.kept, view.pairs
        cols[f"kept_{mode}"] = bool(kept)
        cols[f"pos_base_{mode}"] = [int(x) for x in pairs[:, 0]]
        cols[f"pos_tuned_{mode}"] = [int(x) for x in pairs[:, 1]]
    return cols


def too_long(frame: pd.DataFrame, tok_base, tok_tuned, fairness: FairnessParams, limit: int) -> np.ndarray:
    """(n_prompts,) bool: prompts whose render under either tokenizer exceeds ``limit`` tokens. A text of more
    than ``16 * limit`` characters is long without tokenizing it (no tokenizer packs 16 characters a token)."""
    out = []
    for text in frame["text"]:
        text = str(text).strip()
        if len(text) > 16 * limit:
            out.append(True)
            continue
        rb, rt = render_for_pair(text, tok_base, tok_tuned, fairness)
        out.append(max(len(rb.ids), len(rt.ids)) > limit)
    return np.array(out, dtype=bool)


def filter_prompts(frame: pd.DataFrame, tok_base, tok_tuned, fairness: FairnessParams,
                   vocab: VocabReport, pair: str = "pair") -> tuple[pd.DataFrame, list[PromptAlignment]]:
    """Align every prompt of ``frame`` (the prepared schema) under both tokenizers, after checking
    each rendered prompt against its tokenizer's canonical encoding (:func:`check_render`; ``pair``
    names the pair in its error).

    Returns the frame with added columns ``base_text``, ``tuned_text``, ``base_input_ids``,
    ``tuned_input_ids`` (native ids), ``identical`` (strict criterion), ``n_content`` and, for each
    mode m, ``kept_m`` and ``pos_base_m`` / ``pos_tuned_m`` (compared positions, last content token
    last). Rows kept in no requested mode are dropped. In ``base_ids`` mode the tuned model is fed
    ``base_input_ids``.
    """
    rows, alignments = [], []
    for rec in frame.to_dict("records"):
        text = str(rec["text"]).strip()
        rb, rt = render_for_pair(text, tok_base, tok_tuned, fairness)
        shared = None if fairness.native_templates or fairness.template == "raw" else rb.text
        check_render(rb, text, tok_base, fairness, pair=pair, side="base", prompt_id=str(rec.get("id")))
        check_render(rt, text, tok_tuned, fairness, pair=pair, side="tuned", prompt_id=str(rec.get("id")),
                     shared_text=shared)
        a = align_rendered(rb, rt, tok_base, tok_tuned, id_preserving_superset=vocab.id_preserving_superset)
        alignments.append(a)
        rows.append({**rec, "base_text": rb.text, "tuned_text": rt.text, "base_input_ids": list(rb.ids),
                     "tuned_input_ids": list(rt.ids), "identical": bool(a.identical),
                     "n_content": a.n_content, **_mode_columns(a, fairness.modes)})
    out = pd.DataFrame(rows)
    keep = out[[f"kept_{m}" for m in fairness.modes]].any(axis=1)
    return out[keep].reset_index(drop=True), alignments


def require_prompts(summary: dict, mode: str, pair: str) -> None:
    """Raise :class:`NoPromptsLeft` (with retention per mode and the param to change) if ``mode`` keeps none."""
    modes = summary["all"]["modes"]
    if modes[mode]["n_kept"] > 0:
        return
    n = summary["all"]["n_prompts"]
    retention = ", ".join(f"{m} {v['n_kept']}/{n}" + ("" if v["available"] else " (unavailable)")
                          for m, v in modes.items())
    better = [m for m, v in modes.items() if v["n_kept"] > 0]
    fix = (f"set fairness.primary_mode to one of {better}" if better else
           "check the pair's datasets and tokenizers (no mode keeps any prompt)")
    raise NoPromptsLeft(f"filter_shared@{pair}: no prompt survives mode {mode!r} (kept per mode: {retention}); "
                        f"{fix} in params.yaml")


def fairness_report(vocab: VocabReport, frame: pd.DataFrame, alignments: Sequence[PromptAlignment],
                    fairness: FairnessParams, *, policy: dict | None = None, tokenizers: dict | None = None) -> dict:
    """The JSON written to ``fairness.json``: vocabulary, segmentation identity, retention;
    ``policy`` (:func:`mechdiff.fairness.vocab.enforce_tokenizer_policy`) and ``tokenizers`` (side ->
    :func:`mechdiff.fairness.tokenizer_load.tokenizer_info`: source files, size, embedding and padding rows, BOS, chat
    template) when given. ``warnings`` collects the policy's warnings."""
    summary = summarize_alignments(alignments, list(frame["language"]), MODES)
    out = {"vocab": vocab.to_dict(), "segmentation": summary, "primary_mode": fairness.primary_mode,
           "modes": list(fairness.modes), "template": fairness.template,
           "native_templates": fairness.native_templates, "template_date": fairness.template_date}
    if policy is not None:
        out["tokenizer_policy"] = policy
        out["warnings"] = list(policy.get("warnings", []))
    if tokenizers is not None:
        out["tokenizers"] = tokenizers
    return out
