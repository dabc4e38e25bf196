"""Benchmark: the CKA stage's statistics per layer, the Gram form against the feature (row) form.

    python benchmarks/bench_cka.py [--n 3000 --d 1024 --boot 20 --perm 20 --device cpu] [--out FILE]

For one layer's states X, Y (n, d) float64 with 9 positions per prompt, times ``bootstrap_ci`` and
``permutation_null`` (whole prompts permuted) as the stage calls them (debiased), once on the path
``mechdiff.rq1.cka`` chooses (the Gram form when it pays) and once with the Gram form switched off (every
replicate a feature-form cross term), side by side in one process, and checks both give the same
replicates. Prints one JSON object: seconds, speed ratios (row time / chosen time), largest differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_common import time_once as timed  # noqa: E402
from mechdiff.rq1 import cka  # noqa: E402
from mechdiff.rq1 import hsic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--boot", type=int, default=20)
    ap.add_argument("--perm", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    g = torch.Generator(device=args.device).manual_seed(0)
    X = torch.randn(args.n, args.d, dtype=torch.float64, device=args.device, generator=g)
    Y = X @ torch.randn(args.d, args.d, dtype=torch.float64, device=args.device, generator=g) / args.d ** 0.5
    Y += torch.randn(args.n, args.d, dtype=torch.float64, device=args.device, generator=g)
    groups = np.arange(args.n) // 9  # prompts of 9 positions (collect_acts: the last token + 8 sampled)
    run = {"boot": lambda: cka.bootstrap_ci(X, Y, groups, n_boot=args.boot, seed=0, debiased=True).samples,
           "perm": lambda: cka.permutation_null(X, Y, args.perm, 0, True, groups).null}
    timed(lambda: cka.linear_cka(X[:64], Y[:64]), args.device)  # warm-up
    chosen = {k: timed(f, args.device) for k, f in run.items()}
    pays = hsic.GramForm.pays
    hsic.GramForm.pays = classmethod(lambda cls, *a, **k: False)
    try:
        row = {k: timed(f, args.device) for k, f in run.items()}
    finally:
        hsic.GramForm.pays = pays
    out = {"benchmark": "bench_cka", "n": args.n, "d": args.d, "n_boot": args.boot, "n_perm": args.perm,
           "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
           "torch_threads": torch.get_num_threads(),
           "gram_chosen": {"boot": pays(args.n, args.d, args.d, 3 * args.boot),
                           "perm": pays(args.n, args.d, args.d, args.perm, per_entry=100.0)},
           "chosen_s": {k: round(v[1], 3) for k, v in chosen.items()},
           "row_form_s": {k: round(v[1], 3) for k, v in row.items()},
           "speed_ratio": {k: round(row[k][1] / chosen[k][1], 2) for k in run},
           "max_abs_diff": {k: float(np.nanmax(np.abs(chosen[k][0] - row[k][0]))) for k in run}}
    text = json.dumps(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
