"""filter_shared: apply the cross-tokenizer fairness contract to a pair's prompt set.

For every prompt: render it (one BOS, pinned template date), tokenize it for both models, align the
two segmentations, and record per comparison mode (``strict``, ``aligned``, ``base_ids``) whether the
prompt is kept and which (base position, tuned position) pairs are compared. The result is a table
(one row per prompt, see :func:`filter_prompts`) and a JSON-ready report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from mechdiff.alignment import MODES, PromptAlignment, align_rendered, summarize_alignments
from mechdiff.config import FairnessParams
from mechdiff.errors import MechdiffError
from mechdiff.masking import allowed_mask, lost_mass
from mechdiff.rendering import RenderedPrompt, check_single_bos, pad_batch, render_prompt
from mechdiff.vocab import VocabReport


class NoPromptsLeft(MechdiffError):
    """No prompt survives the fairness filter in the mode the headline numbers use."""


def render_for_pair(text: str, tok_base, tok_tuned, fairness: FairnessParams) -> tuple[RenderedPrompt, RenderedPrompt]:
    """The prompt as each model sees it: one shared rendered string unless ``native_templates``."""
    kw = {"template": fairness.template, "date": fairness.template_date, "system_prompt": fairness.system_prompt}
    base = render_prompt(text, tok_base, **kw)
    if fairness.native_templates:
        return base, render_prompt(text, tok_tuned, **kw)
    ids = tuple(tok_tuned(base.text, add_special_tokens=False)["input_ids"])
    check_single_bos(ids, tok_tuned)
    return base, RenderedPrompt(text=base.text, ids=ids, template=base.template, content_span=base.content_span)


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


def filter_prompts(frame: pd.DataFrame, tok_base, tok_tuned, fairness: FairnessParams,
                   vocab: VocabReport) -> tuple[pd.DataFrame, list[PromptAlignment]]:
    """Align every prompt of ``frame`` (the prepared schema) under both tokenizers.

    Returns the frame with added columns ``base_text``, ``tuned_text``, ``base_input_ids``,
    ``tuned_input_ids`` (native ids), ``identical`` (strict criterion), ``n_content`` and, for each
    mode m, ``kept_m`` and ``pos_base_m`` / ``pos_tuned_m`` (compared positions, last content token
    last). Rows kept in no requested mode are dropped. In ``base_ids`` mode the tuned model is fed
    ``base_input_ids``.
    """
    rows, alignments = [], []
    for rec in frame.to_dict("records"):
        rb, rt = render_for_pair(str(rec["text"]).strip(), tok_base, tok_tuned, fairness)
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


@torch.no_grad()
def masked_mass_at_last(model, ids: Sequence[Sequence[int]], allowed_ids: np.ndarray, pad_id: int,
                        batch_size: int = 32) -> torch.Tensor:
    """Probability mass (n_prompts,) float64 the model puts outside ``allowed_ids`` at each prompt's last token."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        input_ids, mask = pad_batch(ids[i:i + batch_size], pad_id, "right")
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        last = logits[torch.arange(len(mask)), mask.sum(1).to(device) - 1]
        out.append(lost_mass(last, allowed_mask(torch.as_tensor(allowed_ids), last.shape[-1]).to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def fairness_report(vocab: VocabReport, frame: pd.DataFrame, alignments: Sequence[PromptAlignment],
                    fairness: FairnessParams, masked: dict[str, dict[str, float]]) -> dict:
    """The JSON written to ``fairness.json``: vocabulary, segmentation identity, retention, masked mass."""
    summary = summarize_alignments(alignments, list(frame["language"]), MODES)
    return {"vocab": vocab.to_dict(), "segmentation": summary, "primary_mode": fairness.primary_mode,
            "modes": list(fairness.modes), "template": fairness.template,
            "native_templates": fairness.native_templates, "template_date": fairness.template_date,
            "masked_mass": masked}
