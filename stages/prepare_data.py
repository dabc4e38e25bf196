"""Stage prepare_data: build one pair's prompt set (Parquet, schema in :mod:`mechdiff.sources`).

    python -m stages.prepare_data --pair cultural --out data/prepared/cultural.parquet \
        --summary artifacts/results/cultural/data.json
"""

from __future__ import annotations

import argparse

from mechdiff.sources import prepare_pair, summarise
from stages.common import ROOT, atomic_write_json, atomic_write_parquet, load_pair_params, run_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pair", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary", required=True)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    params = load_pair_params(args.params, args.pair)
    frame = prepare_pair(params.pairs[args.pair], root=ROOT, seed=params.data.seed,
                         dev_fraction=params.data.dev_fraction, pair_name=args.pair)
    atomic_write_parquet(args.out, frame)
    atomic_write_json(args.summary, summarise(frame))
    print(f"prepare_data@{args.pair}: {len(frame)} prompts -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
