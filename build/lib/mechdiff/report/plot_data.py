"""The curves of every pair as tidy rows for ``dvc plots show`` / ``dvc plots diff`` (templates in
``.dvc/plots``, titles and axis labels in dvc.yaml's top-level ``plots``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mechdiff.report.numbers import finite_float

#: plot file (under <out>/plots) -> (x field, y field); every row also has ``pair``, ``series``, ``lo``, ``hi``
PLOTS = {"cka.json": ("layer", "cka"), "layer_patch.json": ("layer", "closed"), "steering.json": ("k", "effect"),
         "head_cumulative.json": ("m", "fraction"), "churn.json": ("pair", "value")}


def _row(pair: str, series: str, x_name: str, x, y_name: str, y, lo=None, hi=None) -> dict:
    x = int(x) if isinstance(x, (int, np.integer)) or (isinstance(x, float) and float(x).is_integer()) else x
    return {"pair": pair, "series": series, x_name: x, y_name: finite_float(y), "lo": finite_float(lo),
            "hi": finite_float(hi)}


def plot_data(data: dict) -> dict[str, list[dict]]:
    """The five curves of every pair as tidy rows (one file per curve, the pair a column), for the DVC plot
    templates: CKA by layer with its bootstrap band, layer-patch fraction closed by layer (both directions,
    every mode), steering and ablation effect by rank k and alpha (best layer, test split, fitted subspace,
    with intervals), the cumulative head curve (top-m heads vs random head sets, 5-95% band) and churn with
    Jaccard and Spearman (95% intervals, split-half floor, chance). Every row has the same keys (DVC needs it)."""
    out: dict[str, list[dict]] = {name: [] for name in PLOTS}
    for pair, ev in data.items():
        cka = ev["cka.csv"]
        for r in cka.sort_values(["mode", "layer"]).itertuples():
            out["cka.json"].append(_row(pair, r.mode, "layer", r.layer, "cka", r.cka_debiased, r.ci_low, r.ci_high))
        lp = pd.concat([ev["layer_patch.csv"], ev.get("layer_patch_other", ev["layer_patch.csv"].iloc[:0])])
        for r in lp.sort_values([c for c in ("mode", "direction", "layer") if c in lp.columns]).itertuples():
            series = f"{r.direction} ({r.mode})" if "mode" in lp.columns else r.direction
            out["layer_patch.json"].append(_row(pair, series, "layer", r.layer, "closed", r.fraction_closed,
                                                getattr(r, "fraction_closed_lo", None),
                                                getattr(r, "fraction_closed_hi", None)))
        steer, best = ev["steer.csv"], (ev["steer.json"] or {}).get("best_layer")
        need = {"layer", "split", "probe", "site", "subspace", "direction", "k", "alpha", "effect", "effect_lo",
                "effect_hi"}
        if best is not None and need <= set(steer.columns):
            d = steer[(steer["layer"] == best) & (steer["split"] == "test") & (steer["probe"] == "main")
                      & (steer["site"] == "layer") & (steer["subspace"] == "fitted")]
            for r in d.sort_values(["direction", "alpha", "k"]).itertuples():
                if r.direction == "ablate_tuned":
                    series = "ablate in tuned"
                elif r.direction == "steer_base":
                    series = f"steer base, alpha {r.alpha:g}"
                else:
                    continue
                out["steering.json"].append({**_row(pair, series, "k", r.k, "effect", r.effect, r.effect_lo,
                                                    r.effect_hi), "layer": int(best)})
        per_layer = (ev["head_patch.json"] or {}).get("per_layer") or {}
        if per_layer:  # the first chosen layer with an effect to share out (figure D: the first chosen layer)
            layer, info = next(((la, i) for la, i in per_layer.items() if any(
                finite_float(c.get("fraction_of_layer")) is not None for c in i.get("cumulative") or [])),
                next(iter(per_layer.items())))
            order = {"patching": 0, "attribution": 1, "random": 2}
            for c in sorted(info.get("cumulative") or [], key=lambda c: (order.get(c.get("order"), 3), c.get("m", 0))):
                rand = c.get("order") == "random"
                series = "random head sets (mean)" if rand else f"top heads by {c.get('order')}"
                out["head_cumulative.json"].append({**_row(pair, series, "m", c.get("m"), "fraction",
                                                            c.get("fraction_of_layer"),
                                                            c.get("fraction_q05") if rand else None,
                                                            c.get("fraction_q95") if rand else None),
                                                    "layer": int(layer)})
        ch = ev["attribution.json"] or {}
        for series, value, ci in (("churn", ch.get("churn"), "churn_ci"),
                                  ("churn split-half floor (q95)", (ch.get("noise_floor") or {}).get("churn_q95"),
                                   None),
                                  ("top-k Jaccard", ch.get("jaccard"), "jaccard_ci"),
                                  ("Jaccard by chance", ch.get("jaccard_chance"), None),
                                  ("Spearman (head ranks)", ch.get("spearman"), "spearman_ci")):
            lo, hi = (ch.get(ci) if ci else None) or [None, None]
            out["churn.json"].append(_row(pair, series, "pair", pair, "value", value, lo, hi))
    return out
