"""Mapped patch (RQ2, fit_clt): does the linear map's predicted tuned state act like the real one?

The map (:mod:`mechdiff.rq2.fit_clt`) predicts tuned states, so it is checked where the real tuned state is
used: the tuned -> base cross-model patch. At layer L the BASE model's residual ``h_b`` at the patched
positions is replaced by ``h_b + alpha * (v - h_b)`` for four candidate states v, all at the same ``alpha``
and the same positions (anchors P23):

* ``real``: v = h_tuned, the tuned model's real state (the real cross-model patch);
* ``mapped``: v = map(h_base), the fitted ridge map's prediction of it;
* ``ceiling``: v = the linear ceiling's prediction: the same ridge (same lambda) fitted on the very
  positions the patch overwrites, every content position of the patch prompts (:func:`patched_states`,
  :func:`mechdiff.rq2.fit_clt.fit_ceiling`, :func:`mechdiff.rq2.fit_clt.with_ceiling`). An in-sample bound: were
  the change linear (h_tuned = h_base A + b) and the fit determined (rows >= dimensions), it would
  reproduce the change and close the whole gap. A shortfall of the ceiling does not prove the change
  non-linear: the bound is in-sample, shrunk by the ridge penalty, and fitted on squared error while
  the patch is judged by KL; with fewer rows than dimensions it can memorise and says nothing about
  linearity. Its rows and dimensions are recorded (``scores["ceiling"]``) and
  :func:`mechdiff.verdict.ceiling_reading` words the reading;
* ``identity``: v = h_base, the identity map, which is the base model's own state, i.e. no change:
  the floor, it closes exactly 0 of the gap;
* ``random``: v = h_base + (map(h_base) - h_base) R, R a random rotation
  (:func:`mechdiff.rq2.fit_clt.random_change_like`): a change of exactly the map's size at every row, in a
  random direction; the mean over ``n_random`` draws (each draw's fraction closed is kept too), the
  control that tells whether the map's *direction* matters.

Fractions are also given per prompt class (:func:`summarise_patch` with ``classes``, e.g. the prompt's
task with the fine-tune's target prompts apart), because the mean gap is often carried by a few prompts
of one class, and with a bootstrap interval over prompts of ``mapped - real``.

Why the base model receives the patch: writing map(h_base) into the TUNED model would compare it with
the base state h_base; a perfect map gives map(h_base) = h_tuned there, a no-op that closes nothing
while the real patch closes the gap, so a good map could never agree with the real patch.

``alpha = 1`` replaces the state; ``alpha < 1`` moves part of the way and closes less of the gap for
every arm, so fractions are comparable across arms only at the same alpha. Positions patched: the
compared content positions of the mode (the positions the map is fitted on; BOS and template specials
are excluded, so unlike ``layer_patch`` the BOS state is left alone in every arm). The effect is read
at the last content token over the shared vocabulary: ``fraction closed = 1 - mean KL(P_tuned ||
P_patched) / mean KL(P_tuned || P_base)`` over prompts (the ``tuned->base`` direction of
``layer_patch``), ``nan`` when there is no gap (a null pair). The mapped patch "agrees" with the real
patch when the two fractions differ by at most a tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mechdiff.data.rendering import pad_batch
from mechdiff.fairness.masking import shared_kl
from mechdiff.models.architecture import site_name
from mechdiff.models.capture import capture
from mechdiff.models.collect_acts import input_ids_for, length_sorted_batches
from mechdiff.models.patching import fraction_closed, run_patched
from mechdiff.rq1.cka import to_float64
from mechdiff.rq1.layer_patch import content_positions, last_rows, row_positions
from mechdiff.stats import percentile_interval, resample_indices
from mechdiff.verdict import ceiling_reading

__all__ = ["ARMS", "ARM_DOC", "agreement", "agreement_line", "bootstrap_difference", "lost_note", "mapped_patch",
           "patch_batch", "patched_states", "summarise_patch"]

#: Candidate states of the mapped-patch comparison, in report order.
ARMS = ("real", "mapped", "ceiling", "identity", "random")
#: What each arm writes, stored beside the maps.
ARM_DOC = {"patched": "BASE model: h_base + alpha * (v - h_base) at the compared content positions (BOS excluded)",
           "real": "v = h_tuned", "mapped": "v = ridge map(h_base)",
           "ceiling": "v = the same ridge (same lambda) fitted on every patched content position of the patch "
                      "prompts (an in-sample bound; shrunk by the penalty; squared-error fit judged by KL)",
           "identity": "v = h_base (no change: floor 0)",
           "random": "v = h_base + (ridge map(h_base) - h_base) R, R a random rotation: the map's change, same size per "
                     "row, random direction; one arm row per draw",
           "maps": "h_tuned ~= h_base @ coef + intercept (float32, original units)"}


# --------------------------------------------------------------------------------------------------
# the mapped patch


@torch.no_grad()
def patched_states(base, tuned, records: Sequence[Mapping], mode: str, layers: Sequence[int],
                   pad_ids: tuple[int, int], batch_size: int = 32) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (base (n, d), tuned (n, d)) residual states at every position :func:`mapped_patch` overwrites:
    all compared content positions (:func:`~mechdiff.rq1.layer_patch.content_positions`) of the patch prompts, in batch order."""
    sites = {layer: site_name(layer) for layer in layers}
    got: dict[int, list] = {layer: [[], []] for layer in layers}
    for batch in length_sorted_batches([len(input_ids_for(r, mode)[1]) for r in records], batch_size):
        recs = [records[i] for i in batch]
        ids = [list(x) for x in zip(*(input_ids_for(r, mode) for r in recs))]
        pairs = [content_positions(r, mode) for r in recs]
        for s, m in enumerate((base, tuned)):
            acts = capture(m, *pad_batch(ids[s], pad_ids[s], "right"), list(sites.values()), row_positions(pairs, s))
            for layer, site in sites.items():
                got[layer][s].append(acts[site].double())
    return {layer: (torch.cat(b), torch.cat(t)) for layer, (b, t) in got.items()}


def _candidates(h_b: torch.Tensor, h_t: torch.Tensor,
                maps: Mapping[str, object]) -> list[tuple[str, int, torch.Tensor]]:
    """(arm, draw, v): the state v (n_sel, d) float64 each arm writes into the base model (before the alpha
    interpolation); ``maps["random"]`` is a sequence of draws, every other arm has draw 0."""
    fixed = {"real": h_t.double(), "mapped": to_float64(maps["mapped"].predict(h_b)),
             "ceiling": to_float64(maps["ceiling"].predict(h_b)), "identity": h_b.double()}
    return ([(arm, 0, v) for arm, v in fixed.items()]
            + [("random", k, to_float64(m.predict(h_b))) for k, m in enumerate(maps["random"])])


@torch.no_grad()
def patch_batch(base, tuned, ids: tuple[list, list], pairs: Sequence[np.ndarray],
                maps: Mapping[int, Mapping[str, object]], id_map, pad_ids: tuple[int, int],
                alpha: float = 1.0) -> list[dict]:
    """Per prompt, layer and arm: gap KL(P_tuned || P_base) and remaining KL(P_tuned || P_patched), nats,
    at the last content token, the base model patched (see the module docstring); with the mass outside
    the shared vocabulary that those masked KLs drop (``lost_base``, ``lost_tuned`` of the unpatched models,
    ``lost_patched`` of the patched base), fractions of each model's next-token mass.

    ``ids`` = (base ids per prompt, tuned ids per prompt); ``pairs[k]`` (n_k, 2) patched positions
    (base, tuned) of prompt k, last content token last; ``maps[layer]`` holds the ``mapped``,
    ``ceiling`` and ``random`` predictors (``predict(h_base) -> h_tuned``) of that layer.
    """
    inputs = [pad_batch(ids[s], pad_ids[s], "right") for s in (0, 1)]
    pos = [row_positions(pairs, s) for s in (0, 1)]  # (n_sel, 2) rows (batch, token)
    last = torch.stack([torch.arange(len(pairs)), torch.as_tensor([p[-1, 0] for p in pairs])], 1)
    sites = {layer: site_name(layer) for layer in maps}
    acts, logits = zip(*(capture(m, *inputs[s], list(sites.values()), pos[s], return_logits=True)
                         for s, m in enumerate((base, tuned))))
    lb, lt = (lg[last_rows(pairs)] for lg in logits)  # (n_prompts, V_side)
    clean = shared_kl(lb, lt, id_map, direction="tuned||base")
    gap = clean.kl
    rows = []
    for layer, site in sites.items():
        h_b = acts[0][site].double()  # (n_sel, d)
        for arm, draw, v in _candidates(acts[0][site], acts[1][site], maps[layer]):
            patched = run_patched(base, *inputs[0], site, pos[0], h_b + alpha * (v - h_b), last)
            out = shared_kl(patched, lt, id_map, direction="tuned||base")
            rows += [{"prompt": k, "layer": layer, "arm": arm, "draw": draw, "gap": float(gap[k]),
                      "remaining": float(out.kl[k]), "lost_base": float(clean.lost_base[k]),
                      "lost_tuned": float(clean.lost_tuned[k]), "lost_patched": float(out.lost_base[k])}
                     for k in range(len(pairs))]
    return rows


def mapped_patch(base, tuned, records: Sequence[Mapping], mode: str, maps: Mapping[int, Mapping[str, object]],
                 id_map, pad_ids: tuple[int, int], alpha: float = 1.0, batch_size: int = 32) -> pd.DataFrame:
    """:func:`patch_batch` over filtered prompt records in length-sorted batches; one row per
    (prompt ``id``, ``layer``, ``arm``) with ``gap``, ``remaining`` and the ``lost_*`` masses."""
    rows = []
    for batch in length_sorted_batches([len(input_ids_for(r, mode)[1]) for r in records], batch_size):
        recs = [records[i] for i in batch]
        ids = tuple(list(x) for x in zip(*(input_ids_for(r, mode) for r in recs)))
        out = patch_batch(base, tuned, ids, [content_positions(r, mode) for r in recs], maps, id_map, pad_ids, alpha)
        rows += [{**o, "id": recs[o["prompt"]]["id"]} for o in out]
    return pd.DataFrame(rows, columns=["prompt", "layer", "arm", "draw", "gap", "remaining", "lost_base", "lost_tuned",
                                       "lost_patched", "id"])


def agreement(mapped: float, real: float, tolerance: float, interval: Sequence[float] | None = None) -> str:
    """Mapped- vs real-patch, as an equivalence test on ``mapped - real`` (fractions of the gap closed).

    With ``interval`` (its 95% bootstrap interval over prompts): ``'agree'`` when the interval lies inside
    [-tolerance, tolerance], ``'disagree'`` when it lies wholly outside, ``'inconclusive'`` otherwise (too few
    prompts to tell). Without one, the point estimate decides (``'agree'`` / ``'disagree'``). ``'no gap'``
    when either fraction is nan (nothing to close).
    """
    if not (np.isfinite(mapped) and np.isfinite(real)):
        return "no gap"
    if interval is None or not all(np.isfinite(interval)):
        return "agree" if abs(mapped - real) <= tolerance else "disagree"
    lo, hi = float(min(interval)), float(max(interval))
    if -tolerance <= lo and hi <= tolerance:
        return "agree"
    return "disagree" if lo > tolerance or hi < -tolerance else "inconclusive"


def _lost(sub: pd.DataFrame) -> dict[str, float]:
    """Mean mass (fractions) each unpatched model puts outside the shared vocabulary, over one layer's
    real-arm rows (one per prompt); nan for rows without the columns."""
    real = sub[sub["arm"] == "real"]
    return {c: float(real[c].mean()) if c in real and len(real) else float("nan") for c in ("lost_base", "lost_tuned")}


def lost_note(lost_tuned: float) -> str:
    """The parenthetical that goes with a masked KL: the tuned model's mass outside the shared vocabulary."""
    if lost_tuned != lost_tuned:  # nan: not measured
        return ""
    return f" ({100 * lost_tuned:.3g}% of the tuned model's mass outside the shared vocabulary)"


def _closed(sub: pd.DataFrame) -> tuple[float, dict[str, float]]:
    """Mean gap (nats) of one layer's rows and the fraction of it each arm present closes."""
    gap = float(sub.loc[sub["arm"] == "real", "gap"].mean())
    arms = [a for a in ARMS if (sub["arm"] == a).any()]
    return gap, {a: fraction_closed(gap, float(sub.loc[sub["arm"] == a, "remaining"].mean())) for a in arms}


def bootstrap_difference(sub: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``mapped_closed - real_closed`` over prompts resampled with replacement
    (one layer's rows); (nan, nan) when no resample has a gap."""
    wide = sub.pivot_table(index="id", columns="arm", values="remaining", aggfunc="first")
    gap = sub[sub["arm"] == "real"].set_index("id")["gap"].reindex(wide.index).to_numpy()
    mapped, real = wide["mapped"].to_numpy(), wide["real"].to_numpy()
    idx = resample_indices(len(gap), n_boot, seed)
    g = gap[idx].mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = (real[idx].mean(1) - mapped[idx].mean(1)) / g  # (1 - m/g) - (1 - r/g)
    return percentile_interval(np.where(g > 1e-9, diff, np.nan), level)


def summarise_patch(rows: pd.DataFrame, tolerance: float, classes: Mapping[str, str] | None = None,
                    n_boot: int = 1000, seed: int = 0) -> dict[int, dict]:
    """Per layer: mean gap (nats), fraction of the mean gap closed by each arm (nan without a gap; the random
    control's is the mean over its draws, each draw's in ``random_closed_draws``), ``mapped_minus_real`` with
    its 95% bootstrap interval over prompts, and the ``agreement`` verdict (:func:`agreement`: an equivalence
    test on that interval), and ``lost_base`` / ``lost_tuned``: the mean next-token mass each unpatched model
    puts outside the shared vocabulary, which the masked KLs drop (nan when the rows lack it). With
    ``classes`` (prompt id -> class label), ``by_class`` gives the same gap, fractions and masses within
    each class."""
    out = {}
    for layer, sub in rows.groupby("layer", sort=True):
        gap, closed = _closed(sub)
        ci = list(bootstrap_difference(sub, n_boot, seed))
        rand = sub[sub["arm"] == "random"]
        draws = ([fraction_closed(gap, float(d["remaining"].mean())) for _, d in rand.groupby("draw", sort=True)]
                 if "draw" in rand else [])
        out[int(layer)] = {"gap": gap, "n_prompts": int(sub["id"].nunique()), **_lost(sub),
                           **{f"{arm}_closed": v for arm, v in closed.items()},
                           "random_closed_draws": draws,
                           "mapped_minus_real": closed["mapped"] - closed["real"],
                           "mapped_minus_real_ci": ci,
                           "agreement": agreement(closed["mapped"], closed["real"], tolerance, ci)}
        if classes is not None:
            by = {}
            for label, part in sub.groupby(sub["id"].map(lambda i: classes.get(str(i), "unlabelled")), sort=True):
                g, c = _closed(part)
                by[str(label)] = {"gap": g, "n_prompts": int(part["id"].nunique()), **_lost(part),
                                  **{f"{arm}_closed": v for arm, v in c.items()}}
            out[int(layer)]["by_class"] = by
    return out


def agreement_line(pair: str, layer: int, s: Mapping, tolerance: float, ceiling: Mapping | None = None) -> str:
    """The one-line verdict printed by the stage; ``ceiling``: the layer's ``scores["ceiling"]`` (rows and
    dimensions of the ceiling's fit), without which the ceiling is not read (:func:`ceiling_reading`)."""
    head = f"fit_clt@{pair} layer {layer}: "
    if s["agreement"] == "no gap":
        return (head + f"no gap to close (mean KL {s['gap']:.3g} nats{lost_note(s.get('lost_tuned', float('nan')))}): "
                "mapped-patch vs real-patch not comparable")
    verdict = {"agree": f"agree within {tolerance:g}", "disagree": f"disagree (tolerance {tolerance:g})",
               "inconclusive": f"inconclusive (the interval straddles the tolerance {tolerance:g})"}[s["agreement"]]
    lo, hi = s.get("mapped_minus_real_ci") or (float("nan"), float("nan"))
    line = (head + f"mapped-patch closes {s['mapped_closed']:.3f} of the {s['gap']:.3g}-nat gap"
            f"{lost_note(s.get('lost_tuned', float('nan')))} vs real-patch {s['real_closed']:.3f}: "
            + verdict + f" (mapped - real 95% CI [{lo:.3f}, {hi:.3f}] over prompts)"
            + (f" [in-sample linear ceiling {s['ceiling_closed']:.3f}," if "ceiling_closed" in s else " [")
            + f" identity {s['identity_closed']:.3f}, random change of the map's size {s['random_closed']:.3f}"
            + (f" (max of {len(s['random_closed_draws'])} draws {max(s['random_closed_draws']):.3f})]"
               if s.get("random_closed_draws") else "]"))
    if s["agreement"] == "disagree" and "ceiling_closed" in s:
        info = ceiling or {}
        reading = ceiling_reading(float(s["ceiling_closed"]), float(s["real_closed"]), tolerance,
                                  info.get("n_rows"), info.get("n_dims"))
        line += f"; {reading}" if reading else ""
    for label, c in (s.get("by_class") or {}).items():
        if np.isfinite(c["real_closed"]):
            line += (f"\n  {label}: mean gap {c['gap']:.3g} nats{lost_note(c.get('lost_tuned', float('nan')))} over "
                     f"{c['n_prompts']} prompts, mapped "
                     f"{c['mapped_closed']:.3f} vs real {c['real_closed']:.3f}")
    return line

