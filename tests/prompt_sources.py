"""Shorthands the source tests read prompt sets with (over :mod:`mechdiff.data.prepare_data` and its parts)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechdiff.data.prepare_data import prepare_pair_rows
from mechdiff.data.prompt_rows import normalise_files
from mechdiff.data.source_files import SourceFile, load_files
from mechdiff.params.config import DatasetSpec, PairSpec


def load_raw(spec: DatasetSpec, root: Path) -> list[dict]:
    """All records of a source (every file of a folder or glob, in order) as plain dicts; see :func:`load_files`."""
    return [r for f in load_files(spec, root) for r in f.records]


def normalise(records: list[dict], spec: DatasetSpec, source_name: str, on_bad_row: str = "error") -> pd.DataFrame:
    """Map the raw records of one file (or the Hub) onto the prompt schema (see :mod:`mechdiff.data.prompt_rows`).

    ``on_bad_row``: ``"error"`` raises at the first bad row, ``"skip"`` leaves bad rows out (use
    :func:`normalise_files` to get them). Other errors as in :func:`normalise_files`.
    """
    return normalise_files([SourceFile("", records)], spec, source_name, on_bad_row)[0]


def prepare_pair(pair: PairSpec, root: Path, seed: int, dev_fraction: float,
                 pair_name: str = "pair", on_bad_row: str = "error") -> pd.DataFrame:
    """All datasets of ``pair`` as one split prompt frame; see :func:`prepare_pair_rows`."""
    return prepare_pair_rows(pair, root, seed, dev_fraction, pair_name, on_bad_row)[0]
