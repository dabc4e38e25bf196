"""Known-answer tests of mechdiff.rq1.cka (small shapes, CPU, well under a second each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechdiff.rq1.cka import bootstrap_ci, linear_cka, permutation_null


def _song_unbiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Reference: Song et al. (2012) unbiased HSIC written out on raw (uncentred) Gram matrices."""
    n = X.shape[0]
    one = np.ones(n)

    def hsic(K, L):
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        return (np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))

    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def _biased_gram_cka(X: np.ndarray, Y: np.ndarray) -> float:
    n = X.shape[0]
    H = np.eye(n) - 1 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return float((K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(60, 8), (12, 40)])  # feature form, Gram form
def test_self_similarity_is_one(rng, debiased, shape):
    X = rng.normal(size=shape)
    assert linear_cka(X, X, debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(60, 8), (12, 40)])
def test_invariant_to_rotation_scaling_translation(rng, debiased, shape):
    X = rng.normal(size=shape)
    Y = X @ rng.normal(size=(shape[1], 5)) + rng.normal(size=(shape[0], 5))
    Q = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))[0]
    base = linear_cka(X, Y, debiased)
    assert linear_cka(3.7 * X @ Q + 5.0, Y, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(X, 0.2 * Y - 3.0, debiased) == pytest.approx(base, abs=1e-10)


@pytest.mark.parametrize("shape", [(50, 6), (10, 30)])
def test_both_forms_match_reference_formulas(rng, shape):
    X = rng.normal(size=shape) + 2.0
    Y = X[:, :4] @ rng.normal(size=(4, 7)) + rng.normal(size=(shape[0], 7)) - 1.0
    assert linear_cka(X, Y, debiased=True) == pytest.approx(_song_unbiased_cka(X, Y), abs=1e-10)
    assert linear_cka(X, Y) == pytest.approx(_biased_gram_cka(X, Y), abs=1e-12)


def test_small_n_bias_is_removed_by_debiasing(rng):
    X, Y = rng.normal(size=(32, 512)), rng.normal(size=(32, 512))
    assert linear_cka(X, Y) > 0.3
    assert abs(linear_cka(X, Y, debiased=True)) < 0.1


def test_torch_input_and_edge_cases(rng):
    X = rng.normal(size=(20, 5))
    assert linear_cka(torch.tensor(X, dtype=torch.float32), X) == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(linear_cka(np.ones((20, 3)), X))  # constant input: undefined, no exception
    with pytest.raises(ValueError, match="n >= 4"):
        linear_cka(X[:3], X[:3], debiased=True)
    with pytest.raises(ValueError, match="same positions"):
        linear_cka(X, X[:10])


@pytest.mark.parametrize("debiased", [False, True])
def test_permutation_null(debiased):
    rng = np.random.default_rng(1)  # a fixed draw: under the null p is uniform, so p <= 0.05 has chance 5%
    X = rng.normal(size=(40, 10))
    related = permutation_null(X, X @ rng.normal(size=(10, 10)) + 0.5 * rng.normal(size=(40, 10)),
                               n_perm=99, seed=1, debiased=debiased)
    unrelated = permutation_null(X, rng.normal(size=(40, 10)), n_perm=99, seed=1, debiased=debiased)
    assert related.null.shape == (99,)
    assert related.p_value == pytest.approx(0.01)
    assert unrelated.p_value > 0.05


@pytest.mark.parametrize("debiased", [False, True])
def test_bootstrap_interval_contains_estimate(rng, debiased):
    groups = np.repeat(np.arange(20), 4)  # 20 prompts x 4 positions
    X = rng.normal(size=(80, 6))
    Y = X @ rng.normal(size=(6, 6)) + rng.normal(size=(80, 6))
    res = bootstrap_ci(X, Y, groups, n_boot=200, seed=0, debiased=debiased)
    assert res.samples.shape == (200,)
    assert res.low <= res.estimate <= res.high
    assert res.estimate == pytest.approx(linear_cka(X, Y, debiased))


def test_debiased_bootstrap_is_not_inflated_by_duplicates(rng):
    X, Y = rng.normal(size=(32, 256)), rng.normal(size=(32, 256))
    res = bootstrap_ci(X, Y, None, n_boot=100, seed=0, debiased=True)
    assert abs(np.nanmedian(res.samples)) < 0.1  # copies of one row are not counted as independent pairs


@pytest.mark.parametrize("debiased", [False, True])
def test_grouped_bootstrap_equals_the_row_form_on_resampled_rows(rng, debiased):
    """The prompt bootstrap's per-group fast path gives each replicate the value of the row form on the
    resampled rows (counts per row), to float64 rounding, also for uncentred states and few-row replicates."""
    from mechdiff.rq1.cka import _cka_weighted, _GroupedCKA

    groups = rng.integers(0, 15, 90)  # 15 prompts, uneven sizes
    codes = np.unique(groups, return_inverse=True)[1]
    X = torch.as_tensor(rng.normal(size=(90, 6)) + 4.0)
    Y = X @ torch.as_tensor(rng.normal(size=(6, 7))) + torch.as_tensor(rng.normal(size=(90, 7)))
    n_groups = int(codes.max()) + 1
    assert _GroupedCKA.pays(X, Y, n_groups)
    counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(6)])
    counts[0] = 0
    counts[0, 0] = 2  # one prompt only: fewer than 4 distinct rows may remain
    fast = _GroupedCKA(X, Y, codes, n_groups).cka(torch.as_tensor(counts, dtype=torch.float64), debiased, chunk=4)
    rows = [_cka_weighted(X, Y, torch.as_tensor(c[codes], dtype=torch.float64), debiased) for c in counts]
    np.testing.assert_allclose(fast, rows, rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("debiased", [False, True])
def test_gram_form_equals_the_row_form_for_weights_and_permutations(rng, debiased):
    """The Gram form (the bootstrap's and the null's path for 8B-sized states) gives each weighting and each
    permutation the row form's value to float64 rounding, also for uncentred states and few-row weightings."""
    from mechdiff.rq1.cka import _cka_weighted, _ratio
    from mechdiff.rq1.hsic import GramForm as _GramForm
    from mechdiff.rq1.hsic import center as _center
    from mechdiff.rq1.hsic import hsic as _hsic

    X = torch.as_tensor(rng.normal(size=(30, 50)) + 3.0)
    Y = X @ torch.as_tensor(rng.normal(size=(50, 40))) + torch.as_tensor(rng.normal(size=(30, 40)))
    W = torch.as_tensor(rng.integers(0, 3, size=(5, 30)), dtype=torch.float64)
    W[0] = 0
    W[0, :3] = 2  # three distinct rows: undefined when debiased
    gram = _GramForm(X, Y)
    fast = [_ratio(*t) for t in zip(*gram.weighted(W, debiased))]
    rows = [_cka_weighted(X, Y, w, debiased) for w in W]
    if debiased:
        fast[0] = float("nan") if int((W[0] > 0).sum()) < 4 else fast[0]
    np.testing.assert_allclose(fast, rows, rtol=1e-9, atol=1e-12, equal_nan=True)
    one = torch.ones(30, dtype=torch.float64)
    Xc, Yc = _center(X, one), _center(Y, one)
    for perm in (torch.as_tensor(rng.permutation(30)) for _ in range(3)):
        assert float(gram.permuted(perm, debiased)) == pytest.approx(float(_hsic(Xc, Yc[perm], one, debiased)),
                                                                     rel=1e-9)


def test_the_gram_form_is_chosen_for_8b_sized_states_and_not_for_small_widths():
    from mechdiff.rq1.cka import _GroupedCKA
    from mechdiff.rq1.hsic import GramForm as _GramForm

    big = torch.empty(1, 4096).expand(10_000, -1)  # shapes only, no memory
    assert _GramForm.pays(10_000, 4096, 4096, 300) and not _GroupedCKA.pays(big, big, 1200)
    assert _GramForm.pays(10_000, 4096, 4096, 100, per_entry=100.0)  # permutations: a gather per draw
    assert not _GramForm.pays(2_000, 64, 64, 300)  # narrow states: the feature form is cheaper
    assert not _GramForm.pays(20_000, 4096, 4096, 300)  # five 20k x 20k float64 matrices do not fit the budget


def test_block_permutation_moves_whole_prompts_of_the_same_size_and_keeps_their_order(rng):
    from mechdiff.rq1.cka import block_permutation

    codes = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4])  # sizes 3, 3, 2, 3, 1 (groups 2 and 4 alone in size)
    codes = codes[rng.permutation(len(codes))]  # rows of one prompt need not be contiguous
    rows_of = {g: np.flatnonzero(codes == g) for g in range(5)}
    moved = set()
    for _ in range(200):
        perm = block_permutation(codes, rng)
        assert sorted(perm) == list(range(len(codes)))
        for g, rows in rows_of.items():
            (target,) = set(codes[perm[rows]])
            np.testing.assert_array_equal(perm[rows], rows_of[target])  # k-th row to k-th row
            assert len(rows_of[target]) == len(rows)
            moved |= {g} if target != g else set()
    assert moved == {0, 1, 3}  # every prompt with a same-size partner moves in some draw; the others never


def test_the_prompt_block_null_holds_its_level_where_positions_are_not_exchangeable():
    """200 null datasets: prompts are independent between X and Y, but both carry an effect of the
    position inside the prompt (as real states do). Whole-prompt permutations keep that shared structure,
    so the test rejects at most at its level; shuffling single rows breaks it and rejects almost always."""
    rng = np.random.default_rng(0)
    n_prompts, n_pos, d = 24, 4, 6
    position = rng.normal(size=(n_pos, d)) * 2.0  # shared by X and Y through the position index
    groups = np.repeat(np.arange(n_prompts), n_pos)
    block_rejects = row_rejects = 0
    for i in range(200):
        X = (np.tile(position, (n_prompts, 1)) + np.repeat(rng.normal(size=(n_prompts, d)), n_pos, 0)
             + rng.normal(size=(n_prompts * n_pos, d)))
        Y = (np.tile(position @ rng.normal(size=(d, d)), (n_prompts, 1))
             + np.repeat(rng.normal(size=(n_prompts, d)), n_pos, 0) + rng.normal(size=(n_prompts * n_pos, d)))
        block_rejects += permutation_null(X, Y, n_perm=99, seed=i, debiased=True, groups=groups).p_value <= 0.05
        row_rejects += permutation_null(X, Y, n_perm=99, seed=i, debiased=True).p_value <= 0.05
    assert 2 <= block_rejects <= 20  # Binomial(200, <= 0.05): above 20 has probability about 0.001
    assert row_rejects >= 150
