"""Stage prepare_data: build one pair's prompt set (Parquet, schema in :mod:`mechdiff.data.prompt_schema`).

    python -m stages.prepare_data --pair cultural --out data/prepared/cultural.parquet \
        --summary artifacts/results/cultural/data.json

Bad source rows follow ``data.on_bad_row``: skipped ones are counted per source and reason in the
summary and named in one stderr line per source. A dataset ``path:`` must stay inside the project unless
``data.allow_external_paths``; DVC sees every file read through the ``track_inputs`` stage's digests.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mechdiff.data.prepare_data import prepare_pair_rows, summarise
from mechdiff.params.config import PairSpec
from stages.common import (ROOT, atomic_write_json, atomic_write_parquet, load_pair_params, resolve_path, run_stage,
                           stage_parser)

def check_paths(pair: PairSpec, allow_outside: bool = False, root: Path = ROOT) -> dict[str, Path]:
    """Each dataset's ``path:`` resolved; one that leaves ``root`` is a StageError unless ``allow_outside``."""
    return {name: resolve_path(spec.path, root, allow_outside, "data.allow_external_paths")
            for name, spec in pair.datasets.items() if spec.path}


def main() -> None:
    args = stage_parser(__doc__, "--pair", "--out", "--summary").parse_args()

    params = load_pair_params(args.params, args.pair)
    pair = params.pairs[args.pair]
    check_paths(pair, params.data.allow_external_paths)
    frame, skipped = prepare_pair_rows(pair, root=ROOT, seed=params.data.seed, dev_fraction=params.data.dev_fraction,
                                       pair_name=args.pair, on_bad_row=params.data.on_bad_row)
    for name, s in skipped.items():
        if s.bad:
            print(f"prepare_data: {s.line(name)}", file=sys.stderr)
    atomic_write_parquet(args.out, frame)
    atomic_write_json(args.summary, summarise(frame, skipped))
    print(f"prepare_data@{args.pair}: {len(frame)} prompts -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
