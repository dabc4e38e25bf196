"""Normalising a source's records into prompt rows of the schema (:mod:`mechdiff.data.prompt_schema`): the
field mapping, MC prompts, reference answers, what a row takes from its file's name, and bad rows.

Field mapping
-------------
``DatasetSpec.fields`` maps schema columns (``text``, ``answer``, ``choices``, ``language``, ``id``,
``group``, ``topic``) to source columns. Two columns may be combined with a comma:
``text: "instruction,input"`` joins the non-empty values with a blank line; ``choices: "A,B,C,D"``
collects separate option columns into one list (a single ``choices`` column may instead hold a list, or
a ``{"text": [...], ...}`` mapping). ``answer_format`` says how ``answer`` is read: ``gsm8k`` (after
``####``), ``boxed`` (last ``\\boxed{}``), ``letter`` (``"B"``), ``index`` (0-based -> letter),
``plain`` (as written, numbers normalised) or ``none``.

MC options keep the letters they have in the source: ``["", "T", "Ж", ""]`` becomes ``B) T`` and
``C) Ж`` (an empty option is not shown, and keeps its ``""`` place in ``choices``); a row is never
re-lettered.

Names of files
--------------
For a folder or glob (:mod:`mechdiff.data.source_files`), a row's default id is
``"{source}-{name without suffix}-{row}"`` and, when ``fields.topic`` is not mapped, its topic is the
file's stem minus a trailing split tag (``history_test`` -> ``history``), or the parent folder's name when
the stem is only a split tag (``history/test.jsonl`` -> ``history``).

With ``split_from_path: true`` the source keeps its own dev/test split: the file's name is cut into
words at ``/ _ - .`` and spaces; a word ``dev``, ``val``, ``valid`` or ``validation`` puts the file in
dev, ``test`` in test. A file with neither (e.g. ``train``) or both is an error naming the file. For a
single file the name is its file name (``harmful_val.json`` -> dev).

Bad rows
--------
A row that cannot become a prompt is *bad*: its reason is one of ``empty_text``,
``text_not_a_string`` (the prompt text must be a string: a list, mapping, number or boolean is not),
``choices_not_a_list``, ``choice_not_text``, ``empty_choices`` (fewer than two non-empty options),
``empty_answer``, ``unreadable_answer``, ``answer_points_at_empty_choice``, ``no_language`` or
``<field>_not_text`` (an id, group, topic or language that is a list, mapping or boolean).
``on_bad_row="skip"`` leaves it out and records it (:class:`Skipped`); ``"error"`` raises at the first.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechdiff.data.answers import AnswerError, extract_boxed, extract_gsm8k, extract_letter, normalise_number
from mechdiff.data.prompt_schema import COLUMNS, SourceError, check_field_keys, check_unique_ids, conform, field_columns
from mechdiff.data.source_files import SourceFile
from mechdiff.params.config import DatasetSpec

ANSWER_CUES = {"en": "Answer:", "kk": "Жауабы:", "ru": "Ответ:"}
DEV_WORDS = frozenset({"dev", "val", "valid", "validation"})
TEST_WORDS = frozenset({"test"})
SPLIT_TAG = re.compile(r"[-_. ](?:dev|val|valid|validation|test|train)$", re.IGNORECASE)
SPLIT_TAGS = DEV_WORDS | TEST_WORDS | {"train"}
BAD_ROW_FIX = "fix the row, or set `data.on_bad_row: skip` to skip bad rows (they are counted in data.json)"


class BadRowError(SourceError):
    """One source row cannot become a prompt; ``reason`` is its short code (see the module docstring)."""

    def __init__(self, message: str, reason: str = "bad_row"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BadRow:
    """A row left out: its label (source, record, file, id), reason code and what is wrong."""

    label: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Skipped:
    """How many rows a source had, and the bad rows left out of it."""

    read: int
    bad: tuple[BadRow, ...] = ()

    def reasons(self) -> dict[str, int]:
        """Reason -> count, most frequent first."""
        counts = Counter(b.reason for b in self.bad)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def line(self, source: str) -> str:
        """One line for the log: ``kk_mc: skipped 3 of 812 rows (2 empty_choices, ...); first: <row>``."""
        why = ", ".join(f"{n} {r}" for r, n in self.reasons().items())
        first = f"; first: {self.bad[0].label}" if self.bad else ""
        return f"{source}: skipped {len(self.bad)} of {self.read} rows ({why}){first}"


def normalise_files(files: list[SourceFile], spec: DatasetSpec, source_name: str,
                    on_bad_row: str = "error") -> tuple[pd.DataFrame, Skipped]:
    """Map a source's files onto the prompt schema; with ``split_from_path`` add each file's ``split``.

    Parameters
    ----------
    files : list of SourceFile
        From :func:`mechdiff.data.source_files.load_files`.
    spec : DatasetSpec
        Field mapping, ``answer_format``, ``language``, ``task``, ``target``, ``split_from_path``.
    source_name : str
        The dataset's name in the pair; fills ``source`` and default ids ``"{source_name}-{i}"``.
    on_bad_row : {"error", "skip"}
        What a bad row does (see the module docstring): raise, or be left out and counted.

    Returns
    -------
    (frame, Skipped)

    Raises
    ------
    SourceError
        Unmapped prompt text, no language at all, duplicate ids, a file whose split cannot be read;
        with ``on_bad_row="error"`` a bad row (:class:`BadRowError`, or the ``AnswerError`` of an
        unreadable answer), naming the source, the row and the fix.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    check_field_keys(spec, f"dataset {source_name!r}")
    if spec.answer_format != "none" and "answer" not in spec.fields:
        raise SourceError(f"dataset {source_name!r}: answer_format {spec.answer_format!r} needs "
                          "`fields.answer` (the column holding the reference answer)")
    if "language" not in spec.fields and not spec.language:
        raise SourceError(f"dataset {source_name!r}: set `language:` (e.g. en, kk) or map `fields.language`")
    rows, bad = [], []
    for f in files:
        context = _file_context(f, spec, source_name)
        for i, rec in enumerate(f.records):
            try:
                rows.append(_row(rec, i, spec, source_name, context))
            except (BadRowError, AnswerError) as err:
                if on_bad_row == "error":
                    raise _with_fix(err) from None
                bad.append(BadRow(_row_label(rec, i, spec, source_name, context),
                                  getattr(err, "reason", "unreadable_answer"), str(err)))
    columns = list(COLUMNS) + (["split"] if spec.split_from_path else [])
    frame = conform(pd.DataFrame(rows, columns=columns))
    check_unique_ids(frame, f"dataset {source_name!r}")
    return frame, Skipped(sum(len(f.records) for f in files), tuple(bad))


def _with_fix(err: Exception) -> Exception:
    """The same kind of error, its message ending with the fix for a bad row."""
    out = type(err)(f"{err}; {BAD_ROW_FIX}")
    if isinstance(err, BadRowError):
        out.reason = err.reason
    return out


@dataclass(frozen=True)
class _FileContext:
    """What a row takes from its file: id prefix, label suffix, default topic and split."""

    id_prefix: str
    where: str
    topic: str | None
    split: str | None


def _file_context(f: SourceFile, spec: DatasetSpec, source_name: str) -> _FileContext:
    stem = _without_suffix(f.name)
    split = file_split(f.name, source_name) if spec.split_from_path else None
    if not f.in_folder:
        return _FileContext(source_name, "", None, split)
    return _FileContext(f"{source_name}-{stem}", f" of {f.name}", topic_from_name(f.name), split)


def topic_from_name(name: str) -> str | None:
    """The topic a file's name gives: its stem minus a trailing split tag (``history_test`` -> ``history``);
    the parent folder's name when the stem is only a split tag (``history/test.jsonl`` -> ``history``)."""
    path = Path(name)
    stem = SPLIT_TAG.sub("", path.stem)
    if stem.lower() in SPLIT_TAGS:
        stem = path.parent.name
    return stem or None


def file_split(name: str, source_name: str = "") -> str:
    """``dev`` or ``test`` from a file's name (its path below the source folder); see the module docstring.

    Raises :class:`SourceError` naming the file when its words hold neither split, or both.
    """
    words = {w for w in re.split(r"[/_\-.\s]+", _without_suffix(name).lower()) if w}
    dev, test = bool(words & DEV_WORDS), bool(words & TEST_WORDS)
    if dev != test:
        return "dev" if dev else "test"
    problem = "both a dev and a test word" if dev else "no dev/test word"
    raise SourceError(
        f"dataset {source_name!r}: split_from_path cannot place file {name!r}: its name has {problem} "
        f"(dev: {sorted(DEV_WORDS)}, test: ['test'], as words split at / _ - . and spaces). Rename or "
        "move the file, narrow `path:` to the dev and test files, or drop `split_from_path`")


def _without_suffix(name: str) -> str:
    return re.sub(r"\.[^./]*$", "", name)


def _get(rec: dict, col: str, label: str, key: str) -> Any:
    if col not in rec:
        raise SourceError(f"{label}: no field '{col}' (mapped by fields.{key}); its fields are {sorted(rec)}")
    return rec[col]


def _kind(value: Any) -> str:
    """``a list (['what is', 'this'])``: a value's type and a short repr, for messages."""
    text = repr(value)
    return f"a {type(value).__name__} ({text[:60] + '...' if len(text) > 60 else text})"


def _optional_str(rec: dict, spec: DatasetSpec, key: str, label: str) -> str | None:
    if key not in spec.fields:
        return None
    value = _get(rec, spec.fields[key], label, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRowError(f"{label}: fields.{key} column {spec.fields[key]!r} holds {_kind(value)}, "
                          "expected a string", f"{key}_not_text")
    return str(value).strip() or None


def _text(rec: dict, spec: DatasetSpec, label: str) -> str:
    parts = []
    for col in field_columns(spec.fields["text"]):
        value = _get(rec, col, label, "text")
        if value is not None and not isinstance(value, str):
            raise BadRowError(f"{label}: prompt text column {col!r} holds {_kind(value)}, expected a string",
                              "text_not_a_string")
        if value and value.strip():
            parts.append(value.strip())
    if not parts:
        raise BadRowError(f"{label}: empty prompt text in {spec.fields['text']!r}", "empty_text")
    return "\n\n".join(parts)


def _option(value: Any, label: str) -> str:
    """One MC option as text: ``""`` when empty; a number as written; a list, mapping or boolean is bad."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRowError(f"{label}: an option holds {_kind(value)}, expected text", "choice_not_text")
    return str(value).strip()


def _choices(rec: dict, spec: DatasetSpec, label: str) -> list[str] | None:
    """The options in source order; an empty one stays as ``""`` so every option keeps its letter."""
    if "choices" not in spec.fields:
        return None
    cols = field_columns(spec.fields["choices"])
    if len(cols) > 1:
        values = [_get(rec, c, label, "choices") for c in cols]
    else:
        values = _get(rec, cols[0], label, "choices")
        if isinstance(values, dict) and "text" in values:
            values = values["text"]
        if not isinstance(values, (list, tuple)):
            raise BadRowError(f"{label}: fields.choices column {cols[0]!r} holds {_kind(values)}, expected a "
                              "list (or name several option columns, e.g. 'A,B,C,D')", "choices_not_a_list")
    options = [_option(v, label) for v in values]
    if sum(bool(o) for o in options) < 2:
        raise BadRowError(f"{label}: fewer than two non-empty choices in {spec.fields['choices']!r} "
                          f"({options!r})", "empty_choices")
    return options


def mc_prompt(question: str, choices: list[str], language: str) -> str:
    """Question, lettered options ``A) ...`` one per line, and an answer cue in ``language``.

    Each option keeps the letter of its position; an empty option (``""``) is not shown.
    """
    lines = [question.rstrip()] + [f"{chr(65 + j)}) {c}" for j, c in enumerate(choices) if c]
    return "\n".join(lines + [ANSWER_CUES.get(language, ANSWER_CUES["en"])])


def _answer(rec: dict, spec: DatasetSpec, label: str, choices: list[str] | None) -> str | None:
    fmt = spec.answer_format
    if fmt == "none":
        return None
    value = _get(rec, spec.fields["answer"], label, "answer")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadRowError(f"{label}: empty reference answer in {spec.fields['answer']!r}", "empty_answer")
    if fmt == "gsm8k":
        return extract_gsm8k(value, label)
    if fmt == "boxed":
        return extract_boxed(value, label)
    if fmt in ("letter", "index"):
        return _letter(value, fmt, choices, label)
    return normalise_number(str(value).strip())


def _letter(value: Any, fmt: str, choices: list[str] | None, label: str) -> str:
    """The gold letter; a letter that points at an empty option makes the row bad."""
    if fmt == "index" and not (isinstance(value, int) or str(value).strip().isdigit()):
        raise AnswerError(f"{label}: answer_format 'index' expects a 0-based integer, got {value!r}")
    letter = extract_letter(value, len(choices) if choices else 4, label)
    if choices and not choices[ord(letter) - 65]:
        raise BadRowError(f"{label}: the answer {letter} points at an empty option ({choices!r})",
                          "answer_points_at_empty_choice")
    return letter


def _row_id(rec: dict, i: int, spec: DatasetSpec, source_name: str, context: _FileContext) -> str:
    rid = _optional_str(rec, spec, "id", f"{source_name} record {i + 1}{context.where}")
    return rid or f"{context.id_prefix}-{i}"


def _row_label(rec: dict, i: int, spec: DatasetSpec, source_name: str, context: _FileContext) -> str:
    """``kk_mc record 3 of test/history.jsonl (id '...')``; the id is left out when it is itself bad."""
    where = f"{source_name} record {i + 1}{context.where}"
    try:
        return f"{where} (id {_row_id(rec, i, spec, source_name, context)!r})"
    except BadRowError:
        return where


def _row(rec: dict, i: int, spec: DatasetSpec, source_name: str, context: _FileContext) -> dict:
    rid = _row_id(rec, i, spec, source_name, context)
    label = f"{source_name} record {i + 1}{context.where} (id {rid!r})"
    language = _optional_str(rec, spec, "language", label) or spec.language
    if not language:
        raise BadRowError(f"{label}: no language (empty fields.language value and no `language:` default)",
                          "no_language")
    choices = _choices(rec, spec, label)
    text = _text(rec, spec, label)
    if choices:
        text = mc_prompt(text, choices, language)
    row = {"id": rid, "text": text, "language": language, "task": spec.task,
           "group": _optional_str(rec, spec, "group", label) or rid,
           "answer": _answer(rec, spec, label, choices), "choices": choices,
           "topic": _optional_str(rec, spec, "topic", label) or context.topic, "target": bool(spec.target),
           "source": source_name}
    return {**row, "split": context.split} if context.split else row

