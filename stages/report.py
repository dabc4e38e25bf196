"""Stage report: figures A-D, the verdict per pair, report.md and a self-contained report.html.

    python -m stages.report --results artifacts/results --acts artifacts/acts --figs figs --out report

Reads every pair's results (no model runs, so a report-only threshold reruns only this stage):
behaviour, CKA, layer patch, chosen layers, map (fit_clt), steering (steer_select, steer_curve), churn
(attribution.json) and fairness, plus each pair's activation fingerprint. Writes

* ``figs/report_A.png`` CKA curve (strict and aligned, bootstrap band) + layer-patch bars;
  ``report_B.png`` map R2 with baselines + mapped vs real patch; ``report_C.png`` effect vs k with the
  side-effect ribbon, ablation and steering; ``report_D.png`` churn with intervals and the split-half
  floor, top-k Jaccard and Spearman;
* ``<out>/metrics/<pair>.json``: the verdict and the at most 15 numbers it rests on (intervals as their own
  keys, rounded), one file per pair, so ``dvc metrics show`` prints one readable row per pair
  (:func:`metrics_row`);
* ``<out>/plots/{cka,layer_patch,steering,head_cumulative,churn}.json``: the curves of every pair as tidy rows
  for ``dvc plots show`` / ``dvc plots diff`` (:func:`plot_data`; templates in ``.dvc/plots``, titles and axis
  labels in dvc.yaml's top-level ``plots``);
* ``<out>/headline.json`` (every headline number per pair, read by benchmarks/bench_builds.py),
  ``<out>/headline.csv``, ``<out>/verdict.json`` (labels, criteria, reasons, fingerprints), ``<out>/report.md``
  and ``<out>/report.html``: a verdict card per pair (label, one sentence, the three numbers with 95%
  intervals), the headline table, the figures (embedded as data URIs: renders offline), per-pair evidence,
  and fingerprints and method notes collapsed.

The verdict rules are :mod:`mechdiff.verdict`'s.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mechdiff.layer_entry import entry_profile  # noqa: E402
from mechdiff.planted_truth import BUILD_SENSITIVE  # noqa: E402
from mechdiff.verdict import TASK_MEASURE, Thresholds, churn_comparison, headline_measure, verdict  # noqa: E402
from stages.common import (StageError, atomic_write, atomic_write_json, atomic_write_text, finite,  # noqa: E402
                           load_stage_params, run_stage)

#: result file -> the stage that writes it (named in the error when it is missing)
FILES = {"behaviour.json": "behaviour", "cka.json": "cka", "cka.csv": "cka", "layer_patch.csv": "layer_patch",
         "layers.json": "layer_patch", "clt.json": "fit_clt", "steer.json": "steer_select",
         "steer_curve.csv": "steer_select", "attribution.json": "churn", "fairness.json": "filter_shared",
         "head_patch.json": "head_patch", "change_rank.csv": "cka", "steer.csv": "steer_sweep"}
FIGS = {"A": "CKA curve and layer patching", "B": "base->tuned linear map and mapped vs real patch",
        "C": "steering / ablation effect vs rank k", "D": "head churn and ranking overlap"}


def load_pair_results(results: Path, acts: Path, pair: str) -> dict:
    """Every result file of one pair, parsed; a missing one names the stage that writes it.
    ``layer_patch.csv`` keeps the primary mode's rows (the mode that chose the layers) of the test split
    (the layers were chosen on dev; a table without ``split`` is read whole); the other modes' rows are
    under ``layer_patch_other``."""
    ev = {}
    for name, stage in FILES.items():
        path = results / pair / name
        if not path.exists():
            raise StageError(f"{path} is missing: run `dvc repro {stage}@{pair}` (or the whole pipeline) first")
        ev[name] = pd.read_csv(path) if name.endswith(".csv") else json.loads(path.read_text())
    lp, primary = ev["layer_patch.csv"], ev["layers.json"].get("mode")
    if "split" in lp.columns:
        lp = lp[lp["split"] == "test"].reset_index(drop=True)
    if "mode" in lp.columns and primary is not None:
        ev["layer_patch.csv"], ev["layer_patch_other"] = lp[lp["mode"] == primary], lp[lp["mode"] != primary]
    fp = acts / pair / "fingerprint.json"
    ev["fingerprint"] = json.loads(fp.read_text()) if fp.exists() else None
    return ev


def load_planted_run(root: Path) -> dict:
    """A finished run of the embedded default under project folder ``root``, as the planted-truth checks
    (mechdiff.planted_truth) take it: ``results`` per organism pair, the cultural ``truth``
    (ground_truth.json), ``verdicts`` (verdict.json) and ``policy_max_k`` (its params.yaml)."""
    results = {pair: load_pair_results(root / "artifacts" / "results", root / "artifacts" / "acts", pair)
               for pair in ("cultural", "cognitive", "null")}
    return {"results": results,
            "truth": json.loads((root / "artifacts" / "models" / "cultural" / "ground_truth.json").read_text()),
            "verdicts": json.loads((root / "report" / "verdict.json").read_text()),
            "policy_max_k": load_stage_params(root / "params.yaml").success.policy_max_k}


def evidence(ev: dict) -> dict:
    """The inputs :func:`mechdiff.verdict.verdict` reads."""
    return {"behaviour": ev["behaviour.json"], "cka": ev["cka.json"], "layer_patch": ev["layer_patch.csv"],
            "chosen": ev["layers.json"], "clt": ev["clt.json"], "steer": ev["steer.json"],
            "churn": ev["attribution.json"]}


# --------------------------------------------------------------------------------------------------
# figures (one column per pair)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def fig_a(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, len(data), figsize=(4 * len(data), 6), squeeze=False)
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
    _save(fig, path)


def fig_b(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, len(data), figsize=(4 * len(data), 6), squeeze=False)
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
    _save(fig, path)


def fig_c(data: dict, path: Path) -> None:
    panels = (("ablate_tuned", "ablate in tuned"), ("steer_base", "steer base"))
    fig, axes = plt.subplots(2, len(data), figsize=(4 * len(data), 6), squeeze=False, sharey=True)
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
    _save(fig, path)


def fig_d(data: dict, path: Path) -> None:
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(13, 3.4))
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
    _save(fig, path)


# --------------------------------------------------------------------------------------------------
# numbers and text


def _f(x) -> float | None:
    """A finite float or None (strict JSON)."""
    return float(x) if isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x)) else None


def target_measure(ev: dict) -> str:
    """The behaviour.json measure of the pair's target, from the task its steering sweep recorded
    (:data:`mechdiff.verdict.TASK_MEASURE`: refusal -> refusal_rate, math -> math_acc, a user target ->
    target_rate); refusal_rate when none is recorded."""
    return TASK_MEASURE.get((ev.get("steer.json") or {}).get("task") or "", "refusal_rate")


VERDICT_CODE = {"policy-like": 1.0, "rewiring-like": 0.0, "mixed": 0.5}


def headline(pair: str, domain: str, ev: dict, v: dict) -> dict:
    """The numbers of one pair that ``dvc metrics show`` lists."""
    name, beh = _target(domain, ev)
    steer = ev["steer.json"] or {}
    clt = ev["clt.json"]["headline"]
    ch = ev["attribution.json"]
    fair = ev["fairness.json"]
    strict = fair["segmentation"]["all"]["modes"].get("strict", {})
    prof = entry_profile(ev["layer_patch.csv"])
    return {"verdict_policy_score": VERDICT_CODE.get(v["label"]),
            "behaviour_measure": name,
            "behaviour_delta": _f(beh.get("delta")), "behaviour_delta_lo": _f(beh.get("delta_lo")),
            "behaviour_delta_hi": _f(beh.get("delta_hi")),
            "min_cka_debiased": _f(ev["cka.json"]["strict"]["min_cka_debiased"]),
            "entry_layer": prof["entry_layer"], "entry_max_rise": _f(prof["max_rise"]),
            "entry_max_rise_lo": _f(prof["max_rise_ci"][0]), "entry_max_rise_hi": _f(prof["max_rise_ci"][1]),
            "max_next_token_kl_nats": _f(prof["max_gap_nats"]),
            "map_r2": _f(clt.get("r2_uniform")), "map_gain_over_identity": _f(clt.get("gain_r2_uniform")),
            "mapped_patch_closed": _f(clt.get("mapped_closed")), "real_patch_closed": _f(clt.get("real_closed")),
            "mapped_minus_real_lo": _f(_pair(clt.get("mapped_minus_real_ci"))[0]),
            "mapped_minus_real_hi": _f(_pair(clt.get("mapped_minus_real_ci"))[1]),
            "linear_ceiling_closed": _f(clt.get("ceiling_closed")),
            "patch_tuned_mass_outside_shared": _f(clt.get("lost_tuned")),
            "layer_patch_tuned_mass_outside_shared": _f(prof.get("lost_tuned")),
            "minimal_k": steer.get("minimal_k"), "minimal_k_test_confirmed": steer.get("test_confirmed"),
            "churn": _f(ch.get("churn")), "churn_lo": _f(_pair(ch.get("churn_ci"))[0]),
            "churn_hi": _f(_pair(ch.get("churn_ci"))[1]), "spearman": _f(ch.get("spearman")),
            "jaccard": _f(ch.get("jaccard")),
            "vocab_increase_pct": _f(fair["vocab"].get("pct_increase")),
            "strict_prompt_retention": _f(strict.get("prompt_retention"))}


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
#: verdict label -> CSS class of its card (colour)
LABEL_CLASS = {"policy-like": "policy", "rewiring-like": "rewiring", "mixed": "mixed", "no difference": "same",
               "difference in a null pair": "fault", "inconclusive": "fault"}


@dataclass(frozen=True)
class Est:
    """A table cell or card number: ``value`` (formatted), its 95% interval ``ci`` (``"[lo, hi]"``) and a short
    ``note`` under it (HTML) or after it (Markdown)."""

    value: str
    ci: str | None = None
    note: str | None = None

    def __str__(self) -> str:
        return " ".join(x for x in (self.value, self.ci, f"({self.note})" if self.note else None) if x)


def _fmt(x, digits: int = 2, signed: bool = False) -> str:
    """``x`` with ``digits`` decimals ("n/a" when missing; never "-0.00")."""
    x = _f(x)
    if x is None:
        return "n/a"
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return f"{0:.{digits}f}" if float(text) == 0 else text


def _ci(lo, hi, digits: int = 2) -> str | None:
    lo, hi = _f(lo), _f(hi)
    return None if lo is None or hi is None else f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _pair(ci) -> tuple:
    """A recorded ``[lo, hi]`` interval, or (None, None)."""
    return tuple(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)


def _round(x, sig: int = 3) -> float | None:
    """``x`` to ``sig`` significant digits for the metrics files (None when missing)."""
    x = _f(x)
    return None if x is None else float(f"{x:.{sig}g}") + 0.0


def _target(domain: str, ev: dict) -> tuple[str, dict]:
    """The behaviour measure a pair's change is read on, and its entry in behaviour.json: the largest
    significant change by :func:`mechdiff.verdict.headline_measure`'s rule (the pair's target measure
    first), or for a null pair the measure with the largest |delta| (what its verdict reads)."""
    meas = ev["behaviour.json"]["measures"]
    if domain == "null":
        moved = [(abs(m["delta"]), name == target_measure(ev), name) for name, m in meas.items()
                 if _f(m.get("delta")) is not None]  # ties (every delta 0) go to the usual target measure
        name = max(moved, key=lambda x: x[:2])[2] if moved else target_measure(ev)
    else:
        name = headline_measure(meas, target_measure(ev))
    return name, meas.get(name) or {}


def _target_note(domain: str, ev: dict, shown: str) -> str:
    """``; the largest significant change, as the <target> did not move significantly (...)`` when the headline
    shows another measure than the domain's target (:func:`_target`), else ``""``."""
    target = target_measure(ev)
    m = ev["behaviour.json"]["measures"].get(target)
    if shown == target or not m:
        return ""
    est = f"{_fmt(m.get('delta'), signed=True)} {_ci(m.get('delta_lo'), m.get('delta_hi')) or ''}".rstrip()
    return (f"; the largest significant change, as the {MEASURE_NAMES.get(target, target)} did not move "
            f"significantly ({est})")


def _steer_tests(ev: dict) -> tuple[dict, dict, dict]:
    """steer.json at the best layer: (ablation in the tuned model, steering of the base) on test at the
    dev-chosen minimal k's setting (``handle``; without one, each direction's own dev choice), and the
    best layer's entry itself; empty dicts when the sweep found nothing."""
    steer = ev["steer.json"] or {}
    best = (steer.get("per_layer") or {}).get(str(steer.get("best_layer"))) or {}
    src = best.get("handle") or best
    return ((src.get("ablate_tuned@layer") or {}).get("test") or {},
            (src.get("steer_base@layer") or {}).get("test") or {}, best)


def _confirmed_note(steer: dict) -> str | None:
    """How the minimal k stands on the test split, for a table cell or card."""
    if steer.get("minimal_k") is None:
        return None
    return "confirmed on test" if steer.get("test_confirmed") else "dev only: NOT confirmed on test"


def _cka_min(ev: dict) -> tuple[float | None, float | None, float | None, object]:
    """The verdict's min debiased CKA (strict mode, cka.json) with its 95% bootstrap interval at that layer
    (cka.csv), and the layer."""
    strict = (ev["cka.json"] or {}).get("strict") or {}
    layer = strict.get("layer_of_min")
    lo = hi = None
    cka = ev.get("cka.csv")
    if cka is not None and layer is not None and {"mode", "layer", "ci_low", "ci_high"} <= set(cka.columns):
        row = cka[(cka["mode"] == "strict") & (cka["layer"] == layer)]
        if len(row):
            lo, hi = _f(row["ci_low"].iloc[0]), _f(row["ci_high"].iloc[0])
    return _f(strict.get("min_cka_debiased")), lo, hi, layer


def _change_phrase(name: str, m: dict) -> str:
    """"raised the refusal rate from 0.00 to 0.94 (+0.94 [0.85, 1.00])", or "did not measurably change ..."."""
    label = MEASURE_NAMES.get(name, name.replace("_", " "))
    delta, lo, hi = _f(m.get("delta")), _f(m.get("delta_lo")), _f(m.get("delta_hi"))
    if delta is None:
        return f"left the {label} unmeasured"
    ci = _ci(lo, hi)
    est = f"{_fmt(delta, signed=True)}{' ' + ci if ci else ''}"
    if delta == 0 or (lo is not None and hi is not None and lo <= 0 <= hi):
        return f"did not measurably change the {label} ({est})"
    verb = "raised" if delta > 0 else "lowered"
    return f"{verb} the {label} from {_fmt(m.get('base'))} to {_fmt(m.get('tuned'))} ({est})"


def pair_summary(domain: str, ev: dict, v: dict, t: Thresholds) -> dict:
    """What a pair's verdict card shows: ``label``, ``sentence`` (one plain sentence answering "what did this
    fine-tune change"), and ``numbers``, the three numbers the verdict rests on, each ``{title, est (Est),
    detail, reads, rule}``. Presentation only: every value comes from the results and the verdict."""
    crit = v["criteria"]
    name, m = _target(domain, ev)
    label = MEASURE_NAMES.get(name, name.replace("_", " "))
    prof = entry_profile(ev["layer_patch.csv"])
    rise, entry, gap = _f(prof["max_rise"]), prof["entry_layer"], _f(prof["max_gap_nats"])
    rise_ci = _ci(*prof["max_rise_ci"]) or "[no interval]"
    cka, cka_lo, cka_hi, cka_layer = _cka_min(ev)
    change = Est(_fmt(m.get("delta"), signed=True), _ci(m.get("delta_lo"), m.get("delta_hi")))
    if domain == "null":
        same = v["label"] == "no difference"
        sentence = ("Nothing: the two models of this null pair behave identically (every behaviour delta is 0), "
                    f"their states agree at every scanned layer (min CKA {_fmt(cka, 4)}) and their next-token "
                    f"distributions match (KL {'n/a' if gap is None else f'{gap:.3g}'} nats{_lost_note(prof)}), "
                    "as a null pair must."
                    if same else
                    "The two models of this null pair differ, which points to a pipeline fault (they should be "
                    f"identical): largest behaviour delta {_fmt(m.get('delta'), 3)} ({label}), min CKA "
                    f"{_fmt(cka, 4)}, next-token KL {gap if gap is None else f'{gap:.3g}'} nats{_lost_note(prof)}.")
        numbers = [
            {"title": "Largest behaviour delta", "est": change,
             "detail": f"{label}, tuned − base, the largest of {len(ev['behaviour.json']['measures'])} measures",
             "reads": None, "rule": "no difference needs every delta = 0"},
            {"title": "Min CKA", "est": Est(_fmt(cka, 4), _ci(cka_lo, cka_hi, 4)),
             "detail": f"debiased linear CKA at layer {cka_layer} (strict), the lowest over the scanned layers",
             "reads": None, "rule": f"no difference needs ≥ {t.null_cka_min:g}"},
            {"title": "Next-token KL", "est": Est("n/a" if gap is None else f"{gap:.3g}", None, "nats"),
             "detail": "largest base-tuned next-token KL (on the shared vocabulary) over the scanned layers; one "
                       f"pass over the prompts, no interval{_lost_note(prof)}", "reads": None, "rule": f"no difference needs ≤ {t.null_kl_max:g}"}]
        return {"label": v["label"], "sentence": sentence, "numbers": numbers}
    abl, ind, best = _steer_tests(ev)
    steer = ev["steer.json"] or {}
    k, layer = steer.get("minimal_k"), steer.get("best_layer")
    handle, sharp = crit.get("low_rank_handle", {}), crit.get("sharp_entry", {})
    handle_text = {"policy": f"a rank-{k} subspace at layer {layer} removes it from the tuned model and "
                             "induces it in the base (chosen on dev, confirmed on the test split)",
                   "rewiring": (f"the smallest subspace that both removes and induces it has rank {k}, above "
                                f"{t.policy_max_k}" if k is not None else
                                f"no subspace of rank ≤ {t.policy_max_k} at one layer both removes and induces it")}
    entry_text = {"policy": f"the change enters sharply at layer {entry} (rise {_fmt(rise)} {rise_ci})",
                  "rewiring": f"the change builds up over depth instead of entering at one layer (largest rise "
                              f"{_fmt(rise)} {rise_ci}, upper bounds below {t.sharp_entry_min:g})"}
    what = f"This fine-tune {_change_phrase(name, m)}"
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
                             f"{_fmt(abl.get('effect'))} {_ci(abl.get('effect_lo'), abl.get('effect_hi')) or ''}"
                             .rstrip() + " of the behaviour")
    if ind:
        handle_detail.append(f"adding the dev-mean change inside the rank-{ind.get('k')} steering basis (the change's "
                             f"top singular directions) to the base (alpha {ind.get('alpha'):g}) induces "
                             f"{_fmt(ind.get('effect'))} "
                             f"{_ci(ind.get('effect_lo'), ind.get('effect_hi')) or ''}".rstrip())
    elif best:
        handle_detail.append("steering the base induces it at no swept k within the side-effect limits")
    numbers = [
        {"title": "Behaviour change", "est": change,
         "detail": f"{label}, tuned − base ({_fmt(m.get('base'))} → {_fmt(m.get('tuned'))}; "
                   f"n = {m.get('n')} prompts)" + _target_note(domain, ev, name),
         "reads": None, "rule": "the change the verdict explains"},
        {"title": "Low-rank handle", "est": Est(f"k = {k}" if k is not None else "none", None, _confirmed_note(steer)),
         "detail": (("; ".join(handle_detail) + " (test split)") if handle_detail and handle.get("reads") is not None
                    else handle.get("text", "")),
         "reads": handle.get("reads"),
         "rule": f"policy-like when k ≤ {t.policy_max_k} and confirmed on test; no evidence without a behaviour gap"},
        {"title": "Sharp entry", "est": Est(_fmt(rise), rise_ci, None if entry is None else f"at layer {entry}"),
         "detail": "largest rise, between consecutive scanned layers, of the share of the next-token gap closed by "
                   "patching one layer (both directions), with its 95% interval from the layers' prompt-bootstrap "
                   "intervals",
         "reads": sharp.get("reads"), "rule": f"policy-like when its lower bound ≥ {t.sharp_entry_min:g}, "
                                              f"rewiring-like when every upper bound is below; else inconclusive"}]
    return {"label": v["label"], "sentence": sentence, "numbers": numbers}


def metrics_row(domain: str, ev: dict, v: dict) -> dict:
    """One pair's row of ``dvc metrics show`` (``report/metrics/<pair>.json``): the verdict and the 15 numbers it
    rests on (both kinds of pair), 95% interval bounds as their own keys, rounded to what they resolve (3
    significant digits; CKA to 4 decimals), keys short enough that a row stays under 200 characters. Keys:
    ``delta`` (the headline behaviour change, tuned - base: :func:`_target`; a null pair's largest), ``k_min``
    (minimal rank that removes and induces it, chosen on dev; whether the test split confirms it is
    headline.json's ``minimal_k_test_confirmed``), ``ablate`` / ``steer`` (test effect of removing it from the tuned model / adding
    it to the base at that k and the best layer), ``entry`` (largest layer-patch rise, with ``entry_lo`` /
    ``entry_hi``), ``cka_min`` (strict). The largest next-token KL (no interval) and the context numbers
    (map R2, churn, the mass outside the shared vocabulary that the KL drops, ...) stay in headline.json,
    which keeps each `dvc metrics show` row within 200 characters."""
    _, m = _target(domain, ev)
    abl, ind, _ = _steer_tests(ev)
    prof = entry_profile(ev["layer_patch.csv"])
    cka, lo, hi, _ = _cka_min(ev)

    def r4(x):
        return None if _f(x) is None else round(float(x), 4) + 0.0

    return {"verdict": v["label"],
            "delta": _round(m.get("delta")), "delta_lo": _round(m.get("delta_lo")),
            "delta_hi": _round(m.get("delta_hi")),
            "k_min": (ev["steer.json"] or {}).get("minimal_k"),
            "ablate": _round(abl.get("effect")), "ablate_lo": _round(abl.get("effect_lo")),
            "ablate_hi": _round(abl.get("effect_hi")), "steer": _round(ind.get("effect")),
            "entry": _round(prof["max_rise"], 2), "entry_lo": _round(prof["max_rise_ci"][0], 2),
            "entry_hi": _round(prof["max_rise_ci"][1], 2), "cka_min": r4(cka), "cka_lo": r4(lo), "cka_hi": r4(hi)}


# --------------------------------------------------------------------------------------------------
# plot data for `dvc plots show` (templates in .dvc/plots, definitions in dvc.yaml's top-level plots)

#: plot file (under <out>/plots) -> (x field, y field); every row also has ``pair``, ``series``, ``lo``, ``hi``
PLOTS = {"cka.json": ("layer", "cka"), "layer_patch.json": ("layer", "closed"), "steering.json": ("k", "effect"),
         "head_cumulative.json": ("m", "fraction"), "churn.json": ("pair", "value")}


def _row(pair: str, series: str, x_name: str, x, y_name: str, y, lo=None, hi=None) -> dict:
    x = int(x) if isinstance(x, (int, np.integer)) or (isinstance(x, float) and float(x).is_integer()) else x
    return {"pair": pair, "series": series, x_name: x, y_name: _f(y), "lo": _f(lo), "hi": _f(hi)}


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
                _f(c.get("fraction_of_layer")) is not None for c in i.get("cumulative") or [])),
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


# --------------------------------------------------------------------------------------------------
# the document


def _table(rows: list[dict], cols: list[str]) -> list[list[str]]:
    def cell(x):
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return "n/a"
        return f"{x:.3g}" if isinstance(x, float) else str(x)
    return [cols] + [[cell(r.get(c)) for c in cols] for r in rows]


#: printed where a headline number has no interval recorded, so the reader sees that it has none
NO_INTERVAL = "[no interval]"
HEADLINE_COLUMNS = ["Pair", "Verdict", "Behaviour change (tuned − base)", "Minimal k", "Ablation effect (test)",
                    "Entry rise", "Min CKA", "Map R² (held-out)", "Patch closed: mapped / real", "Head churn"]


def _lost_note(d: dict) -> str:
    """`` (x% of the tuned model's mass outside the shared vocabulary)`` for a masked KL, from ``d["lost_tuned"]``
    (a fraction; :func:`mechdiff.verdict.entry_profile` or the fit_clt headline); empty when not recorded."""
    x = _f(d.get("lost_tuned"))
    return "" if x is None else f" ({100 * x:.3g}% of the tuned model's mass outside the shared vocabulary)"


def headline_row(pair: str, domain: str, ev: dict, v: dict) -> list:
    """One row of the report's headline table (:data:`HEADLINE_COLUMNS`): human units, 95% intervals."""
    name, m = _target(domain, ev)
    abl, _, _ = _steer_tests(ev)
    steer = ev["steer.json"] or {}
    prof = entry_profile(ev["layer_patch.csv"])
    cka, lo, hi, cka_layer = _cka_min(ev)
    clt = ev["clt.json"].get("headline") or {}
    ch = ev["attribution.json"] or {}
    churn_lo, churn_hi = ch.get("churn_ci") or [None, None]
    floor = (ch.get("noise_floor") or {}).get("churn_q95")
    k = steer.get("minimal_k")
    return [pair, v["label"],
            Est(_fmt(m.get("delta"), signed=True), _ci(m.get("delta_lo"), m.get("delta_hi")),
                MEASURE_NAMES.get(name, name)),
            "n/a" if domain == "null" else ("none" if k is None else Est(str(k), None, _confirmed_note(steer))),
            Est(_fmt(abl.get("effect")), _ci(abl.get("effect_lo"), abl.get("effect_hi")),
                f"k = {abl.get('k')}, layer {steer.get('best_layer')}") if abl else "n/a",
            "n/a" if _f(prof["max_rise"]) is None else
            Est(_fmt(prof["max_rise"]), _ci(*prof["max_rise_ci"]) or NO_INTERVAL, f"layer {prof['entry_layer']}"),
            Est(_fmt(cka, 3), _ci(lo, hi, 3), None if cka_layer is None else f"layer {cka_layer}"),
            Est(_fmt(clt.get("r2_uniform"), 3), NO_INTERVAL,
                None if _f(clt.get("identity_r2_uniform")) is None
                else f"identity {_fmt(clt.get('identity_r2_uniform'), 3)} {NO_INTERVAL}"),
            "n/a" if _f(clt.get("mapped_closed")) is None and _f(clt.get("real_closed")) is None else
            Est(f"{_fmt(clt.get('mapped_closed'))} / {_fmt(clt.get('real_closed'))}",
                f"mapped − real {_ci(*_pair(clt.get('mapped_minus_real_ci'))) or NO_INTERVAL}",
                _lost_note(clt).strip(" ()") or None),
            Est(_fmt(ch.get("churn")), _ci(churn_lo, churn_hi) or NO_INTERVAL,
                None if _f(floor) is None else f"floor {_fmt(floor)}")]


def _kv(value) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_kv(x)}" for k, x in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ", ".join(_kv(x) for x in value)
    return "n/a" if value is None else str(value)


def head_patch_text(hp: dict | None) -> str | None:
    """One paragraph on head patching from ``head_patch.json``: per chosen layer, each kind's heads above
    noise (test) or the sentence that none is, then the top heads and their confirmation, or that none is
    named because no head is above noise on dev. None for results without the per-kind noise summary."""
    parts = []
    for layer, info in ((hp or {}).get("per_layer") or {}).items():
        noise, conf = info.get("above_noise"), info.get("confirm_top") or {}
        if not isinstance(noise, dict):
            return None
        top = conf.get("top_heads") or []
        said = [str(v.get("text")) for v in noise.values()]
        if top:
            said.append(f"top {conf.get('kind')} heads at layer {layer} (above noise on dev) "
                        f"{', '.join(map(str, top))}: {'' if conf.get('confirmed') else 'not '}confirmed against "
                        "random head sets on test")
        else:
            said.append(str(conf.get("text") or f"no top heads named at layer {layer}"))
        parts.append("; ".join(said))
    if not parts:
        return None
    rule = (hp or {}).get("noise_rule") or "above noise"
    return f"Head patching ({rule}): " + ". ".join(p[:1].upper() + p[1:] for p in parts) + "."


def _layer_list(layers) -> str:
    return ", ".join(str(int(x)) for x in layers) or "none"


def change_rank_text(change: pd.DataFrame, chosen: dict) -> str:
    """One paragraph on the change H_tuned − H_base: per captured layer the fewest directions holding 90% of
    it and the top direction's share (``change_rank.csv``, primary mode), which layers layer patching
    scanned (coarse, and refined inside the brackets), and the change at the exact entry (``layers.json``)."""
    rows = change[change["mode"] == chosen.get("mode", "strict")]
    text = ("Directions carrying the change H_tuned − H_base (fewest holding 90% of its energy, with the top "
            "direction's share; 0 = identical states) by captured layer: "
            + ", ".join(f"{r.layer}: {r.rank_90} (top {r.top1_energy:.2f})" for r in rows.itertuples()) + ".")
    if chosen.get("scan") is not None:
        text += (f" Layer patching scanned layers {_layer_list(chosen['scan'])}"
                 + (f" (every {chosen['stride']})" if chosen.get("stride") else "")
                 + (f", then every layer inside the brackets around the entry and the chosen layers: "
                    f"{_layer_list(chosen['refined'])}" if chosen.get("refined") else "") + ".")
    for e in chosen.get("entry") or []:
        below = "" if e.get("below") is None else f" (layer {e['below']} before it was patched: the entry is exact)"
        text += (f" At the entry layer {e['layer']}{below}, {e['rank_90']} directions hold 90% of the change, "
                 f"the top one {e['top1_energy']:.2f}.")
    return text + (" A rank-r edit of an MLP's down_proj at block L reads at most r at L and 0 below it; an "
                   "attention edit at block L can read more, since the same block's MLP reads and answers it.")


def _criteria_table(v: dict) -> list[list]:
    rows = [["Criterion", "Role", "Reads", "Value", "Threshold", "Evidence"]]
    for name, c in v["criteria"].items():
        val, thr = c.get("value"), c.get("threshold")
        rows.append([CRITERION_NAMES.get(name, name), "decides" if c.get("decides") else "context",
                     c.get("reads") or "n/a", "n/a" if _f(val) is None else f"{_f(val):.3g}",
                     "n/a" if _f(thr) is None else f"{_f(thr):g}", c.get("text", "")])
    return rows


def document(data: dict, domains: dict, verdicts: dict, heads: dict, t: Thresholds,
             trust_remote_code: bool = False, allow_pickle: bool = False) -> list[tuple]:
    """The report as blocks: ``("h1"|"h2"|"h3"|"p"|"lead", text)``, ``("ul", items)``, ``("table", rows)``
    (cells are strings or :class:`Est`), ``("kv", [(key, value)])``, ``("cards", [summary])`` (see
    :func:`pair_summary`), ``("details", summary, blocks)`` (collapsed) and ``("img", letter)``."""
    pairs = list(data)
    cards = [{"pair": p, "domain": domains[p], **pair_summary(domains[p], data[p], verdicts[p], t)} for p in pairs]
    blocks: list[tuple] = [
        ("h1", "mechdiff report: what did each fine-tune change?"),
        ("lead", f"{len(pairs)} model pair{'s' if len(pairs) != 1 else ''} ({', '.join(pairs)}). Each card gives the "
                 "verdict, the one-sentence answer and the three numbers the verdict rests on; brackets are 95% "
                 "bootstrap intervals over prompts."),
        ("cards", cards),
        ("h2", "Headline numbers"),
        ("table", [HEADLINE_COLUMNS] + [headline_row(p, domains[p], data[p], verdicts[p]) for p in pairs]),
        ("p", "Behaviour change: tuned minus base, on the pair's target measure when its 95% interval excludes 0, "
              "otherwise on the measure whose interval excludes 0 with the largest change in units of its interval "
              "half-width (per-character perplexity stands for perplexity); the measure is named under it. Minimal "
              "k: smallest subspace rank at one layer that both removes the behaviour from the tuned model and "
              "induces it in the base, chosen on dev and held to the test split (the ablation effect is that "
              "setting's, on test; k is a chosen rank, its uncertainty is whether the test split confirms it). "
              "Entry rise: largest rise of the layer-patch fraction closed between consecutive scanned layers. "
              "Brackets: 95% intervals, bootstrap over prompts (the entry rise's paired: both layers' fractions on "
              "the same prompt resamples; mapped / real: the interval of mapped − real; a width near the whole "
              "range, such as a churn of "
              "[0.00, 1.00], says the number is not resolved); [no interval] where none is computed (the map R², "
              "one held-out fit). Min CKA: "
              "debiased linear CKA, strict mode. Patch closed: share of the next-token gap closed by patching the "
              "mapped vs the real tuned state. Head churn: share of important heads that differ (floor: split-half "
              "q95)."),
    ]
    for letter, title in FIGS.items():
        blocks.append(("h2", f"Figure {letter}: {title}"))
        blocks.append(("img", letter))
    for p in pairs:
        v, ev = verdicts[p], data[p]
        blocks.append(("h2", f"{p} ({domains[p]}): {v['label']}"))
        blocks.append(("h3", "Criteria"))
        blocks.append(("table", _criteria_table(v)))
        beh = ev["behaviour.json"]["measures"]
        rows = [["Measure", "n", "Base", "Tuned", "Tuned − base"]]
        for name, m in beh.items():
            rows.append([MEASURE_NAMES.get(name, name), str(m.get("n")),
                         Est(_fmt(m.get("base"), 3), _ci(m.get("base_lo"), m.get("base_hi"), 3)),
                         Est(_fmt(m.get("tuned"), 3), _ci(m.get("tuned_lo"), m.get("tuned_hi"), 3)),
                         Est(_fmt(m.get("delta"), 3, signed=True), _ci(m.get("delta_lo"), m.get("delta_hi"), 3))])
        blocks.append(("h3", "Behaviour (95% bootstrap intervals by prompt; tuned − base is paired)"))
        blocks.append(("table", rows))
        blocks.append(("p", change_rank_text(ev["change_rank.csv"], ev["layers.json"])))
        fair = ev["fairness.json"]
        masked = ev["behaviour.json"].get("masked_mass", {})
        seg = fair["segmentation"]["all"]["modes"]
        blocks.append(("p", "Fairness: vocabulary +{:.3g}% ({} appended, id identity {}), prompts kept per mode: {}; "
                            "masked next-token mass of the tuned model: {}.".format(
                                fair["vocab"].get("pct_increase", 0.0), fair["vocab"].get("n_appended"),
                                fair["vocab"].get("id_identity"),
                                ", ".join(f"{m} {s.get('n_kept')} ({s.get('prompt_retention', 0):.0%})"
                                          for m, s in seg.items()),
                                ", ".join(f"{lang} {d.get('tuned', 0):.3f}" for lang, d in masked.items()) or "n/a")))
        heads_text = head_patch_text(ev.get("head_patch.json"))
        if heads_text:
            blocks.append(("p", heads_text))
        fp = ev["fingerprint"] or {}
        blocks.append(("details", f"Activation fingerprint of {p}",
                       [("kv", [(k, _kv(fp[k])) for k in sorted(fp)])] if fp else
                       [("p", "No fingerprint (artifacts/acts/<pair>/fingerprint.json is missing).")]))
    notes: list[tuple] = [
        ("p", f"Verdict rule: policy-like when a rank ≤ {t.policy_max_k} subspace at one layer both removes "
              "the behaviour from the tuned model and induces it in the base within the side-effect limits (an "
              "accuracy drop blocks when its 95% item-bootstrap interval lies above the limit: on a few MC items one "
              "flip is 17-25 points), chosen on dev and confirmed on the test split (a k the test split does not confirm, or a sweep of a "
              "behaviour the tuned model does not show more than the base, is no evidence: inconclusive), "
              f"and the change enters sharply (the fraction of the gap closed by layer patching rises by ≥ "
              f"{t.sharp_entry_min:g} between consecutive scanned layers in both directions, base->tuned and "
              "tuned->base); rewiring-like when neither holds; mixed otherwise. Map R2, mapped-vs-real patch, "
              "churn and CKA are reported as context. A null pair reads no difference when every behaviour delta "
              f"is 0, CKA ≥ {t.null_cka_min:g} at every scanned layer and next-token KL ≤ {t.null_kl_max:g} nats.")]
    by_domain = {domains[p]: p for p in data}
    if "cultural" in by_domain and "cognitive" in by_domain:
        cmp = churn_comparison(data[by_domain["cultural"]]["attribution.json"],
                               data[by_domain["cognitive"]]["attribution.json"])
        notes.append(("p", f"Head churn ({by_domain['cultural']} as the policy pair, {by_domain['cognitive']} as "
                           f"the rewiring pair): {cmp['text']}."))
    notes.append(("p", "Reproducibility: on the same machine and package versions a rerun reproduces every number "
                       "here bit for bit. On another build of the embedded organisms (another machine, organisms "
                       "seed or thread count) the planted answers and the verdicts hold, while these headline "
                       "numbers move (spread over builds: benchmarks/RESULTS.md, sections 10 and 17): "
                       + "; ".join(f"{k} ({why})" for k, why in BUILD_SENSITIVE.items()) + "."))
    notes.append(("p", f"Models loaded with trust_remote_code = {str(bool(trust_remote_code)).lower()} "
                       "(params fairness.trust_remote_code); " + (
                           "weights from safetensors, or from pickle files where a model has no safetensors "
                           "(params fairness.allow_pickle_weights = true)." if allow_pickle else
                           "weights and tensors are read through safetensors only (pickle weights are refused; "
                           "params fairness.allow_pickle_weights = false).")))
    blocks.append(("details", "Method notes", notes))
    return blocks


def _md_cell(c) -> str:
    return str(c).replace("|", "\\|")


def _md_blocks(blocks: list[tuple], fig_paths: dict) -> list[str]:
    out = []
    for kind, *body in blocks:
        if kind == "h1":
            out.append(f"# {body[0]}\n")
        elif kind == "h2":
            out.append(f"## {body[0]}\n")
        elif kind == "h3":
            out.append(f"### {body[0]}\n")
        elif kind in ("p", "lead"):
            out.append(body[0] + "\n")
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in body[0]) + "\n")
        elif kind == "table":
            head, *rows = body[0]
            out.append("\n".join(["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
                                 + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]) + "\n")
        elif kind == "kv":
            out.append("\n".join(["| key | value |", "|---|---|"]
                                 + [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in body[0]]) + "\n")
        elif kind == "cards":
            for c in body[0]:
                out.append(f"### {c['pair']} ({c['domain']}): {c['label']}\n")
                out.append(f"**{c['sentence']}**\n")
                out.append("\n".join(
                    f"- **{n['title']}**" + (f" (reads {n['reads']})" if n["reads"] else "") + f": {n['est']}. "
                    f"{n['detail'][:1].upper()}{n['detail'][1:]}; {n['rule']}." for n in c["numbers"]) + "\n")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(body[0])}</summary>\n")
            out.extend(_md_blocks(body[1], fig_paths))
            out.append("</details>\n")
        elif kind == "img":
            out.append(f"![Figure {body[0]}]({fig_paths[body[0]]})\n")
    return out


def to_markdown(blocks: list[tuple], fig_paths: dict) -> str:
    return "\n".join(_md_blocks(blocks, fig_paths))


CSS = """
:root{--fg:#1d2125;--muted:#5f6b76;--line:#d5dae0;--bg2:#f4f6f8}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
max-width:1200px;margin:24px auto;padding:0 24px}
h1{font-size:1.7em;margin:.2em 0 .3em}h2{font-size:1.3em;margin:1.8em 0 .5em;border-bottom:1px solid var(--line);
padding-bottom:.2em}h3{font-size:1.05em;margin:1.2em 0 .4em}
.lead{color:var(--muted);margin:0 0 1.2em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:16px}
.verdict-card{border:1px solid var(--line);border-top:6px solid var(--c);border-radius:8px;padding:12px 16px;
background:#fff;--c:#7a8793}
.verdict-card.policy{--c:#2f6fb0}.verdict-card.rewiring{--c:#c8702a}.verdict-card.mixed{--c:#7d5bb5}
.verdict-card.same{--c:#3f8f4e}.verdict-card.fault{--c:#b8322a}
.verdict-card h3{margin:0;font-size:1.15em;display:flex;gap:.5em;align-items:baseline;flex-wrap:wrap}
.verdict-card .domain{color:var(--muted);font-weight:normal;font-size:.85em}
.label{display:inline-block;padding:1px 10px;border-radius:12px;background:var(--c);color:#fff;font-weight:600;
font-size:.9em;margin:.5em 0 .2em}
.answer{font-size:1.02em;margin:.4em 0 .8em}
.nums{margin:0;display:grid;gap:10px}
.nums dt{font-weight:600;font-size:.85em;text-transform:uppercase;letter-spacing:.03em;color:var(--muted)}
.nums dd{margin:0}.nums .v{font-size:1.3em;font-weight:600}
.reads{display:inline-block;font-size:.8em;border:1px solid var(--c);color:var(--c);border-radius:10px;padding:0 7px;
margin-left:.4em;vertical-align:middle}
.note,.rule{color:var(--muted);font-size:.85em}
.v,.ci{font-variant-numeric:tabular-nums}.ci{color:var(--muted);white-space:nowrap}
table{border-collapse:collapse;width:100%;font-size:14px;margin:.4em 0 1em}
th{text-align:left;font-weight:600;background:var(--bg2);vertical-align:bottom}
td,th{border-bottom:1px solid var(--line);padding:5px 8px;vertical-align:top;overflow-wrap:break-word}
table.kv td{overflow-wrap:anywhere}
td .note{display:block}
table.kv td:first-child{color:var(--muted);white-space:nowrap;width:12em}
details{border:1px solid var(--line);border-radius:6px;padding:6px 14px;margin:1em 0}
summary{cursor:pointer;font-weight:600}
figure{margin:1em 0}img{max-width:100%;height:auto;display:block}
"""


def _html_cell(c) -> str:
    if isinstance(c, Est):
        parts = [f"<span class='v'>{html.escape(c.value)}</span>"]
        if c.ci:
            parts.append(f" <span class='ci'>{html.escape(c.ci)}</span>")
        if c.note:
            parts.append(f"<span class='note'>{html.escape(c.note)}</span>")
        return "".join(parts)
    return html.escape(str(c))


def _html_card(c: dict) -> str:
    cls = LABEL_CLASS.get(c["label"], "fault")
    out = [f"<article class='verdict-card {cls}' id='card-{html.escape(c['pair'])}'>",
           f"<h3>{html.escape(c['pair'])} <span class='domain'>{html.escape(c['domain'])} pair</span></h3>",
           f"<span class='label'>{html.escape(c['label'])}</span>",
           f"<p class='answer'>{html.escape(c['sentence'])}</p><dl class='nums'>"]
    for n in c["numbers"]:
        reads = f"<span class='reads'>reads {html.escape(n['reads'])}</span>" if n["reads"] else ""
        e = n["est"]
        out.append(f"<div><dt>{html.escape(n['title'])}</dt><dd><span class='v'>{html.escape(e.value)}</span>"
                   + (f" <span class='ci'>{html.escape(e.ci)}</span>" if e.ci else "")
                   + (f" <span class='note'>{html.escape(e.note)}</span>" if e.note else "") + reads
                   + f"<div class='note'>{html.escape(n['detail'])}</div>"
                   + f"<div class='rule'>{html.escape(n['rule'])}</div></dd></div>")
    out.append("</dl></article>")
    return "".join(out)


def _html_blocks(blocks: list[tuple], fig_bytes: dict) -> list[str]:
    out = []
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{html.escape(body[0])}</{kind}>")
        elif kind == "lead":
            out.append(f"<p class='lead'>{html.escape(body[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in body[0]) + "</ul>")
        elif kind == "table":
            head, *rows = body[0]
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead>"
                       "<tbody>" + "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>"
                                           for r in rows) + "</tbody></table>")
        elif kind == "kv":
            out.append("<table class='kv'>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                                      for k, v in body[0]) + "</table>")
        elif kind == "cards":
            out.append("<section class='cards'>" + "".join(_html_card(c) for c in body[0]) + "</section>")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(body[0])}</summary>")
            out.extend(_html_blocks(body[1], fig_bytes))
            out.append("</details>")
        elif kind == "img":
            data = base64.b64encode(fig_bytes[body[0]]).decode("ascii")
            out.append(f"<figure><img alt='Figure {body[0]}: {html.escape(FIGS[body[0]])}' "
                       f"src='data:image/png;base64,{data}'></figure>")
    return out


def to_html(blocks: list[tuple], fig_bytes: dict) -> str:
    """A self-contained page: the figures are embedded as base64 data URIs, no network needed."""
    head = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>mechdiff report</title><style>{CSS}</style></head><body>")
    return "\n".join([head] + _html_blocks(blocks, fig_bytes) + ["</body></html>"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--results", "--acts", "--figs", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_stage_params(args.params)
    s, r = params.success, params.report
    t = Thresholds(policy_max_k=s.policy_max_k, sharp_entry_min=r.sharp_entry_min, map_r2_min=s.map_r2_min,
                   agreement_tolerance=params.clt.agreement_tolerance, null_cka_min=r.null_cka_min,
                   null_kl_max=r.null_kl_max)
    results, acts, figs, out = Path(args.results), Path(args.acts), Path(args.figs), Path(args.out)
    data = {p: load_pair_results(results, acts, p) for p in params.pairs}
    domains = {p: params.pairs[p].domain for p in params.pairs}
    verdicts = {p: verdict(domains[p], evidence(data[p]), t) for p in data}
    heads = {p: headline(p, domains[p], data[p], verdicts[p]) for p in data}
    fig_paths = {letter: figs / f"report_{letter}.png" for letter in FIGS}
    for letter, fn in zip(FIGS, (fig_a, fig_b, fig_c, fig_d)):
        fn(data, fig_paths[letter])
    blocks = document(data, domains, verdicts, heads, t, params.fairness.trust_remote_code,
                      params.fairness.allow_pickle_weights)
    rel = {k: Path("..") / v if not v.is_absolute() else v for k, v in fig_paths.items()}
    atomic_write_text(out / "report.md", to_markdown(blocks, rel))
    atomic_write_text(out / "report.html", to_html(blocks, {k: v.read_bytes() for k, v in fig_paths.items()}))
    atomic_write_json(out / "headline.json", finite(heads))
    metrics = out / "metrics"
    for stale in metrics.glob("*.json") if metrics.is_dir() else ():  # a pair no longer in params (run outside DVC)
        if stale.stem not in data:
            stale.unlink()
    for p in data:
        atomic_write_json(metrics / f"{p}.json", finite(metrics_row(domains[p], data[p], verdicts[p])))
    for name, rows in plot_data(data).items():
        atomic_write_json(out / "plots" / name, finite(rows))
    atomic_write(out / "headline.csv", lambda tmp: pd.DataFrame(
        [{"pair": p, "verdict": verdicts[p]["label"], **heads[p]} for p in data]).to_csv(tmp, index=False))
    atomic_write_json(out / "verdict.json", finite({p: {"domain": domains[p], **verdicts[p],
                                                        "trust_remote_code": params.fairness.trust_remote_code,
                                                        "fingerprint": data[p]["fingerprint"]} for p in data}))
    for p in data:
        print(f"report: {p}: {verdicts[p]['label']}")
        for line in verdicts[p]["reasons"]:
            print(f"    {line}")


if __name__ == "__main__":
    run_stage(main)
