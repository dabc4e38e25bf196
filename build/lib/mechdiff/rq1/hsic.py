"""HSIC terms of linear CKA (:mod:`mechdiff.rq1.cka`), in float64, for row *weights*, in three exact forms.

``w`` (n,) counts each original row in a resampled set; ``w = 1`` is the plain estimator. With counts from
a bootstrap the biased term equals the term on the concatenated resampled rows; the debiased one
(Song et al.'s U-statistic) is computed on the resampled set with pairs of copies of the same original row
excluded exactly as the diagonal is (copies are not independent draws, and keeping them would
re-introduce the ``n << d`` inflation the estimator removes).

* :func:`hsic`: one weighting, from the w-centred features (:func:`center`) in the cheaper of the
  feature-space form (cost ``n (d1 + d2)^2``, used when ``d1 + d2 <= n``) and the Gram form (cost
  ``n^2 (d1 + d2)``).
* :class:`GroupMoments`: many per-group weightings (a prompt bootstrap) from per-group sums.
* :class:`GramForm`: many row weightings or permutations (a bootstrap or a null) from the (n, n) Gram
  matrices, formed once.

Inputs are never modified.
"""

from __future__ import annotations

import torch

__all__ = ["GramForm", "GroupMoments", "center", "hsic"]


def center(A: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Subtract the ``w``-weighted column mean. A: (n, d), w: (n,)."""
    return A - (w @ A / w.sum())


def _cross(Xc: torch.Tensor, Yc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_ij w_i w_j <x_i, x_j> <y_i, y_j>`` in the cheaper of the feature and Gram forms."""
    if Xc.shape[1] + Yc.shape[1] <= Xc.shape[0]:
        sw = w.sqrt()[:, None]
        return ((sw * Xc).T @ (sw * Yc)).square().sum()  # ||(√w Xc)^T (√w Yc)||_F^2
    K, L = Xc @ Xc.T, Yc @ Yc.T  # (n, n) Gram matrices
    return w @ (K * L) @ w


def hsic(Xc: torch.Tensor, Yc: torch.Tensor, w: torch.Tensor, debiased: bool) -> torch.Tensor:
    """HSIC of w-centred features Xc (n, d1), Yc (n, d2); biased up to the common factor 1/n^2.

    The debiased form is Song et al.'s U-statistic
    ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))`` with ``K~`` the Gram matrix
    with its diagonal (and, for counts ``w``, every pair of copies of one row) set to zero; for centred
    features ``1'K~1 = -sum w^2 |x|^2`` and ``1'K~L~1 = sum w^3 |x|^2 |y|^2``.
    """
    cross = _cross(Xc, Yc, w)
    if not debiased:
        return cross
    return _u_statistic(cross, w, Xc.square().sum(1), Yc.square().sum(1))


def _u_statistic(cross: torch.Tensor, w: torch.Tensor, kx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """Debiased HSIC from the weighted cross term and the centred rows' squared norms ``kx``, ``ly``.

    Shapes: ``w``, ``kx``, ``ly`` (..., n) and ``cross`` (...): batched over leading dimensions."""
    n = w.sum(-1)
    trace = cross - (w.square() * kx * ly).sum(-1)
    sum_k, sum_l = -(w.square() * kx).sum(-1), -(w.square() * ly).sum(-1)
    rows = (w.pow(3) * kx * ly).sum(-1)
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * rows / (n - 2)) / (n * (n - 3))


class GroupMoments:
    """Per-group sums of one HSIC term's row statistics, so that the term under per-group weights ``c`` (G,)
    (every row of group g counted ``c_g`` times, as in a prompt bootstrap) costs ``G d1 d2`` instead of
    ``n d1 d2``. Exact: with ``a_i = |x_i|^2``, ``b_i = |y_i|^2`` and the weighted means ``mu``, ``nu``, every
    row quantity of :func:`hsic` is a polynomial in ``x_i``, ``y_i``, ``mu`` and ``nu`` whose group sums are
    stored here. X (n, d1), Y (n, d2) should be roughly centred (less cancellation); ``codes`` (n,) in [0, G)."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, codes: torch.Tensor, n_groups: int):
        def gsum(v: torch.Tensor) -> torch.Tensor:  # (n, ...) -> (G, ...)
            return torch.zeros((n_groups, *v.shape[1:]), dtype=v.dtype, device=v.device).index_add_(0, codes, v)

        a, b = X.square().sum(1), Y.square().sum(1)
        self.n, self.a, self.b, self.ab = gsum(torch.ones_like(a)), gsum(a), gsum(b), gsum(a * b)
        self.x, self.y, self.ay, self.bx = gsum(X), gsum(Y), gsum(a[:, None] * Y), gsum(b[:, None] * X)
        order = torch.argsort(codes, stable=True)
        bounds = torch.searchsorted(codes[order], torch.arange(n_groups + 1, device=codes.device)).tolist()
        self.S = torch.stack([X[order[lo:hi]].T @ Y[order[lo:hi]] for lo, hi in zip(bounds[:-1], bounds[1:])])

    def hsic(self, C: torch.Tensor, debiased: bool) -> torch.Tensor:
        """:func:`hsic` of the weighted-centred rows for each row of per-group weights ``C`` (B, G): (B,).
        Batched so that each per-group sum is read once for all B weightings."""
        N = C @ self.n  # (B,)
        mu, nu = (C @ self.x) / N[:, None], (C @ self.y) / N[:, None]  # (B, d1), (B, d2)
        G, d1, d2 = self.S.shape
        M = (C @ self.S.reshape(G, d1 * d2)).view(-1, d1, d2) - N[:, None, None] * mu[:, :, None] * nu[:, None, :]
        cross = M.square().sum((1, 2))  # sum_i w_i xc_i yc_i^T, squared Frobenius norm
        if not debiased:
            return cross
        mu2, nu2 = mu.square().sum(1)[:, None], nu.square().sum(1)[:, None]  # (B, 1)
        xm, yn = mu @ self.x.T, nu @ self.y.T  # (B, G) group sums of x_i . mu and y_i . nu
        Snu = (self.S.reshape(G * d1, d2) @ nu.T).view(G, d1, -1)  # (G, d1, B)
        mSn = torch.einsum("gib,bi->bg", Snu, mu)  # (B, G) group sums of (x_i . mu)(y_i . nu)
        k = self.a - 2 * xm + mu2 * self.n  # (B, G) group sums of |x_i - mu|^2
        ell = self.b - 2 * yn + nu2 * self.n
        kl = (self.ab - 2 * (nu @ self.ay.T) + nu2 * self.a - 2 * (mu @ self.bx.T) + 4 * mSn
              - 2 * nu2 * xm + mu2 * self.b - 2 * mu2 * yn + mu2 * nu2 * self.n)  # group sums of |xc|^2 |yc|^2
        C2 = C.square()
        trace = cross - (C2 * kl).sum(1)
        sum_k, sum_l, rows = -(C2 * k).sum(1), -(C2 * ell).sum(1), (C2 * C * kl).sum(1)
        return (trace + sum_k * sum_l / ((N - 1) * (N - 2)) - 2.0 * rows / (N - 2)) / (N * (N - 3))


class GramForm:
    """HSIC terms of X (n, d1), Y (n, d2) from their (n, n) Gram matrices, for many row weightings
    (a bootstrap) or row permutations (a null). Forming the Grams costs ``n^2 (d1 + d2)`` once; each
    evaluation then costs ``O(n^2)`` instead of the feature form's ``n d1 d2``: for 8B-sized states
    (d = 4096, n = 10k) about a hundred times less. Exact: with ``K`` the Gram of the globally centred X,
    weights ``w`` (total N), ``a = K w / N`` and ``c = w'K w / N^2`` (and ``b``, ``e`` from ``L``), the
    ``w``-centred Gram is ``K - a 1' - 1 a' + c``, so the cross term is
    ``w'(K o L)w - 2 N sum_i w_i a_i b_i + c e N^2`` and the centred squared norms are ``diag K - 2a + c``."""

    MAX_ENTRIES = 2 ** 30  # float64 entries of the five (n, n) matrices held: 8 GiB

    @classmethod
    def pays(cls, n: int, d1: int, d2: int, evaluations: int, per_entry: float = 3.0) -> bool:
        """Cheaper than ``evaluations`` feature-form cross terms, and small enough to hold. ``per_entry``:
        the cost of one evaluation per (n, n) entry in multiply-adds: about 3 for a weighting (three
        matrix-vector products), about 100 for a permutation (a memory-bound gather of ``L``)."""
        return (5 * n * n <= cls.MAX_ENTRIES
                and n * n * (d1 + d2) + per_entry * evaluations * n * n < evaluations * n * d1 * d2)

    def __init__(self, X: torch.Tensor, Y: torch.Tensor):
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        self.K, self.L = Xc @ Xc.T, Yc @ Yc.T  # (n, n)
        self.dk, self.dl = self.K.diagonal().clone(), self.L.diagonal().clone()  # (n,) squared row norms
        self.products: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def weighted(self, W: torch.Tensor, debiased: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """HSIC (xy, xx, yy) of the rows weighted by each row of ``W`` (B, n): three (B,) tensors."""
        N = W.sum(1, keepdim=True)  # (B, 1)
        a, b = (W @ self.K) / N, (W @ self.L) / N  # (B, n); K, L symmetric
        c, e = (W * a).sum(1, keepdim=True) / N, (W * b).sum(1, keepdim=True) / N  # (B, 1)
        kx, ly = self.dk - 2 * a + c, self.dl - 2 * b + e  # (B, n) centred squared norms

        if self.products is None:  # elementwise products K o L, K o K, L o L: (n, n) each, formed once
            self.products = (self.K * self.L, self.K.square(), self.L.square())

        def term(M: torch.Tensor, p: torch.Tensor, q: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                 u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cross = ((W @ M) * W).sum(1) - 2 * N[:, 0] * (W * p * q).sum(1) + (s * t * N.square())[:, 0]
            return _u_statistic(cross, W, u, v) if debiased else cross

        KL, KK, LL = self.products
        return term(KL, a, b, c, e, kx, ly), term(KK, a, a, c, c, kx, kx), term(LL, b, b, e, e, ly, ly)

    def permuted(self, perm: torch.Tensor, debiased: bool) -> torch.Tensor:
        """HSIC of X's rows against Y's rows in the order ``perm`` (n,), unit weights: a scalar."""
        cross = (self.K * self.L[perm][:, perm]).sum()
        if not debiased:
            return cross
        return _u_statistic(cross, torch.ones_like(self.dk), self.dk, self.dl[perm])

