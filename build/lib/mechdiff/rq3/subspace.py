"""Directions and rank-k subspaces for steering and ablation (RQ3 building blocks).

* :func:`diff_in_means`, :func:`rank_k_basis`, :func:`bootstrap_stability`: estimate a direction / an
  orthonormal rank-k basis from two sets of states, in float64, and check its stability.
  :func:`sort_by_change_share`: order a basis's columns by the share of the change each carries.
* :func:`orthonormal_basis`: a basis as a checked float64 (d, k) tensor with orthonormal columns.
* :func:`random_subspace`: an orthonormal control of equal rank. :func:`typical_projection_norm`: the
  scale for expressing a steering strength alpha in relative units (P28).
* :class:`SteeringSubspace`: the fitted RQ3 subspace of one layer (ablation basis, steering basis and
  vectors, stability), from the paired fine-tuning changes; :func:`no_change` detects a null pair.

Pitfalls handled (anchors section 5.6): P25 float64 accumulation and bootstrap stability; P26 centred
paired differences, QR before ``U U^T``, explained variance, random controls; P28 alpha units.
"""

from __future__ import annotations

import numpy as np
import torch

from mechdiff.rq1.cka import match_input, to_float64
from mechdiff.stats import draw_group_counts, group_codes

__all__ = [
    "SteeringSubspace",
    "bootstrap_stability",
    "diff_in_means",
    "no_change",
    "orthonormal_basis",
    "random_subspace",
    "rank_k_basis",
    "sort_by_change_share",
    "typical_projection_norm",
]

_ORTHONORMAL_TOL = 1e-6


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm()
    if not norm > 0:
        raise ValueError("cannot normalise a zero direction (the two sets have equal means)")
    return v / norm


def diff_in_means(A, B):
    """Difference of the means of A and B, accumulated in float64, and its unit direction.

    Parameters
    ----------
    A : ndarray or Tensor of shape (n_a, d)
        States of the first condition (e.g. tuned, or prompts with the behaviour).
    B : ndarray or Tensor of shape (n_b, d)
        States of the second condition.

    Returns
    -------
    diff : ndarray or Tensor of shape (d,)
        ``mean(A) - mean(B)`` (unnormalised), float64, numpy when A is numpy.
    direction : ndarray or Tensor of shape (d,)
        ``diff / ||diff||``.
    """
    At = to_float64(A)
    Bt = to_float64(B, device=At.device)
    if At.ndim != 2 or Bt.ndim != 2 or At.shape[1] != Bt.shape[1]:
        raise ValueError(f"A (n_a, d) and B (n_b, d) must be 2-D with equal d; got {tuple(At.shape)}, "
                         f"{tuple(Bt.shape)}")
    diff = At.mean(0) - Bt.mean(0)
    return match_input(diff, A), match_input(_unit(diff), A)


def rank_k_basis(diffs, k: int, direction=None, center: bool = True):
    """Orthonormal rank-k basis of (paired) differences, with explained variance ratios.

    Without ``direction``: the top-k right singular vectors of the centred differences. With it: the
    unit ``direction`` first, then the top k-1 singular vectors of the differences with that direction
    projected out, orthonormalised by QR. Columns are signed so the mean difference projects >= 0.

    Parameters
    ----------
    diffs : ndarray or Tensor of shape (n_pairs, d)
        Per-example differences (e.g. tuned minus base states of the same prompt and position).
    k : int
        Rank, 1 <= k <= min(n_pairs, d).
    direction : ndarray or Tensor of shape (d,), optional
        E.g. the diff-in-means direction.
    center : bool, default True
        Subtract the mean difference before the SVD (P26).

    Returns
    -------
    basis : ndarray or Tensor of shape (d, k)
        Orthonormal columns (``basis.T @ basis = I``).
    explained_variance_ratio : ndarray of shape (k,)
        Share of the (centred) differences' total variance along each column.
    """
    D = to_float64(diffs)
    if D.ndim != 2 or not 1 <= k <= min(D.shape):
        raise ValueError(f"need diffs (n_pairs, d) and 1 <= k <= min(n_pairs, d); got {tuple(D.shape)}, k={k}")
    mean = D.mean(0)
    Dc = D - mean if center else D
    if direction is None:
        basis = torch.linalg.svd(Dc, full_matrices=False)[2][:k].T  # (d, k)
    else:
        u = _unit(to_float64(direction, device=D.device).reshape(-1))
        rest = torch.linalg.svd(Dc - (Dc @ u)[:, None] * u, full_matrices=False)[2][: k - 1].T  # (d, k-1)
        basis = torch.linalg.qr(torch.cat([u[:, None], rest], dim=1))[0]  # (d, k)
    basis = _orient(basis, mean if direction is None else u)
    total = Dc.square().sum()
    ratio = (Dc @ basis).square().sum(0) / total if total > 0 else torch.zeros(k, dtype=torch.float64)
    return match_input(basis, diffs), ratio.cpu().numpy()


def sort_by_change_share(basis: torch.Tensor, change: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Columns of ``basis`` (d, k), orthonormal, ordered by the share of the change each carries, descending.

    ``change`` (n, d): the paired differences themselves, not centred (a shift shared by every row is part
    of the change). Share of column j: ``||change @ u_j||^2 / ||change||_F^2`` (all 0 without a change).
    Ties keep the input order (stable sort), so the order is deterministic. Returns the sorted basis
    (d, k), the order (k,) (sorted column i is input column ``order[i]``) and the sorted shares (k,).
    """
    C = to_float64(change, device=basis.device)
    total = C.square().sum()
    share = ((C @ basis.double()).square().sum(0) / total if total > 0
             else torch.zeros(basis.shape[1], dtype=torch.float64)).cpu().numpy()
    order = np.argsort(-share, kind="stable")
    return basis[:, torch.as_tensor(order, device=basis.device)], order, share[order]


def _orient(U: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Flip columns of U (d, k) so that ``reference @ U >= 0``."""
    signs = torch.where(reference @ U < 0, -1.0, 1.0).to(U.dtype)
    return U * signs


def bootstrap_stability(A, B, n_boot: int = 200, seed: int = 0, groups=None, paired: bool = False) -> np.ndarray:
    """Cosines between diff-in-means directions of bootstrap resamples and of the full data (P25).

    Reference value: for pure noise in high d the expected cosine is about ``1/sqrt(2)`` (the resampling
    noise is as large as the full estimate's), not 0; a stable direction gives values near 1.

    Parameters
    ----------
    A : ndarray or Tensor of shape (n_a, d)
    B : ndarray or Tensor of shape (n_b, d)
    n_boot : int, default 200
    seed : int, default 0
    groups : tuple (groups_a, groups_b) of arrays of shapes (n_a,), (n_b,), optional
        Prompt ids; whole prompts are resampled. ``None``: rows are resampled.
    paired : bool, default False
        Rows of A and B correspond (n_a == n_b, e.g. tuned and base states of the same positions): one
        draw (by ``groups_a``) serves both, keeping the pairs.

    Returns
    -------
    ndarray of shape (n_boot,)
    """
    At = to_float64(A)
    Bt = to_float64(B, device=At.device)
    full = _unit(At.mean(0) - Bt.mean(0))
    groups_a, groups_b = (None, None) if groups is None else groups
    if paired and At.shape[0] != Bt.shape[0]:
        raise ValueError(f"paired=True needs as many rows in A as in B; got {At.shape[0]} and {Bt.shape[0]}")
    codes_a, codes_b = group_codes(groups_a, At.shape[0]), group_codes(groups_b, Bt.shape[0])
    rng = np.random.default_rng(seed)
    cosines = np.empty(n_boot)
    for b in range(n_boot):
        wa = draw_group_counts(codes_a, rng)
        wb = wa if paired else draw_group_counts(codes_b, rng)
        diff = _weighted_mean(At, wa) - _weighted_mean(Bt, wb)
        cosines[b] = float(diff @ full / diff.norm()) if diff.norm() > 0 else float("nan")
    return cosines


def _weighted_mean(A: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    w = torch.as_tensor(counts, dtype=torch.float64, device=A.device)
    return w @ A / w.sum()


# --------------------------------------------------------------------------------------------------
# projections


def orthonormal_basis(U, device: torch.device | None) -> torch.Tensor:
    """U as a float64 (d, k) tensor with orthonormal columns, checked."""
    Ut = to_float64(U, device=device)
    Ut = Ut[:, None] if Ut.ndim == 1 else Ut
    if Ut.ndim != 2:
        raise ValueError(f"U must be (d, k); got shape {tuple(Ut.shape)}")
    gram_err = (Ut.T @ Ut - torch.eye(Ut.shape[1], dtype=torch.float64, device=Ut.device)).abs().max()
    if gram_err > _ORTHONORMAL_TOL:
        raise ValueError(f"U must be (d, k) with orthonormal columns (max |U^T U - I| = {float(gram_err):.2e}); "
                         "orthonormalise it first, e.g. with torch.linalg.qr")
    return Ut


def random_subspace(d: int, k: int, seed: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Random orthonormal basis (d, k), float64 tensor: QR of a seeded Gaussian (Haar-distributed).

    The numpy generator draws the matrix, so the basis is the same on every device.
    """
    if not 1 <= k <= d:
        raise ValueError(f"need 1 <= k <= d; got d={d}, k={k}")
    G = torch.as_tensor(np.random.default_rng(seed).standard_normal((d, k)), device=device)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R))  # sign fix makes Q Haar-distributed


def typical_projection_norm(H, U, mask=None) -> float:
    """Mean norm of the component of H in span(U), over the positions selected by ``mask``.

    Use it to express a steering strength in relative units (P28): ``alpha * typical_projection_norm``.

    Parameters
    ----------
    H : ndarray or Tensor of shape (..., d)
        States, e.g. (batch, pos, d).
    U : ndarray or Tensor of shape (d, k)
        Orthonormal basis.
    mask : ndarray or Tensor of bool, shape H.shape[:-1], optional
        True on content tokens (exclude sinks, BOS and padding); ``None`` uses every position.

    Returns
    -------
    float
        ``mean ||h U||_2`` over the selected positions (nan if none is selected).
    """
    Ht = to_float64(H)
    norms = (Ht @ orthonormal_basis(U, Ht.device)).norm(dim=-1)  # H.shape[:-1]
    if mask is not None:
        norms = norms[to_float64(mask, device=Ht.device).bool()]
    return float(norms.mean()) if norms.numel() else float("nan")


# --------------------------------------------------------------------------------------------------
# the fitted subspace


class SteeringSubspace:
    """Diff-in-means direction of a target-vs-neutral contrast plus a rank-k basis of paired differences.

    ``fit(target, neutral, paired, groups, paired_answer)``: ``direction_`` = unit ``mean(target) -
    mean(neutral)`` (float64, P25); the basis spans that direction, then the top singular vectors
    of the centred paired differences (tuned minus base, same prompt and position: at the prompt's last
    token, and at the answer tokens when ``paired_answer`` is given) with it projected out,
    orthonormalised (P26); ``basis_`` (D, k_max) orders those columns by the share of the change (the
    paired differences, not centred) each carries, descending (:func:`~mechdiff.rq3.subspace.sort_by_change_share`),
    so the contrast direction comes first only when it carries the most; ``change_share_`` (k_max,) those
    shares (descending); ``explained_variance_ratio_`` (k_max,) of the centred differences, per column in
    the same order (the spread around the mean change, so not monotone: the mean-change direction has little);
    ``change_captured_`` (k_max,) = ``||P_k m||^2 / ||m||^2`` for the mean last-token difference m;
    ``stability_`` (n_boot,) bootstrap cosines of the direction (whole prompt groups resampled).

    Steering (:meth:`steering_vectors`) is rank-k in its own nested basis ``steer_basis_`` (D, k_max): the
    top right singular vectors of the paired changes (not centred, both roles pooled), so it never holds
    the mean change m as a column and ``W_k W_k^T m`` grows with k (with U above, m or the contrast sits in
    span(U_2), so every k >= 2 would add the same vector). For each position role (``end`` = the prompt's
    last token, ``answer`` = answer tokens) the vector is ``alpha * c * unit(sum_j c_j w_j)`` with
    ``c_j = w_j . m_role`` the dev-mean projection of that role's change on direction j and ``c`` the
    typical projection norm of that role's paired differences on the unit vector (P28);
    ``steer_change_captured_`` (k_max,) = ``||W_k^T m||^2 / ||m||^2`` for the last-token mean change.
    With no change at all (a null pair) it is zero.
    """

    def __init__(self, k_max: int = 8, n_boot: int = 200, seed: int = 0):
        self.k_max, self.n_boot, self.seed = k_max, n_boot, seed

    def fit(self, target, neutral, paired, groups=None, paired_answer=None) -> SteeringSubspace:
        T, N, Dp = (torch.as_tensor(x).double() for x in (target, neutral, paired))
        Da = None if paired_answer is None or len(paired_answer) == 0 else torch.as_tensor(paired_answer).double()
        if min(T.shape[0], N.shape[0], Dp.shape[0]) < 2:
            raise ValueError(f"need >= 2 target, neutral and paired rows; got {T.shape[0]}, {N.shape[0]}, "
                             f"{Dp.shape[0]}")
        self.diff_, self.direction_ = diff_in_means(T, N)
        k = min(self.k_max, Dp.shape[0] + (0 if Da is None else Da.shape[0]), Dp.shape[1])
        if Da is None:
            self.basis_, self.explained_variance_ratio_ = rank_k_basis(Dp, k, direction=self.direction_)
        else:
            self.basis_, self.explained_variance_ratio_ = _two_role_basis(Dp, Da, self.direction_, k)
        change = Dp if Da is None else torch.cat([Dp, Da])
        self.basis_, order, self.change_share_ = sort_by_change_share(self.basis_, change)
        self.explained_variance_ratio_ = self.explained_variance_ratio_[order]
        self.paired_ = {"end": Dp} if Da is None else {"end": Dp, "answer": Da}
        self.mean_change_ = Dp.mean(0)
        m2 = float(self.mean_change_ @ self.mean_change_)
        proj = torch.cumsum((self.mean_change_ @ self.basis_) ** 2, 0)
        self.change_captured_ = (proj / m2).numpy() if m2 > 0 else np.zeros(k)
        self.steer_basis_ = _change_basis(change, k)
        sproj = torch.cumsum((self.mean_change_ @ self.steer_basis_) ** 2, 0)
        self.steer_change_captured_ = (sproj / m2).numpy() if m2 > 0 else np.zeros(k)
        self.stability_ = bootstrap_stability(T, N, self.n_boot, self.seed, groups)
        return self

    def basis(self, k: int) -> torch.Tensor:
        """The first k columns (D, k) of the fitted basis (the fit is nested in k)."""
        if not hasattr(self, "basis_"):
            raise RuntimeError("SteeringSubspace is not fitted; call fit() first")
        if not 1 <= k <= self.basis_.shape[1]:
            raise ValueError(f"k={k} outside the fitted ranks 1..{self.basis_.shape[1]}")
        return self.basis_[:, :k]

    def steering_basis(self, k: int) -> torch.Tensor:
        """The first k columns (D, k) of the steering basis (top singular directions of the change)."""
        self.basis(k)  # fitted and in range
        return self.steer_basis_[:, :k]

    def steering_vectors(self, k: int, alpha: float) -> dict[str, torch.Tensor]:
        """Per role (``end``, ``answer``): ``alpha * c * unit(W_k c_role)`` (D,) float64 with ``c_role = W_k^T
        m_role`` (k,) the per-direction dev-mean projections; zero when the role's mean change has no part
        in span(W_k)."""
        W = self.steering_basis(k)
        out = {}
        for role, D in self.paired_.items():
            mk = W @ (W.T @ D.mean(0))
            norm = float(mk.norm())
            if norm <= 1e-9 * max(1.0, float(D.norm(dim=1).mean())):
                out[role] = torch.zeros_like(mk)
                continue
            unit = mk / norm
            out[role] = alpha * typical_projection_norm(D, unit[:, None]) * unit
        return out


def _change_basis(change: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors (D, k) of the paired changes ``change`` (n, D), not centred (a shift
    every row shares is part of the change), signed so the mean change projects >= 0; descending in the
    share of the change each carries. Zero columns are completed to an orthonormal set by QR."""
    V = torch.linalg.svd(change, full_matrices=False)[2][:k].T  # (D, <=k)
    if V.shape[1] < k:
        V = torch.linalg.qr(torch.cat([V, torch.eye(change.shape[1], k - V.shape[1], dtype=V.dtype)], 1))[0]
    return V * torch.where(change.mean(0) @ V < 0, -1.0, 1.0).to(V.dtype)


def _two_role_basis(Dp: torch.Tensor, Da: torch.Tensor, direction: torch.Tensor, k: int):
    """Orthonormal (D, k) basis: the diff-in-means direction, the mean answer-position change, then the top
    singular vectors of the paired differences centred per role with those two projected out (QR);
    returns it with the explained variance ratio of the centred differences per column."""
    heads = [direction / direction.norm()]
    ma = Da.mean(0)
    if float(ma.norm()) > 1e-9 * max(1.0, float(Da.norm(dim=1).mean())):
        heads.append(ma / ma.norm())
    C = torch.cat([Dp - Dp.mean(0), Da - Da.mean(0)])  # (n, D), centred per role
    Q = torch.linalg.qr(torch.stack(heads, 1))[0][:, : min(len(heads), k)]  # (D, h)
    n_rest = k - Q.shape[1]
    rest = torch.linalg.svd(C - (C @ Q) @ Q.T, full_matrices=False)[2][:n_rest].T  # (D, k - h)
    basis = torch.linalg.qr(torch.cat([Q, rest], 1))[0]  # (D, k)
    refs = torch.stack(heads + [Dp.mean(0)] * k, 1)[:, :k]  # orient column j along heads[j] (else the mean)
    basis = basis * torch.where((basis * refs).sum(0) < 0, -1.0, 1.0).to(basis.dtype)
    total = C.square().sum()
    ratio = (C @ basis).square().sum(0) / total if total > 0 else torch.zeros(k, dtype=torch.float64)
    return basis, ratio.numpy()


def no_change(paired: torch.Tensor, states: torch.Tensor, rtol: float = 1e-6) -> bool:
    """True when the paired differences (n, D) vanish next to the states' typical norm (a null pair)."""
    return float(paired.norm(dim=1).max()) <= rtol * max(float(states.norm(dim=1).mean()), 1e-30)
