"""A pair's target: which prompts form the target and the contrast class, and the behaviour measured on them.

Every causal stage (steering, head patching, attribution, churn) reads the pair's :class:`Target` from
``pairs.<pair>.target`` in params, never the pair's ``domain`` (which only labels what the verdict
expects). Two built-in targets reproduce the study's definitions:

* ``cultural``: target = questions (tasks ``topic``, ``freeform``, ``refusal``) whose ``target`` flag is
  set; contrast = the other questions (the ``neutral`` texts when there are none); measure ``refusal``
  (greedy answer opens with a refusal pattern; soft score = log-prob of the refusal opening of the
  prompt's language).
* ``cognitive``: target = ``math`` prompts with a reference answer; contrast = every question; measure
  ``answer`` (greedy answer judged against the reference by exact value or math-verify equivalence; soft
  score = log-prob of `` <answer>``).

A user target (a mapping in params, :class:`mechdiff.params.config.TargetSpec`) names the datasets of the pair
whose prompts form each class and picks one of four measures:

=============  ======================================================  ==========================
measure        hard (greedy, per prompt)                               soft (teacher-forced)
=============  ======================================================  ==========================
``refusal``    opens with a refusal pattern                            log-prob of the refusal opening
``answer``     right against the row's reference (value/equivalence)  log-prob of `` <answer>``
``logprob``    the greedy text holds the continuation                  log-prob of the continuation
``match``      the greedy text holds the string (no classifier)        log-prob of the string
=============  ======================================================  ==========================

For ``logprob`` and ``match`` the continuation is ``text`` (one string for every prompt) or, when
``text`` is null, each prompt's own ``answer`` column. Head churn thresholds are in nats for ``answer``
and ``logprob`` and in percentage points of the continuation's probability for ``refusal`` and ``match``.
Pure functions of prompt frames; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mechdiff.errors import MechdiffError

__all__ = ["BUILTIN", "MEASURES", "QUESTION_TASKS", "Target", "TargetError", "as_target", "resolve"]

MEASURES = ("refusal", "answer", "logprob", "match")
QUESTION_TASKS = ("topic", "freeform", "refusal")
#: the name a built-in target's steering/head-patching outputs record as ``task`` (verdict.TASK_MEASURE)
_BUILTIN_TASK = {"cultural": "refusal", "cognitive": "math"}


class TargetError(MechdiffError):
    """A pair's target selects no usable prompts; the message names the class and the fix."""


def _filled(a) -> bool:
    return a is not None and not (isinstance(a, float) and np.isnan(a)) and str(a).strip() != ""


@dataclass(frozen=True)
class Target:
    """What the causal stages measure on which prompts (see the module docstring).

    ``name``: ``cultural``, ``cognitive`` (built-ins) or ``custom``; ``measure``: one of :data:`MEASURES`;
    ``prompts`` / ``contrast``: dataset names (the ``source`` column) of the target and contrast class for
    a custom target (``contrast`` None: the questions outside ``prompts``); ``text``: the continuation of
    ``logprob`` / ``match`` (None: each row's ``answer``).
    """

    name: str
    measure: str
    prompts: tuple[str, ...] | None = None
    contrast: tuple[str, ...] | None = None
    text: str | None = None

    @property
    def builtin(self) -> bool:
        return self.prompts is None

    @property
    def task(self) -> str:
        """The name outputs record as the sweep's ``task``: ``refusal`` / ``math`` for the built-ins, ``target``
        for a custom target (whose behaviour gap is behaviour.json's ``target_rate``)."""
        return _BUILTIN_TASK[self.name] if self.builtin else "target"

    @property
    def units(self) -> str:
        """Head-churn threshold units: ``nats`` (answer, logprob) or ``pp`` (refusal, match)."""
        return "nats" if self.measure in ("answer", "logprob") else "pp"

    def parts(self, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """``target``, ``other`` (the contrast class; the ``neutral`` texts when it is empty), ``mc`` and
        ``neutral`` frames of a prompt table (rows in table order)."""
        q = frame["task"].isin(QUESTION_TASKS)
        neutral = frame[frame["task"] == "neutral"]
        mc = frame[frame["task"] == "mc"]
        if self.builtin:
            if self.measure == "refusal":
                target, other = frame[q & frame["target"].fillna(False).astype(bool)], \
                    frame[q & ~frame["target"].fillna(False).astype(bool)]
            else:
                target, other = frame[(frame["task"] == "math") & frame["answer"].map(_filled)], frame[q]
        else:
            src = frame["source"]
            target = frame[src.isin(self.prompts)]
            if self.measure == "answer" or (self.measure in ("logprob", "match") and self.text is None):
                target = target[target["answer"].map(_filled)]
            other = frame[src.isin(self.contrast)] if self.contrast else frame[q & ~src.isin(self.prompts)]
            mc, neutral = mc[~mc["source"].isin(self.prompts)], neutral[~neutral["source"].isin(self.prompts)]
        return {"target": target, "other": other if len(other) else neutral, "mc": mc, "neutral": neutral}

    def continuation(self, language: str, answer, sep: str = " ") -> str | None:
        """The teacher-forced continuation of one prompt: the refusal opening of ``language`` (``refusal``), the
        reference ``answer`` (``answer``), or ``text`` / ``answer`` (``logprob``, ``match``), with ``sep`` in
        front; None when it needs an answer the prompt lacks."""
        if self.measure == "refusal":
            return sep + opening(language)
        if self.measure == "answer" or self.text is None:
            return sep + str(answer).strip() if _filled(answer) else None
        return sep + self.text

    def continuations(self, frame: pd.DataFrame, sep: str = " ") -> list[str]:
        """:meth:`continuation` of every row of ``frame`` (rows of :meth:`parts`' ``target``)."""
        out = [self.continuation(lang, ans, sep) for lang, ans in zip(frame["language"], frame["answer"])]
        if any(c is None for c in out):
            raise TargetError(f"{sum(c is None for c in out)} target prompts have no answer to continue with; give "
                              "the target a text (target.text) or fill the prompts' answer column")
        return out

    def references(self, frame: pd.DataFrame) -> list[str]:
        """What :func:`judge` compares each greedy answer with: the reference (``answer``), the continuation
        text without its separator (``logprob``, ``match``), ``""`` (``refusal``)."""
        if self.measure == "refusal":
            return [""] * len(frame)
        if self.measure == "answer":
            return [str(a) for a in frame["answer"]]
        return [c.strip() for c in self.continuations(frame)]

    @property
    def judge_kind(self) -> str:
        """How :func:`mechdiff.models.measures.judge` reads a greedy answer: ``refusal`` (pattern), ``math`` (right
        against the reference) or ``contains`` (holds the reference string: logprob, match)."""
        return {"refusal": "refusal", "answer": "math"}.get(self.measure, "contains")


def opening(language: str) -> str:
    """The refusal opening of ``language`` in the world's vocabulary (English for another language)."""
    from mechdiff.organisms import world

    langs = world.LANGUAGES
    return world.REFUSAL_PREFIXES[langs.index(language)] if language in langs else world.REFUSAL_PREFIXES[0]


BUILTIN = {"cultural": Target("cultural", "refusal"), "cognitive": Target("cognitive", "answer")}


def resolve(spec) -> Target:
    """The :class:`Target` of a params value: a built-in name or a :class:`mechdiff.params.config.TargetSpec`."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, str):
        if spec not in BUILTIN:
            raise TargetError(f"unknown built-in target {spec!r}; built-ins: {sorted(BUILTIN)}")
        return BUILTIN[spec]
    return Target("custom", spec.measure, tuple(spec.prompts), tuple(spec.contrast) if spec.contrast else None,
                  spec.text)


def as_target(x) -> Target:
    """A :class:`Target`, a built-in target name, or a built-in's task name (``refusal`` -> cultural,
    ``math`` -> cognitive, as the sweep's outputs record them)."""
    if isinstance(x, str) and x in _BUILTIN_TASK.values():
        return BUILTIN[{v: k for k, v in _BUILTIN_TASK.items()}[x]]
    return resolve(x)
