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
``choices``  object (list[str] |  MC option texts in letter order (world MC: the letters), else None
             None)
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
from collections import Counter
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


class SourceError(MechdiffError):
    """A prompt source cannot be read or does not match its spec; the message names it and the fix."""


# --------------------------------------------------------------------------------------------------
# reading


def describe(spec: DatasetSpec, root: Path | None = None) -> str:
    """A human name for where ``spec`` reads from (used in every error message)."""
    if spec.path:
        p = _resolve(spec.path, root) if root is not None else Path(spec.path)
        over = f" (local copy of Hub dataset '{spec.hub_id}')" if spec.kind == "hub" else ""
        return f"file {p}{over}"
    if spec.kind == "hub":
        cfg = f", config {spec.hub_config!r}" if spec.hub_config else ""
        return (f"Hub dataset '{spec.hub_id}'{cfg}, split {spec.hub_split or DEFAULT_HUB_SPLIT!r}, "
                f"revision {spec.revision!r}")
    return f"{spec.kind} source"


def load_raw(spec: DatasetSpec, root: Path) -> list[dict]:
    """Read a source's records as a list of plain dicts and check them against ``spec.fields``.

    Parameters
    ----------
    spec : DatasetSpec
        ``kind`` ``file`` or ``hub``; a set ``path`` (relative to ``root``) always wins over the Hub.
    root : Path
        Project root for relative paths.

    Raises
    ------
    SourceError
        Missing, empty or non-UTF-8 file; unknown format; unreachable Hub dataset; a record lacking a
        mapped field (names the field and the file); duplicate ids.
    """
    if spec.kind == "world":
        raise SourceError("a 'world' dataset has no raw records; build it with world_frame(spec, seed)")
    where = describe(spec, root)
    if spec.path:
        records = _read_local(_resolve(spec.path, root), where)
    elif spec.kind == "hub":
        records = _load_hub(spec, where)
    else:
        raise SourceError(f"{where}: kind 'file' needs `path:`")
    if not records:
        raise SourceError(f"{where}: holds no records; point `path:` at a non-empty file")
    _check_records(records, spec, where)
    return records


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def _read_local(path: Path, where: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise SourceError(f"{where}: unsupported format {suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    if not path.is_file():
        raise SourceError(f"{where}: file not found; fix `path:` (relative paths start at the project root)")
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
    """Every mapped column present in every record; prompt text non-empty; ids unique."""
    _check_field_keys(spec, where)
    for key, value in spec.fields.items():
        for col in _columns(value):
            for i, rec in enumerate(records):
                if col not in rec:
                    raise SourceError(
                        f"{where}: record {i + 1} has no field '{col}' (mapped by fields.{key}); "
                        f"its fields are {sorted(rec)}. Fix `fields.{key}` or the file")
    _check_unique_ids(records, spec, where)


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


def normalise(records: list[dict], spec: DatasetSpec, source_name: str) -> pd.DataFrame:
    """Map raw records onto the prompt schema (see the module docstring).

    Parameters
    ----------
    records : list of dict
        From :func:`load_raw`.
    spec : DatasetSpec
        Field mapping, ``answer_format``, ``language``, ``task``, ``target``.
    source_name : str
        The dataset's name in the pair; fills ``source`` and default ids ``"{source_name}-{i}"``.

    Raises
    ------
    SourceError
        Unmapped or empty prompt text, no language, an MC answer out of range, duplicate ids.
    AnswerError
        A reference answer cannot be extracted (the message names the record).
    """
    _check_field_keys(spec, f"dataset {source_name!r}")
    if spec.answer_format != "none" and "answer" not in spec.fields:
        raise SourceError(f"dataset {source_name!r}: answer_format {spec.answer_format!r} needs "
                          "`fields.answer` (the column holding the reference answer)")
    if "language" not in spec.fields and not spec.language:
        raise SourceError(f"dataset {source_name!r}: set `language:` (e.g. en, kk) or map `fields.language`")
    rows = [_row(rec, i, spec, source_name) for i, rec in enumerate(records)]
    frame = conform(pd.DataFrame(rows, columns=list(COLUMNS)))
    check_unique_ids(frame, f"dataset {source_name!r}")
    return frame


def _get(rec: dict, col: str, label: str, key: str) -> Any:
    if col not in rec:
        raise SourceError(f"{label}: no field '{col}' (mapped by fields.{key}); its fields are {sorted(rec)}")
    return rec[col]


def _optional_str(rec: dict, spec: DatasetSpec, key: str, label: str) -> str | None:
    if key not in spec.fields:
        return None
    value = _get(rec, spec.fields[key], label, key)
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _text(rec: dict, spec: DatasetSpec, label: str) -> str:
    parts = [_get(rec, c, label, "text") for c in _columns(spec.fields["text"])]
    parts = [str(p).strip() for p in parts if p is not None and str(p).strip()]
    if not parts:
        raise SourceError(f"{label}: empty prompt text in {spec.fields['text']!r}")
    return "\n\n".join(parts)


def _choices(rec: dict, spec: DatasetSpec, label: str) -> list[str] | None:
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
            raise SourceError(f"{label}: fields.choices column {cols[0]!r} holds {type(values).__name__}, "
                              "expected a list (or name several option columns, e.g. 'A,B,C,D')")
    options = [str(v).strip() for v in values if v is not None and str(v).strip()]
    if len(options) < 2:
        raise SourceError(f"{label}: fewer than two non-empty choices in {spec.fields['choices']!r}")
    return options


def mc_prompt(question: str, choices: list[str], language: str) -> str:
    """Question, lettered options ``A) ...`` one per line, and an answer cue in ``language``."""
    lines = [question.rstrip()] + [f"{chr(65 + j)}) {c}" for j, c in enumerate(choices)]
    return "\n".join(lines + [ANSWER_CUES.get(language, ANSWER_CUES["en"])])


def _answer(rec: dict, spec: DatasetSpec, label: str, choices: list[str] | None) -> str | None:
    fmt = spec.answer_format
    if fmt == "none":
        return None
    value = _get(rec, spec.fields["answer"], label, "answer")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AnswerError(f"{label}: empty reference answer in {spec.fields['answer']!r}")
    if fmt == "gsm8k":
        return extract_gsm8k(value, label)
    if fmt == "boxed":
        return extract_boxed(value, label)
    if fmt in ("letter", "index"):
        if fmt == "index" and not (isinstance(value, int) or str(value).strip().isdigit()):
            raise AnswerError(f"{label}: answer_format 'index' expects a 0-based integer, got {value!r}")
        return extract_letter(value, len(choices) if choices else 4, label)
    return normalise_number(str(value).strip())


def _row(rec: dict, i: int, spec: DatasetSpec, source_name: str) -> dict:
    rid = _optional_str(rec, spec, "id", f"{source_name} record {i + 1}") or f"{source_name}-{i}"
    label = f"{source_name} record {i + 1} (id {rid!r})"
    language = _optional_str(rec, spec, "language", label) or spec.language
    if not language:
        raise SourceError(f"{label}: no language (empty fields.language value and no `language:` default)")
    choices = _choices(rec, spec, label)
    text = _text(rec, spec, label)
    if choices:
        text = mc_prompt(text, choices, language)
    return {"id": rid, "text": text, "language": language, "task": spec.task,
            "group": _optional_str(rec, spec, "group", label) or rid,
            "answer": _answer(rec, spec, label, choices), "choices": choices,
            "topic": _optional_str(rec, spec, "topic", label), "target": bool(spec.target),
            "source": source_name}


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


def dataset_frame(spec: DatasetSpec, name: str, root: Path, seed: int) -> pd.DataFrame:
    """One dataset of a pair in the prompt schema (unsampled, unsplit)."""
    if spec.kind == "world":
        return world_frame(spec, seed, name)
    return normalise(load_raw(spec, root), spec, name)


def prepare_pair(pair: PairSpec, root: Path, seed: int, dev_fraction: float,
                 pair_name: str = "pair") -> pd.DataFrame:
    """All datasets of ``pair``: loaded, normalised, sampled (``spec.n`` groups), concatenated, split.

    Raises
    ------
    SourceError
        Any source problem; no prompts at all or an empty dev/test split (the message names the pair,
        each dataset's row count and the param to change); ids not unique across datasets.
    """
    frames = {name: sample(dataset_frame(spec, name, root, seed), spec.n, seed)
              for name, spec in pair.datasets.items()}
    counts = ", ".join(f"{name}={len(f)} rows" for name, f in frames.items())
    empty = [name for name, f in frames.items() if f.empty]
    if empty:
        raise SourceError(f"pair {pair_name!r}: dataset(s) {empty} gave no prompts ({counts}); check "
                          f"`pairs.{pair_name}.datasets.<name>.path`/`hub_*` and `.n`")
    frame = pd.concat(list(frames.values()), ignore_index=True)
    check_unique_ids(frame, f"pair {pair_name!r}")
    frame = assign_splits(frame, dev_fraction, seed)
    for split in ("dev", "test"):
        if not (frame["split"] == split).any():
            raise SourceError(
                f"pair {pair_name!r}: the {split} split is empty ({frame['group'].nunique()} groups; {counts}); "
                f"add prompts (raise `pairs.{pair_name}.datasets.<name>.n`) or move `data.dev_fraction` "
                f"(now {dev_fraction}) toward 0.5")
    return frame


def summarise(frame: pd.DataFrame) -> dict:
    """JSON-ready counts of a prepared frame: totals, per split, task, language and source."""
    def counts(col: str, sub: pd.DataFrame) -> dict:
        return {str(k): int(v) for k, v in sorted(Counter(sub[col]).items())}

    sources = {}
    for name, sub in frame.groupby("source", sort=True):
        sources[str(name)] = {
            "prompts": int(len(sub)), "groups": int(sub["group"].nunique()),
            "with_answer": int(sub["answer"].notna().sum()), "target": int(sub["target"].sum()),
            "tasks": counts("task", sub), "languages": counts("language", sub),
            **({"splits": counts("split", sub)} if "split" in sub else {})}
    out = {"prompts": int(len(frame)), "groups": int(frame["group"].nunique()),
           "tasks": counts("task", frame), "languages": counts("language", frame), "sources": sources}
    if "split" in frame:
        out["splits"] = counts("split", frame)
    return out
