"""Where the change between two models enters, read from the layer-patch scan of both directions
(layer_patch.csv as a frame: ``direction``, ``layer``, ``fraction_closed`` with its prompt-bootstrap interval,
the paired rise interval ``rise_lo`` / ``rise_hi``, ``gap`` and the masked-away mass ``lost_*``).

:func:`entry_profile` gives each scanned layer's rise of the fraction of the gap closed, in both directions
at once, and the layer of the largest; :func:`sharp_entry` decides from the rise intervals whether the change
enters sharply (the verdict's ``sharp_entry`` criterion, :mod:`mechdiff.verdict`). The layer scan's refinement
(:mod:`mechdiff.rq1.layer_refine`) and the planted-truth checks read the same profile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

__all__ = ["entry_profile", "sharp_entry"]


def _bounds(d: pd.DataFrame, col: str) -> list[float]:
    return [float(x) for x in d[col]] if col in d else [float("nan")] * len(d)


def _rises(layer_patch: pd.DataFrame, direction: str) -> dict:
    """One direction's scan: ``layers``, fraction ``closed`` at each with its prompt-bootstrap interval
    (``closed_lo`` / ``closed_hi``; nan when not recorded), its ``rise`` from the layer before (from 0 before the
    first) and the rise's interval: the paired prompt-bootstrap interval the table records (``rise_lo`` /
    ``rise_hi``, :func:`mechdiff.rq1.layer_patch.rise_intervals`), else, for a table written before those columns,
    the conservative difference of the marginal intervals (this layer's lower bound - the upper bound before,
    upper - lower before)."""
    d = layer_patch[layer_patch["direction"] == direction].sort_values("layer")
    closed, lo, hi = [float(x) for x in d["fraction_closed"]], _bounds(d, "fraction_closed_lo"), \
        _bounds(d, "fraction_closed_hi")
    paired = "rise_lo" in d and "rise_hi" in d and d[["rise_lo", "rise_hi"]].notna().any().any()
    return {"layers": [int(x) for x in d["layer"]], "closed": closed, "closed_lo": lo, "closed_hi": hi,
            "rise": [b - a for a, b in zip([0.0] + closed[:-1], closed)],
            "rise_lo": _bounds(d, "rise_lo") if paired else [b - a for a, b in zip([0.0] + hi[:-1], lo)],
            "rise_hi": _bounds(d, "rise_hi") if paired else [b - a for a, b in zip([0.0] + lo[:-1], hi)]}


def _both(a: float, b: float) -> float:
    return min(a, b) if math.isfinite(a) and math.isfinite(b) else float("nan")


def entry_profile(layer_patch: pd.DataFrame) -> dict:
    """Where the change enters, from the layer-patch scan of both directions.

    A change made at one layer closes the whole gap from that layer on in both directions (downstream of
    it the two models are the same), so at its entry the fraction closed jumps in both. A change spread
    over the depth accumulates, and its two directions need not agree (each runs the other model's
    layers downstream). The entry rise at each scanned layer is therefore the smaller of the two
    directions' rises there (one direction alone when the other is absent); ``max_rise`` is the largest
    and ``entry_layer`` where it happens (None and NaN without a gap to close, as in a null pair).
    ``rise_ci`` is each layer's entry-rise interval (the smaller of the directions' bounds, from the
    prompt-bootstrap intervals of the fraction closed; NaN where the scan has none) and ``max_rise_ci`` the
    entry layer's. ``closed`` and ``closed_reverse`` are the base->tuned and tuned->base fractions per layer
    (``closed_ci`` / ``closed_reverse_ci`` their intervals); ``max_gap_nats`` the largest masked next-token
    KL and ``lost_base`` / ``lost_tuned`` the mean mass each model puts outside the shared vocabulary, which
    that KL drops (fractions; NaN when not recorded)."""
    fwd, back = _rises(layer_patch, "base->tuned"), _rises(layer_patch, "tuned->base")
    if back["layers"] == fwd["layers"]:
        rises, lo, hi = ([_both(a, b) for a, b in zip(fwd[k], back[k])] for k in ("rise", "rise_lo", "rise_hi"))
    else:
        rises, lo, hi = fwd["rise"], fwd["rise_lo"], fwd["rise_hi"]
        back = {k: [] for k in back}
    finite = [j for j in range(len(rises)) if math.isfinite(rises[j])]  # no gap (a null pair): no entry
    i = max(finite, key=lambda j: rises[j]) if finite else None
    d = layer_patch[layer_patch["direction"] == "base->tuned"]
    nan = float("nan")
    return {"layers": fwd["layers"], "closed": fwd["closed"], "closed_reverse": back["closed"],
            "closed_ci": list(zip(fwd["closed_lo"], fwd["closed_hi"])),
            "closed_reverse_ci": list(zip(back["closed_lo"], back["closed_hi"])),
            "rise_ci": list(zip(lo, hi)),
            "max_rise": rises[i] if i is not None else nan,
            "max_rise_ci": (lo[i], hi[i]) if i is not None else (nan, nan),
            "entry_layer": fwd["layers"][i] if i is not None else None,
            "max_gap_nats": float(d["gap"].max()) if len(d) else nan,
            **{c: float(d[c].mean()) if c in d and len(d) else nan for c in ("lost_base", "lost_tuned")}}


def sharp_entry(prof: Mapping, threshold: float) -> tuple[bool | None, str]:
    """Whether the change enters sharply, decided by the rise intervals of :func:`entry_profile`: ``True``
    when some layer's rise has its lower bound ``>= threshold``, ``False`` when every layer's upper bound is
    below it, ``None`` (inconclusive) when an interval straddles it, without a gap or without intervals;
    with the reason in words."""
    if prof["entry_layer"] is None:
        return None, "no gap to close at any scanned layer"
    cis = [(x, a, b) for x, (a, b) in zip(prof["layers"], prof["rise_ci"]) if math.isfinite(a) and math.isfinite(b)]
    if not cis:
        return None, "no prompt-bootstrap interval of the fraction closed recorded, so the rise is not decided"
    x, lo, _ = max(cis, key=lambda c: c[1])
    if lo >= threshold:
        return True, f"sharp, its lower bound {lo:.2f} at layer {x} >= {threshold:g}"
    if all(b < threshold for _, _, b in cis):
        return False, f"not sharp, every layer's upper bound < {threshold:g} (largest {max(b for *_, b in cis):.2f})"
    straddle = [f"L{x}: [{a:.2f}, {b:.2f}]" for x, a, b in cis if a < threshold <= b]
    return None, f"inconclusive, the rise interval straddles {threshold:g} ({', '.join(straddle)})"

