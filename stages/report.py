"""Stage report: figures A-D, the verdict per pair, report.md and a self-contained report.html.

    python -m stages.report --results artifacts/results --acts artifacts/acts --figs figs --out report

Reads every pair's results (no model runs, so a report-only threshold reruns only this stage):
behaviour, CKA, layer patch, chosen layers, map (fit_clt), steering (steer_select, steer_curve), churn
(attribution.json) and fairness, plus each pair's activation fingerprint. Writes

* ``figs/report_A.png`` CKA curve (strict and aligned, bootstrap band) + layer-patch bars;
  ``report_B.png`` map R2 with baselines + mapped vs real patch; ``report_C.png`` effect vs k with the
  side-effect ribbon, ablation and steering; ``report_D.png`` churn with intervals and the split-half
  floor, top-k Jaccard and Spearman;
* ``<out>/headline.json`` (numbers only, for ``dvc metrics show``), ``<out>/headline.csv``,
  ``<out>/verdict.json`` (labels, criteria, reasons, fingerprints), ``<out>/report.md`` and
  ``<out>/report.html`` (figures embedded as data URIs: renders offline).

The verdict rules are :mod:`mechdiff.verdict`'s.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mechdiff.planted_truth import BUILD_SENSITIVE  # noqa: E402
from mechdiff.verdict import Thresholds, churn_comparison, entry_profile, verdict  # noqa: E402
from stages.common import (StageError, atomic_write, atomic_write_json, atomic_write_text, finite,  # noqa: E402
                           load_stage_params, run_stage)

#: result file -> the stage that writes it (named in the error when it is missing)
FILES = {"behaviour.json": "behaviour", "cka.json": "cka", "cka.csv": "cka", "layer_patch.csv": "layer_patch",
         "layers.json": "layer_patch", "clt.json": "fit_clt", "steer.json": "steer_select",
         "steer_curve.csv": "steer_select", "attribution.json": "churn", "fairness.json": "filter_shared",
         "head_patch.json": "head_patch", "change_rank.csv": "cka"}
FIGS = {"A": "CKA curve and layer patching", "B": "base->tuned linear map and mapped vs real patch",
        "C": "steering / ablation effect vs rank k", "D": "head churn and ranking overlap"}


def load_pair_results(results: Path, acts: Path, pair: str) -> dict:
    """Every result file of one pair, parsed; a missing one names the stage that writes it.
    ``layer_patch.csv`` keeps the primary mode's rows (the mode that chose the layers); the other
    modes' rows are under ``layer_patch_other``."""
    ev = {}
    for name, stage in FILES.items():
        path = results / pair / name
        if not path.exists():
            raise StageError(f"{path} is missing: run `dvc repro {stage}@{pair}` (or the whole pipeline) first")
        ev[name] = pd.read_csv(path) if name.endswith(".csv") else json.loads(path.read_text())
    lp, primary = ev["layer_patch.csv"], ev["layers.json"].get("mode")
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


TARGET_MEASURE = {"cultural": "refusal_rate", "cognitive": "math_acc", "null": "refusal_rate"}
VERDICT_CODE = {"policy-like": 1.0, "rewiring-like": 0.0, "mixed": 0.5}


def headline(pair: str, domain: str, ev: dict, v: dict) -> dict:
    """The numbers of one pair that ``dvc metrics show`` lists."""
    beh = ev["behaviour.json"]["measures"].get(TARGET_MEASURE[domain], {})
    clt = ev["clt.json"]["headline"]
    ch = ev["attribution.json"]
    fair = ev["fairness.json"]
    strict = fair["segmentation"]["all"]["modes"].get("strict", {})
    prof = entry_profile(ev["layer_patch.csv"])
    return {"verdict_policy_score": VERDICT_CODE.get(v["label"]),
            "behaviour_delta": _f(beh.get("delta")), "behaviour_delta_lo": _f(beh.get("delta_lo")),
            "behaviour_delta_hi": _f(beh.get("delta_hi")),
            "min_cka_debiased": _f(ev["cka.json"]["strict"]["min_cka_debiased"]),
            "entry_layer": prof["entry_layer"], "entry_max_rise": _f(prof["max_rise"]),
            "map_r2": _f(clt.get("r2_uniform")), "map_gain_over_identity": _f(clt.get("gain_r2_uniform")),
            "mapped_patch_closed": _f(clt.get("mapped_closed")), "real_patch_closed": _f(clt.get("real_closed")),
            "linear_ceiling_closed": _f(clt.get("ceiling_closed")),
            "minimal_k": ev["steer.json"].get("minimal_k"),
            "churn": _f(ch.get("churn")), "spearman": _f(ch.get("spearman")), "jaccard": _f(ch.get("jaccard")),
            "vocab_increase_pct": _f(fair["vocab"].get("pct_increase")),
            "strict_prompt_retention": _f(strict.get("prompt_retention"))}


def _table(rows: list[dict], cols: list[str]) -> list[list[str]]:
    def cell(x):
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return "n/a"
        return f"{x:.3g}" if isinstance(x, float) else str(x)
    return [cols] + [[cell(r.get(c)) for c in cols] for r in rows]


def document(data: dict, domains: dict, verdicts: dict, heads: dict, t: Thresholds,
             trust_remote_code: bool = False, allow_pickle: bool = False) -> list[tuple]:
    """The report as blocks: ``("h1"|"h2"|"p"|"ul", text or items)``, ``("table", rows)``, ``("img", letter)``."""
    blocks: list[tuple] = [("h1", "mechdiff report: what did each fine-tune change?")]
    cols = ["pair", "verdict", "behaviour_delta", "min_cka_debiased", "entry_layer", "entry_max_rise", "map_r2",
            "mapped_patch_closed", "real_patch_closed", "linear_ceiling_closed", "minimal_k", "churn", "spearman"]
    blocks.append(("table", _table([{"pair": p, "verdict": verdicts[p]["label"], **heads[p]} for p in data], cols)))
    blocks.append(("p", f"Verdict rule: policy-like when a rank <= {t.policy_max_k} subspace at one layer both removes "
                        "the behaviour from the tuned model and induces it in the base within the side-effect limits, "
                        f"and the change enters sharply (the fraction of the gap closed by layer patching rises by >= "
                        f"{t.sharp_entry_min:g} between consecutive scanned layers in both directions, base->tuned and "
                        "tuned->base); rewiring-like when neither holds; mixed otherwise. "
                        "Map R2, mapped-vs-real patch, churn and CKA are reported as context."))
    by_domain = {domains[p]: p for p in data}
    if "cultural" in by_domain and "cognitive" in by_domain:
        cmp = churn_comparison(data[by_domain["cultural"]]["attribution.json"],
                               data[by_domain["cognitive"]]["attribution.json"])
        blocks.append(("p", f"Head churn ({by_domain['cultural']} as the policy pair, {by_domain['cognitive']} as "
                            f"the rewiring pair): {cmp['text']}."))
    blocks.append(("p", "Reproducibility: on the same machine and package versions a rerun reproduces every number "
                        "here bit for bit. On another build of the embedded organisms (another machine, organisms "
                        "seed or thread count) the planted answers and the verdicts hold, while these headline "
                        "numbers move (spread over builds: benchmarks/RESULTS.md, section 10): "
                        + "; ".join(f"{k} ({why})" for k, why in BUILD_SENSITIVE.items()) + "."))
    blocks.append(("p", f"Models loaded with trust_remote_code = {str(bool(trust_remote_code)).lower()} "
                        "(params fairness.trust_remote_code); " + (
                            "weights from safetensors, or from pickle files where a model has no safetensors "
                            "(params fairness.allow_pickle_weights = true)." if allow_pickle else
                            "weights and tensors are read through safetensors only (pickle weights are refused; "
                            "params fairness.allow_pickle_weights = false).")))
    for p in data:
        v = verdicts[p]
        blocks.append(("h2", f"{p} ({domains[p]}): {v['label']}"))
        blocks.append(("ul", v["reasons"]))
        beh = data[p]["behaviour.json"]["measures"]
        rows = [{"measure": m, **{k: beh[m].get(k) for k in ("n", "base", "tuned", "delta", "delta_lo", "delta_hi")}}
                for m in beh]
        blocks.append(("p", "Behaviour (95% bootstrap intervals by prompt; delta = tuned - base, paired):"))
        blocks.append(("table", _table(rows, ["measure", "n", "base", "tuned", "delta", "delta_lo", "delta_hi"])))
        change = data[p]["change_rank.csv"]
        change = change[change["mode"] == data[p]["layers.json"].get("mode", "strict")]
        blocks.append(("p", "Directions carrying the change H_tuned - H_base (fewest holding 90% of its energy; 0 = "
                            "identical states) by layer: " + ", ".join(
                                f"{r.layer}: {r.rank_90}" for r in change.itertuples()) + ". A rank-r edit feeding "
                            "the residual stream at layer L reads r at L and 0 below it."))
        fair = data[p]["fairness.json"]
        masked = data[p]["behaviour.json"].get("masked_mass", {})
        seg = fair["segmentation"]["all"]["modes"]
        blocks.append(("p", "Fairness: vocabulary +{:.3g}% ({} appended, id identity {}), prompts kept per mode: {}; "
                            "masked next-token mass of the tuned model: {}.".format(
                                fair["vocab"].get("pct_increase", 0.0), fair["vocab"].get("n_appended"),
                                fair["vocab"].get("id_identity"),
                                ", ".join(f"{m} {s.get('n_kept')} ({s.get('prompt_retention', 0):.0%})"
                                          for m, s in seg.items()),
                                ", ".join(f"{lang} {d.get('tuned', 0):.3f}"
                                          for lang, d in masked.items()))))
        fp = data[p]["fingerprint"] or {}
        keep = {k: fp.get(k) for k in ("models", "model_hashes", "tokenizer_hashes", "template_hash", "dtype",
                                       "attn_implementation", "versions") if k in fp}
        blocks.append(("p", "Activation fingerprint: " + (json.dumps(keep or fp, sort_keys=True) if fp else "n/a")))
    for letter, title in FIGS.items():
        blocks.append(("h2", f"Figure {letter}: {title}"))
        blocks.append(("img", letter))
    return blocks


def to_markdown(blocks: list[tuple], fig_paths: dict) -> str:
    out = []
    for kind, body in blocks:
        if kind == "h1":
            out.append(f"# {body}\n")
        elif kind == "h2":
            out.append(f"## {body}\n")
        elif kind == "p":
            out.append(body + "\n")
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in body) + "\n")
        elif kind == "table":
            head, *rows = body
            out.append("\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                                 + ["| " + " | ".join(r) + " |" for r in rows]) + "\n")
        elif kind == "img":
            out.append(f"![Figure {body}]({fig_paths[body]})\n")
    return "\n".join(out)


def to_html(blocks: list[tuple], fig_bytes: dict) -> str:
    """A self-contained page: the figures are embedded as base64 data URIs, no network needed."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>mechdiff report</title><style>"
           "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #bbb;padding:2px 6px;font-size:90%}img{max-width:100%}</style></head><body>"]
    for kind, body in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{html.escape(body)}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in body) + "</ul>")
        elif kind == "table":
            head, *rows = body
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
        elif kind == "img":
            data = base64.b64encode(fig_bytes[body]).decode("ascii")
            out.append(f"<img alt='Figure {body}' src='data:image/png;base64,{data}'>")
    return "\n".join(out + ["</body></html>"])


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
