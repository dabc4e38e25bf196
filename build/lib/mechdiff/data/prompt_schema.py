"""The prompt schema every stage after ``prepare_data`` reads, and the field mapping onto it.

Prompt schema
-------------
One row per prompt. :func:`mechdiff.data.prompt_rows.normalise_files`, :func:`mechdiff.data.prepare_data.world_frame` and
:func:`mechdiff.data.prepare_data.prepare_pair_rows` return exactly these columns:

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
``split``    str                  ``dev`` | ``test`` -- added by :func:`mechdiff.data.prepare_data.assign_splits` /
                                  :func:`mechdiff.data.prepare_data.prepare_pair_rows` only
===========  ===================  ==============================================================

After a Parquet round trip pandas reads missing ``answer``/``topic`` as NaN and ``choices`` as arrays;
:func:`conform` restores None and lists.

Field mapping
-------------
``DatasetSpec.fields`` maps schema columns (:data:`FIELD_KEYS`) to source columns; a value may name two or
more columns with a comma (:func:`field_columns`; how they combine: :mod:`mechdiff.data.prompt_rows`).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from mechdiff.errors import MechdiffError
from mechdiff.params.config import DatasetSpec

COLUMNS = ("id", "text", "language", "task", "group", "answer", "choices", "topic", "target", "source")
FIELD_KEYS = ("text", "answer", "choices", "language", "id", "group", "topic")
NULLABLE = ("answer", "choices", "topic")


class SourceError(MechdiffError):
    """A prompt source cannot be read or does not match its spec; the message names it and the fix."""


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


def field_columns(spec_value: str) -> list[str]:
    """The source columns a ``fields`` value names: ``"instruction, input"`` -> ``["instruction", "input"]``."""
    return [c.strip() for c in spec_value.split(",") if c.strip()]


def check_field_keys(spec: DatasetSpec, where: str) -> None:
    """Raise :class:`SourceError` for a ``fields`` key outside :data:`FIELD_KEYS`, or no ``fields.text``."""
    unknown = sorted(set(spec.fields) - set(FIELD_KEYS))
    if unknown:
        raise SourceError(f"{where}: unknown `fields:` key(s) {unknown}; allowed: {list(FIELD_KEYS)}")
    if "text" not in spec.fields:
        raise SourceError(f"{where}: `fields.text` must name the column holding the prompt text")
