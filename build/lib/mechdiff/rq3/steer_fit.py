"""The RQ3 subspace of one layer fitted from both models' states (steer_sweep; dev split only).

:func:`fit_subspace` reads the residual states of both models at the paired last tokens of target and
contrast prompts (:func:`paired_inputs`, :func:`paired_states`) and at the target continuation's tokens
(:func:`answer_diffs`), and fits a :class:`mechdiff.rq3.subspace.SteeringSubspace` in float64:
the diff-in-means direction of the paired fine-tuning change (tuned minus base at the same prompt and
last token) between target and neutral prompts (``steer.contrast: change``; ``tuned`` = the tuned model's
own target-vs-neutral contrast, as the seed wrote it -- on the cognitive organism it is the
arithmetic-vs-question direction that both models share, and ablating it breaks the skill rather than
the fine-tune), then the mean change at the answer tokens, then the SVD of the paired changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mechdiff.data.rendering import pad_batch
from mechdiff.data.target import as_target
from mechdiff.models.architecture import site_name
from mechdiff.models.capture import capture
from mechdiff.models.measures import model_device
from mechdiff.rq3.head_sweep import aligned_rows
from mechdiff.rq3.subspace import SteeringSubspace, no_change

__all__ = ["answer_diffs", "fit_subspace", "layer_states", "paired_inputs", "paired_states"]


def layer_states(model, rows: Sequence[Sequence[int]], positions: Sequence[int], layer: int, pad_id: int,
                 batch_size: int = 64) -> torch.Tensor:
    """Residual after block ``layer`` (n, D) float64, row i read at token ``positions[i]``."""
    site, out, dev = site_name(layer), [], model_device(model)
    for start in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[start:start + batch_size]]
        ids, mask = pad_batch(chunk, pad_id, "right")
        sel = torch.stack([torch.arange(len(chunk)), torch.as_tensor(list(positions[start:start + len(chunk)]))], 1)
        out.append(capture(model, ids.to(dev), mask.to(dev), [site], sel)[site].double())
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size, dtype=torch.float64)


def paired_inputs(frame, modes: Sequence[str]) -> list[dict]:
    """Per prompt, the first of ``modes`` that keeps it: the ids both models read, the last compared
    positions and the mode (``base_ids``/``tuned_ids``/``base_pos``/``tuned_pos``/``mode``/``group``);
    prompts no mode keeps are left out."""
    out = []
    for r in frame.to_dict("records"):
        for mode in modes:
            if r.get(f"kept_{mode}"):
                base = list(map(int, r["base_input_ids"]))
                tuned = base if mode == "base_ids" else list(map(int, r["tuned_input_ids"]))
                out.append({"base_ids": base, "tuned_ids": tuned, "base_pos": int(r[f"pos_base_{mode}"][-1]),
                            "tuned_pos": int(r[f"pos_tuned_{mode}"][-1]), "mode": mode, "group": r["group"]})
                break
    return out


def paired_states(base, tuned, pairs: Sequence[dict], layer: int, pads: tuple[int, int]) -> tuple:
    """``(base states, tuned states)`` (n, D) float64 at the paired positions."""
    b = layer_states(base, [p["base_ids"] for p in pairs], [p["base_pos"] for p in pairs], layer, pads[0])
    t = layer_states(tuned, [p["tuned_ids"] for p in pairs], [p["tuned_pos"] for p in pairs], layer, pads[1])
    return b, t


def answer_diffs(base, tuned, toks, frame, task: str, layer: int) -> torch.Tensor:
    """Tuned minus base states (n, D) float64 at the target continuation's tokens (the answer positions),
    teacher-forced on inputs both models read token by token (``strict`` or ``base_ids``)."""
    rows = aligned_rows(frame, toks, as_target(task).continuations(frame), ["strict", "base_ids"])
    pads = _pads(toks)
    out = []
    for side in ("base", "tuned"):
        seqs, pos = [], []
        for r in rows:
            p, c = r[side]
            seqs += [list(p) + list(c)] * len(c)
            pos += list(range(len(p), len(p) + len(c)))
        out.append(layer_states(base if side == "base" else tuned, seqs, pos, layer, pads[side == "tuned"]))
    return out[1] - out[0]


def fit_subspace(base, tuned, toks, parts: dict, layer: int, modes: Sequence[str], task: str, contrast: str,
                 k_max: int, n_boot: int, seed: int) -> tuple[SteeringSubspace, dict]:
    """The RQ3 subspace of one layer from the prompts in ``parts`` (e.g. the dev split).

    ``contrast="change"`` (default): the diff-in-means of the paired fine-tuning change (tuned minus base
    at the same prompt and last token) between target and neutral prompts -- the target-vs-neutral
    contrast of the tuned model minus the same contrast of the base, so directions both models share
    (the topic, the arithmetic format) are left out. ``"tuned"``: the tuned model's own target-vs-neutral
    contrast. Without any change (a null pair) ``change`` falls back to ``tuned``. The basis is completed
    from the paired changes on target prompts at their last token and at the answer tokens. Returns the
    fitted subspace and a JSON-ready description.
    """
    pads = _pads(toks)
    pt, po = paired_inputs(parts["target"], modes), paired_inputs(parts["other"], modes)
    if len(pt) < 2 or len(po) < 2:
        raise ValueError(f"need >= 2 target and >= 2 neutral prompts kept in a mode of {list(modes)}; "
                         f"got {len(pt)} and {len(po)}")
    bt, tt = paired_states(base, tuned, pt, layer, pads)
    bo, to = paired_states(base, tuned, po, layer, pads)
    used = contrast
    if contrast == "change" and no_change(torch.cat([tt - bt, to - bo]), torch.cat([tt, to])):
        used = "tuned"
    A, B = (tt - bt, to - bo) if used == "change" else (tt, to)
    groups = (np.array([p["group"] for p in pt]), np.array([p["group"] for p in po]))
    ans = answer_diffs(base, tuned, toks, parts["target"], task, layer)
    sub = SteeringSubspace(k_max, n_boot, seed).fit(A, B, tt - bt, groups, ans)
    modes_used = {m: sum(p["mode"] == m for p in pt + po) for m in modes}
    info = {"contrast": used, "contrast_asked": contrast, "n_target": len(pt), "n_neutral": len(po),
            "n_answer_positions": len(ans), "paired_modes": modes_used,
            "change_share": sub.change_share_.tolist(),
            "explained_variance_ratio": sub.explained_variance_ratio_.tolist(),
            "change_captured": sub.change_captured_.tolist(),
            "steer_change_captured": sub.steer_change_captured_.tolist(), "diff_norm": float(sub.diff_.norm()),
            "mean_change_norm": float(sub.mean_change_.norm()),
            "mean_answer_change_norm": float(ans.mean(0).norm()) if len(ans) else 0.0,
            "stability_cosine_mean": float(np.nanmean(sub.stability_)),
            "stability_cosine_q05": float(np.nanquantile(sub.stability_, 0.05))}
    return sub, info


def _pads(toks) -> tuple[int, int]:
    return tuple(t.pad_token_id if t.pad_token_id is not None else t.eos_token_id for t in toks)
