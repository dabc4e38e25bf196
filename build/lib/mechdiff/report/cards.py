"""The verdict card of one pair: its label, one sentence answering "what did this fine-tune change", and the
three numbers the verdict rests on."""

from __future__ import annotations

from mechdiff.report.formatting import (CRITERION_NAMES, MEASURE_NAMES, Est, change_phrase, confirmed_note, fmt_ci,
                                        fmt_number, lost_note, target_note)
from mechdiff.report.numbers import finite_float, headline_behaviour, steer_tests, strict_min_cka
from mechdiff.rq1.layer_entry import entry_profile
from mechdiff.verdict import Thresholds


def pair_summary(domain: str, ev: dict, v: dict, t: Thresholds) -> dict:
    """What a pair's verdict card shows: ``label``, ``sentence`` (one plain sentence answering "what did this
    fine-tune change"), and ``numbers``, the three numbers the verdict rests on, each ``{title, est (Est),
    detail, reads, rule}``. Presentation only: every value comes from the results and the verdict."""
    crit = v["criteria"]
    name, m = headline_behaviour(domain, ev)
    label = MEASURE_NAMES.get(name, name.replace("_", " "))
    prof = entry_profile(ev["layer_patch.csv"])
    rise, entry, gap = finite_float(prof["max_rise"]), prof["entry_layer"], finite_float(prof["max_gap_nats"])
    rise_ci = fmt_ci(*prof["max_rise_ci"]) or "[no interval]"
    cka, cka_lo, cka_hi, cka_layer = strict_min_cka(ev)
    change = Est(fmt_number(m.get("delta"), signed=True), fmt_ci(m.get("delta_lo"), m.get("delta_hi")))
    if domain == "null":
        same = v["label"] == "no difference"
        sentence = ("Nothing: the two models of this null pair behave identically (every behaviour delta is 0), "
                    f"their states agree at every scanned layer (min CKA {fmt_number(cka, 4)}) and their next-token "
                    f"distributions match (KL {'n/a' if gap is None else f'{gap:.3g}'} nats{lost_note(prof)}), "
                    "as a null pair must."
                    if same else
                    "The two models of this null pair differ, which points to a pipeline fault (they should be "
                    f"identical): largest behaviour delta {fmt_number(m.get('delta'), 3)} ({label}), min CKA "
                    f"{fmt_number(cka, 4)}, next-token KL {gap if gap is None else f'{gap:.3g}'} "
                    f"nats{lost_note(prof)}.")
        numbers = [
            {"title": "Largest behaviour delta", "est": change,
             "detail": f"{label}, tuned − base, the largest of {len(ev['behaviour.json']['measures'])} measures",
             "reads": None, "rule": "no difference needs every delta = 0"},
            {"title": "Min CKA", "est": Est(fmt_number(cka, 4), fmt_ci(cka_lo, cka_hi, 4)),
             "detail": f"debiased linear CKA at layer {cka_layer} (strict), the lowest over the scanned layers",
             "reads": None, "rule": f"no difference needs ≥ {t.null_cka_min:g}"},
            {"title": "Next-token KL", "est": Est("n/a" if gap is None else f"{gap:.3g}", None, "nats"),
             "detail": "largest base-tuned next-token KL (on the shared vocabulary) over the scanned layers; one "
                       f"pass over the prompts, no interval{lost_note(prof)}",
             "reads": None, "rule": f"no difference needs ≤ {t.null_kl_max:g}"}]
        return {"label": v["label"], "sentence": sentence, "numbers": numbers}
    abl, ind, best = steer_tests(ev)
    steer = ev["steer.json"] or {}
    k, layer = steer.get("minimal_k"), steer.get("best_layer")
    handle, sharp = crit.get("low_rank_handle", {}), crit.get("sharp_entry", {})
    handle_text = {"policy": f"a rank-{k} subspace at layer {layer} removes it from the tuned model and "
                             "induces it in the base (chosen on dev, confirmed on the test split)",
                   "rewiring": (f"the smallest subspace that both removes and induces it has rank {k}, above "
                                f"{t.policy_max_k}" if k is not None else
                                f"no subspace of rank ≤ {t.policy_max_k} at one layer both removes and induces it")}
    entry_text = {"policy": f"the change enters sharply at layer {entry} (rise {fmt_number(rise)} {rise_ci})",
                  "rewiring": f"the change builds up over depth instead of entering at one layer (largest rise "
                              f"{fmt_number(rise)} {rise_ci}, upper bounds below {t.sharp_entry_min:g})"}
    what = f"This fine-tune {change_phrase(name, m)}"
    reads = (handle.get("reads"), sharp.get("reads"))
    if v["label"] == "policy-like":
        sentence = f"{what} through a low-rank, localised change: {handle_text['policy']}, and {entry_text['policy']}."
    elif v["label"] == "rewiring-like":
        sentence = f"{what} by distributed rewiring: {handle_text['rewiring']}, and {entry_text['rewiring']}."
    elif None in reads:
        missing = [CRITERION_NAMES[c].lower() + f" ({crit[c]['text']})" for c in ("low_rank_handle", "sharp_entry")
                   if c in crit and crit[c]["reads"] is None]
        sentence = f"{what}; the verdict is inconclusive: {'; '.join(missing)}."
    else:
        parts = [handle_text[reads[0]], entry_text[reads[1]]]
        if reads[0] == "rewiring":
            parts.reverse()
        sentence = f"{what}; the evidence is mixed: {parts[0]}, but {parts[1]}."
    handle_detail = []
    if abl:
        handle_detail.append(f"ablating rank {abl.get('k')} at layer {layer} in the tuned model removes "
                             f"{fmt_number(abl.get('effect'))} "
                             f"{fmt_ci(abl.get('effect_lo'), abl.get('effect_hi')) or ''}".rstrip()
                             + " of the behaviour")
    if ind:
        handle_detail.append(f"adding the dev-mean change inside the rank-{ind.get('k')} steering basis (the change's "
                             f"top singular directions) to the base (alpha {ind.get('alpha'):g}) induces "
                             f"{fmt_number(ind.get('effect'))} "
                             f"{fmt_ci(ind.get('effect_lo'), ind.get('effect_hi')) or ''}".rstrip())
    elif best:
        handle_detail.append("steering the base induces it at no swept k within the side-effect limits")
    numbers = [
        {"title": "Behaviour change", "est": change,
         "detail": f"{label}, tuned − base ({fmt_number(m.get('base'))} → {fmt_number(m.get('tuned'))}; "
                   f"n = {m.get('n')} prompts)" + target_note(domain, ev, name),
         "reads": None, "rule": "the change the verdict explains"},
        {"title": "Low-rank handle", "est": Est(f"k = {k}" if k is not None else "none", None, confirmed_note(steer)),
         "detail": (("; ".join(handle_detail) + " (test split)") if handle_detail and handle.get("reads") is not None
                    else handle.get("text", "")),
         "reads": handle.get("reads"),
         "rule": f"policy-like when k ≤ {t.policy_max_k} and confirmed on test; no evidence without a behaviour gap"},
        {"title": "Sharp entry", "est": Est(fmt_number(rise), rise_ci, None if entry is None else f"at layer {entry}"),
         "detail": "largest rise, between consecutive scanned layers, of the share of the next-token gap closed by "
                   "patching one layer (both directions), with its 95% interval from the layers' prompt-bootstrap "
                   "intervals",
         "reads": sharp.get("reads"), "rule": f"policy-like when its lower bound ≥ {t.sharp_entry_min:g}, "
                                              f"rewiring-like when every upper bound is below; else inconclusive"}]
    return {"label": v["label"], "sentence": sentence, "numbers": numbers}
