"""The shared resampling statistics: known answers and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mechdiff.stats import (bootstrap_mean_interval, group_codes, percentile_interval, resample_counts,
                            resample_indices)


def test_group_codes_number_the_groups_in_sorted_order_and_check_the_shape():
    assert group_codes(["b", "a", "b", "c"], 4).tolist() == [1, 0, 1, 2]
    assert group_codes(None, 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        group_codes(["a", "b"], 3)


def test_resamples_depend_only_on_the_seed_and_the_count_and_counts_add_up():
    a, b = resample_indices(7, 50, seed=3), resample_indices(7, 50, seed=3)
    assert a.shape == (50, 7) and (a == b).all() and a.min() >= 0 and a.max() < 7
    assert not (a == resample_indices(7, 50, seed=4)).all()
    counts = resample_counts(7, 50, seed=3)
    assert (counts.sum(1) == 7).all()
    assert all((np.bincount(row, minlength=7) == c).all() for row, c in zip(a, counts))


def test_the_percentile_interval_has_its_known_answer_and_ignores_non_finite_values():
    assert percentile_interval(np.arange(101.0)) == (2.5, 97.5)
    assert percentile_interval(np.r_[np.arange(101.0), np.nan, np.inf]) == (2.5, 97.5)
    assert percentile_interval(np.arange(101.0), level=0.5) == (25.0, 75.0)
    assert all(math.isnan(x) for x in percentile_interval([np.nan, np.nan]))
    with pytest.raises(ValueError, match="level"):
        percentile_interval([1.0, 2.0], level=1.0)


def test_the_mean_interval_is_a_point_for_constants_and_covers_the_true_mean_at_about_its_level():
    assert bootstrap_mean_interval(np.full(20, 0.3), 100, 0) == pytest.approx((0.3, 0.3))
    assert all(math.isnan(x) for x in bootstrap_mean_interval(np.zeros(0), 100, 0))
    rng = np.random.default_rng(0)
    covered = [lo <= 0.0 <= hi for lo, hi in (bootstrap_mean_interval(rng.normal(size=60), 400, s) for s in range(300))]
    assert 0.88 <= np.mean(covered) <= 0.99  # a 95% percentile interval of a mean of 60 normals: ~94% coverage
