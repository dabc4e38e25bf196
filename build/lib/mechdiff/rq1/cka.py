"""Linear CKA between two sets of representations of the SAME positions (RQ1), its permutation null and its
prompt bootstrap.

Both estimators are computed in float64 on the device of the inputs (numpy input runs on the CPU):

* **biased** (Kornblith et al. 2019): centred-Gram HSIC, ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``.
  Inflated when ``n << d``: independent Gaussians with n = 32, d = 512 give about 0.94.
* **debiased**: the unbiased HSIC U-statistic of Song et al. (2012, JMLR), as used for CKA by Nguyen et
  al. (2021). Needs ``n >= 4``; each HSIC term is formed first and the ratio last; the value can be
  negative; it is ``nan`` only when a self-HSIC is ``<= 0`` (the ratio is undefined).

The HSIC terms (:mod:`mechdiff.rq1.hsic`) are exact in their feature-space and Gram forms and written for row
weights, so a bootstrap replicate is a weighting of the rows (pairs of copies of one row excluded from the
debiased term as the diagonal is) and a null replicate a permutation of them.

Pitfalls handled: P16 (small-N bias), P18 (negative HSIC, n >= 4, ratio of HSIC terms) in
the anchors document, section 5.4. Inputs are never modified.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from mechdiff.rq1.hsic import GramForm, GroupMoments, center, hsic
from mechdiff.stats import group_codes, percentile_interval, resample_counts

__all__ = [
    "BootstrapResult",
    "PermutationResult",
    "block_permutation",
    "bootstrap_ci",
    "linear_cka",
    "match_input",
    "permutation_null",
    "to_float64",
]


class PermutationResult(NamedTuple):
    """Observed CKA, its permutation null and the one-sided p-value ``P(null >= observed)``."""

    statistic: float
    null: np.ndarray  # (n_perm,)
    p_value: float


class BootstrapResult(NamedTuple):
    """Point estimate, percentile interval and the bootstrap samples (``nan`` where undefined)."""

    estimate: float
    low: float
    high: float
    level: float
    samples: np.ndarray  # (n_boot,)


# --------------------------------------------------------------------------------------------------
# array plumbing shared by the math modules


def to_float64(A, device: torch.device | str | None = None) -> torch.Tensor:
    """Return ``A`` (ndarray or tensor) as a float64 tensor, on ``device`` or on the device it is on.

    Parameters
    ----------
    A : ndarray or Tensor of any shape
    device : torch device, optional

    Returns
    -------
    Tensor of the same shape, dtype float64. Never aliases a caller's integer or float32 data.
    """
    if isinstance(A, torch.Tensor):
        return A.detach().to(device=device or A.device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(A), dtype=torch.float64, device=device)


def match_input(T: torch.Tensor, ref):
    """Return tensor ``T`` as a numpy array when ``ref`` is not a tensor, else as a tensor on ``T``'s device."""
    if isinstance(ref, torch.Tensor):
        return T
    return T.detach().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# CKA from HSIC terms


def _check_pair(X: torch.Tensor, Y: torch.Tensor, debiased: bool) -> None:
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"X and Y must be 2-D (n, d); got shapes {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same positions (rows): {X.shape[0]} != {Y.shape[0]}")
    if debiased and X.shape[0] < 4:
        raise ValueError(f"the debiased estimator needs n >= 4 rows; got n = {X.shape[0]}")


def _ratio(hxy: torch.Tensor, hxx: torch.Tensor, hyy: torch.Tensor) -> float:
    """CKA from HSIC terms; ``nan`` (silently) when a self-HSIC is not positive."""
    if not (hxx > 0 and hyy > 0):
        return float("nan")
    return float(hxy / (hxx.sqrt() * hyy.sqrt()))


def _cka_weighted(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, debiased: bool) -> float:
    if debiased and int((w > 0).sum()) < 4:
        return float("nan")
    Xc, Yc = center(X, w), center(Y, w)
    return _ratio(hsic(Xc, Yc, w, debiased), hsic(Xc, Xc, w, debiased), hsic(Yc, Yc, w, debiased))


class _GroupedCKA:
    """CKA of X (n, d1), Y (n, d2) under per-group weights, from :class:`GroupMoments` of the three HSIC
    terms (the prompt bootstrap's fast path; the same values as :func:`_cka_weighted` on row counts)."""

    MAX_ENTRIES = 2 ** 25  # float64 entries of the three per-group (d, d) sums: 256 MiB

    @classmethod
    def pays(cls, X: torch.Tensor, Y: torch.Tensor, n_groups: int) -> bool:
        """Cheaper than the row form (fewer groups than rows) and small enough to hold."""
        d1, d2 = X.shape[1], Y.shape[1]
        return 2 * n_groups <= X.shape[0] and n_groups * (d1 * d2 + d1 * d1 + d2 * d2) <= cls.MAX_ENTRIES

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, codes: np.ndarray, n_groups: int):
        codes_t = torch.as_tensor(codes, dtype=torch.long, device=X.device)
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)  # the weighted centring absorbs any shift; this one limits cancellation
        self.xy, self.xx, self.yy = (GroupMoments(A, B, codes_t, n_groups) for A, B in ((Xc, Yc), (Xc, Xc), (Yc, Yc)))

    def cka(self, C: torch.Tensor, debiased: bool, chunk: int = 64) -> np.ndarray:
        """CKA for each row of per-group weights ``C`` (B, G): (B,), ``nan`` where undefined."""
        out = []
        for lo in range(0, C.shape[0], chunk):
            Cb = C[lo:lo + chunk]
            out += [_ratio(xy, xx, yy) for xy, xx, yy in zip(
                self.xy.hsic(Cb, debiased), self.xx.hsic(Cb, debiased), self.yy.hsic(Cb, debiased))]
        values = np.asarray(out, dtype=float)
        if debiased:  # as _cka_weighted: fewer than 4 distinct rows
            values[((C > 0).to(self.xy.n.dtype) @ self.xy.n < 4).cpu().numpy()] = np.nan
        return values


def block_permutation(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A row permutation (n,) that moves whole groups (prompts): the rows of group g, in their order,
    take the rows of group pi(g), where pi permutes the groups that have the same number of rows (a
    group with a size of its own stays in place). Positions of one prompt are not exchangeable; whole
    prompts are. ``codes`` (n,) group codes in [0, G)."""
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    perm = np.arange(len(codes))
    for size in np.unique(sizes[sizes > 0]):
        members = np.flatnonzero(sizes == size)
        if len(members) < 2:
            continue
        targets = members[rng.permutation(len(members))]
        src = (starts[members][:, None] + np.arange(size)).ravel()
        dst = (starts[targets][:, None] + np.arange(size)).ravel()
        perm[order[src]] = order[dst]
    return perm


# --------------------------------------------------------------------------------------------------
# public API


def linear_cka(X, Y, debiased: bool = False) -> float:
    """Linear CKA between two representations of the same n positions.

    Parameters
    ----------
    X : ndarray or Tensor of shape (n, d1)
        First model's states (e.g. base, one row per aligned position).
    Y : ndarray or Tensor of shape (n, d2)
        Second model's states at the same positions, same row order.
    debiased : bool, default False
        Use the unbiased HSIC estimator (needs n >= 4). Report it whenever n is not much larger than d.

    Returns
    -------
    float
        CKA in [0, 1] for the biased estimator; the debiased one may fall slightly below 0. ``nan`` when
        undefined (a constant input, or a non-positive debiased self-HSIC).

    Examples
    --------
    >>> X = np.random.default_rng(0).normal(size=(50, 8))
    >>> round(linear_cka(X, 2 * X + 1), 12)
    1.0
    """
    Xt = to_float64(X)
    Yt = to_float64(Y, device=Xt.device)
    _check_pair(Xt, Yt, debiased)
    return _cka_weighted(Xt, Yt, torch.ones(Xt.shape[0], dtype=torch.float64, device=Xt.device), debiased)


def permutation_null(X, Y, n_perm: int = 1000, seed: int = 0, debiased: bool = False,
                     groups=None) -> PermutationResult:
    """Permutation null of linear CKA: shuffle Y against X, breaking the pairing of positions.

    With ``groups`` (prompt labels) whole prompts are permuted (:func:`block_permutation`): positions of
    one prompt share the prompt and their place in it, so they are not exchangeable, and shuffling single
    rows would make a null that rejects for that shared structure alone. Without ``groups`` rows are
    permuted. The smallest attainable p-value is ``1 / (1 + n_perm)``.

    Parameters
    ----------
    X : ndarray or Tensor of shape (n, d1)
    Y : ndarray or Tensor of shape (n, d2)
    n_perm : int, default 1000
        Number of permutations. Cost: ``n_perm`` CKA cross terms (the self terms are computed once).
    seed : int, default 0
        Seed of the numpy generator that draws the permutations (same draws on CPU and GPU).
    debiased : bool, default False
    groups : array-like of shape (n,), optional
        Group (prompt) label of each row; whole groups are permuted. ``None``: rows are permuted.

    Returns
    -------
    PermutationResult
        ``statistic`` (observed CKA), ``null`` of shape (n_perm,), and
        ``p_value = (1 + #{null >= statistic}) / (1 + n_perm)``.
    """
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1; got {n_perm}")
    Xt = to_float64(X)
    Yt = to_float64(Y, device=Xt.device)
    _check_pair(Xt, Yt, debiased)
    n = Xt.shape[0]
    codes = None if groups is None else group_codes(groups, n)
    rng = np.random.default_rng(seed)
    perms = (rng.permutation(n) if codes is None else block_permutation(codes, rng) for _ in range(n_perm))
    w = torch.ones(n, dtype=torch.float64, device=Xt.device)
    Xc, Yc = center(Xt, w), center(Yt, w)
    hxx, hyy = hsic(Xc, Xc, w, debiased), hsic(Yc, Yc, w, debiased)  # invariant under permutation
    observed = _ratio(hsic(Xc, Yc, w, debiased), hxx, hyy)
    null = np.empty(n_perm)
    if GramForm.pays(n, Xt.shape[1], Yt.shape[1], n_perm, per_entry=100.0):
        gram = GramForm(Xt, Yt)
        for b, perm in enumerate(perms):
            null[b] = _ratio(gram.permuted(torch.as_tensor(perm, device=Xt.device), debiased), hxx, hyy)
    else:
        for b, perm in enumerate(perms):
            null[b] = _ratio(hsic(Xc, Yc[torch.as_tensor(perm, device=Xt.device)], w, debiased), hxx, hyy)
    p_value = (1.0 + np.sum(null >= observed)) / (1.0 + n_perm)
    return PermutationResult(observed, null, float(p_value))


def bootstrap_ci(X, Y, groups=None, n_boot: int = 1000, seed: int = 0, debiased: bool = False,
                 level: float = 0.95) -> BootstrapResult:
    """Percentile bootstrap interval of linear CKA, resampling GROUPS (prompts), not rows.

    Positions of one prompt are correlated, so a row bootstrap is too narrow. Each replicate draws as
    many groups as there are, with replacement, and computes CKA on the resampled set, represented by
    per-row counts (no rows are copied). For ``debiased=True``, pairs of copies of the same row are
    excluded like the diagonal of the U-statistic (see the module docstring); with no duplicates this is
    exactly the unbiased estimator.

    Parameters
    ----------
    X : ndarray or Tensor of shape (n, d1)
    Y : ndarray or Tensor of shape (n, d2)
    groups : array-like of shape (n,), optional
        Group (prompt) label of each row; ``None`` treats every row as its own group.
    n_boot : int, default 1000
    seed : int, default 0
    debiased : bool, default False
    level : float, default 0.95
        Coverage of the two-sided percentile interval.

    Returns
    -------
    BootstrapResult
        ``estimate`` (CKA on the full data), ``low``/``high`` (nan-ignoring percentiles), ``level`` and
        ``samples`` of shape (n_boot,) with ``nan`` for replicates where CKA is undefined.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    Xt = to_float64(X)
    Yt = to_float64(Y, device=Xt.device)
    _check_pair(Xt, Yt, debiased)
    codes = group_codes(groups, Xt.shape[0])
    n_groups = int(codes.max()) + 1
    counts = resample_counts(n_groups, n_boot, seed)  # (n_boot, G): how often each prompt is drawn
    if _GroupedCKA.pays(Xt, Yt, n_groups):
        samples = _GroupedCKA(Xt, Yt, codes, n_groups).cka(
            torch.as_tensor(counts, dtype=torch.float64, device=Xt.device), debiased)
    elif GramForm.pays(Xt.shape[0], Xt.shape[1], Yt.shape[1], 3 * n_boot):
        gram, codes_t = GramForm(Xt, Yt), torch.as_tensor(codes, device=Xt.device)
        samples = np.concatenate([_weighted_cka(gram, torch.as_tensor(chunk, dtype=torch.float64,
                                                                      device=Xt.device)[:, codes_t], debiased)
                                  for chunk in np.array_split(counts, max(1, n_boot // 16))])
    else:
        samples = np.array([_cka_weighted(Xt, Yt, torch.as_tensor(c[codes], dtype=torch.float64, device=Xt.device),
                                          debiased) for c in counts])
    estimate = linear_cka(Xt, Yt, debiased)
    low, high = percentile_interval(samples, level)
    return BootstrapResult(estimate, low, high, level, samples)


def _weighted_cka(gram: GramForm, W: torch.Tensor, debiased: bool) -> np.ndarray:
    """CKA for each row of row weights ``W`` (B, n) from the Gram form: (B,), ``nan`` where undefined
    (as :func:`_cka_weighted`: a self-HSIC <= 0, or fewer than 4 distinct rows when debiased)."""
    values = np.array([_ratio(xy, xx, yy) for xy, xx, yy in zip(*gram.weighted(W, debiased))], dtype=float)
    if debiased:
        values[((W > 0).sum(1) < 4).cpu().numpy()] = np.nan
    return values
