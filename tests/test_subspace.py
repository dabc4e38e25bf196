"""Known-answer tests of mechdiff.rq3.subspace (float64, CPU, tiny shapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechdiff.rq3.subspace import (bootstrap_stability, diff_in_means, orthonormal_basis, random_subspace, rank_k_basis,
                               typical_projection_norm)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def basis():
    return random_subspace(32, 3, seed=1)


def test_random_subspace_is_orthonormal_and_seeded():
    U = random_subspace(64, 5, seed=3)
    assert U.shape == (64, 5) and U.dtype == torch.float64
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(U, random_subspace(64, 5, seed=3), atol=0, rtol=0)


def test_a_basis_must_have_orthonormal_columns(rng, basis):
    torch.testing.assert_close(orthonormal_basis(basis, None), basis, atol=0, rtol=0)
    assert orthonormal_basis(basis[:, 0].numpy(), None).shape == (32, 1)  # a vector is a rank-1 basis
    with pytest.raises(ValueError, match="orthonormal"):
        orthonormal_basis(2 * np.eye(8)[:, :2], None)


def test_diff_in_means(rng):
    A, B = rng.normal(size=(100, 16)) + 1.0, rng.normal(size=(80, 16))
    diff, direction = diff_in_means(A, B)
    np.testing.assert_allclose(diff, A.mean(0) - B.mean(0), atol=1e-14)
    assert np.linalg.norm(direction) == pytest.approx(1.0)


def test_planted_rank_one_difference_is_recovered(rng):
    d = 64
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    diffs = rng.normal(2.0, 1.0, size=(300, 1)) * u + 0.02 * rng.normal(size=(300, d))  # (pairs, d)
    U, ratio = rank_k_basis(diffs, 1)
    assert U.shape == (d, 1)
    assert abs(U[:, 0] @ u) > 0.99
    assert U[:, 0] @ u > 0  # oriented along the mean difference
    assert ratio[0] > 0.9


def test_rank_k_basis_with_direction_first(rng):
    diffs = rng.normal(size=(200, 20)) @ np.diag(np.linspace(3, 0.1, 20)) + 0.5
    direction = diff_in_means(diffs, np.zeros((1, 20)))[1]
    U, ratio = rank_k_basis(diffs, 4, direction=direction)
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(U[:, 0], direction, atol=1e-12)
    assert ratio.shape == (4,) and np.all(ratio >= 0) and ratio.sum() <= 1 + 1e-12


def test_bootstrap_stability_strong_vs_noise(rng):
    d, n = 64, 60
    groups = (np.repeat(np.arange(20), 3), np.repeat(np.arange(20), 3))
    shift = np.zeros(d)
    shift[0] = 8.0
    strong = bootstrap_stability(rng.normal(size=(n, d)) + shift, rng.normal(size=(n, d)), n_boot=100,
                                 groups=groups)
    noise = bootstrap_stability(rng.normal(size=(n, d)), rng.normal(size=(n, d)), n_boot=100, groups=groups)
    assert strong.shape == (100,)
    assert strong.mean() > 0.95
    assert noise.mean() < 0.8  # about 1/sqrt(2) for pure noise in high d
    paired = bootstrap_stability(rng.normal(size=(n, d)) + shift, rng.normal(size=(n, d)), n_boot=20,
                                 groups=(groups[0], None), paired=True)
    assert paired.mean() > 0.95


def test_typical_projection_norm_respects_mask(basis):
    U = basis
    H = torch.zeros(2, 3, 32, dtype=torch.float64)
    H[..., :] = 2.0 * U[:, 0]  # every position has projection norm 2 ...
    H[0, 0] = 100.0 * U[:, 1]  # ... except a sink
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    assert typical_projection_norm(H, U, mask) == pytest.approx(2.0)
    assert typical_projection_norm(H, U) > 2.0
