"""Reading a prompt source's records: local files by format (jsonl/ndjson, json, csv/tsv, parquet),
folders and globs of them, or a Hugging Face Hub dataset; each record a plain dict, checked against the
source's ``fields`` (:mod:`mechdiff.data.prompt_schema`). Reading is the only I/O; nothing is written.

Files, folders and globs
------------------------
``path:`` (relative to the project root, or absolute) is one file, a folder, or a glob such as
``data/sources/kk_mc/*/*.jsonl``. A folder is read recursively; a folder or glob reads every file with
a supported suffix (``.jsonl .ndjson .json .csv .tsv .parquet``; hidden files are skipped) in sorted
order of the file's *name*: its path below the folder (for a glob, below its last folder without
wildcards); :mod:`mechdiff.data.prompt_rows` takes a row's default id, topic and split from that name.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mechdiff.data.prompt_schema import SourceError, check_field_keys, field_columns
from mechdiff.params.config import DatasetSpec

LOCAL_FORMATS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
DEFAULT_HUB_SPLIT = "train"
HUB_FIX = ("set `path:` to a local copy in the same format (jsonl/csv/parquet with the same columns), "
           "or check hub_id/hub_config/hub_split/revision and your network / `hf auth login` for gated sets")
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class SourceFile:
    """The records of one file of a source.

    ``name``: the file's path below the folder ``path:`` names (posix; a single file: its file name; the
    Hub: ``""``). ``in_folder``: ``path:`` is a folder or a glob.
    """

    name: str
    records: list[dict]
    in_folder: bool = False


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
    check_field_keys(spec, where)
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



def _check_records(records: list[dict], spec: DatasetSpec, where: str) -> None:
    """Every mapped column present in every record."""
    for key, value in spec.fields.items():
        for col in field_columns(value):
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
