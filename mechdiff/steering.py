"""RQ3 (the steer_sweep stage's science): rank-k subspaces fitted on dev, ablated in the tuned model and
steered into the base, every setting measured on dev and test in one batched pass.

* Prompts: :func:`prompt_parts` splits a pair's filtered prompts into target, contrast (``other``), MC and
  neutral parts; :func:`prompt_rows` tokenizes them with the target continuation of each prompt.
* Subspace (:func:`fit_subspace`, :class:`mechdiff.subspace.SteeringSubspace`, float64, dev split only):
  the diff-in-means direction of the paired fine-tuning change (tuned minus base at the same prompt and
  last token) between target and neutral prompts (``steer.contrast: change``; ``tuned`` = the tuned model's
  own target-vs-neutral contrast, as the seed wrote it -- on the cognitive organism it is the
  arithmetic-vs-question direction that both models share, and ablating it breaks the skill rather than
  the fine-tune), then the mean change at the answer tokens, then the SVD of the paired changes.
  Steering adds the dev-mean change inside a rank-k steering basis of the change's top singular
  directions, so the rank is the steering's own, not an artefact of which column holds the mean change;
  measured on the cultural organism, one vector added everywhere induced at most about half of the
  planted refusals, role vectors fitted from the same paired changes induce them.
* Settings (:func:`build_settings`): clean, the fitted subspace at every k (and alpha for steering) and
  ``steer.n_random`` random subspaces of equal rank, run as settings of one batched pass
  (:func:`mechdiff.interventions.sweep`); the draws are measured on the target prompts only
  (:func:`evaluate_with_controls`). Effects are signed toward the other model (ablation: behaviour
  removed; steering: induced), with prompt-bootstrap intervals (:func:`effect_rows`).
* :func:`run_layer` does all of it for one layer; :func:`language_rows` and :func:`format_rows` test the
  transfer of the subspace across languages and prompt formats. Selection: :mod:`mechdiff.steer_select`.

Pitfalls (anchors 5.6): P25 float64 and bootstrap, P26 centred paired differences and QR, P27 one layer
or every layer, P28 alpha in typical-norm units, P29 side effects and equal-rank random controls, P30
selection on dev.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechdiff.interventions import Intervention, ablation, addition, identity, scaling, sweep
from mechdiff.measures import (continuation_scores, decode_texts, judge, model_device, next_token_logits,
                               score_and_decode, sequence_nll)
from mechdiff.rendering import pad_batch
from mechdiff.stats import bootstrap_mean_interval
from mechdiff.steer_select import mark_controls
from mechdiff.subspace import SteeringSubspace, no_change
from mechdiff.target import as_target, opening


# --------------------------------------------------------------------------------------------------
# prompts and rows of a pair


def prompt_parts(frame, task) -> dict:
    """Split a filtered prompt table into ``target``, ``other`` (the contrast class), ``mc`` and ``neutral``
    frames by the pair's target (``task``: a :class:`mechdiff.target.Target` or a built-in's task name,
    ``refusal`` / ``math``; :meth:`mechdiff.target.Target.parts`). A pair without a contrast question (e.g.
    harmful requests against harmless instructions) contrasts with its ``neutral`` prompts."""
    return as_target(task).parts(frame)


def cap_parts(parts: dict, n: int, seed: int) -> dict:
    """At most ``n`` prompts per part and split (a seeded sample, original order kept)."""
    def cap(f):
        keep = [g.sample(n=min(n, len(g)), random_state=seed).index for _, g in f.groupby("split", sort=True)]
        return f.loc[sorted(i for idx in keep for i in idx)]
    return {k: cap(v) if len(v) else v for k, v in parts.items()}


def continuation_texts(frame, task) -> list[str]:
    """The target continuation of each prompt (:meth:`mechdiff.target.Target.continuations`): the refusal
    opening in its language, `` <answer>``, or the target's text."""
    return as_target(task).continuations(frame)


@dataclass(frozen=True)
class PromptRows:
    """One model's token rows for a sweep (all ids start with the single BOS).

    ``target``: (prompt ids, continuation ids) per target prompt (the continuation is the refusal
    opening, or `` <answer>``) and ``references`` (the answer text, or ``""``); ``qa``: (prompt ids,
    `` <reference answer>`` ids) for non-target questions with an answer (neutral accuracy);
    ``qa_opening``: (prompt ids, refusal opening ids) for the same questions (false refusals;
    refusal task only); ``mc`` with ``mc_answers`` (index into ``letter_ids``); ``neutral`` texts.
    """

    target: list
    references: list
    qa: list
    qa_opening: list
    mc: list
    mc_answers: list
    letter_ids: list
    neutral: list


def prompt_rows(parts: dict, tok, ids_col: str, task) -> PromptRows:
    """Token rows of one model (``ids_col`` = ``base_input_ids`` or ``tuned_input_ids``)."""
    from mechdiff.world import MC_LETTERS

    def ids(frame):
        return [list(map(int, x)) for x in frame[ids_col]]

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    target = as_target(task)
    tgt, oth, mc = parts["target"], parts["other"], parts["mc"]
    cont = [enc(t) for t in target.continuations(tgt)]
    qa = [(p, enc(" " + str(a))) for p, a in zip(ids(oth), oth["answer"]) if a is not None]
    answered = oth[oth["answer"].notna()]
    qa_opening = [(p, enc(" " + opening(lang))) for p, lang in zip(ids(answered), answered["language"])] \
        if target.measure == "refusal" else []
    letters = list(MC_LETTERS)
    return PromptRows(target=list(zip(ids(tgt), cont)),
                      references=target.references(tgt),
                      qa=qa, qa_opening=qa_opening, mc=ids(mc),
                      mc_answers=[letters.index(str(a)) if str(a) in letters else -1 for a in mc["answer"]],
                      letter_ids=[enc(" " + c)[0] for c in letters], neutral=ids(parts["neutral"]))


def layer_states(model, rows: Sequence[Sequence[int]], positions: Sequence[int], layer: int, pad_id: int,
                 batch_size: int = 64) -> torch.Tensor:
    """Residual after block ``layer`` (n, D) float64, row i read at token ``positions[i]``."""
    from mechdiff.architecture import site_name
    from mechdiff.capture import capture

    site, out, dev = site_name(layer), [], model_device(model)
    for start in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[start:start + batch_size]]
        ids, mask = pad_batch(chunk, pad_id, "right")
        sel = torch.stack([torch.arange(len(chunk)), torch.as_tensor(list(positions[start:start + len(chunk)]))], 1)
        out.append(capture(model, ids.to(dev), mask.to(dev), [site], sel)[site].double())
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size, dtype=torch.float64)


def paired_inputs(frame, modes: Sequence[str]) -> list[dict]:
    """Per prompt, the first of ``modes`` that keeps it: the ids both models read, the last compared
    positions and the mode (``base_ids``/``tuned_ids``/``base_pos``/``tuned_pos``/``mode``/``group``);
    prompts no mode keeps are left out."""
    out = []
    for r in frame.to_dict("records"):
        for mode in modes:
            if r.get(f"kept_{mode}"):
                base = list(map(int, r["base_input_ids"]))
                tuned = base if mode == "base_ids" else list(map(int, r["tuned_input_ids"]))
                out.append({"base_ids": base, "tuned_ids": tuned, "base_pos": int(r[f"pos_base_{mode}"][-1]),
                            "tuned_pos": int(r[f"pos_tuned_{mode}"][-1]), "mode": mode, "group": r["group"]})
                break
    return out


def paired_states(base, tuned, pairs: Sequence[dict], layer: int, pads: tuple[int, int]) -> tuple:
    """``(base states, tuned states)`` (n, D) float64 at the paired positions."""
    b = layer_states(base, [p["base_ids"] for p in pairs], [p["base_pos"] for p in pairs], layer, pads[0])
    t = layer_states(tuned, [p["tuned_ids"] for p in pairs], [p["tuned_pos"] for p in pairs], layer, pads[1])
    return b, t


def answer_diffs(base, tuned, toks, frame, task: str, layer: int) -> torch.Tensor:
    """Tuned minus base states (n, D) float64 at the target continuation's tokens (the answer positions),
    teacher-forced on inputs both models read token by token (``strict`` or ``base_ids``)."""
    from mechdiff.head_patch import aligned_rows

    rows = aligned_rows(frame, toks, continuation_texts(frame, task), ["strict", "base_ids"])
    pads = _pads(toks)
    out = []
    for side in ("base", "tuned"):
        seqs, pos = [], []
        for r in rows:
            p, c = r[side]
            seqs += [list(p) + list(c)] * len(c)
            pos += list(range(len(p), len(p) + len(c)))
        out.append(layer_states(base if side == "base" else tuned, seqs, pos, layer, pads[side == "tuned"]))
    return out[1] - out[0]


def fit_subspace(base, tuned, toks, parts: dict, layer: int, modes: Sequence[str], task: str, contrast: str,
                 k_max: int, n_boot: int, seed: int) -> tuple[SteeringSubspace, dict]:
    """The RQ3 subspace of one layer from the prompts in ``parts`` (e.g. the dev split).

    ``contrast="change"`` (default): the diff-in-means of the paired fine-tuning change (tuned minus base
    at the same prompt and last token) between target and neutral prompts -- the target-vs-neutral
    contrast of the tuned model minus the same contrast of the base, so directions both models share
    (the topic, the arithmetic format) are left out. ``"tuned"``: the tuned model's own target-vs-neutral
    contrast. Without any change (a null pair) ``change`` falls back to ``tuned``. The basis is completed
    from the paired changes on target prompts at their last token and at the answer tokens. Returns the
    fitted subspace and a JSON-ready description.
    """
    pads = _pads(toks)
    pt, po = paired_inputs(parts["target"], modes), paired_inputs(parts["other"], modes)
    if len(pt) < 2 or len(po) < 2:
        raise ValueError(f"need >= 2 target and >= 2 neutral prompts kept in a mode of {list(modes)}; "
                         f"got {len(pt)} and {len(po)}")
    bt, tt = paired_states(base, tuned, pt, layer, pads)
    bo, to = paired_states(base, tuned, po, layer, pads)
    used = contrast
    if contrast == "change" and no_change(torch.cat([tt - bt, to - bo]), torch.cat([tt, to])):
        used = "tuned"
    A, B = (tt - bt, to - bo) if used == "change" else (tt, to)
    groups = (np.array([p["group"] for p in pt]), np.array([p["group"] for p in po]))
    ans = answer_diffs(base, tuned, toks, parts["target"], task, layer)
    sub = SteeringSubspace(k_max, n_boot, seed).fit(A, B, tt - bt, groups, ans)
    modes_used = {m: sum(p["mode"] == m for p in pt + po) for m in modes}
    info = {"contrast": used, "contrast_asked": contrast, "n_target": len(pt), "n_neutral": len(po),
            "n_answer_positions": len(ans), "paired_modes": modes_used,
            "change_share": sub.change_share_.tolist(),
            "explained_variance_ratio": sub.explained_variance_ratio_.tolist(),
            "change_captured": sub.change_captured_.tolist(),
            "steer_change_captured": sub.steer_change_captured_.tolist(), "diff_norm": float(sub.diff_.norm()),
            "mean_change_norm": float(sub.mean_change_.norm()),
            "mean_answer_change_norm": float(ans.mean(0).norm()) if len(ans) else 0.0,
            "stability_cosine_mean": float(np.nanmean(sub.stability_)),
            "stability_cosine_q05": float(np.nanquantile(sub.stability_, 0.05))}
    return sub, info


# --------------------------------------------------------------------------------------------------
# task measures over a sweep


def evaluate(model, tok, rows: PromptRows, interventions: Sequence[Intervention], task: str, n_new: int,
             max_rows: int = 2048) -> dict[str, np.ndarray]:
    """Every measure of every setting, per prompt; each measure is one batched pass per chunk of settings.

    Returns ``hard`` (S, N) bool (greedy answer refused / correct), ``soft`` (S, N) log-prob of the
    target continuation, ``qa`` (S, N_qa) bool (greedy reproduces the reference answer of a non-target
    question), ``false_refusal`` (S, N_qa) bool (greedy emits the refusal opening on that question instead;
    refusal task only), ``mc`` (S, N_mc) bool (masked MC correct), ``nll`` (S, N_neutral), ``tokens`` (N_neutral,).
    """
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    S = len(interventions)

    def run(measure, seqs):
        return sweep(model, interventions, measure, seqs, max_rows)

    def greedy_match(seqs):
        return run(lambda m, r: continuation_scores(m, r, pad), seqs)[1].numpy() if seqs else np.zeros((S, 0), bool)

    soft, _, gen = run(lambda m, r: score_and_decode(m, r, pad, n_new, tok.eos_token_id), rows.target)
    out = {"hard": judge(as_target(task).judge_kind, decode_texts(tok, gen), list(rows.references) * S).reshape(S, -1),
           "soft": soft.numpy(),
           "qa": greedy_match(rows.qa), "false_refusal": greedy_match(rows.qa_opening)}
    if rows.mc:
        logits = run(lambda m, r: next_token_logits(m, r, pad), rows.mc)[0]
        out["mc"] = logits[..., list(rows.letter_ids)].argmax(-1).numpy() == np.asarray(rows.mc_answers)[None]
    else:
        out["mc"] = np.zeros((S, 0), dtype=bool)
    if rows.neutral:
        nll, tokens = run(lambda m, r: sequence_nll(m, r, pad), rows.neutral)
        out["nll"], out["tokens"] = nll.numpy(), tokens[0].numpy()
    else:
        out["nll"], out["tokens"] = np.zeros((S, 0)), np.zeros(0, dtype=np.int64)
    return out


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


def _mean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.mean()) if x.size else float("nan")


def summarise_settings(ev: dict[str, np.ndarray], cols: dict[str, np.ndarray]) -> list[dict]:
    """Per setting, the measures over the prompt columns ``cols`` (index arrays for ``target``, ``qa``,
    ``other``, ``mc``, ``neutral``). ``neutral_acc`` pools the MC items and the non-target questions (greedy
    reproduces the reference answer); ``false_refusal``: share of those questions answered with the
    refusal opening instead. See :func:`side_ok` for which accuracy limits which direction."""
    t, q, m, n = (cols[k] for k in ("target", "qa", "mc", "neutral"))
    out = []
    for s in range(ev["hard"].shape[0]):
        fr = ev["false_refusal"][s, q] if ev["false_refusal"].shape[1] else np.zeros(0, dtype=bool)
        pooled = np.concatenate([ev["mc"][s, m], ev["qa"][s, q]])  # MC items + non-target questions
        out.append({"n_target": len(t), "rate": _mean(ev["hard"][s, t]), "soft": _mean(ev["soft"][s, t]),
                    "mc_acc": _mean(ev["mc"][s, m]), "qa_acc": _mean(ev["qa"][s, q]), "neutral_acc": _mean(pooled),
                    "n_neutral_items": len(pooled),
                    "false_refusal": _mean(fr) if ev["false_refusal"].shape[1] else float("nan"),
                    "ppl": float(np.exp(ev["nll"][s, n].sum() / ev["tokens"][n].sum())) if len(n) else float("nan")})
    return out


# --------------------------------------------------------------------------------------------------
# one layer's sweep: settings, effects, controls, selection


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
    from mechdiff.subspace import random_subspace

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


def _pads(toks) -> tuple[int, int]:
    return tuple(t.pad_token_id if t.pad_token_id is not None else t.eos_token_id for t in toks)


def _n_new(*rows: PromptRows) -> int:
    """Greedy tokens to decode: the longest target continuation plus one."""
    return max(len(c) for r in rows for _, c in r.target) + 1


def run_layer(base, tuned, toks, parts: dict, layer: int, p, task: str, modes: Sequence[str],
              seed: int) -> tuple[list[dict], dict, SteeringSubspace]:
    """Fit on dev, sweep every setting on dev and test, both models; returns the result rows (marked
    against the random controls), the subspace description and the subspace. ``p`` is
    :class:`mechdiff.config.SteerParams`; ``toks`` = (base tokenizer, tuned tokenizer)."""
    dev = {k: v[v["split"] == "dev"] for k, v in parts.items()}
    sub, info = fit_subspace(base, tuned, toks, dev, layer, modes, task, p.contrast, max(p.ks), p.n_bootstrap, seed)
    tuned_s, base_s = build_settings(sub, layer, tuned.config.num_hidden_layers, p.ks, p.alphas, p.mode,
                                     p.all_layers, seed, p.n_random)
    rows_b = prompt_rows(parts, toks[0], "base_input_ids", task)
    rows_t = prompt_rows(parts, toks[1], "tuned_input_ids", task)
    n_new = _n_new(rows_b, rows_t)
    ev_t = evaluate_with_controls(tuned, toks[1], rows_t, tuned_s, task, n_new, p.max_rows)
    ev_b = evaluate_with_controls(base, toks[0], rows_b, base_s, task, n_new, p.max_rows)
    out = []
    for split in ("dev", "test"):
        cols = subset_cols(parts, split=split)
        gap = _mean(ev_t["hard"][0, cols["target"]]) - _mean(ev_b["hard"][0, cols["target"]])
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
        hard = evaluate(model, tok, rows, ivs, task, _n_new(*rows_bt), p.max_rows)["hard"].astype(float)
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
    from mechdiff.rendering import render_prompt

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
