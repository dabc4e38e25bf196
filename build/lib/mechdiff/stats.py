"""Prompt-level resampling statistics shared by every research question.

Every interval mechdiff reports resamples whole prompts (or prompt groups) with replacement, never
positions: the positions of one prompt are not independent. The pieces:

* :func:`group_codes`: integer codes 0..G-1 of group labels (a prompt id per row), shape (n,).
* :func:`resample_indices`: the (n_boot, n) draws of a bootstrap over n units, a function of ``seed`` and
  ``n`` only, so two calls on the same prompts (e.g. at other layers) resample them alike.
* :func:`resample_counts`: the same draws as counts, (n_boot, n): how often each unit is drawn.
* :func:`draw_group_counts`: one draw of whole groups from a running generator, as row counts (n,): for
  bootstraps that draw two unpaired samples per replicate from one stream (the subspace's stability).
* :func:`percentile_interval`: the nan-aware percentile interval of replicate values.
* :func:`bootstrap_mean_interval`: the interval of a mean of per-prompt values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_mean_interval", "draw_group_counts", "group_codes", "percentile_interval", "resample_counts",
           "resample_indices"]


def group_codes(groups: Sequence | np.ndarray | None, n: int) -> np.ndarray:
    """Integer codes 0..G-1 of the group labels, shape (n,); ``None``: every row its own group."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},); got {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(n)


def resample_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) int64: each row draws ``n`` of the units 0..n-1 with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) int64: how often each unit is drawn in each row of :func:`resample_indices`."""
    return np.stack([np.bincount(row, minlength=n) for row in resample_indices(n, n_boot, seed)])


def draw_group_counts(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row counts (n,) of one bootstrap draw of whole groups (``codes`` 0..G-1 per row, :func:`group_codes`)."""
    n_groups = int(codes.max()) + 1
    return np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[codes]


def percentile_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Central percentile interval at ``level`` of the finite ``values`` (nan, nan when none is finite)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    q = round((1 - level) / 2, 12)  # 0.025 exactly at level 0.95
    return float(np.quantile(v, q)), float(np.quantile(v, 1 - q))


def bootstrap_mean_interval(per_unit: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``per_unit`` (n,) values over units resampled with replacement."""
    per_unit = np.asarray(per_unit, dtype=float)
    if per_unit.size == 0:
        return float("nan"), float("nan")
    return percentile_interval(per_unit[resample_indices(per_unit.size, n_boot, seed)].mean(1), level)
