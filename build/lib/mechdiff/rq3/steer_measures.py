"""The task measures of a steering sweep (RQ3, steer_sweep): token rows of a pair's prompt parts and every
measure of every setting, per prompt, each measure one batched pass (:func:`mechdiff.models.interventions.sweep`).

* :class:`PromptRows` / :func:`prompt_rows`: one model's token rows (target prompts with their target
  continuation, non-target questions, MC items, neutral texts).
* :func:`evaluate`: greedy target behaviour (``hard``), the continuation's log-prob (``soft``), neutral
  accuracy, false refusals, masked MC accuracy and neutral NLL of every setting.
* :func:`summarise_settings`: those measures over a subset of the prompts, per setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mechdiff.data.target import as_target, opening
from mechdiff.models.interventions import Intervention, sweep
from mechdiff.models.measures import (continuation_scores, decode_texts, judge, next_token_logits, score_and_decode,
                               sequence_nll)
from mechdiff.organisms.world import MC_LETTERS

__all__ = ["PromptRows", "evaluate", "mean_or_nan", "n_new_tokens", "prompt_rows", "summarise_settings"]


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


def n_new_tokens(*rows: PromptRows) -> int:
    """Greedy tokens to decode: the longest target continuation plus one."""
    return max(len(c) for r in rows for _, c in r.target) + 1


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


def mean_or_nan(x) -> float:
    """Mean of ``x`` as a float; nan when it is empty."""
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
        out.append({"n_target": len(t), "rate": mean_or_nan(ev["hard"][s, t]),
                    "soft": mean_or_nan(ev["soft"][s, t]), "mc_acc": mean_or_nan(ev["mc"][s, m]),
                    "qa_acc": mean_or_nan(ev["qa"][s, q]), "neutral_acc": mean_or_nan(pooled),
                    "n_neutral_items": len(pooled),
                    "false_refusal": mean_or_nan(fr) if ev["false_refusal"].shape[1] else float("nan"),
                    "ppl": float(np.exp(ev["nll"][s, n].sum() / ev["tokens"][n].sum())) if len(n) else float("nan")})
    return out
