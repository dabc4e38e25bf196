"""A pair's prompt set: every dataset of the pair read (:mod:`mechdiff.data.source_files`) and normalised
(:mod:`mechdiff.data.prompt_rows`), or built from the synthetic world, then sampled, concatenated, split into
dev/test and summarised. Pure functions: nothing here writes a file (the ``prepare_data`` stage does);
reading a source is the only I/O. The columns: :mod:`mechdiff.data.prompt_schema`.

Sampling and splits
-------------------
``DatasetSpec.n`` counts *groups* (an EN/KK pair counts once). Both the sample and the dev/test split
rank each group by a SHA-256 hash of (seed, group id), so they are deterministic and adding or
removing rows never moves any other group.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pandas as pd

from mechdiff.data.prompt_rows import Skipped, normalise_files
from mechdiff.data.prompt_schema import COLUMNS, SourceError, check_unique_ids, conform
from mechdiff.data.source_files import load_files
from mechdiff.organisms.world import evaluation_prompts
from mechdiff.params.config import DatasetSpec, PairSpec


def world_frame(spec: DatasetSpec, seed: int, source_name: str = "world") -> pd.DataFrame:
    """The organisms' held-out evaluation prompts (:func:`mechdiff.organisms.world.evaluation_prompts`) as a frame.

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
