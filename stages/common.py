"""File I/O shared by the stage scripts: validated params, atomic writes, clean error exits.

The library (:mod:`mechdiff`) never touches files; these helpers are the only place stages write.
Every write goes to a temporary name in the destination folder and is renamed into place, so a
killed stage never leaves a file DVC could mistake for a result.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mechdiff.config import Params, ParamsError, load_params
from mechdiff.errors import MechdiffError

ROOT = Path(__file__).resolve().parents[1]


class StageError(MechdiffError):
    """A problem with the stage's inputs that the user must fix; printed without a traceback."""


def load_stage_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate the params file (errors name the key and the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found; run the stage from the project root") from None
    return load_params(text, str(path))


def load_pair_params(path: str | os.PathLike, pair: str) -> Params:
    """:func:`load_stage_params`, then check that ``pair`` is one of its pairs (the message names them)."""
    params = load_stage_params(path)
    if pair not in params.pairs:
        raise StageError(f"pair {pair!r} is not in {path} (pairs: {sorted(params.pairs)})")
    return params


def resolve_path(path: str, root: Path = ROOT) -> Path:
    """A path from params, relative to the project root; relative paths may not escape the project.

    Absolute paths are taken as given (the user asked for them explicitly).
    """
    p = Path(path)
    if p.is_absolute():
        return p
    full = (root / p).resolve()
    if root.resolve() not in full.parents and full != root.resolve():
        raise StageError(f"path {path!r} from params escapes the project directory {root}; "
                         "use an absolute path if you really mean a location outside it")
    return full


def current_umask() -> int:
    """The process's file-mode creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    """An empty temporary file beside ``path`` with the mode a plain ``open`` would give it: mkstemp
    creates 0600, which a teammate on a shared filesystem could not read once it is renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and rename the temporary file onto ``path`` only if it succeeds."""
    path = Path(path)
    tmp = _tmp_sibling(path, path.suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def finite(obj: Any) -> Any:
    """JSON-ready copy for metrics files: NaN/inf -> None (strict JSON, which ``dvc metrics show`` reads),
    dict keys as strings, tuples as lists, recursively."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically with sorted keys, so identical results give identical bytes."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_parquet(path: str | os.PathLike, frame: Any) -> Path:
    """Write a pandas DataFrame to Parquet atomically (no index, deterministic bytes)."""
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700; a plain mkdir honours the umask
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; user errors print one clear line and exit 2 (no traceback)."""
    try:
        main()
    except MechdiffError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
