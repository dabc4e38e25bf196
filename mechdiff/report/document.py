"""The report as a list of blocks, independent of the output format: verdict cards, the headline table, the
figures, per-pair evidence (criteria, behaviour, the change's rank, fairness, head patching, the activation
fingerprint) and the method notes; :mod:`mechdiff.report.render_markdown` and
:mod:`mechdiff.report.render_html` write it out."""

from __future__ import annotations

import pandas as pd

from mechdiff.organisms.planted_truth import BUILD_SENSITIVE
from mechdiff.report.cards import pair_summary
from mechdiff.report.tables import HEADLINE_COLUMNS, behaviour_table, criteria_table, headline_row, kv_text
from mechdiff.verdict import Thresholds, churn_comparison

#: figure letter -> what it shows (figures.py draws them; the document places them in this order)
FIGS = {"A": "CKA curve and layer patching", "B": "base->tuned linear map and mapped vs real patch",
        "C": "steering / ablation effect vs rank k", "D": "head churn and ranking overlap"}


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


def fairness_text(fair: dict, masked: dict) -> str:
    """One paragraph on the fairness contract (``fairness.json``): the vocabulary increase, the prompts kept per
    mode, and the tuned model's next-token mass outside the shared vocabulary per language (``masked``,
    behaviour.json's ``masked_mass``)."""
    seg = fair["segmentation"]["all"]["modes"]
    return ("Fairness: vocabulary +{:.3g}% ({} appended, id identity {}), prompts kept per mode: {}; "
            "masked next-token mass of the tuned model: {}.".format(
                fair["vocab"].get("pct_increase", 0.0), fair["vocab"].get("n_appended"),
                fair["vocab"].get("id_identity"),
                ", ".join(f"{m} {s.get('n_kept')} ({s.get('prompt_retention', 0):.0%})" for m, s in seg.items()),
                ", ".join(f"{lang} {d.get('tuned', 0):.3f}" for lang, d in masked.items()) or "n/a"))


def document(data: dict, domains: dict, verdicts: dict, t: Thresholds,
             trust_remote_code: bool = False, allow_pickle: bool = False) -> list[tuple]:
    """The report as blocks: ``("h1"|"h2"|"h3"|"p"|"lead", text)``, ``("ul", items)``, ``("table", rows)``
    (cells are strings or :class:`mechdiff.report.formatting.Est`), ``("kv", [(key, value)])``, ``("cards",
    [summary])`` (see :func:`mechdiff.report.cards.pair_summary`), ``("details", summary, blocks)`` (collapsed) and
    ``("img", letter)``. ``data``: pair -> its results; ``domains``, ``verdicts``: pair -> domain, verdict
    (:func:`mechdiff.verdict.verdict`)."""
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
        blocks.append(("table", criteria_table(v)))
        blocks.append(("h3", "Behaviour (95% bootstrap intervals by prompt; tuned − base is paired)"))
        blocks.append(("table", behaviour_table(ev["behaviour.json"]["measures"])))
        blocks.append(("p", change_rank_text(ev["change_rank.csv"], ev["layers.json"])))
        blocks.append(("p", fairness_text(ev["fairness.json"], ev["behaviour.json"].get("masked_mass", {}))))
        heads_text = head_patch_text(ev.get("head_patch.json"))
        if heads_text:
            blocks.append(("p", heads_text))
        fp = ev["fingerprint"] or {}
        blocks.append(("details", f"Activation fingerprint of {p}",
                       [("kv", [(k, kv_text(fp[k])) for k in sorted(fp)])] if fp else
                       [("p", "No fingerprint (artifacts/acts/<pair>/fingerprint.json is missing).")]))
    blocks.append(("details", "Method notes", method_notes(data, domains, t, trust_remote_code, allow_pickle)))
    return blocks


def method_notes(data: dict, domains: dict, t: Thresholds, trust_remote_code: bool, allow_pickle: bool) -> list[tuple]:
    """The method notes as ``("p", text)`` blocks: the verdict rule with its thresholds, the head-churn
    comparison of the cultural and cognitive pairs (when both are present), what reproduces bit for bit and what
    moves across builds, and how the models were loaded."""
    notes: list[tuple] = [
        ("p", f"Verdict rule: policy-like when a rank ≤ {t.policy_max_k} subspace at one layer both removes "
              "the behaviour from the tuned model and induces it in the base within the side-effect limits (an "
              "accuracy drop blocks when its 95% item-bootstrap interval lies above the limit: on a few MC items one "
              "flip is 17-25 points), chosen on dev and confirmed on the test split (a k the test split does not "
              "confirm, or a sweep of a "
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
    return notes
