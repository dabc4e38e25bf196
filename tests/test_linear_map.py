"""Known-answer tests of mechdiff.rq2.linear_map and mechdiff.rq2.ridge (planted maps, CPU, small shapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from mechdiff.rq2.linear_map import (LinearMap, RidgePreprocess, Standardizer, baseline_scores, gain_over_identity,
                                 map_scores)
from mechdiff.rq2.ridge import RidgeGrid, grouped_cv_lambda, grouped_folds


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split_by_group(groups: np.ndarray, frac: float = 0.2):
    test = groups % int(round(1 / frac)) == 0
    return ~test, test


def test_standardizer_uses_fit_rows_and_floors_constant_dims(rng):
    X = rng.normal(3.0, 2.0, size=(200, 4))
    X[:, 2] = 7.0  # constant dim
    s = Standardizer().fit(X)
    Z = s.transform(X)
    np.testing.assert_allclose(Z[:, [0, 1, 3]].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[:, [0, 1, 3]].std(0), 1, atol=1e-12)
    assert np.all(np.isfinite(Z)) and np.all(Z[:, 2] == 0)
    np.testing.assert_allclose(s.inverse_transform(Z), X, atol=1e-12)


@pytest.mark.parametrize("solver", ["eigh", "svd"])
@pytest.mark.parametrize("shape", [(80, 20), (15, 40)])  # primal (n >= d) and dual (n < d) paths
def test_grid_equals_direct_solve(rng, solver, shape):
    X, Y = rng.normal(size=shape), rng.normal(size=(shape[0], 6))
    lambdas = [1e-3, 0.1, 1.0, 10.0, 1e3]
    grid = RidgeGrid(lambdas, fit_intercept=False, solver=solver).fit(X, Y)
    assert grid.n_factorizations_ == 1  # the whole grid from one factorisation
    assert grid.coefs_.shape == (5, shape[1], 6)
    for lam, W in zip(lambdas, grid.coefs_):
        direct = np.linalg.solve(X.T @ X + lam * np.eye(shape[1]), X.T @ Y)
        np.testing.assert_allclose(W.numpy(), direct, atol=1e-8, rtol=0)


def test_grid_intercept_matches_sklearn(rng):
    from sklearn.linear_model import Ridge

    X, Y = rng.normal(size=(60, 10)) + 2.0, rng.normal(size=(60, 3)) - 1.0
    grid = RidgeGrid([0.5, 5.0]).fit(X, Y)
    for k, lam in enumerate([0.5, 5.0]):
        ref = Ridge(alpha=lam).fit(X, Y)
        np.testing.assert_allclose(grid.coefs_[k].numpy(), ref.coef_.T, atol=1e-10)
        np.testing.assert_allclose(grid.intercepts_[k].numpy(), ref.intercept_, atol=1e-10)
        np.testing.assert_allclose(grid.predict(X, lam).numpy(), ref.predict(X), atol=1e-10)


def test_grouped_folds_never_share_a_group(rng):
    groups = rng.integers(0, 30, size=300)
    folds = grouped_folds(groups, 5, seed=2)
    seen = np.concatenate([val for _, val in folds])
    assert np.array_equal(np.sort(seen), np.arange(300))  # each row validated exactly once
    for train, val in folds:
        assert not set(groups[train]) & set(groups[val])


def test_grouped_cv_one_factorisation_per_fold(rng):
    X = rng.normal(size=(120, 10))
    Y = X @ rng.normal(size=(10, 4)) + rng.normal(size=(120, 4))
    cv = grouped_cv_lambda(X, Y, np.repeat(np.arange(40), 3), [1e-3, 1e-1, 10.0, 1e3, 1e5], n_folds=4)
    assert cv["n_factorizations"] == 4
    assert cv["cv_mse"].shape == (5,) and cv["fold_mse"].shape == (4, 5)
    assert cv["lambda"] < 1e3  # a real signal is not shrunk away


def test_planted_map_is_recovered(rng):
    n, d, noise = 2000, 48, 0.1
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) + rng.normal(size=d)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    Y = X @ A + 0.5 + noise * rng.normal(size=(n, d))
    groups = np.repeat(np.arange(n // 4), 4)
    train, test = _split_by_group(groups)
    m = LinearMap(lambdas=[1e-6, 1e-4, 1e-2, 1.0]).fit(X[train], Y[train], groups[train])
    assert np.linalg.norm(m.coef_.numpy() - A) / np.linalg.norm(A) < 0.05
    expected_r2 = 1 - noise**2 / (Y[test] - (Y[test] - X[test] @ A - 0.5)).var(0)  # per dim
    scores = m.score(X[test], Y[test])
    assert scores["r2_uniform"] == pytest.approx(expected_r2.mean(), abs=0.02)
    assert isinstance(m.predict(X[test]), np.ndarray)


def test_n_below_d_stays_at_or_above_identity(rng):
    n, d, rank = 100, 256, 4  # 100 prompts x 1 position
    X = rng.normal(size=(n, d)) @ np.diag(np.linspace(2.0, 0.2, d))
    change = rng.normal(size=(d, rank)) @ rng.normal(size=(rank, d)) * 0.02
    Y = X + X @ change + 0.1 * rng.normal(size=(n, d))
    groups = np.arange(n)
    train, test = _split_by_group(groups)
    m = LinearMap().fit(X[train], Y[train], groups[train])
    held_out = m.score(X[test], Y[test])
    base = baseline_scores(X[train], Y[train], X[test], Y[test], groups[train])
    assert held_out["r2_uniform"] > 0
    assert held_out["r2_uniform"] >= base["identity"]["r2_uniform"] - 0.01
    assert gain_over_identity(held_out, base["identity"])["r2_uniform"] >= -0.01
    assert base["mean"]["r2_uniform"] <= 0.0  # the train mean cannot beat the test mean


@pytest.mark.parametrize("pca_dim", [None, 4])
def test_cv_preprocessing_is_fitted_inside_each_fold_on_its_training_rows(rng, pca_dim):
    """One prompt group sits far off (mean +50, scale x20): a standardiser fitted on every row would carry it
    into the folds where it is held out. Each fold's standardisers, identity-prior scales and PCA must equal
    ones fitted on that fold's training rows alone, and its ridge grid a direct solve on those rows."""
    n_groups, d = 24, 6
    groups = np.repeat(np.arange(n_groups), 5)
    X = rng.normal(size=(len(groups), d))
    X[groups == 0] = X[groups == 0] * 20 + 50  # the outlying prompt
    Y = X + 0.3 * X @ rng.normal(size=(d, d)) + rng.normal(size=X.shape)
    lambdas = [1e-3, 1e-1, 10.0]
    m = LinearMap(lambdas=lambdas, cv_folds=4, pca_dim=pca_dim, seed=1).fit(X, Y, groups)
    folds = grouped_folds(groups, 4, seed=1)
    all_rows = Standardizer().fit(X)
    for (train, val), prep, mse in zip(folds, m.cv_["preprocessors"], m.cv_["fold_mse"]):
        alone = RidgePreprocess("identity", pca_dim).fit(X[train], Y[train])
        for got, ref in ((prep.x_scaler_, alone.x_scaler_), (prep.y_scaler_, alone.y_scaler_)):
            torch.testing.assert_close(got.mean_, ref.mean_, rtol=0, atol=1e-12)
            torch.testing.assert_close(got.scale_, ref.scale_, rtol=0, atol=1e-12)
        torch.testing.assert_close(prep.w0_, alone.w0_, rtol=0, atol=1e-12)
        if pca_dim is not None:
            torch.testing.assert_close(prep.pca_components_.abs(), alone.pca_components_.abs(), rtol=0, atol=1e-9)
        if 0 in groups[val]:  # the leak would matter here: the fold's statistics differ from all rows'
            assert float((prep.x_scaler_.mean_ - all_rows.mean_).abs().max()) > 1.0
        # the grid's validation MSE equals a direct solve per lambda on the fold's standardised rows
        Ztr, Rtr = prep.apply(X[train], Y[train])
        Zva, Rva = prep.apply(X[val], Y[val])
        Ztr, Rtr, Zva, Rva = (A.numpy() for A in (Ztr, Rtr, Zva, Rva))
        mz, mr = Ztr.mean(0), Rtr.mean(0)
        for lam, got in zip(sorted(lambdas), mse):
            W = np.linalg.solve((Ztr - mz).T @ (Ztr - mz) + lam * len(train) * np.eye(Ztr.shape[1]),
                                (Ztr - mz).T @ (Rtr - mr))
            assert got == pytest.approx((((Zva - mz) @ W + mr - Rva) ** 2).mean(), rel=1e-8)
    # the final map refits the preprocessing on every training row
    torch.testing.assert_close(m.x_scaler_.mean_, all_rows.mean_, rtol=0, atol=1e-12)


def test_pca_dim_and_zero_prior(rng):
    n, d = 300, 40
    X = rng.normal(size=(n, 5)) @ rng.normal(size=(5, d)) + 0.01 * rng.normal(size=(n, d))  # rank ~5
    Y = X @ rng.normal(size=(d, 7))  # d_out != d_in: prior 'auto' -> 'zero'
    m = LinearMap(pca_dim=5, lambdas=[1e-6, 1e-3]).fit(X, Y)
    assert m.prior_ == "zero" and m.pca_components_.shape == (d, 5)
    assert m.score(X, Y)["r2_variance_weighted"] > 0.99
    assert m.n_factorizations_ == 5 * 2 + 1 + 1  # a ridge and a PCA per fold, final fit, final PCA


def test_null_pair_is_identity(rng):
    X = rng.normal(size=(200, 16)) * 3 + 1
    groups = np.repeat(np.arange(50), 4)
    m = LinearMap().fit(X, X, groups)
    scores = m.score(X, X)
    assert scores["r2_uniform"] >= 0.999
    base = baseline_scores(X, X, X, X, groups)
    assert base["identity"]["r2_uniform"] == pytest.approx(scores["r2_uniform"], abs=1e-9)


def test_procrustes_recovers_rotation_and_scale(rng):
    d = 24
    R = np.linalg.qr(rng.normal(size=(d, d)))[0]
    X = rng.normal(size=(100, d))
    Y = 2.5 * X @ R + 3.0
    m = LinearMap(method="procrustes").fit(X, Y)
    np.testing.assert_allclose(m.rotation_.numpy(), R, atol=1e-10)
    assert m.scale_ == pytest.approx(2.5, abs=1e-12)
    np.testing.assert_allclose(m.predict(X), Y, atol=1e-10)
    assert m.lambda_ is None


def test_map_scores_match_sklearn(rng):
    T = rng.normal(size=(50, 6)) * np.array([1, 2, 3, 4, 5, 100])
    P = T + rng.normal(size=(50, 6))
    s = map_scores(T, P)
    assert s["r2_uniform"] == pytest.approx(r2_score(T, P))
    assert s["r2_variance_weighted"] == pytest.approx(r2_score(T, P, multioutput="variance_weighted"))
    np.testing.assert_allclose(s["r2_per_dim"], r2_score(T, P, multioutput="raw_values"))
    cos = (T * P).sum(1) / np.linalg.norm(T, axis=1) / np.linalg.norm(P, axis=1)
    assert s["mean_cosine"] == pytest.approx(cos.mean())
    assert 0 < s["cka"] <= 1 and np.isfinite(s["cka_debiased"])


def test_shuffled_pairs_baseline_is_near_chance(rng):
    X = rng.normal(size=(200, 8))
    Y = X @ rng.normal(size=(8, 8))
    base = baseline_scores(X[:150], Y[:150], X[150:], Y[150:], None, map_params={"prior": "zero"})
    assert base["shuffled"]["r2_uniform"] < 0.1


def test_torch_inputs_keep_tensors(rng):
    X = torch.as_tensor(rng.normal(size=(60, 8)), dtype=torch.float32)
    m = LinearMap(lambdas=[1e-3, 1.0], cv_folds=3).fit(X, X + 1.0)  # identity prior: exact
    out = m.predict(X)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    torch.testing.assert_close(out, (X + 1.0).double(), atol=1e-5, rtol=0)  # float32 rounding of Y
