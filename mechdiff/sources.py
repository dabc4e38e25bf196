"""Prompt sources: load a dataset (local file, Hugging Face Hub, or the synthetic world) and normalise it
to the one prompt schema every later stage reads.

Pure functions: nothing here writes a file (the ``prepare_data`` stage does); reading a source is the
only I/O.

Prompt schema
-------------
One row per prompt. ``normalise``, ``world_frame`` and ``prepare_pair`` return exactly these columns:

===========  ===================  ==============================================================
column       dtype                meaning
===========  ===================  ==============================================================
``id``       str                  unique prompt id (``fields.id`` or ``"{source}-{row index}"``)
``text``     str                  the prompt as fed to the model (MC: question + lettered options
                                  ``A) ...`` + an answer cue such as ``Answer:`` / ``Жауабы:``)
``language`` str                  ISO code, e.g. ``en``, ``kk``
``task``     str                  the dataset's ``task`` (``freeform``, ``mc``, ``math``, ``refusal``,
                                  ``neutral``); world rows carry their own (``topic``, ``math``,
                                  ``mc``, ``neutral``)
``group``    str                  translation-pair id: the EN and KK versions of an item share it;
                                  defaults to ``id``. Sampling and splits never separate a group
``answer``   object (str | None)  canonical reference answer (see ``answer_format``), else None
``choices``  object (list[str] |  MC option texts by letter position, ``""`` for an empty option
             None)                (world MC: the letters), else None
``topic``    object (str | None)  topic / category label, else None
``target``   bool                 True where the fine-tune's target behaviour is expected
``source``   str                  dataset name (the key under ``pairs.<pair>.datasets``)
``split``    str                  ``dev`` | ``test`` -- added by :func:`assign_splits` /
                                  :func:`prepare_pair` only
===========  ===================  ==============================================================

After a Parquet round trip pandas reads missing ``answer``/``topic`` as NaN and ``choices`` as arrays;
:func:`conform` restores None and lists.

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

Files, folders and globs
------------------------
``path:`` (relative to the project root, or absolute) is one file, a folder, or a glob such as
``data/sources/kk_mc/*/*.jsonl``. A folder is read recursively; a folder or glob reads every file with
a supported suffix (``.jsonl .ndjson .json .csv .tsv .parquet``; hidden files are skipped) in sorted
order of the file's *name*: its path below the folder (for a glob, below its last folder without
wildcards). For a folder or glob, a row's default id is ``"{source}-{name without suffix}-{row}"`` and,
when ``fields.topic`` is not mapped, its topic is the file's stem minus a trailing split tag
(``history_test`` -> ``history``), or the parent folder's name when the stem is only a split tag
(``history/test.jsonl`` -> ``history``).

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

Sampling and splits
-------------------
``DatasetSpec.n`` counts *groups* (an EN/KK pair counts once). Both the sample and the dev/test split
rank each group by a SHA-256 hash of (seed, group id), so they are deterministic and adding or
removing rows never moves any other group.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechdiff.answers import AnswerError, extract_boxed, extract_gsm8k, extract_letter, normalise_number
from mechdiff.config import DatasetSpec, PairSpec
from mechdiff.errors import MechdiffError
from mechdiff.world import evaluation_prompts

COLUMNS = ("id", "text", "language", "task", "group", "answer", "choices", "topic", "target", "source")
FIELD_KEYS = ("text", "answer", "choices", "language", "id", "group", "topic")
NULLABLE = ("answer", "choices", "topic")
LOCAL_FORMATS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
ANSWER_CUES = {"en": "Answer:", "kk": "Жауабы:", "ru": "Ответ:"}
DEFAULT_HUB_SPLIT = "train"
HUB_FIX = ("set `path:` to a local copy in the same format (jsonl/csv/parquet with the same columns), "
           "or check hub_id/hub_config/hub_split/revision and your network / `hf auth login` for gated sets")


GLOB_CHARS = frozenset("*?[")
DEV_WORDS = frozenset({"dev", "val", "valid", "validation"})
TEST_WORDS = frozenset({"test"})
SPLIT_TAG = re.compile(r"[-_. ](?:dev|val|valid|validation|test|train)$", re.IGNORECASE)
SPLIT_TAGS = DEV_WORDS | TEST_WORDS | {"train"}
BAD_ROW_FIX = "fix the row, or set `data.on_bad_row: skip` to skip bad rows (they are counted in data.json)"


class SourceError(MechdiffError):
    """A prompt source cannot be read or does not match its spec; the message names it and the fix."""


class BadRowError(SourceError):
    """One source row cannot become a prompt; ``reason`` is its short code (see the module docstring)."""

    def __init__(self, message: str, reason: str = "bad_row"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SourceFile:
    """The records of one file of a source.

    ``name``: the file's path below the folder ``path:`` names (posix; a single file: its file name; the
    Hub: ``""``). ``in_folder``: ``path:`` is a folder or a glob.
    """

    name: str
    records: list[dict]
    in_folder: bool = False


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


# --------------------------------------------------------------------------------------------------
# reading


def describe(spec: DatasetSpec, root: Path | None = None) -> str:
    """A human name for where ``spec`` reads from (used in every error message)."""
    if spec.path:
        p = _resolve(spec.path, root) if root is not None else Path(spec.path)
        over = f" (local copy of Hub dataset '{spec.hub_id}')" if spec.kind == "hub" else ""
        what = "files matching" if GLOB_CHARS & set(spec.path) else "folder" if p.is_dir() else "file"
        return f"{what} {p}{over}"
    if spec.kind == "hub":
        cfg = f", config {spec.hub_config!r}" if spec.hub_config else ""
        return (f"Hub dataset '{spec.hub_id}'{cfg}, split {spec.hub_split or DEFAULT_HUB_SPLIT!r}, "
                f"revision {spec.revision!r}")
    return f"{spec.kind} source"


def load_raw(spec: DatasetSpec, root: Path) -> list[dict]:
    """All records of a source (every file of a folder or glob, in order) as plain dicts; see :func:`load_files`."""
    return [r for f in load_files(spec, root) for r in f.records]


def load_files(spec: DatasetSpec, root: Path) -> list[SourceFile]:
    """Read a source's files and check their records against ``spec.fields``.

    Parameters
    ----------
    spec : DatasetSpec
        ``kind`` ``file`` or ``hub``; a set ``path`` (a file, folder or glob, relative to ``root`` or
        absolute) always wins over the Hub.
    root : Path
        Project root for relative paths.

    Raises
    ------
    SourceError
        Missing, empty or non-UTF-8 file; unknown format; a folder or glob without data files;
        unreachable Hub dataset; a record lacking a mapped field (names the field and the file);
        duplicate ids.
    """
    if spec.kind == "world":
        raise SourceError("a 'world' dataset has no raw records; build it with world_frame(spec, seed)")
    where = describe(spec, root)
    _check_field_keys(spec, where)
    if spec.path:
        found, in_folder = local_files(spec.path, root, where)
        labels = [f"file {path}" if in_folder else where for _, path in found]
        files = [SourceFile(name, _read_local(path, label), in_folder)
                 for (name, path), label in zip(found, labels)]
    elif spec.kind == "hub":
        files, labels = [SourceFile("", _load_hub(spec, where))], [where]
    else:
        raise SourceError(f"{where}: kind 'file' needs `path:`")
    for f, label in zip(files, labels):
        if not f.records:
            raise SourceError(f"{label}: holds no records; point `path:` at a non-empty file")
        _check_records(f.records, spec, label)
    _check_unique_ids([r for f in files for r in f.records], spec, where)
    return files


def local_files(path: str, root: Path, where: str = "") -> tuple[list[tuple[str, Path]], bool]:
    """The files ``path`` names as (name, path) in sorted order of name, and whether it is a folder or glob.

    A folder (read recursively) or glob keeps files with a supported suffix, hidden ones skipped; the
    name is the path below the folder (a glob: below its last folder without wildcards). A single file
    is returned as it is, named by its file name. Raises :class:`SourceError` when a folder or glob
    holds no such file.
    """
    p = _resolve(path, root)
    if GLOB_CHARS & set(path):
        base, pattern = _glob_base(p)
        found = base.glob(pattern) if base.is_dir() else []
    elif p.is_dir():
        base, found = p, p.rglob("*")
    else:
        return [(p.name, p)], False
    files = sorted(((f.relative_to(base).as_posix(), f) for f in found if _data_file(f, base)),
                   key=lambda nf: nf[0])
    if not files:
        raise SourceError(f"{where or path}: no {'/'.join(LOCAL_FORMATS)} files found; fix `path:` "
                          "(relative paths start at the project root)")
    return files, True


def _glob_base(p: Path) -> tuple[Path, str]:
    """Split a glob into its last folder without wildcards and the pattern below it."""
    parts = p.parts
    first = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    return Path(*parts[:first]), "/".join(parts[first:])


def _data_file(f: Path, base: Path) -> bool:
    rel = f.relative_to(base).parts
    return f.is_file() and f.suffix.lower() in LOCAL_FORMATS and not any(x.startswith(".") for x in rel)


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def _read_local(path: Path, where: str) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.exists():
        raise SourceError(f"{where}: file not found; fix `path:` (relative paths start at the project root)")
    if suffix not in LOCAL_FORMATS:
        raise SourceError(f"{where}: unsupported format {suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    if not path.is_file():
        raise SourceError(f"{where}: not a file; fix `path:` (relative paths start at the project root)")
    if path.stat().st_size == 0:
        raise SourceError(f"{where}: file is empty (0 bytes)")
    if suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise SourceError(f"{where}: not a readable Parquet file ({type(err).__name__}: {err})") from None
        return [_clean_record(r) for r in frame.to_dict("records")]
    text = _read_text(path, where)
    if suffix in (".csv", ".tsv"):
        return _parse_csv(text, "\t" if suffix == ".tsv" else ",", where)
    if suffix == ".json":
        return _parse_json(text, where)
    return _parse_jsonl(text, where)


def _read_text(path: Path, where: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise SourceError(f"{where}: not valid UTF-8 at line {line} (byte {err.start}: "
                          f"{data[err.start:err.start + 4]!r}); re-save the file as UTF-8") from None


def _parse_jsonl(text: str, where: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{where}: line {lineno} is not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise SourceError(f"{where}: line {lineno} is a JSON {type(obj).__name__}, expected an object")
        records.append(obj)
    return records


def _parse_json(text: str, where: str) -> list[dict]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}); "
                          "for one object per line use the .jsonl suffix") from None
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise SourceError(f"{where}: expected a JSON list of objects")
    return obj


def _parse_csv(text: str, sep: str, where: str) -> list[dict]:
    if not text.strip():
        raise SourceError(f"{where}: file is empty")
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise SourceError(f"{where}: not a readable CSV file ({err})") from None
    return frame.to_dict("records")


def _load_hub(spec: DatasetSpec, where: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise SourceError(f"{where}: the `datasets` package is not installed (pip install datasets); "
                          f"or {HUB_FIX}") from None
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split or DEFAULT_HUB_SPLIT,
                                   revision=spec.revision)
    except Exception as err:  # connection, not-found, gated, bad revision: one user-facing message
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise SourceError(f"cannot load {where} ({reason}). Fix: {HUB_FIX}") from err
    return [_clean_record(dict(r)) for r in ds]


def _clean_value(v: Any) -> Any:
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()  # numpy scalars and arrays
    if isinstance(v, list):
        return [_clean_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean_value(x) for k, x in v.items()}
    if isinstance(v, float) and math.isnan(v):
        return None
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def _clean_record(record: dict) -> dict:
    return {str(k): _clean_value(v) for k, v in record.items()}


def _columns(spec_value: str) -> list[str]:
    return [c.strip() for c in spec_value.split(",") if c.strip()]


def _check_field_keys(spec: DatasetSpec, where: str) -> None:
    unknown = sorted(set(spec.fields) - set(FIELD_KEYS))
    if unknown:
        raise SourceError(f"{where}: unknown `fields:` key(s) {unknown}; allowed: {list(FIELD_KEYS)}")
    if "text" not in spec.fields:
        raise SourceError(f"{where}: `fields.text` must name the column holding the prompt text")


def _check_records(records: list[dict], spec: DatasetSpec, where: str) -> None:
    """Every mapped column present in every record."""
    for key, value in spec.fields.items():
        for col in _columns(value):
            for i, rec in enumerate(records):
                if col not in rec:
                    raise SourceError(
                        f"{where}: record {i + 1} has no field '{col}' (mapped by fields.{key}); "
                        f"its fields are {sorted(rec)}. Fix `fields.{key}` or the file")


def _check_unique_ids(records: list[dict], spec: DatasetSpec, where: str) -> None:
    if "id" not in spec.fields:
        return
    col = spec.fields["id"]
    counts = Counter(str(r.get(col)) for r in records)
    dups = sorted(k for k, c in counts.items() if c > 1)
    if dups:
        raise SourceError(f"{where}: duplicate ids in column '{col}' ({len(dups)} ids repeated, e.g. "
                          f"{dups[:5]}); ids must be unique -- fix the file or map `fields.id` elsewhere")


# --------------------------------------------------------------------------------------------------
# normalising


def normalise(records: list[dict], spec: DatasetSpec, source_name: str, on_bad_row: str = "error") -> pd.DataFrame:
    """Map the raw records of one file (or the Hub) onto the prompt schema (see the module docstring).

    ``on_bad_row``: ``"error"`` raises at the first bad row, ``"skip"`` leaves bad rows out (use
    :func:`normalise_files` to get them). Other errors as in :func:`normalise_files`.
    """
    return normalise_files([SourceFile("", records)], spec, source_name, on_bad_row)[0]


def normalise_files(files: list[SourceFile], spec: DatasetSpec, source_name: str,
                    on_bad_row: str = "error") -> tuple[pd.DataFrame, Skipped]:
    """Map a source's files onto the prompt schema; with ``split_from_path`` add each file's ``split``.

    Parameters
    ----------
    files : list of SourceFile
        From :func:`load_files`.
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
    _check_field_keys(spec, f"dataset {source_name!r}")
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
    for col in _columns(spec.fields["text"]):
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
    cols = _columns(spec.fields["choices"])
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


def conform(frame: pd.DataFrame) -> pd.DataFrame:
    """Give a prompt frame the schema's dtypes: None (not NaN) for missing, lists for ``choices``.

    Use it on a frame read back from Parquet. Extra columns (e.g. ``split``) are kept.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise SourceError(f"prompt frame lacks schema column(s) {missing}")
    out = frame.copy()
    for col in NULLABLE:
        out[col] = pd.Series([_nullable(v, col == "choices") for v in out[col]], index=out.index, dtype=object)
    for col in ("id", "text", "language", "task", "group", "source"):
        out[col] = out[col].astype(str)
    out["target"] = out["target"].astype(bool)
    return out


def _nullable(v: Any, is_list: bool) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if is_list:
        return [str(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]
    return str(v)


def check_unique_ids(frame: pd.DataFrame, what: str) -> None:
    """Raise :class:`SourceError` naming repeated ids (and their sources) in ``frame``."""
    dup = frame[frame["id"].duplicated(keep=False)]
    if len(dup):
        examples = dup.groupby("id")["source"].apply(lambda s: sorted(set(s))).head(5).to_dict()
        raise SourceError(f"{what}: {dup['id'].nunique()} prompt id(s) are not unique, e.g. {examples} "
                          "(id -> sources); map `fields.id` to a unique column or drop it to number rows")


# --------------------------------------------------------------------------------------------------
# the synthetic world


def world_frame(spec: DatasetSpec, seed: int, source_name: str = "world") -> pd.DataFrame:
    """The organisms' held-out evaluation prompts (:func:`mechdiff.world.evaluation_prompts`) as a frame.

    ``task`` and ``target`` come from each world prompt (``topic``/``math``/``mc``/``neutral``;
    ``target`` marks the policy topic). World MC ``choices`` are the option letters.
    """
    prompts = evaluation_prompts(seed, spec.world_n_math, spec.world_n_neutral)
    rows = [{"id": p.id, "text": p.text, "language": p.language, "task": p.task, "group": p.group,
             "answer": p.answer, "choices": list(p.choices) if p.choices else None, "topic": p.topic,
             "target": bool(p.target), "source": source_name} for p in prompts]
    frame = conform(pd.DataFrame(rows, columns=list(COLUMNS)))
    check_unique_ids(frame, f"world dataset {source_name!r}")
    return frame


# --------------------------------------------------------------------------------------------------
# sampling, splits, pairs


def _unit(key: str) -> float:
    """A uniform number in [0, 1) from a SHA-256 of ``key`` (stable across runs and platforms)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def sample(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """Keep ``n`` groups, chosen by a seeded hash of the group id (all rows of a chosen group stay).

    ``n=None`` or ``n`` >= the number of groups keeps everything. Row order is preserved.
    """
    if n is None:
        return frame.reset_index(drop=True)
    if n <= 0:
        raise ValueError(f"sample size n must be positive, got {n}")
    groups = list(dict.fromkeys(frame["group"]))
    if n >= len(groups):
        return frame.reset_index(drop=True)
    keep = set(sorted(groups, key=lambda g: (_unit(f"sample:{seed}:{g}"), g))[:n])
    return frame[frame["group"].isin(keep)].reset_index(drop=True)


def assign_splits(frame: pd.DataFrame, dev_fraction: float, seed: int) -> pd.DataFrame:
    """Add ``split`` (``dev``/``test``) by group: dev iff hash(seed, group) < ``dev_fraction``.

    Each group's split depends only on its id and the seed, so adding rows never reshuffles others.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    out = frame.copy()
    split = {g: ("dev" if _unit(f"split:{seed}:{g}") < dev_fraction else "test") for g in set(out["group"])}
    out["split"] = out["group"].map(split).astype(str)
    return out


def dataset_rows(spec: DatasetSpec, name: str, root: Path, seed: int,
                 on_bad_row: str = "error") -> tuple[pd.DataFrame, Skipped]:
    """One dataset of a pair in the prompt schema (unsampled; split only with ``split_from_path``) and the
    rows it left out."""
    if spec.kind == "world":
        frame = world_frame(spec, seed, name)
        return frame, Skipped(len(frame))
    return normalise_files(load_files(spec, root), spec, name, on_bad_row)


def prepare_pair(pair: PairSpec, root: Path, seed: int, dev_fraction: float,
                 pair_name: str = "pair", on_bad_row: str = "error") -> pd.DataFrame:
    """All datasets of ``pair`` as one split prompt frame; see :func:`prepare_pair_rows`."""
    return prepare_pair_rows(pair, root, seed, dev_fraction, pair_name, on_bad_row)[0]


def prepare_pair_rows(pair: PairSpec, root: Path, seed: int, dev_fraction: float, pair_name: str = "pair",
                      on_bad_row: str = "error") -> tuple[pd.DataFrame, dict[str, Skipped]]:
    """All datasets of ``pair``: loaded, normalised, sampled (``spec.n`` groups), concatenated, split.

    Datasets with ``split_from_path`` keep their files' split; the others get the seeded hash split.
    Returns the frame and, per dataset, the rows read and left out (``on_bad_row="skip"``).

    Raises
    ------
    SourceError
        Any source problem; no prompts at all or an empty dev/test split (the message names the pair,
        each dataset's row count and the param to change); ids not unique across datasets; a group
        whose rows lie in both the source's dev and test files.
    """
    loaded = {name: dataset_rows(spec, name, root, seed, on_bad_row) for name, spec in pair.datasets.items()}
    skipped = {name: s for name, (_, s) in loaded.items()}
    frames = {name: sample(f, pair.datasets[name].n, seed) for name, (f, _) in loaded.items()}
    counts = ", ".join(f"{name}={len(f)} rows" for name, f in frames.items())
    empty = [name for name, f in frames.items() if f.empty]
    if empty:
        why = "; ".join(skipped[n].line(n) for n in empty if skipped[n].bad)
        raise SourceError(f"pair {pair_name!r}: dataset(s) {empty} gave no prompts ({counts}"
                          f"{'; ' + why if why else ''}); check `pairs.{pair_name}.datasets.<name>.path`/`hub_*`, "
                          "`.fields` and `.n`")
    frame = pd.concat(list(frames.values()), ignore_index=True)
    check_unique_ids(frame, f"pair {pair_name!r}")
    frame = _split(frame, dev_fraction, seed, pair_name)
    for split in ("dev", "test"):
        if not (frame["split"] == split).any():
            own = " or add files of that split to a `split_from_path` dataset" if any(
                s.split_from_path for s in pair.datasets.values()) else ""
            raise SourceError(
                f"pair {pair_name!r}: the {split} split is empty ({frame['group'].nunique()} groups; {counts}); "
                f"add prompts (raise `pairs.{pair_name}.datasets.<name>.n`){own} or move `data.dev_fraction` "
                f"(now {dev_fraction}) toward 0.5")
    return frame, skipped


def _split(frame: pd.DataFrame, dev_fraction: float, seed: int, pair_name: str) -> pd.DataFrame:
    """The hash split, except where a row already has its source's split; a group never straddles both."""
    own = frame["split"] if "split" in frame else pd.Series([None] * len(frame), index=frame.index, dtype=object)
    out = assign_splits(frame.drop(columns="split", errors="ignore"), dev_fraction, seed)
    out["split"] = own.where(own.notna(), out["split"]).astype(str)
    mixed = out.groupby("group")["split"].nunique()
    mixed = sorted(mixed[mixed > 1].index)
    if mixed:
        raise SourceError(f"pair {pair_name!r}: {len(mixed)} group(s) have rows in both the dev and test split, "
                          f"e.g. {mixed[:5]}; with `split_from_path` a group's rows must come from files of "
                          "one split (fix `fields.group` or the files)")
    return out[list(COLUMNS) + ["split"]]


def summarise(frame: pd.DataFrame, skipped: dict[str, Skipped] | None = None) -> dict:
    """JSON-ready counts of a prepared frame: totals, per split, task, language and source.

    With ``skipped`` (from :func:`prepare_pair_rows`), each source also gets ``rows_read``,
    ``rows_skipped`` and ``skip_reasons`` (reason -> count), and the total ``rows_skipped``.
    """
    def counts(col: str, sub: pd.DataFrame) -> dict:
        return {str(k): int(v) for k, v in sorted(Counter(sub[col]).items())}

    sources = {}
    for name, sub in frame.groupby("source", sort=True):
        sources[str(name)] = {
            "prompts": int(len(sub)), "groups": int(sub["group"].nunique()),
            "with_answer": int(sub["answer"].notna().sum()), "target": int(sub["target"].sum()),
            "tasks": counts("task", sub), "languages": counts("language", sub),
            **({"splits": counts("split", sub)} if "split" in sub else {})}
    for name, s in (skipped or {}).items():
        sources.setdefault(name, {}).update(rows_read=s.read, rows_skipped=len(s.bad), skip_reasons=s.reasons())
    out = {"prompts": int(len(frame)), "groups": int(frame["group"].nunique()),
           "tasks": counts("task", frame), "languages": counts("language", frame), "sources": sources}
    if skipped is not None:
        out["rows_skipped"] = sum(len(s.bad) for s in skipped.values())
    if "split" in frame:
        out["splits"] = counts("split", frame)
    return out
