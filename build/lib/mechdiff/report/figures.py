"""Figures A-D of the report, one column of panels per pair, as matplotlib Figures (no pyplot state: the caller
saves them, :func:`png_bytes`).

``data``: pair -> its results as the report stage loads them (see :mod:`mechdiff.report.numbers`).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes at 110 dpi, after ``tight_layout``."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def cka_and_layer_patch_figure(data: dict) -> Figure:
    """Figure A: per pair, the debiased CKA curve by layer (strict and aligned, bootstrap band) over
    the layer-patch fraction of the gap closed by layer (both directions; the other modes dashed)."""
    fig = Figure(figsize=(4 * len(data), 6))
    axes = fig.subplots(2, len(data), squeeze=False)
    for j, (pair, ev) in enumerate(data.items()):
        cka = ev["cka.csv"]
        for mode in ("strict", "aligned"):
            d = cka[cka["mode"] == mode].sort_values("layer")
            axes[0, j].plot(d["layer"], d["cka_debiased"], marker="o", label=f"debiased, {mode}")
            axes[0, j].fill_between(d["layer"], d["ci_low"], d["ci_high"], alpha=0.2)
        axes[0, j].set(title=f"{pair}: CKA base vs tuned", xlabel="layer", ylabel="linear CKA")
        axes[0, j].legend(fontsize=7)
        lp = ev["layer_patch.csv"]
        for i, direction in enumerate(("base->tuned", "tuned->base")):
            d = lp[lp["direction"] == direction].sort_values("layer")
            axes[1, j].bar(d["layer"] + 0.4 * i - 0.2, d["fraction_closed"].fillna(0), width=0.4,
                           label=f"{direction} ({ev['layers.json'].get('mode')})")
        other = ev.get("layer_patch_other")
        if other is not None and len(other):
            for mode, d in other[other["direction"] == "base->tuned"].groupby("mode"):
                d = d.sort_values("layer")
                axes[1, j].plot(d["layer"], d["fraction_closed"].fillna(0), "k--o", ms=3, label=f"base->tuned ({mode})")
        chosen = ev["layers.json"]["layers"]
        axes[1, j].set(title=f"layer patch (chosen {chosen})", xlabel="layer", ylabel="fraction of KL gap closed",
                       ylim=(-0.1, 1.1))
        axes[1, j].legend(fontsize=7)
    return fig


def linear_map_figure(data: dict) -> Figure:
    """Figure B: per pair, the held-out R2 of the base->tuned map and its baselines at the headline layer
    over the fraction of the gap closed by the mapped vs the real patch and its controls."""
    fig = Figure(figsize=(4 * len(data), 6))
    axes = fig.subplots(2, len(data), squeeze=False)
    bars = ("map", "procrustes", "identity", "shuffled", "mean")
    arms = ("real", "mapped", "ceiling", "identity", "random")  # xmodel_map.ARMS (not imported: it loads torch)
    for j, (pair, ev) in enumerate(data.items()):
        clt = ev["clt.json"]
        layer = str(clt["headline"]["layer"])
        held = clt["layers"][layer]["heldout"]
        r2 = [(held.get(b) or {}).get("r2_uniform", np.nan) for b in bars]
        axes[0, j].bar(bars, np.clip(np.nan_to_num(r2, nan=0.0), -0.5, None),
                       color=[f"C{i}" for i in range(len(bars))])
        axes[0, j].set(title=f"{pair}: held-out R2, layer {layer}", ylim=(-0.5, 1.05), ylabel="R2 (uniform)")
        axes[0, j].tick_params(axis="x", labelsize=7)
        patch = clt["layers"][layer].get("patch") or {}
        vals = [patch.get(f"{a}_closed") for a in arms]
        axes[1, j].bar(arms, [0.0 if v is None else max(v, -1.0) for v in vals],
                       color=[f"C{i}" for i in range(len(arms))])
        note = "no gap" if vals[0] is None else f"agreement: {patch.get('agreement')}"
        axes[1, j].set(title=f"mapped vs real patch ({note})", ylim=(-1.05, 1.1), ylabel="fraction of gap closed")
    return fig


def steering_figure(data: dict) -> Figure:
    """Figure C: per pair, the target effect vs rank k at the best layer (ablation in the tuned model over
    steering of the base, each subspace with its band), with the side-effect ribbons and the target threshold."""
    panels = (("ablate_tuned", "ablate in tuned"), ("steer_base", "steer base"))
    fig = Figure(figsize=(4 * len(data), 6))
    axes = fig.subplots(2, len(data), squeeze=False, sharey=True)
    for j, (pair, ev) in enumerate(data.items()):
        curve, best = ev["steer_curve.csv"], ev["steer.json"].get("best_layer")
        for i, (direction, title) in enumerate(panels):
            ax = axes[i, j]
            sub = curve[(curve["layer"] == best) & (curve["direction"] == direction) & (curve["site"] == "layer")]
            for name, d in sub.groupby("subspace", sort=True):
                d = d.sort_values("k")
                ax.plot(d["k"], d["effect"], marker="o", label=f"{name} subspace")
                ax.fill_between(d["k"], d["effect_lo"], d["effect_hi"], alpha=0.15)
            fit = sub[sub["subspace"] == "fitted"].sort_values("k")
            if len(fit):
                ax.fill_between(fit["k"], 0, fit["ppl_increase"].clip(lower=0), color="grey", alpha=0.3,
                                label="ppl increase (fraction)")
                ax.fill_between(fit["k"], 0, fit["side_drop_pp"].clip(lower=0) / 100, color="purple", alpha=0.15,
                                label="accuracy drop (pp/100)")
            ax.axhline(ev["steer.json"].get("target_effect_min", 0.1), ls=":", color="black", lw=0.8)
            ax.set(title=f"{pair}: {title}, layer {best}", xlabel="rank k", ylabel="target effect (test)")
            ax.legend(fontsize=6)
    return fig


def head_churn_figure(data: dict) -> Figure:
    """Figure D: head churn per pair with its interval and split-half floor, top-k Jaccard and Spearman
    of the head rankings, and the cumulative top-m head curve against random head sets."""
    fig = Figure(figsize=(13, 3.4))
    ax, bx, cx = fig.subplots(1, 3)
    pairs = list(data)
    churn = [data[p]["attribution.json"] for p in pairs]
    vals = [float(c.get("churn") or 0.0) for c in churn]  # null (no churn measured) plots as 0
    lo = [v - (c.get("churn_ci") or [v, v])[0] for v, c in zip(vals, churn)]
    hi = [(c.get("churn_ci") or [v, v])[1] - v for v, c in zip(vals, churn)]
    ax.bar(pairs, vals, yerr=np.abs([lo, hi]), capsize=3, color=[f"C{i}" for i in range(len(pairs))])
    floors = [(c.get("noise_floor") or {}).get("churn_q95") for c in churn]
    ax.scatter(pairs, [np.nan if f is None else f for f in floors], marker="_", s=400, color="black",
               label="split-half floor (q95)")
    ax.set(title="head churn (important heads that differ)", ylim=(0, 1.05), ylabel="churn")
    ax.legend(fontsize=7)
    x = np.arange(len(pairs))
    bx.bar(x - 0.2, [c.get("jaccard") or 0 for c in churn], width=0.4, label="top-k Jaccard")
    bx.bar(x + 0.2, [c.get("spearman") or 0 for c in churn], width=0.4, label="Spearman (head ranks)")
    bx.scatter(x - 0.2, [c.get("jaccard_chance") or np.nan for c in churn], marker="_", s=200, color="black",
               label="Jaccard by chance")
    bx.set_xticks(x, pairs)
    bx.set(title="head ranking overlap base vs tuned", ylim=(-0.2, 1.05))
    bx.legend(fontsize=7)
    for i, p in enumerate(pairs):
        per_layer = data[p]["head_patch.json"].get("per_layer") or {}
        if not per_layer:
            continue
        layer, info = next(iter(per_layer.items()))
        cum = pd.DataFrame(info.get("cumulative") or [])
        if not len(cum):
            continue
        for col in ("fraction_of_layer", "fraction_q05", "fraction_q95"):
            cum[col] = cum[col].astype(float)  # null (no layer effect, e.g. the null pair) -> NaN
        for order, style in (("patching", "-o"), ("attribution", "--s")):
            d = cum[cum["order"] == order].sort_values("m")
            if len(d):
                cx.plot(np.log2(d["m"]), d["fraction_of_layer"], style, color=f"C{i}", label=f"{p} L{layer}, {order} rank")
        d = cum[cum["order"] == "random"].sort_values("m")
        cx.fill_between(np.log2(d["m"]), d["fraction_q05"], d["fraction_q95"], color=f"C{i}", alpha=0.12)
        sizes = sorted(cum["m"].unique())
        cx.set_xticks(np.log2(sizes), [str(m) for m in sizes])
    cx.set(title="top-m heads together vs random sets (band)", xlabel="m heads",
           ylabel="fraction of the layer's effect")
    cx.legend(fontsize=6)
    return fig
