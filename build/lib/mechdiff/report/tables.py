"""The report's tables as rows of cells (strings or :class:`mechdiff.report.formatting.Est`): the headline
table (one row per pair), a verdict's criteria, a pair's behaviour measures, and key-value text."""

from __future__ import annotations

from mechdiff.report.formatting import (CRITERION_NAMES, MEASURE_NAMES, Est, confirmed_note, fmt_ci, fmt_number,
                                        lost_note)
from mechdiff.report.numbers import finite_float, headline_behaviour, interval_bounds, steer_tests, strict_min_cka
from mechdiff.rq1.layer_entry import entry_profile

#: printed where a headline number has no interval recorded, so the reader sees that it has none
NO_INTERVAL = "[no interval]"
HEADLINE_COLUMNS = ["Pair", "Verdict", "Behaviour change (tuned − base)", "Minimal k", "Ablation effect (test)",
                    "Entry rise", "Min CKA", "Map R² (held-out)", "Patch closed: mapped / real", "Head churn"]


def headline_row(pair: str, domain: str, ev: dict, v: dict) -> list:
    """One row of the report's headline table (:data:`HEADLINE_COLUMNS`): human units, 95% intervals."""
    name, m = headline_behaviour(domain, ev)
    abl, _, _ = steer_tests(ev)
    steer = ev["steer.json"] or {}
    prof = entry_profile(ev["layer_patch.csv"])
    cka, lo, hi, cka_layer = strict_min_cka(ev)
    clt = ev["clt.json"].get("headline") or {}
    ch = ev["attribution.json"] or {}
    churn_lo, churn_hi = ch.get("churn_ci") or [None, None]
    floor = (ch.get("noise_floor") or {}).get("churn_q95")
    k = steer.get("minimal_k")
    return [pair, v["label"],
            Est(fmt_number(m.get("delta"), signed=True), fmt_ci(m.get("delta_lo"), m.get("delta_hi")),
                MEASURE_NAMES.get(name, name)),
            "n/a" if domain == "null" else ("none" if k is None else Est(str(k), None, confirmed_note(steer))),
            Est(fmt_number(abl.get("effect")), fmt_ci(abl.get("effect_lo"), abl.get("effect_hi")),
                f"k = {abl.get('k')}, layer {steer.get('best_layer')}") if abl else "n/a",
            "n/a" if finite_float(prof["max_rise"]) is None else
            Est(fmt_number(prof["max_rise"]), fmt_ci(*prof["max_rise_ci"]) or NO_INTERVAL,
                f"layer {prof['entry_layer']}"),
            Est(fmt_number(cka, 3), fmt_ci(lo, hi, 3), None if cka_layer is None else f"layer {cka_layer}"),
            Est(fmt_number(clt.get("r2_uniform"), 3), NO_INTERVAL,
                None if finite_float(clt.get("identity_r2_uniform")) is None
                else f"identity {fmt_number(clt.get('identity_r2_uniform'), 3)} {NO_INTERVAL}"),
            "n/a" if finite_float(clt.get("mapped_closed")) is None and finite_float(clt.get("real_closed")) is None
            else
            Est(f"{fmt_number(clt.get('mapped_closed'))} / {fmt_number(clt.get('real_closed'))}",
                f"mapped − real {fmt_ci(*interval_bounds(clt.get('mapped_minus_real_ci'))) or NO_INTERVAL}",
                lost_note(clt).strip(" ()") or None),
            Est(fmt_number(ch.get("churn")), fmt_ci(churn_lo, churn_hi) or NO_INTERVAL,
                None if finite_float(floor) is None else f"floor {fmt_number(floor)}")]


def criteria_table(v: dict) -> list[list]:
    """A verdict's criteria (:func:`mechdiff.verdict.verdict`'s ``criteria``), one row each: name, whether it
    decides or is context, what it reads, value, threshold and the evidence sentence."""
    rows = [["Criterion", "Role", "Reads", "Value", "Threshold", "Evidence"]]
    for name, c in v["criteria"].items():
        val, thr = c.get("value"), c.get("threshold")
        rows.append([CRITERION_NAMES.get(name, name), "decides" if c.get("decides") else "context",
                     c.get("reads") or "n/a", "n/a" if finite_float(val) is None else f"{finite_float(val):.3g}",
                     "n/a" if finite_float(thr) is None else f"{finite_float(thr):g}", c.get("text", "")])
    return rows


def behaviour_table(measures: dict) -> list[list]:
    """A pair's behaviour measures (behaviour.json's ``measures``), one row each: n prompts, base, tuned and
    tuned − base, each with its 95% interval, 3 decimals."""
    rows = [["Measure", "n", "Base", "Tuned", "Tuned − base"]]
    for name, m in measures.items():
        rows.append([MEASURE_NAMES.get(name, name), str(m.get("n")),
                     Est(fmt_number(m.get("base"), 3), fmt_ci(m.get("base_lo"), m.get("base_hi"), 3)),
                     Est(fmt_number(m.get("tuned"), 3), fmt_ci(m.get("tuned_lo"), m.get("tuned_hi"), 3)),
                     Est(fmt_number(m.get("delta"), 3, signed=True), fmt_ci(m.get("delta_lo"), m.get("delta_hi"), 3))])
    return rows


def kv_text(value) -> str:
    """A fingerprint value as one line of text: dicts as ``key: value`` sorted by key and joined by ``; ``, lists
    joined by ``, ``, None as ``n/a``."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {kv_text(x)}" for k, x in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ", ".join(kv_text(x) for x in value)
    return "n/a" if value is None else str(value)
