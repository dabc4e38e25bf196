"""Benchmark: ridge over a whole lambda grid from ONE factorisation vs scikit-learn ``Ridge`` per lambda.

Prints one JSON object: device, versions, shapes, the lambda grid, every repeat's seconds and their
median for both, the ratio ``sklearn / grid`` and the largest absolute coefficient difference.

Both fit an intercept in float64 on the same data. The data are float32, as activations are; scikit-learn
gets a float64 copy made before timing, ``RidgeGrid`` gets the float32 array (or CUDA tensor) and converts
inside the timed region. The grid is the ``clt.lambdas`` of params.yaml as per-row penalties, i.e.
``alpha = n * lambda``.

Usage::

    python benchmarks/bench_ridge_grid.py                       # CPU default: 4000 x 512
    python benchmarks/bench_ridge_grid.py --threads 1           # on a shared, loaded CPU box
    python benchmarks/bench_ridge_grid.py --n 10000 --d 4096 --device cuda   # the full size, on a GPU

The full size (10000 positions x 4096 dims, 6 lambdas) is about 1 GiB of float64 coefficients and minutes
of scikit-learn time on a 2-core box: run it on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.linear_model import Ridge

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from mechdiff.rq2.ridge import RidgeGrid  # noqa: E402

LAMBDAS_PER_ROW = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000, help="rows (positions)")
    p.add_argument("--d", type=int, default=512, help="input = output dims")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--solver", default="auto", choices=["auto", "eigh", "svd"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's). Use 1 on a shared, loaded box: torch's OpenMP "
                        "threads stall when other processes hold the cores")
    return p.parse_args(argv)


def make_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic base states X (n, d) and tuned states Y = X A + noise, float32."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d), dtype=np.float32) * np.geomspace(3.0, 0.03, d, dtype=np.float32)
    A = np.eye(d, dtype=np.float32) + 0.05 * rng.standard_normal((d, d), dtype=np.float32)
    return X, X @ A + 0.1 * rng.standard_normal((n, d), dtype=np.float32)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_grid(X, Y, alphas, solver: str, device: str, repeats: int):
    Xt, Yt = torch.as_tensor(X, device=device), torch.as_tensor(Y, device=device)
    RidgeGrid(alphas, solver=solver).fit(Xt[:64], Yt[:64])  # warm-up (library init, kernels)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        grid = RidgeGrid(alphas, solver=solver).fit(Xt, Yt)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, grid


def time_sklearn(X64, Y64, alphas, repeats: int):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        coefs = [Ridge(alpha=a).fit(X64, Y64).coef_.T for a in alphas]  # one fit (and solve) per lambda
        times.append(time.perf_counter() - t0)
    return times, np.stack(coefs)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    X, Y = make_data(args.n, args.d, args.seed)
    alphas = [lam * args.n for lam in LAMBDAS_PER_ROW]
    grid_times, grid = time_grid(X, Y, alphas, args.solver, args.device, args.repeats)
    sk_times, sk_coefs = time_sklearn(X.astype(np.float64), Y.astype(np.float64), alphas, args.repeats)
    diff = np.abs(grid.coefs_.cpu().numpy() - sk_coefs)
    report = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "numpy": np.__version__, "sklearn": sklearn.__version__,
        "commit": bc.commit(), "date_utc": bc.env_info("cpu")["date_utc"], "argv": " ".join(sys.argv),
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "n": args.n, "d_in": args.d, "d_out": args.d, "input_dtype": "float32", "compute_dtype": "float64",
        "solver": args.solver, "alphas": alphas, "repeats": args.repeats,
        "grid_seconds": grid_times, "grid_median_s": statistics.median(grid_times),
        "grid_n_factorizations": grid.n_factorizations_,
        "sklearn_seconds": sk_times, "sklearn_median_s": statistics.median(sk_times),
        "speedup_sklearn_over_grid": statistics.median(sk_times) / statistics.median(grid_times),
        "max_abs_coef_diff": float(diff.max()),
        "max_abs_coef": float(np.abs(sk_coefs).max()),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
