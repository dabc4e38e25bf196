"""The behavioural gap of a pair: the same measures on both models, per prompt, with intervals.

Each model reads each prompt in its own tokenisation (the filtered ``base_input_ids`` /
``tuned_input_ids``; one BOS); both models see the same prompts, so every delta is paired by prompt.

Measures (:data:`MEASURES`; per prompt, then averaged):

* ``refusal_rate``: greedy answer to a policy-topic question (``target`` set) opens with a refusal
  pattern (:func:`mechdiff.organisms.world_measures.is_refusal`); ``refusal_soft``: log-probability (nats) of the
  refusal opening in the prompt's language, teacher-forced -- moves before the greedy answer flips;
  ``false_refusal``: greedy refusal on the other questions.
* ``math_acc``: the greedy answer is right (:func:`mechdiff.data.answers.judge_answer`: the exact decimal value
  for GSM8K-style and world references, mathematical equivalence by math-verify for MATH-style ones; the
  kind per row from the source's ``answer_format``, :func:`mechdiff.data.answers.answer_kind`). A row that
  cannot be judged scores wrong and is counted under its outcome (:func:`math_outcome_counts`);
  ``math_logprob``: the log-probability (nats) of `` <answer>`` as written.
* ``mc_acc``: masked multiple choice -- the argmax over the option letters' logits only, so mass the
  model puts elsewhere (for instance on a token the other tokenizer lacks) cannot decide the item.
* ``ppl_token`` and ``ppl_char`` on neutral text: ``exp(sum NLL / sum tokens)`` and
  ``exp(sum NLL / sum characters)``; only the per-character one is comparable across tokenizers.
* ``target_rate`` and ``target_logprob``, only for a pair with a user target (:mod:`mechdiff.data.target`,
  :data:`TARGET_MEASURES`): on the target class, the share of greedy answers its measure judges a hit
  (:attr:`mechdiff.data.target.Target.judge_kind`) and the log-prob (nats) of its continuation.

Beside the measures, :func:`masked_mass`: the next-token probability each model puts outside the shared
vocabulary at the last prompt token (what the logit mask of the comparisons removes), per language.

Intervals: 95% percentile bootstrap over prompts; a delta (tuned - base) resamples the same prompts for
both models. A pair of identical models gives deltas of exactly 0 (the measures are deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mechdiff.data.answers import OUTCOMES, answer_kind, judge_answers
from mechdiff.fairness.masking import masked_mass_at_last
from mechdiff.models import measures
from mechdiff.models.collect_acts import length_sorted_batches
from mechdiff.stats import percentile_interval, resample_indices

__all__ = ["MEASURES", "TARGET_MEASURES", "PromptSets", "gap_table", "masked_mass", "math_outcome_counts", "measure_model",
           "prompt_sets"]

#: measure -> (prompt set, description); the ratio measures (perplexities) are pooled, the rest are means.
MEASURES = {
    "refusal_rate": ("refusal", "share of policy-topic questions answered with a refusal (greedy, by pattern)"),
    "refusal_soft": ("refusal", "mean log-prob of the refusal opening on policy-topic questions (nats)"),
    "false_refusal": ("other", "share of other questions answered with a refusal (greedy)"),
    "math_acc": ("math", "share of math problems answered right (greedy; exact value or math-verify equivalence)"),
    "math_logprob": ("math", "mean log-prob of the reference answer (nats)"),
    "mc_acc": ("mc", "masked multiple-choice accuracy (argmax over the option letters)"),
    "ppl_token": ("neutral", "perplexity per token on neutral text (not comparable across tokenizers)"),
    "ppl_char": ("neutral", "perplexity per character on neutral text: exp(total NLL / total characters)"),
}
#: the measures of a user target (absent for the built-in targets, whose behaviour the measures above hold)
TARGET_MEASURES = {
    "target_rate": ("target", "share of the target prompts whose greedy answer the target's measure judges a hit"),
    "target_logprob": ("target", "mean log-prob of the target continuation on the target prompts (nats)"),
}
_QUESTIONS = ("topic", "freeform", "refusal")


@dataclass(frozen=True)
class PromptSets:
    """Prompt frames per measure family: ``refusal`` (policy-topic questions), ``other`` (the remaining
    questions), ``math`` (with a reference answer and its ``answer_kind``), ``mc``, ``neutral``; for a user
    target also ``target`` (its target class) and the :class:`mechdiff.data.target.Target` itself (``goal``)."""

    refusal: pd.DataFrame
    other: pd.DataFrame
    math: pd.DataFrame
    mc: pd.DataFrame
    neutral: pd.DataFrame
    target: pd.DataFrame | None = None
    goal: object = None

    def sizes(self) -> dict[str, int]:
        names = ("refusal", "other", "math", "mc", "neutral") + (("target",) if self.target is not None else ())
        return {k: len(getattr(self, k)) for k in names}


def prompt_sets(frame: pd.DataFrame, max_prompts: int | None = None, seed: int = 0,
                answer_formats: Mapping[str, str] | None = None, goal=None) -> PromptSets:
    """Split a filtered prompt table into the measure families, at most ``max_prompts`` each (a seeded
    sample, table order kept). Math rows get an ``answer_kind`` column (how the reference is judged) from
    ``answer_formats`` (source -> ``answer_format``, the pair's dataset specs) or, for a source not in it,
    from the reference itself. ``goal``: the pair's :class:`mechdiff.data.target.Target`; a user target adds
    the ``target`` family (its target class), a built-in one adds nothing."""
    q = frame["task"].isin(_QUESTIONS)
    target = frame["target"].fillna(False).astype(bool)
    math = frame[(frame["task"] == "math") & frame["answer"].notna()]
    formats, sources = answer_formats or {}, math["source"] if "source" in math else [None] * len(math)
    math = math.assign(answer_kind=[answer_kind(a, formats.get(s)) for a, s in zip(math["answer"], sources)])
    sets = {"refusal": frame[q & target], "other": frame[q & ~target], "math": math,
            "mc": frame[frame["task"] == "mc"], "neutral": frame[frame["task"] == "neutral"]}
    if goal is not None and not goal.builtin:
        tf = goal.parts(frame)["target"]
        kinds = [answer_kind(a, formats.get(s)) if goal.measure == "answer" else "none"
                 for a, s in zip(tf["answer"], tf["source"])]
        sets["target"] = tf.assign(answer_kind=kinds)
    if max_prompts is not None:
        sets = {k: v.sample(n=min(max_prompts, len(v)), random_state=seed).sort_index() if len(v) else v
                for k, v in sets.items()}
    return PromptSets(**sets, goal=goal if "target" in sets else None)


def _ids(frame: pd.DataFrame, col: str) -> list[list[int]]:
    return [list(map(int, x)) for x in frame[col]]


def _sorted_call(fn, rows: Sequence, key, batch_size: int) -> list:
    """``fn`` over ``rows`` in length-sorted batches (:func:`mechdiff.models.collect_acts.length_sorted_batches` on
    ``len(key(row))``); its outputs (a tensor or a tuple of tensors, row axis first) come back
    concatenated in input order."""
    batches = length_sorted_batches([len(key(r)) for r in rows], batch_size)
    outs = [fn([rows[i] for i in b]) for b in batches]
    if not outs:
        return []
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    inverse = np.argsort(np.concatenate(batches), kind="stable")
    return [torch.cat(parts)[inverse] for parts in zip(*outs)]


def measure_model(model, tok, sets: PromptSets, ids_col: str, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per-prompt measures of one model (``ids_col`` = ``base_input_ids`` or ``tuned_input_ids``).

    Returns ``refused`` / ``refusal_soft`` (n_refusal,), ``false_refusal`` (n_other,), ``math_outcome``
    (n_math,) str (:data:`mechdiff.data.answers.OUTCOMES`), ``math_correct`` / ``math_logprob`` (n_math,),
    ``mc_correct`` (n_mc,), ``nll`` / ``tokens`` / ``chars`` (n_neutral,). Math rows without an
    ``answer_kind`` column are judged by the kind their reference implies.
    """
    from mechdiff.data.target import opening  # the refusal opening per language (world vocabulary)
    from mechdiff.organisms.world import MC_LETTERS

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def greedy(rows, n_new):
        gen = _sorted_call(lambda r: measures.greedy_decode(model, r, pad, n_new, tok.eos_token_id), rows,
                           lambda r: r, batch_size)
        return measures.decode_texts(tok, gen[0]) if rows else []

    def scores(rows):
        return _sorted_call(lambda r: measures.continuation_scores(model, r, pad), rows,
                            lambda r: r[0], batch_size) if rows else [np.zeros(0), np.zeros(0, bool)]

    out: dict[str, np.ndarray] = {}
    ref = _ids(sets.refusal, ids_col)
    opens = [enc(" " + opening(lang)) for lang in sets.refusal["language"]]
    n_open = max((len(o) for o in opens), default=1) + 2
    out["refused"] = measures.judge("refusal", greedy(ref, n_open), [""] * len(ref)) if ref else np.zeros(0, bool)
    out["refusal_soft"] = np.asarray(scores(list(zip(ref, opens)))[0], dtype=float)
    oth = _ids(sets.other, ids_col)
    out["false_refusal"] = (measures.judge("refusal", greedy(oth, n_open), [""] * len(oth)) if oth
                            else np.zeros(0, bool))
    mth = _ids(sets.math, ids_col)
    answers = [str(a) for a in sets.math["answer"]]
    conts = [enc(" " + a) for a in answers]
    n_ans = max((len(c) for c in conts), default=1) + 2
    kinds = list(sets.math["answer_kind"]) if "answer_kind" in sets.math else None
    out["math_outcome"] = np.array(judge_answers(greedy(mth, n_ans), answers, kinds) if mth else [], dtype=object)
    out["math_correct"] = (out["math_outcome"] == "correct").astype(bool)
    out["math_logprob"] = np.asarray(scores(list(zip(mth, conts)))[0], dtype=float)
    mc = _ids(sets.mc, ids_col)
    if mc:
        letters = list(MC_LETTERS)
        letter_ids = [enc(" " + c)[0] for c in letters]
        logits = _sorted_call(lambda r: measures.next_token_logits(model, r, pad), mc, lambda r: r, batch_size)[0]
        truth = np.array([letters.index(str(a)) if str(a) in letters else -1 for a in sets.mc["answer"]])
        out["mc_correct"] = logits[:, letter_ids].argmax(-1).numpy() == truth
    else:
        out["mc_correct"] = np.zeros(0, bool)
    neu = _ids(sets.neutral, ids_col)
    if neu:
        nll, tokens = _sorted_call(lambda r: measures.sequence_nll(model, r, pad), neu, lambda r: r, batch_size)
        out["nll"], out["tokens"] = nll.numpy(), tokens.numpy()
    else:
        out["nll"], out["tokens"] = np.zeros(0), np.zeros(0, np.int64)
    out["chars"] = np.array([len(t) for t in sets.neutral["text"]], dtype=np.int64)
    if sets.target is not None:
        goal, tgt = sets.goal, _ids(sets.target, ids_col)
        conts = [enc(c) for c in goal.continuations(sets.target)] if tgt else []
        refs = goal.references(sets.target)
        n_new = max((len(c) for c in conts), default=1) + 2
        kinds = list(sets.target["answer_kind"]) if goal.measure == "answer" else None
        out["target_hit"] = measures.judge(goal.judge_kind, greedy(tgt, n_new), refs, kinds) if tgt else np.zeros(0, bool)
        out["target_logprob"] = np.asarray(scores(list(zip(tgt, conts)))[0], dtype=float)
    return out


def math_outcome_counts(m: Mapping[str, np.ndarray]) -> dict[str, int]:
    """``{outcome: rows}`` of one model's math answers, every :data:`mechdiff.data.answers.OUTCOMES` key present
    (zeros included); the counts add up to the number of math prompts."""
    got = [str(o) for o in m.get("math_outcome", [])]
    return {o: got.count(o) for o in OUTCOMES}


def _per_prompt(m: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    """measure -> (value per prompt, denominator per prompt or None for a plain mean) for :func:`gap_table`."""
    nll = np.asarray(m["nll"], float)
    return {"refusal_rate": (m["refused"].astype(float), None), "refusal_soft": (m["refusal_soft"], None),
            "false_refusal": (m["false_refusal"].astype(float), None),
            "math_acc": (m["math_correct"].astype(float), None), "math_logprob": (m["math_logprob"], None),
            "mc_acc": (m["mc_correct"].astype(float), None),
            "ppl_token": (nll, np.asarray(m["tokens"], float)), "ppl_char": (nll, np.asarray(m["chars"], float)),
            **({"target_rate": (np.asarray(m["target_hit"], float), None), "target_logprob": (m["target_logprob"], None)}
               if "target_hit" in m else {})}


def _stat(num: np.ndarray, den: np.ndarray | None):
    """Mean of ``num`` over its last (prompt) axis, or ``exp(sum num / sum den)`` for a perplexity."""
    return num.mean(-1) if den is None else np.exp(num.sum(-1) / den.sum(-1))


def gap_table(base: Mapping[str, np.ndarray], tuned: Mapping[str, np.ndarray], n_boot: int = 1000,
              seed: int = 0) -> pd.DataFrame:
    """One row per measure: ``n``, ``base``, ``tuned``, ``delta`` (tuned - base) with 95% bootstrap
    intervals by prompt (``*_lo``, ``*_hi``; the delta's paired), and the description. A measure without
    prompts gets NaN values and ``n = 0``; the :data:`TARGET_MEASURES` rows come only when measured."""
    rows = []
    pb, pt = _per_prompt(base), _per_prompt(tuned)
    for name, (family, desc) in {**MEASURES, **{k: v for k, v in TARGET_MEASURES.items() if k in pb}}.items():
        (nb, db), (nt, dt) = pb[name], pt[name]
        n = len(nb)
        row = {"measure": name, "prompts": family, "n": n, "description": desc}
        if n == 0:
            rows.append({**row, **{f"{k}{s}": np.nan for k in ("base", "tuned", "delta") for s in ("", "_lo", "_hi")}})
            continue
        idx = resample_indices(n, n_boot, seed)
        vb, vt = _stat(nb, db), _stat(nt, dt)
        bb, bt = _stat(nb[idx], None if db is None else db[idx]), _stat(nt[idx], None if dt is None else dt[idx])
        for key, value, boot in (("base", vb, bb), ("tuned", vt, bt), ("delta", vt - vb, bt - bb)):
            lo, hi = percentile_interval(boot)
            row.update({key: float(value), f"{key}_lo": float(lo), f"{key}_hi": float(hi)})
        rows.append(row)
    cols = ["measure", "prompts", "n"] + [f"{k}{s}" for k in ("base", "tuned", "delta") for s in ("", "_lo", "_hi")]
    return pd.DataFrame(rows)[cols + ["description"]]


MASS_PROMPTS_PER_LANGUAGE = 64


def masked_mass(models, frame, id_map: dict) -> dict:
    """``{language: {"base": mass, "tuned": mass}}``: the mean probability each model puts outside the shared
    ids at the last prompt token (what the logit mask removes), on up to 64 prompts per language."""
    out: dict[str, dict[str, float]] = {}
    for side, model, col in zip(("base", "tuned"), models, ("base_input_ids", "tuned_input_ids")):
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        for lang, sub in frame.groupby("language", sort=True):
            ids = [list(x) for x in sub[col].head(MASS_PROMPTS_PER_LANGUAGE)]
            lost = masked_mass_at_last(model, ids, id_map[f"{side}_ids"], pad)
            out.setdefault(str(lang), {})[side] = float(lost.mean()) if len(lost) else 0.0
    return out
