"""The verdict of one pair: is the fine-tune a low-rank, localised "policy" change or distributed rewiring?

Inputs are the stages' results of one pair, already parsed (dicts and frames; this module reads no files):
``behaviour`` (behaviour.json), ``cka`` (cka.json), ``layer_patch`` (layer_patch.csv as a frame),
``chosen`` (layers.json), ``clt`` (clt.json), ``steer`` (steer.json), ``churn`` (attribution.json).

Criteria (:func:`criteria`), each with its value, threshold and which reading it supports:

* ``low_rank_handle`` (decides): the minimal k at which a fitted subspace at one layer both removes the
  behaviour from the tuned model and induces it in the base, chosen on dev with side effects in limits
  (an accuracy drop blocks when its item-bootstrap interval lies above the limit, :func:`mechdiff.rq3.steer_select.side_ok`)
  (``steer.json``'s ``minimal_k``) and held to the test split (``test_confirmed``: the same k, alpha and
  layer reach the target on test in both directions). Policy-like when ``<= policy_max_k`` (the seed:
  k <= 3) and confirmed on test; a k within the threshold that the test split does not confirm is no
  evidence (inconclusive); rewiring-like when no swept k, or only one above the threshold, does both.
  Without a behavioural gap to explain (:func:`behaviour_gap`: the tuned model does not show the swept
  behaviour more than the base, the delta's interval not above 0) the criterion is inconclusive: a
  sweep that can neither remove nor induce an absent behaviour says nothing about how it is wired.
* ``sharp_entry`` (decides): the largest rise, between consecutive scanned layers (from 0 before the
  first), of the fraction of the next-token gap closed by cross-model layer patching, taken in both
  directions at once (the smaller of the base->tuned and tuned->base rises at each layer, see
  :func:`mechdiff.rq1.layer_entry.entry_profile`); decided by its interval over prompts
  (:func:`mechdiff.rq1.layer_entry.sharp_entry`): policy-like when
  the rise's lower bound is ``>= sharp_entry_min`` (the change enters at one place instead of
  accumulating over the depth), rewiring-like when every layer's upper bound is below it, inconclusive
  when an interval straddles it (or no interval is recorded).
* ``map_r2``, ``mapped_patch``, ``head_churn`` and ``min_cka`` are reported as context: a linear map fits
  both kinds of change, and churn needs enough heads per layer for its z-score (see ``head_churn``'s note).

The behaviour change a report shows for a pair (:func:`headline_measure`) is the largest significant one,
by a stated rule, not one fixed measure.

Label (:func:`verdict`): ``policy-like`` when both deciding criteria read policy, ``rewiring-like`` when
both read rewiring, ``mixed`` otherwise, ``inconclusive`` when one is missing. A ``null`` pair reads
``no difference`` when its behaviour deltas, layer-patch gaps and CKA say so, and ``difference in a
null pair`` otherwise (a pipeline fault: the two models are identical).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mechdiff.rq1.layer_entry import entry_profile, sharp_entry

__all__ = ["CEILING_CAVEATS", "TASK_MEASURE", "Thresholds", "behaviour_gap", "ceiling_reading", "churn_comparison",
           "criteria", "headline_measure", "significant", "verdict"]

#: the behaviour.json measure of each steering target task (steer.json's ``task``; ``target``: a user target,
#: :mod:`mechdiff.data.target`)
TASK_MEASURE = {"refusal": "refusal_rate", "math": "math_acc", "target": "target_rate"}


@dataclass(frozen=True)
class Thresholds:
    """The verdict's thresholds (params ``success`` and ``report``)."""

    policy_max_k: int = 3
    sharp_entry_min: float = 0.5
    map_r2_min: float = 0.3
    agreement_tolerance: float = 0.1
    null_cka_min: float = 0.999
    null_kl_max: float = 1e-6


#: why the linear ceiling is an upper bound on what a linear map does, not a test of linearity
CEILING_CAVEATS = ("in-sample (fitted on the very positions it patches)", "shrunk by the ridge penalty",
                   "fitted on squared error while the patch is judged by KL")


def ceiling_reading(ceiling: float, real: float, tolerance: float, n_rows: int | None,
                    n_dims: int | None) -> str:
    """What the linear ceiling says when the mapped patch disagrees with the real one, or "" when nothing.

    ``ceiling``, ``real``: fractions of the gap closed; ``n_rows``, ``n_dims``: the ceiling's fitting rows and
    input dimensions. A shortfall of the ceiling is named as possibly non-linear only when the fit is
    determined (``n_rows >= n_dims``) and always with :data:`CEILING_CAVEATS`; an under-determined or
    unrecorded fit makes no statement about linearity.
    """
    if not (math.isfinite(ceiling) and math.isfinite(real)):
        return ""
    head = f"a linear map fitted on the patched positions themselves (in-sample bound) closes {ceiling:.2f}"
    if n_rows is None or n_dims is None:
        return head + " (its rows and dimensions are not recorded: no reading of linearity)"
    if n_rows < n_dims:
        return head + (f", but it is fitted on {n_rows} rows < {n_dims} dimensions (under-determined, it can "
                       "memorise): no reading of linearity")
    if abs(ceiling - real) > tolerance:
        return head + (f" on {n_rows} rows x {n_dims} dimensions, short of the real patch: the change may not be "
                       "linear in the base state, with caveats (" + "; ".join(CEILING_CAVEATS) + ")")
    return head + (f" on {n_rows} rows x {n_dims} dimensions, as the real patch does: the held-out map is limited "
                   "by its training prompts")


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def significant(m: Mapping) -> bool:
    """A behaviour measure's delta (tuned - base) moved: its 95% interval excludes 0."""
    lo, hi = _num(m.get("delta_lo")), _num(m.get("delta_hi"))
    return lo > 0 or hi < 0  # NaN bounds compare False: not significant


def headline_measure(measures: Mapping[str, Mapping], target: str) -> str:
    """The behaviour change a pair's headline shows (a behaviour.json ``measures`` key). Rule: ``target``
    (the behaviour the pair is about) when its delta is significant (:func:`significant`); otherwise,
    among the significant measures, the largest |delta| in units of its own interval half-width (a
    zero-width interval ranks first; ties go by name); ``ppl_token`` stands aside when ``ppl_char`` is
    measured (per-token perplexity is not comparable across tokenizers); ``target`` when nothing moved."""
    if target in measures and significant(measures[target]):
        return target
    skip = {"ppl_token"} if math.isfinite(_num((measures.get("ppl_char") or {}).get("delta"))) else set()

    def size(name):
        m = measures[name]
        half = (_num(m["delta_hi"]) - _num(m["delta_lo"])) / 2
        return (abs(_num(m["delta"])) / half if half > 0 else math.inf, name)

    moved = [n for n, m in measures.items() if n not in skip and significant(m) and math.isfinite(_num(m.get("delta")))]
    return max(moved, key=size) if moved else target


def behaviour_gap(behaviour: Mapping | None, task: str | None) -> tuple[bool | None, str]:
    """Whether there is a behavioural gap for the steering sweep of ``task`` to explain: the tuned model
    shows the behaviour more than the base (:data:`TASK_MEASURE`'s measure, delta interval above 0), as
    the sweep's signed effects assume. ``(True | False, text)``; ``(None, text)`` when not measured."""
    name = TASK_MEASURE.get(task or "")
    m = ((behaviour or {}).get("measures") or {}).get(name) if name else None
    if not m or not math.isfinite(_num(m.get("delta"))):
        return None, f"behaviour gap of the {task} target not measured"
    lo, hi = _num(m.get("delta_lo")), _num(m.get("delta_hi"))
    text = (f"{name} base {_num(m.get('base')):.2f} -> tuned {_num(m.get('tuned')):.2f}, delta "
            f"{_num(m.get('delta')):+.2f} [{lo:.2f}, {hi:.2f}]")
    return bool(lo > 0), text


def _split_text(what: str, r: Mapping | None) -> str:
    """``ablation removes 0.88 [0.73, 0.96]`` from a steer.json test row, or that there is none."""
    if not r:
        return f"{what}: no test row"
    return f"{what} {_num(r.get('effect')):.2f} [{_num(r.get('effect_lo')):.2f}, {_num(r.get('effect_hi')):.2f}]"


def _handle_test_text(handle: Mapping, target: float) -> str:
    """The test-split numbers of the minimal k's setting in both directions and whether each reached."""
    parts = []
    for key, what in (("ablate_tuned@layer", "ablation{} removes"), ("steer_base@layer", "steering{} induces")):
        h = handle.get(key) or {}
        alpha = f" (alpha {_num(h.get('alpha')):g})" if key.startswith("steer") and h.get("alpha") is not None else ""
        parts.append(_split_text(what.format(alpha), h.get("test"))
                     + ("" if h.get("test_reached") else f", short of {target:g} or outside the side-effect limits"))
    return "test split: " + "; ".join(parts)


def _low_rank_handle(steer: Mapping, behaviour: Mapping | None, t: Thresholds) -> dict:
    """The ``low_rank_handle`` criterion (see the module docstring)."""
    k, layer = steer.get("minimal_k"), steer.get("best_layer")
    best = (steer.get("per_layer") or {}).get(str(layer)) or {}
    handle, target = best.get("handle") or {}, _num(steer.get("target_effect_min"))
    gap, gap_text = behaviour_gap(behaviour, steer.get("task"))
    if k is None:
        reads = False
        txt = "no swept k both removes and induces the behaviour within the side-effect limits on dev"
        abl = (best.get("ablate_tuned@layer") or {})
        if abl.get("test"):
            txt += "; " + _split_text(f"test split: rank-{abl.get('minimal_k')} ablation alone removes", abl["test"])
    else:
        confirmed = bool(steer.get("test_confirmed"))
        txt = f"minimal k = {k} at layer {layer} on dev, " + ("confirmed" if confirmed else "NOT confirmed") + \
            " on test; " + _handle_test_text(handle, target)
        reads = k <= t.policy_max_k if (confirmed or k > t.policy_max_k) else None
    if gap is False:
        reads, txt = None, f"no behavioural gap to explain ({gap_text}), so the sweep is no evidence; {txt}"
    elif gap:
        txt += f" (behaviour gap {gap_text})"
    return _criterion(k, t.policy_max_k, reads, True, txt)


def _criterion(value, threshold, policy: bool | None, decides: bool, text: str) -> dict:
    return {"value": value, "threshold": threshold, "reads": None if policy is None else
            ("policy" if policy else "rewiring"), "decides": decides, "text": text}


def criteria(ev: Mapping, t: Thresholds) -> dict[str, dict]:
    """The criteria of a non-null pair (see the module docstring), each ``{value, threshold, reads,
    decides, text}``; ``reads`` is None when the evidence is missing or not interpretable."""
    out = {}
    steer = ev.get("steer") or {}
    out["low_rank_handle"] = (_low_rank_handle(steer, ev.get("behaviour"), t) if steer else
                              _criterion(None, t.policy_max_k, None, True, "steer.json missing"))
    lp = ev.get("layer_patch")
    if lp is not None and len(lp):
        prof = entry_profile(lp)
        reads, why = sharp_entry(prof, t.sharp_entry_min)
        lo, hi = prof["max_rise_ci"]

        def scan(closed, cis):
            return ", ".join(f"L{a}: {b:.2f} [{c:.2f}, {d:.2f}]" for a, b, (c, d) in zip(prof["layers"], closed, cis))

        back = scan(prof["closed_reverse"], prof["closed_reverse_ci"])
        out["sharp_entry"] = _criterion(prof["max_rise"], t.sharp_entry_min, reads,
                                        True, f"largest rise in both directions {prof['max_rise']:.2f} "
                                        f"[{lo:.2f}, {hi:.2f}] at layer {prof['entry_layer']}: {why} (gap closed by "
                                        f"base->tuned patch, 95% prompt-bootstrap intervals: "
                                        f"{scan(prof['closed'], prof['closed_ci'])}"
                                        + (f"; tuned->base: {back})" if back else ")"))
    else:
        out["sharp_entry"] = _criterion(None, t.sharp_entry_min, None, True, "layer_patch.csv missing")
    head = (ev.get("clt") or {}).get("headline") or {}
    if head:
        r2, ident = _num(head.get("r2_uniform")), _num(head.get("identity_r2_uniform"))
        out["map_r2"] = _criterion(r2, t.map_r2_min, None, False,
                                   f"held-out R2 {r2:.3f} vs identity {ident:.3f} at layer {head.get('layer')}")
        mapped, real = _num(head.get("mapped_closed")), _num(head.get("real_closed"))
        ci = head.get("mapped_minus_real_ci")
        label = head.get("agreement") or (
            "no gap" if not (math.isfinite(mapped) and math.isfinite(real)) else
            "agree" if abs(mapped - real) <= t.agreement_tolerance else "disagree")  # results without the label
        why = "" if not ci or None in ci else f", mapped - real 95% interval [{ci[0]:.2f}, {ci[1]:.2f}]"
        if label == "disagree":
            reading = ceiling_reading(_num(head.get("ceiling_closed")), real, t.agreement_tolerance,
                                      head.get("ceiling_rows"), head.get("ceiling_dims"))
            why += f"; {reading}" if reading else ""
        out["mapped_patch"] = _criterion(mapped, t.agreement_tolerance, None, False,
                                         f"mapped patch closes {mapped:.2f} of the gap vs real {real:.2f}: " + label
                                         + f" (equivalence within +-{t.agreement_tolerance:g})" + why)
    ch = ev.get("churn") or {}
    if ch:
        note = "" if ch.get("z_attainable", True) else (
            f"; z >= {ch.get('z')} within a layer is unattainable with this few heads per layer, so only the "
            f"absolute threshold marks heads ({ch.get('n_important_union')} of {ch.get('n_heads')} marked)")
        lo, hi = (ch.get("churn_ci") or [None, None])
        floor = (ch.get("noise_floor") or {}).get("churn_q95")
        out["head_churn"] = _criterion(_num(ch.get("churn")), None, None, False,
                                       f"churn {_num(ch.get('churn')):.2f} [{_num(lo):.2f}, {_num(hi):.2f}] "
                                       f"(split-half floor q95 {_num(floor):.2f}), "
                                       f"Spearman {_num(ch.get('spearman')):.2f}, top-{ch.get('top_k')} Jaccard "
                                       f"{_num(ch.get('jaccard')):.2f} (chance {_num(ch.get('jaccard_chance')):.2f})"
                                       + note + _patch_agreement_text(ch.get("head_patch_agreement")))
    cka = ((ev.get("cka") or {}).get("strict") or {})
    if cka:
        out["min_cka"] = _criterion(_num(cka.get("min_cka_debiased")), None, None, False,
                                    f"min debiased CKA {_num(cka.get('min_cka_debiased')):.3f} at layer "
                                    f"{cka.get('layer_of_min')} (strict)")
    return out


def _patch_agreement_text(agreement: Mapping | None) -> str:
    """``; attribution vs real zero ablation (tuned): Spearman .., top-k Jaccard ..`` or ``""``."""
    tuned = (agreement or {}).get("tuned")
    if not tuned:
        return ""
    return (f"; attribution vs real zero ablation of the same heads (tuned, layers {tuned.get('layers')}): "
            f"Spearman {_num(tuned.get('spearman')):.2f}, top-{tuned.get('top_k')} Jaccard {_num(tuned.get('jaccard')):.2f}")


def _null_verdict(ev: Mapping, t: Thresholds) -> dict:
    beh = ((ev.get("behaviour") or {}).get("measures") or {})
    deltas = [abs(v["delta"]) for v in beh.values() if v.get("delta") is not None]
    max_delta = max(deltas, default=float("nan"))
    cka = _num(((ev.get("cka") or {}).get("strict") or {}).get("min_cka_debiased"))
    lp = ev.get("layer_patch")
    gap = entry_profile(lp)["max_gap_nats"] if lp is not None and len(lp) else float("nan")
    crit = {"behaviour_delta": _criterion(max_delta, 0.0, None, True, f"largest |behaviour delta| {max_delta:.3g}"),
            "min_cka": _criterion(cka, t.null_cka_min, None, True, f"min debiased CKA {cka:.4f}"),
            "layer_patch_gap": _criterion(gap, t.null_kl_max, None, True, f"base-tuned next-token KL {gap:.3g} nats")}
    same = max_delta == 0.0 and cka >= t.null_cka_min and gap <= t.null_kl_max
    label = "no difference" if same else "difference in a null pair"
    reason = ("identical behaviour (every delta 0), CKA >= {:.3f} at every scanned layer and KL <= {:g} nats"
              .format(t.null_cka_min, t.null_kl_max) if same else
              "the two models of a null pair differ: " + "; ".join(c["text"] for c in crit.values()))
    return {"label": label, "criteria": crit, "reasons": [reason]}


def verdict(domain: str, ev: Mapping, t: Thresholds) -> dict:
    """``{"label", "criteria", "reasons"}`` for one pair (see the module docstring)."""
    if domain == "null":
        return _null_verdict(ev, t)
    crit = criteria(ev, t)
    reads = [c["reads"] for c in crit.values() if c["decides"]]
    if None in reads:
        label = "inconclusive"
    elif all(r == "policy" for r in reads):
        label = "policy-like"
    elif all(r == "rewiring" for r in reads):
        label = "rewiring-like"
    else:
        label = "mixed"
    reasons = [f"{name} ({c['reads'] or 'n/a'}): {c['text']}" for name, c in crit.items() if c["decides"]]
    reasons += [f"{name} (context): {c['text']}" for name, c in crit.items() if not c["decides"]]
    return {"label": label, "criteria": crit, "reasons": reasons}


def churn_comparison(policy: Mapping, rewiring: Mapping, level: float = 0.95) -> dict:
    """The seed's expectation churn(rewiring pair) > churn(policy pair), tested on the two pairs' churn
    results (attribution.json).

    ``difference`` = rewiring - policy churn and ``difference_ci``: its ``level`` percentile interval from the
    two pairs' prompt bootstraps (``churn_bootstrap``; the pairs' prompts are resampled independently, so
    draw i of one pair minus draw i of the other is a draw of the difference); without bootstraps, NaN.
    ``expected``: the point estimates are ordered as expected; ``separated``: the difference's interval
    excludes 0 (without bootstraps: the two churn intervals do not overlap); ``text`` states the result and,
    when it is not separated, why the comparison cannot be read (z-score unattainable with few heads per
    layer, too few heads marked important, churn within the split-half noise floor).
    """
    def ci(c):
        lo, hi = c.get("churn_ci") or [float("nan"), float("nan")]
        return _num(lo), _num(hi)

    cp, cr = _num(policy.get("churn")), _num(rewiring.get("churn"))
    (plo, phi), (rlo, rhi) = ci(policy), ci(rewiring)
    bp, br = policy.get("churn_bootstrap"), rewiring.get("churn_bootstrap")
    diff = cr - cp
    dlo = dhi = float("nan")
    if bp and br:
        n = min(len(bp), len(br))
        draws = [_num(b) - _num(a) for a, b in zip(bp[:n], br[:n])]
        draws = sorted(d for d in draws if math.isfinite(d))
        if draws:
            q = (1 - level) / 2
            dlo, dhi = (float(_quantile(draws, x)) for x in (q, 1 - q))
    expected = math.isfinite(cp) and math.isfinite(cr) and cr > cp
    separated = expected and (dlo > 0 if math.isfinite(dlo) else rlo > phi)
    reasons = []
    for name, c in (("policy", policy), ("rewiring", rewiring)):
        if not c.get("z_attainable", True):
            reasons.append(f"the {name} pair's z >= {c.get('z')} within a layer is unattainable with this few heads "
                           f"per layer ({c.get('n_heads')} heads over its scanned layers)")
        if (c.get("n_important_union") or 0) < 3:
            reasons.append(f"the {name} pair marks only {c.get('n_important_union') or 0} important heads, so its "
                           "churn is a ratio of very small counts")
        if c.get("churn_above_floor") is False:
            reasons.append(f"the {name} pair's churn is within its split-half noise floor")
    text = f"churn policy pair {cp:.2f} [{plo:.2f}, {phi:.2f}] vs rewiring pair {cr:.2f} [{rlo:.2f}, {rhi:.2f}]"
    if math.isfinite(dlo):
        text += f", difference {diff:.2f} [{dlo:.2f}, {dhi:.2f}]"
    text += ": " + ("as expected, the difference's interval excludes 0" if separated and math.isfinite(dlo) else
                    "as expected, intervals separated" if separated else
                    "as expected but the interval includes 0" if expected and math.isfinite(dlo) else
                    "as expected but the intervals overlap" if expected else "NOT ordered as the seed expects")
    if not separated and reasons:
        text += "; why it cannot be read here: " + "; ".join(reasons)
    return {"expected": expected, "separated": separated, "difference": diff, "difference_ci": [dlo, dhi],
            "reasons": reasons, "text": text}


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending list (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])
