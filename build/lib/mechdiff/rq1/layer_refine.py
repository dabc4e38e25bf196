"""Choosing layers from the layer-patch scan (:func:`choose_layers`, for RQ2-RQ4) and refining the coarse
scan so the entry is exact.

A coarse scan (every ``layers.scan_stride`` blocks) only brackets where the change enters: between the
scanned layer before the entry and the entry (a planted edit at layer 18 reads at 19 with stride 2).
:func:`bracket_layers` lists the layers inside the brackets around the entries (:func:`entry_layers`) and
the other chosen layers; :func:`refine_scan` patches them until none is left, so the layer before each
entry was patched and the entry is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from mechdiff.rq1.layer_entry import entry_profile


def choose_layers(summary: pd.DataFrame, cka: dict[int, float], n_choose: int, threshold: float = 0.5) -> dict:
    """The rule for RQ2-RQ4 layers: the first patched layer whose base->tuned patch closes at least
    ``threshold`` of the gap (where the change has entered), then the layer of lowest CKA not yet chosen.

    Without any gap (a null pair) the lowest-CKA layers are chosen. Returns the layers and the reasons.
    """
    fwd = summary[summary["direction"] == "base->tuned"].sort_values("layer")
    chosen, reasons = [], []
    entered = fwd[fwd["fraction_closed"] >= threshold]
    if len(entered):
        first = entered.iloc[0]
        chosen.append(int(first["layer"]))
        ci = (f" [{first['fraction_closed_lo']:.2f}, {first['fraction_closed_hi']:.2f}]"
              if "fraction_closed_lo" in entered else "")
        reasons.append(f"first layer where the base->tuned patch closes >= {threshold:.0%} of the gap "
                       f"({first['fraction_closed']:.2f}{ci}, 95% prompt-bootstrap interval)" if ci else
                       f"first layer where the base->tuned patch closes >= {threshold:.0%} of the gap")
    for layer in sorted(cka, key=lambda k: (cka[k], k)):
        if len(chosen) >= n_choose:
            break
        if layer not in chosen:
            chosen.append(int(layer))
            reasons.append("lowest debiased CKA among the remaining scanned layers")
    return {"layers": chosen, "reasons": reasons}


def entry_layers(summary: pd.DataFrame, threshold: float) -> list[int]:
    """Where the change enters, by both readings (ascending, without repeats; empty without a gap): the
    first layer whose base->tuned patch closes ``threshold`` of the gap (:func:`choose_layers`) and the
    layer of the largest rise in both directions (:func:`mechdiff.rq1.layer_entry.entry_profile`)."""
    first = choose_layers(summary, {}, 1, threshold)["layers"]  # without CKA: the threshold entry alone
    rise = entry_profile(summary)["entry_layer"]
    return sorted({int(x) for x in first + ([rise] if rise is not None else [])})


def bracket_layers(patched: Sequence[int], entries: Sequence[int], others: Sequence[int]) -> list[int]:
    """Layers not yet ``patched`` inside the brackets the coarse scan leaves (ascending).

    An entry L (the change first shows at L) is bracketed below: every layer after the patched layer
    before L (from 0 when none) up to L. Any other layer (e.g. chosen by CKA) is bracketed on both sides,
    between its patched neighbours. Patching these makes the entry exact: the layer before it was patched.
    """
    done = sorted(set(patched))
    out: set[int] = set()
    for layer in set(entries) | set(others):
        below = max([x for x in done if x < layer], default=-1)
        out.update(range(below + 1, layer))
        if layer in others:
            above = min([x for x in done if x > layer], default=layer + 1)
            out.update(range(layer + 1, above))
    return sorted(out - set(done))


def refine_scan(patch: Callable[[list[int]], pd.DataFrame], coarse: Sequence[int], cka: dict[int, float],
                n_choose: int, threshold: float) -> tuple[pd.DataFrame, dict, list[int]]:
    """The coarse scan, then the layers inside the brackets around the entries and the chosen layers
    (:func:`bracket_layers`) until none is left, so the layer before each entry was patched.

    ``patch(layers)`` returns :func:`mechdiff.rq1.layer_patch.summarise` rows at those layers. Returns the summary
    over every patched layer, :func:`choose_layers` on it, and the exact entries (:func:`entry_layers`).
    """
    summary = patch(list(coarse))
    while True:
        chosen = choose_layers(summary, cka, n_choose, threshold)
        entries = entry_layers(summary, threshold)
        new = bracket_layers(summary["layer"].unique(), entries, [x for x in chosen["layers"] if x not in entries])
        if not new:
            return summary, chosen, entries
        summary = pd.concat([summary, patch(new)]).sort_values(["direction", "layer"], ignore_index=True)
