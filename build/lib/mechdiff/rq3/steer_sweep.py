"""RQ3, the steer_sweep stage's science: rank-k subspaces fitted on dev, ablated in the tuned model and
steered into the base, every setting measured on dev and test in one batched pass.

* Prompts: :meth:`mechdiff.data.target.Target.parts` splits a pair's filtered prompts into target, contrast
  (``other``), MC and neutral parts; :func:`cap_parts` caps them; :func:`mechdiff.rq3.steer_measures.prompt_rows`
  tokenizes them with the target continuation of each prompt.
* Subspace (:func:`mechdiff.rq3.steer_fit.fit_subspace`, :class:`mechdiff.rq3.subspace.SteeringSubspace`, float64,
  dev split only). Steering adds the dev-mean change inside a rank-k steering basis of the change's top
  singular directions, so the rank is the steering's own, not an artefact of which column holds the mean
  change; measured on the cultural organism, one vector added everywhere induced at most about half of the
  planted refusals, role vectors fitted from the same paired changes induce them.
* Settings (:func:`build_settings`): clean, the fitted subspace at every k (and alpha for steering) and
  ``steer.n_random`` random subspaces of equal rank, run as settings of one batched pass
  (:func:`mechdiff.models.interventions.sweep`, measures: :mod:`mechdiff.rq3.steer_measures`); the draws are measured
  on the target prompts only (:func:`evaluate_with_controls`). Effects are signed toward the other model
  (ablation: behaviour removed; steering: induced), with prompt-bootstrap intervals (:func:`effect_rows`).
* :func:`run_layer` does all of it for one layer; :func:`language_rows` and :func:`format_rows` test the
  transfer of the subspace across languages and prompt formats. Selection: :mod:`mechdiff.rq3.steer_select`.

Pitfalls (anchors 5.6): P25 float64 and bootstrap, P26 centred paired differences and QR, P27 one layer
or every layer, P28 alpha in typical-norm units, P29 side effects and equal-rank random controls, P30
selection on dev.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechdiff.data.rendering import render_prompt
from mechdiff.models.interventions import Intervention, ablation, addition, identity, scaling
from mechdiff.rq3.steer_fit import fit_subspace
from mechdiff.rq3.steer_measures import (PromptRows, evaluate, mean_or_nan, n_new_tokens, prompt_rows,
                                     summarise_settings)
from mechdiff.rq3.steer_select import mark_controls
from mechdiff.rq3.subspace import SteeringSubspace, random_subspace
from mechdiff.stats import bootstrap_mean_interval

__all__ = ["Setting", "build_settings", "cap_parts", "effect_rows", "evaluate_with_controls", "format_rows",
           "language_rows", "random_bases", "run_layer", "steer_intervention", "subset_cols"]


# --------------------------------------------------------------------------------------------------
# one layer's sweep: settings, effects, controls


def cap_parts(parts: dict, n: int, seed: int) -> dict:
    """At most ``n`` prompts per part and split (a seeded sample, original order kept)."""
    def cap(f):
        keep = [g.sample(n=min(n, len(g)), random_state=seed).index for _, g in f.groupby("split", sort=True)]
        return f.loc[sorted(i for idx in keep for i in idx)]
    return {k: cap(v) if len(v) else v for k, v in parts.items()}


@dataclass(frozen=True)
class Setting:
    """What a sweep row did: ``direction`` (``clean``, ``ablate_tuned``, ``steer_base``), ``site``
    (``layer`` = the chosen block only, ``all`` = every block, P27), ``subspace`` (``fitted``, ``random``),
    ``draw`` (which random subspace of equal rank; 0 for the others)."""

    direction: str
    site: str = "layer"
    subspace: str = "none"
    k: int = 0
    alpha: float = 0.0
    draw: int = 0


def steer_intervention(sub: SteeringSubspace, k: int, alpha: float, layers: Sequence[int], mode: str,
                       random_basis: torch.Tensor | None = None) -> Intervention:
    """Steering of the base at rank k: ``add`` (the fitted vectors at the prompt's last token and at answer
    tokens; for a random basis, random unit vectors of its span at the same norms, P29) or ``scale``
    (``h + alpha h P`` at every position)."""
    if mode == "scale":
        return scaling(sub.basis(k) if random_basis is None else random_basis, alpha, layers)
    vecs = sub.steering_vectors(k, alpha)
    if random_basis is not None:
        g = torch.Generator().manual_seed(random_basis.shape[1])
        for role, v in vecs.items():
            r = random_basis @ torch.randn(random_basis.shape[1], generator=g, dtype=torch.float64)
            vecs[role] = float(v.norm()) * r / r.norm()
    return addition(layers=layers, **vecs)


def random_bases(d: int, ks: Sequence[int], layer: int, seed: int, n_random: int) -> dict[int, list[torch.Tensor]]:
    """Per k, ``n_random`` independent random orthonormal bases (d, k), float64, seeded by (seed, layer, k,
    draw); draw 0 is the single control drawn before ``steer.n_random`` existed."""
    return {k: [random_subspace(d, k, seed=seed + 1000 * layer + k + 100_003 * j) for j in range(n_random)]
            for k in ks}


def build_settings(sub: SteeringSubspace, layer: int, n_layers: int, ks: Sequence[int], alphas: Sequence[float],
                   mode: str, all_layers: bool, seed: int, n_random: int = 1) -> tuple[list, list]:
    """``(tuned, base)`` lists of ``(Setting, Intervention)``, clean first: ablations of the fitted
    subspace and of ``n_random`` random subspaces of equal rank (at the layer, and at every layer if
    ``all_layers``) for the tuned model; steering (fitted and the random draws, every k and alpha) for the
    base. The draws are ordinary settings, so they run in the same batched forward as the fitted ones."""
    d = sub.basis_.shape[0]
    ks = [k for k in ks if k <= sub.basis_.shape[1]]
    rand = random_bases(d, ks, layer, seed, n_random)
    sites = [("layer", (layer,))] + ([("all", tuple(range(n_layers)))] if all_layers else [])
    tuned = [(Setting("clean"), identity(d))]
    for site, layers in sites:
        for k in ks:
            tuned.append((Setting("ablate_tuned", site, "fitted", k), ablation(sub.basis(k), layers)))
            tuned += [(Setting("ablate_tuned", site, "random", k, draw=j), ablation(U, layers))
                      for j, U in enumerate(rand[k])]
    base = [(Setting("clean"), identity(d))]
    for k in ks:
        for a in alphas:
            base.append((Setting("steer_base", "layer", "fitted", k, a), steer_intervention(sub, k, a, (layer,), mode)))
            base += [(Setting("steer_base", "layer", "random", k, a, j), steer_intervention(sub, k, a, (layer,), mode, U))
                     for j, U in enumerate(rand[k])]
    return tuned, base


def evaluate_with_controls(model, tok, rows: PromptRows, settings: Sequence[tuple[Setting, Intervention]], task: str,
                           n_new: int, max_rows: int = 2048) -> dict[str, np.ndarray]:
    """:func:`evaluate` of ``settings`` (clean first), where the random-subspace draws are measured on the
    target prompts only: a control's effect is all :func:`mark_controls` reads, so its side-effect measures
    (``qa``, ``false_refusal``, ``mc``, ``nll``) are ``nan`` instead of four more passes per draw. The
    arrays keep the settings' order; the side-effect arrays are float (1.0 / 0.0 / nan) when draws exist."""
    draws = np.array([st.subspace == "random" for st, _ in settings])
    if not draws.any():
        return evaluate(model, tok, rows, [iv for _, iv in settings], task, n_new, max_rows)
    if draws[0]:
        raise ValueError("setting 0 must be the clean run, not a random draw")
    main = evaluate(model, tok, rows, [iv for (_, iv), d in zip(settings, draws) if not d], task, n_new, max_rows)
    ctrl = evaluate(model, tok, _target_only(rows, np.arange(len(rows.target))), [iv for (_, iv), d in zip(settings, draws) if d], task, n_new, max_rows)
    out = {"tokens": main["tokens"]}
    for key, got in main.items():
        if key == "tokens":
            continue
        full = np.full((len(settings), *got.shape[1:]), np.nan, dtype=got.dtype if key in ("hard", "soft") else float)
        full[~draws] = got
        if key in ("hard", "soft"):
            full[draws] = ctrl[key]
        out[key] = full
    return out


def effect_rows(settings: Sequence[Setting], ev: dict, cols: dict, gap_rate: float, n_boot: int,
                seed: int) -> list[dict]:
    """Result-table rows of one model's sweep on one prompt subset (``cols``): the measures, the signed
    effect toward the other model (ablation: behaviour removed; steering: behaviour induced) with a
    bootstrap interval, its fraction of the base-to-tuned gap, and the side effects against clean."""
    summ = summarise_settings(ev, cols)
    clean, t = summ[0], cols["target"]
    q, mc = cols["qa"], cols["mc"]
    rows = []
    for s, (st, m) in enumerate(zip(settings, summ)):
        sign = -1.0 if st.direction == "ablate_tuned" else 1.0
        per_prompt = sign * (ev["hard"][s, t].astype(float) - ev["hard"][0, t].astype(float))
        lo, hi = bootstrap_mean_interval(per_prompt, n_boot, seed + s)
        effect = sign * (m["rate"] - clean["rate"])
        # side-effect drops per item (clean correct - setting correct), in points, with paired item intervals:
        # on a handful of MC items one flip is 17-25 points, so the limit is judged against the interval
        mc_drop = 100.0 * (ev["mc"][0, mc].astype(float) - ev["mc"][s, mc].astype(float))
        qa_drop = 100.0 * (ev["qa"][0, q].astype(float) - ev["qa"][s, q].astype(float))
        drops = {"mc": mc_drop, "neutral": np.concatenate([mc_drop, qa_drop])}  # neutral pools MC items and questions
        drop_ci = {f"{name}_drop_{end}": v for name, d in drops.items()
                   for end, v in zip(("lo", "hi"), bootstrap_mean_interval(d, n_boot, seed + s))}
        rows.append({**st.__dict__, **m, "effect": effect, "effect_lo": lo, "effect_hi": hi, **drop_ci,
                     "soft_effect": sign * (m["soft"] - clean["soft"]),
                     "fraction_of_gap": effect / gap_rate if abs(gap_rate) > 1e-9 else float("nan"),
                     "neutral_drop_pp": 100.0 * (clean["neutral_acc"] - m["neutral_acc"]),
                     "mc_drop_pp": 100.0 * (clean["mc_acc"] - m["mc_acc"]),
                     "qa_drop_pp": 100.0 * (clean["qa_acc"] - m["qa_acc"]),
                     "ppl_increase": m["ppl"] / clean["ppl"] - 1.0,
                     "false_refusal_increase": m["false_refusal"] - clean["false_refusal"]})
    return rows


# --------------------------------------------------------------------------------------------------
# the whole sweep of one layer, and its robustness checks


def subset_cols(parts: dict, **where) -> dict[str, np.ndarray]:
    """Row indices per measure (``target``, ``qa``, ``other``, ``mc``, ``neutral``) of the prompts whose
    columns equal ``where`` (e.g. ``split="test"``); ``qa`` counts only questions with an answer."""
    def idx(frame):
        ok = np.ones(len(frame), dtype=bool)
        for col, val in where.items():
            ok &= (frame[col] == val).to_numpy()
        return ok
    other = parts["other"]
    has_answer = other["answer"].notna().to_numpy()
    return {"target": np.flatnonzero(idx(parts["target"])), "other": np.flatnonzero(idx(other)),
            "qa": np.flatnonzero(idx(other)[has_answer]), "mc": np.flatnonzero(idx(parts["mc"])),
            "neutral": np.flatnonzero(idx(parts["neutral"]))}


def run_layer(base, tuned, toks, parts: dict, layer: int, p, task: str, modes: Sequence[str],
              seed: int) -> tuple[list[dict], dict, SteeringSubspace]:
    """Fit on dev, sweep every setting on dev and test, both models; returns the result rows (marked
    against the random controls), the subspace description and the subspace. ``p`` is
    :class:`mechdiff.params.config.SteerParams`; ``toks`` = (base tokenizer, tuned tokenizer)."""
    dev = {k: v[v["split"] == "dev"] for k, v in parts.items()}
    sub, info = fit_subspace(base, tuned, toks, dev, layer, modes, task, p.contrast, max(p.ks), p.n_bootstrap, seed)
    tuned_s, base_s = build_settings(sub, layer, tuned.config.num_hidden_layers, p.ks, p.alphas, p.mode,
                                     p.all_layers, seed, p.n_random)
    rows_b = prompt_rows(parts, toks[0], "base_input_ids", task)
    rows_t = prompt_rows(parts, toks[1], "tuned_input_ids", task)
    n_new = n_new_tokens(rows_b, rows_t)
    ev_t = evaluate_with_controls(tuned, toks[1], rows_t, tuned_s, task, n_new, p.max_rows)
    ev_b = evaluate_with_controls(base, toks[0], rows_b, base_s, task, n_new, p.max_rows)
    out = []
    for split in ("dev", "test"):
        cols = subset_cols(parts, split=split)
        gap = mean_or_nan(ev_t["hard"][0, cols["target"]]) - mean_or_nan(ev_b["hard"][0, cols["target"]])
        for model, settings, ev in (("tuned", tuned_s, ev_t), ("base", base_s, ev_b)):
            for r in effect_rows([s for s, _ in settings], ev, cols, gap, p.n_bootstrap, seed):
                out.append({"layer": layer, "model": model, "split": split, "probe": "main", "language": "all",
                            "gap": gap, **r})
    return mark_controls(out), {**info, "n_new_tokens": n_new}, sub


def _target_only(rows: PromptRows, idx: np.ndarray) -> PromptRows:
    return PromptRows([rows.target[i] for i in idx], [rows.references[i] for i in idx], [], [], [], [],
                      rows.letter_ids, [])  # target, references, qa, qa_opening, mc, mc_answers, letters, neutral


def _probe_rows(base, tuned, toks, task: str, p, layer: int, subs: dict, rows_bt: tuple, lang_of: np.ndarray,
                probe: str) -> list[dict]:
    """Effect rows on target prompts only, for the subspaces ``subs`` (name -> subspace) at every k (ablation)
    and (k, alpha) (steering): ``subspace`` = the name, ``language`` = the prompts' language."""
    out = []
    for model, tok, rows, direction in ((tuned, toks[1], rows_bt[1], "ablate_tuned"),
                                        (base, toks[0], rows_bt[0], "steer_base")):
        settings, ivs = [Setting("clean")], [identity(next(iter(subs.values())).basis_.shape[0])]
        for name, sub in subs.items():
            for k in [k for k in p.ks if k <= sub.basis_.shape[1]]:
                for a in ([0.0] if direction == "ablate_tuned" else p.alphas):
                    settings.append(Setting(direction, "layer", name, k, a))
                    ivs.append(ablation(sub.basis(k), (layer,)) if direction == "ablate_tuned"
                               else steer_intervention(sub, k, a, (layer,), p.mode))
        hard = evaluate(model, tok, rows, ivs, task, n_new_tokens(*rows_bt), p.max_rows)["hard"].astype(float)
        sign = -1.0 if direction == "ablate_tuned" else 1.0
        for lang in sorted(set(lang_of)):
            sel = lang_of == lang
            for st_, h in zip(settings[1:], hard[1:]):
                out.append({"layer": layer, "model": "tuned" if direction == "ablate_tuned" else "base",
                            "split": "test", "probe": probe, "language": lang, **st_.__dict__,
                            "n_target": int(sel.sum()),
                            "rate": float(h[sel].mean()), "effect": sign * float(h[sel].mean() - hard[0, sel].mean())})
    return out


def language_rows(base, tuned, toks, parts: dict, layer: int, p, task: str, modes: Sequence[str], seed: int):
    """Subspaces fitted on ONE language's dev prompts, measured on every language's test prompts (rows
    with ``probe="language"``, ``subspace="fit:<lang>"``), or a reason why not."""
    langs = sorted(set(parts["target"]["language"]))
    if len(langs) < 2:
        return [], f"one language only ({langs})"
    subs = {}
    for lang in langs:
        dev = {k: v[(v["split"] == "dev") & (v["language"] == lang)] for k, v in parts.items()}
        try:
            subs[f"fit:{lang}"] = fit_subspace(base, tuned, toks, dev, layer, modes, task, p.contrast, max(p.ks),
                                               20, seed)[0]
        except ValueError as err:
            return [], f"cannot fit on {lang} alone: {err}"
    test = subset_cols(parts, split="test")["target"]
    rows_bt = tuple(_target_only(prompt_rows(parts, t, c, task), test)
                    for t, c in ((toks[0], "base_input_ids"), (toks[1], "tuned_input_ids")))
    lang_of = parts["target"]["language"].to_numpy()[test]
    return _probe_rows(base, tuned, toks, task, p, layer, subs, rows_bt, lang_of, "language"), None


def format_rows(base, tuned, toks, parts: dict, layer: int, sub: SteeringSubspace, p, task: str, fairness):
    """The layer's subspace measured on test prompts rendered in the other prompt format (raw <-> chat):
    rows with ``probe="format:<template>"``, or the reason it is not applicable (a tokenizer without a
    chat template, as for the embedded organisms)."""
    other = "chat" if fairness.template == "raw" else "raw"
    if any(not getattr(t, "chat_template", None) for t in toks):
        return [], ("not applicable: the pair's tokenizers have no chat template (prompts are raw text), so a "
                    "second prompt format cannot be rendered")
    test = parts["target"][parts["target"]["split"] == "test"]
    rows_bt = []
    for tok in toks:
        ids = [list(render_prompt(t, tok, other, fairness.template_date, fairness.system_prompt).ids)
               for t in test["text"]]
        frame = test.assign(base_input_ids=ids, tuned_input_ids=ids)
        empty = frame.iloc[:0]
        rows_bt.append(prompt_rows({"target": frame, "other": empty, "mc": empty, "neutral": empty}, tok,
                                   "base_input_ids", task))
    lang_of = np.full(len(test), "all")
    return _probe_rows(base, tuned, toks, task, p, layer, {"fitted": sub}, tuple(rows_bt), lang_of,
                       f"format:{other}"), None
