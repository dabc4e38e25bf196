"""How the report writes a number: formatted values with their 95% intervals (:class:`Est`), the names readers
see for behaviour measures and verdict criteria, and the short phrases and notes shared by the verdict cards
and the tables."""

from __future__ import annotations

from dataclasses import dataclass

from mechdiff.report.numbers import finite_float, target_measure

#: behaviour measures as a reader names them (behaviour.json keys; an unknown one keeps its key)
MEASURE_NAMES = {"refusal_rate": "refusal rate", "refusal_soft": "refusal log-prob (nats)",
                 "false_refusal": "false refusal rate", "math_acc": "math accuracy",
                 "math_logprob": "math answer log-prob (nats)", "mc_acc": "multiple-choice accuracy",
                 "ppl_token": "perplexity per token", "ppl_char": "perplexity per character",
                 "target_rate": "target behaviour rate", "target_logprob": "target continuation log-prob (nats)"}


#: verdict criteria as a reader names them (mechdiff.verdict criteria keys)
CRITERION_NAMES = {"low_rank_handle": "Low-rank handle", "sharp_entry": "Sharp entry", "map_r2": "Linear map R²",
                   "mapped_patch": "Mapped vs real patch", "head_churn": "Head churn", "min_cka": "Min CKA",
                   "behaviour_delta": "Largest behaviour delta", "layer_patch_gap": "Next-token KL"}


@dataclass(frozen=True)
class Est:
    """A table cell or card number: ``value`` (formatted), its 95% interval ``ci`` (``"[lo, hi]"``) and a short
    ``note`` under it (HTML) or after it (Markdown)."""

    value: str
    ci: str | None = None
    note: str | None = None

    def __str__(self) -> str:
        return " ".join(x for x in (self.value, self.ci, f"({self.note})" if self.note else None) if x)


def fmt_number(x, digits: int = 2, signed: bool = False) -> str:
    """``x`` with ``digits`` decimals ("n/a" when missing; never "-0.00")."""
    x = finite_float(x)
    if x is None:
        return "n/a"
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return f"{0:.{digits}f}" if float(text) == 0 else text


def fmt_ci(lo, hi, digits: int = 2) -> str | None:
    """``"[lo, hi]"`` with ``digits`` decimals, or None when either bound is missing."""
    lo, hi = finite_float(lo), finite_float(hi)
    return None if lo is None or hi is None else f"[{fmt_number(lo, digits)}, {fmt_number(hi, digits)}]"


def lost_note(d: dict) -> str:
    """`` (x% of the tuned model's mass outside the shared vocabulary)`` for a masked KL, from ``d["lost_tuned"]``
    (a fraction; :func:`mechdiff.rq1.layer_entry.entry_profile` or the fit_clt headline); empty when not recorded."""
    x = finite_float(d.get("lost_tuned"))
    return "" if x is None else f" ({100 * x:.3g}% of the tuned model's mass outside the shared vocabulary)"


def confirmed_note(steer: dict) -> str | None:
    """How the minimal k stands on the test split, for a table cell or card."""
    if steer.get("minimal_k") is None:
        return None
    return "confirmed on test" if steer.get("test_confirmed") else "dev only: NOT confirmed on test"


def change_phrase(name: str, m: dict) -> str:
    """"raised the refusal rate from 0.00 to 0.94 (+0.94 [0.85, 1.00])", or "did not measurably change ..."."""
    label = MEASURE_NAMES.get(name, name.replace("_", " "))
    delta, lo, hi = finite_float(m.get("delta")), finite_float(m.get("delta_lo")), finite_float(m.get("delta_hi"))
    if delta is None:
        return f"left the {label} unmeasured"
    ci = fmt_ci(lo, hi)
    est = f"{fmt_number(delta, signed=True)}{' ' + ci if ci else ''}"
    if delta == 0 or (lo is not None and hi is not None and lo <= 0 <= hi):
        return f"did not measurably change the {label} ({est})"
    verb = "raised" if delta > 0 else "lowered"
    return f"{verb} the {label} from {fmt_number(m.get('base'))} to {fmt_number(m.get('tuned'))} ({est})"


def target_note(domain: str, ev: dict, shown: str) -> str:
    """``; the largest significant change, as the <target> did not move significantly (...)`` when the headline
    shows another measure than the domain's target (:func:`headline_behaviour`), else ``""``."""
    target = target_measure(ev)
    m = ev["behaviour.json"]["measures"].get(target)
    if shown == target or not m:
        return ""
    est = f"{fmt_number(m.get('delta'), signed=True)} {fmt_ci(m.get('delta_lo'), m.get('delta_hi')) or ''}".rstrip()
    return (f"; the largest significant change, as the {MEASURE_NAMES.get(target, target)} did not move "
            f"significantly ({est})")
