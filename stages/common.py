"""File I/O shared by the stage scripts: validated params, atomic writes, clean error exits.

The library (:mod:`mechdiff`) never touches files; these helpers are the only place stages write.
Every write goes to a temporary name in the destination folder and is renamed into place, so a
killed stage never leaves a file DVC could mistake for a result.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mechdiff.errors import MechdiffError
from mechdiff.params.config import Params, ParamsError, load_params

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
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#x} on line {line}); save the "
                          "file as UTF-8") from None
    return load_params(text, str(path))


def load_pair_params(path: str | os.PathLike, pair: str) -> Params:
    """:func:`load_stage_params`, then check that ``pair`` is one of its pairs (the message names them)."""
    params = load_stage_params(path)
    if pair not in params.pairs:
        raise StageError(f"pair {pair!r} is not in {path} (pairs: {sorted(params.pairs)})")
    return params


def stage_parser(doc: str | None, *required: str, raw_doc: bool = False) -> argparse.ArgumentParser:
    """A stage's command line: the ``required`` options (each takes a value) and ``--params`` (default
    ``params.yaml``); ``raw_doc`` keeps the docstring's line breaks in ``--help``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter if raw_doc
                                 else argparse.HelpFormatter)
    for name in required:
        ap.add_argument(name, required=True)
    ap.add_argument("--params", default="params.yaml")
    return ap


def resolve_path(path: str, root: Path = ROOT, allow_outside: bool = False, key: str = "") -> Path:
    """A path from params (``~`` expanded), relative to the project root; it may not leave the project
    (``..``, an absolute path elsewhere, a symlink out of it) unless ``allow_outside``. ``key`` names the
    params switch that allows it, for the message."""
    p = Path(path).expanduser()
    full = (p if p.is_absolute() else root / p).resolve()
    inside = full == root.resolve() or root.resolve() in full.parents
    if not inside and not allow_outside:
        fix = f"set {key}: true to allow it" if key else "use a path inside the project"
        raise StageError(f"path {path!r} from params leaves the project directory {root}; move the data "
                         f"under the project (e.g. data/sources/), or {fix}")
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


def save_figure(fig, path: str | os.PathLike) -> None:
    """Lay out a matplotlib figure, write it atomically as a 120-dpi PNG and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


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


def non_finite_keys(obj: Any, where: str = "") -> list[str]:
    """Dotted paths of every NaN or infinite float in a JSON-ready object (``finite`` turns the ones that
    mean "not measured" into None before writing)."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in non_finite_keys(v, f"{where}.{key}" if where else str(key))]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in non_finite_keys(v, f"{where}[{i}]")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [where or "<value>"]
    return []


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically with sorted keys, so identical results give identical bytes. A NaN or
    infinite number is refused (strict JSON; a silent NaN once read as "no change"), naming its key."""
    bad = non_finite_keys(obj)
    if bad:
        raise StageError(f"{path}: refusing to write non-finite numbers (NaN or Inf) at {', '.join(bad[:5])}"
                         f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}; an upstream input holds "
                         "non-finite values: check the activations and models of this pair")
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


def _unreadable(path: Path, err: Exception) -> StageError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return StageError(f"{path} cannot be read ({type(err).__name__}: {first}); it is truncated or corrupt: delete "
                      "it and rerun the stage that writes it (dvc repro -f <stage>)")


def _read(path: str | os.PathLike, load: Callable[[Path], Any]) -> Any:
    """``load(path)``; a missing, truncated or corrupt file is one clear error."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found; run `dvc repro` (the stage that writes it has not run)")
    try:
        return load(path)
    except Exception as err:  # pyarrow: ArrowInvalid, OSError; safetensors: SafetensorError
        raise _unreadable(path, err) from None


def read_table(path: str | os.PathLike):
    """``pandas.read_parquet(path)``, errors as :func:`_read`."""
    import pandas as pd

    return _read(path, pd.read_parquet)


def read_tensors(path: str | os.PathLike) -> dict:
    """``safetensors.torch.load_file(path)``, errors as :func:`_read`."""
    from safetensors.torch import load_file

    return _read(path, lambda p: load_file(str(p)))


# errno -> the fix, for failures of the machine rather than of the inputs
_OS_FIXES = {errno.ENOSPC: "free disk space (or point the outputs at a larger disk) and rerun",
             errno.EDQUOT: "free space within your disk quota and rerun",
             errno.EROFS: "the filesystem is read-only: run the stage where its outputs can be written",
             errno.EACCES: "make the output directory writable for your user and rerun"}


def progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """``iterable`` with a tqdm progress bar on stderr (items per second, time left) when stderr is a
    terminal; silent under CI (``CI`` set) and in logs."""
    from tqdm.auto import tqdm

    quiet = bool(os.environ.get("CI")) or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet, leave=False, dynamic_ncols=True)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; user errors, and a full disk or an unwritable output directory, print one
    clear line and exit 2 (no traceback). The atomic writes leave no torn output behind."""
    try:
        main()
    except MechdiffError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in _OS_FIXES:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot write{where}: {err.strerror}; {_OS_FIXES[err.errno]}", file=sys.stderr)
        sys.exit(2)


WHOLE_FILE_LIMIT = 64 << 20  # bytes hashed whole; larger files are sampled
N_BLOCKS, BLOCK = 64, 64 << 10


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of the whole file, or ``sampled-sha256:<hex>`` of its size and 64 spread blocks."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        h.update(str(size).encode())
        for i in range(N_BLOCKS):
            f.seek((size - BLOCK) * i // (N_BLOCKS - 1))
            h.update(f.read(BLOCK))
    return f"sampled-sha256:{h.hexdigest()}"
