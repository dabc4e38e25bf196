"""The numbers the report reads off one pair's results: the headline behaviour change, the steering tests at
the dev-chosen handle, the strict min CKA with its interval, every headline number (``headline.json``) and the
pair's ``dvc metrics show`` row.

``ev`` is one pair's results as the report stage loads them: ``{"<file name>": parsed JSON or DataFrame}``
(``behaviour.json``, ``cka.json``, ``cka.csv``, ``layer_patch.csv``, ``layers.json``, ``clt.json``,
``steer.json``, ``steer_curve.csv``, ``steer.csv``, ``attribution.json``, ``fairness.json``,
``head_patch.json``, ``change_rank.csv``) plus ``layer_patch_other`` and ``fingerprint``.
"""

from __future__ import annotations

import math

import numpy as np

from mechdiff.rq1.layer_entry import entry_profile
from mechdiff.verdict import TASK_MEASURE, headline_measure


def finite_float(x) -> float | None:
    """A finite float or None (strict JSON)."""
    return float(x) if isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x)) else None


def interval_bounds(ci) -> tuple:
    """A recorded ``[lo, hi]`` interval, or (None, None)."""
    return tuple(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)


def round_sig(x, sig: int = 3) -> float | None:
    """``x`` to ``sig`` significant digits for the metrics files (None when missing)."""
    x = finite_float(x)
    return None if x is None else float(f"{x:.{sig}g}") + 0.0


def evidence(ev: dict) -> dict:
    """The inputs :func:`mechdiff.verdict.verdict` reads."""
    return {"behaviour": ev["behaviour.json"], "cka": ev["cka.json"], "layer_patch": ev["layer_patch.csv"],
            "chosen": ev["layers.json"], "clt": ev["clt.json"], "steer": ev["steer.json"],
            "churn": ev["attribution.json"]}


def target_measure(ev: dict) -> str:
    """The behaviour.json measure of the pair's target, from the task its steering sweep recorded
    (:data:`mechdiff.verdict.TASK_MEASURE`: refusal -> refusal_rate, math -> math_acc, a user target ->
    target_rate); refusal_rate when none is recorded."""
    return TASK_MEASURE.get((ev.get("steer.json") or {}).get("task") or "", "refusal_rate")


def headline_behaviour(domain: str, ev: dict) -> tuple[str, dict]:
    """The behaviour measure a pair's change is read on, and its entry in behaviour.json: the largest
    significant change by :func:`mechdiff.verdict.headline_measure`'s rule (the pair's target measure
    first), or for a null pair the measure with the largest |delta| (what its verdict reads)."""
    meas = ev["behaviour.json"]["measures"]
    if domain == "null":
        moved = [(abs(m["delta"]), name == target_measure(ev), name) for name, m in meas.items()
                 if finite_float(m.get("delta")) is not None]  # ties (every delta 0) go to the usual target measure
        name = max(moved, key=lambda x: x[:2])[2] if moved else target_measure(ev)
    else:
        name = headline_measure(meas, target_measure(ev))
    return name, meas.get(name) or {}


def steer_tests(ev: dict) -> tuple[dict, dict, dict]:
    """steer.json at the best layer: (ablation in the tuned model, steering of the base) on test at the
    dev-chosen minimal k's setting (``handle``; without one, each direction's own dev choice), and the
    best layer's entry itself; empty dicts when the sweep found nothing."""
    steer = ev["steer.json"] or {}
    best = (steer.get("per_layer") or {}).get(str(steer.get("best_layer"))) or {}
    src = best.get("handle") or best
    return ((src.get("ablate_tuned@layer") or {}).get("test") or {},
            (src.get("steer_base@layer") or {}).get("test") or {}, best)


def strict_min_cka(ev: dict) -> tuple[float | None, float | None, float | None, object]:
    """The verdict's min debiased CKA (strict mode, cka.json) with its 95% bootstrap interval at that layer
    (cka.csv), and the layer."""
    strict = (ev["cka.json"] or {}).get("strict") or {}
    layer = strict.get("layer_of_min")
    lo = hi = None
    cka = ev.get("cka.csv")
    if cka is not None and layer is not None and {"mode", "layer", "ci_low", "ci_high"} <= set(cka.columns):
        row = cka[(cka["mode"] == "strict") & (cka["layer"] == layer)]
        if len(row):
            lo, hi = finite_float(row["ci_low"].iloc[0]), finite_float(row["ci_high"].iloc[0])
    return finite_float(strict.get("min_cka_debiased")), lo, hi, layer


VERDICT_CODE = {"policy-like": 1.0, "rewiring-like": 0.0, "mixed": 0.5}


def headline(pair: str, domain: str, ev: dict, v: dict) -> dict:
    """Every headline number of one pair (its entry in ``headline.json`` and its row of ``headline.csv``):
    behaviour change with its 95% interval, min CKA, the entry rise, the map, the minimal k, churn, fairness."""
    name, beh = headline_behaviour(domain, ev)
    steer = ev["steer.json"] or {}
    clt = ev["clt.json"]["headline"]
    ch = ev["attribution.json"]
    fair = ev["fairness.json"]
    strict = fair["segmentation"]["all"]["modes"].get("strict", {})
    prof = entry_profile(ev["layer_patch.csv"])
    return {"verdict_policy_score": VERDICT_CODE.get(v["label"]),
            "behaviour_measure": name,
            "behaviour_delta": finite_float(beh.get("delta")),
            "behaviour_delta_lo": finite_float(beh.get("delta_lo")),
            "behaviour_delta_hi": finite_float(beh.get("delta_hi")),
            "min_cka_debiased": finite_float(ev["cka.json"]["strict"]["min_cka_debiased"]),
            "entry_layer": prof["entry_layer"], "entry_max_rise": finite_float(prof["max_rise"]),
            "entry_max_rise_lo": finite_float(prof["max_rise_ci"][0]),
            "entry_max_rise_hi": finite_float(prof["max_rise_ci"][1]),
            "max_next_token_kl_nats": finite_float(prof["max_gap_nats"]),
            "map_r2": finite_float(clt.get("r2_uniform")),
            "map_gain_over_identity": finite_float(clt.get("gain_r2_uniform")),
            "mapped_patch_closed": finite_float(clt.get("mapped_closed")),
            "real_patch_closed": finite_float(clt.get("real_closed")),
            "mapped_minus_real_lo": finite_float(interval_bounds(clt.get("mapped_minus_real_ci"))[0]),
            "mapped_minus_real_hi": finite_float(interval_bounds(clt.get("mapped_minus_real_ci"))[1]),
            "linear_ceiling_closed": finite_float(clt.get("ceiling_closed")),
            "patch_tuned_mass_outside_shared": finite_float(clt.get("lost_tuned")),
            "layer_patch_tuned_mass_outside_shared": finite_float(prof.get("lost_tuned")),
            "minimal_k": steer.get("minimal_k"), "minimal_k_test_confirmed": steer.get("test_confirmed"),
            "churn": finite_float(ch.get("churn")), "churn_lo": finite_float(interval_bounds(ch.get("churn_ci"))[0]),
            "churn_hi": finite_float(interval_bounds(ch.get("churn_ci"))[1]),
            "spearman": finite_float(ch.get("spearman")),
            "jaccard": finite_float(ch.get("jaccard")),
            "vocab_increase_pct": finite_float(fair["vocab"].get("pct_increase")),
            "strict_prompt_retention": finite_float(strict.get("prompt_retention"))}


def metrics_row(domain: str, ev: dict, v: dict) -> dict:
    """One pair's row of ``dvc metrics show`` (``report/metrics/<pair>.json``): the verdict and the 15 numbers it
    rests on (both kinds of pair), 95% interval bounds as their own keys, rounded to what they resolve (3
    significant digits; CKA to 4 decimals), keys short enough that a row stays under 200 characters. Keys:
    ``delta`` (the headline behaviour change, tuned - base: :func:`headline_behaviour`; a null pair's largest),
    ``k_min`` (minimal rank that removes and induces it, chosen on dev; whether the test split confirms it is
    headline.json's ``minimal_k_test_confirmed``), ``ablate`` / ``steer`` (test effect of removing it from the
    tuned model / adding it to the base at that k and the best layer), ``entry`` (largest layer-patch rise, with
    ``entry_lo`` / ``entry_hi``), ``cka_min`` (strict). The largest next-token KL (no interval) and the context numbers
    (map R2, churn, the mass outside the shared vocabulary that the KL drops, ...) stay in headline.json,
    which keeps each `dvc metrics show` row within 200 characters."""
    _, m = headline_behaviour(domain, ev)
    abl, ind, _ = steer_tests(ev)
    prof = entry_profile(ev["layer_patch.csv"])
    cka, lo, hi, _ = strict_min_cka(ev)

    def r4(x):
        return None if finite_float(x) is None else round(float(x), 4) + 0.0

    return {"verdict": v["label"],
            "delta": round_sig(m.get("delta")), "delta_lo": round_sig(m.get("delta_lo")),
            "delta_hi": round_sig(m.get("delta_hi")),
            "k_min": (ev["steer.json"] or {}).get("minimal_k"),
            "ablate": round_sig(abl.get("effect")), "ablate_lo": round_sig(abl.get("effect_lo")),
            "ablate_hi": round_sig(abl.get("effect_hi")), "steer": round_sig(ind.get("effect")),
            "entry": round_sig(prof["max_rise"], 2), "entry_lo": round_sig(prof["max_rise_ci"][0], 2),
            "entry_hi": round_sig(prof["max_rise_ci"][1], 2), "cka_min": r4(cka), "cka_lo": r4(lo), "cka_hi": r4(hi)}
