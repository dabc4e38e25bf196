"""Directions and rank-k subspaces for steering and ablation (RQ3 building blocks).

* :func:`diff_in_means`, :func:`rank_k_basis`, :func:`bootstrap_stability`: estimate a direction / an
  orthonormal rank-k basis from two sets of states, in float64, and check its stability.
  :func:`sort_by_change_share`: order a basis's columns by the share of the change each carries.
* :func:`projector`, :func:`project_out`, :func:`project_in`: apply ``P = U U^T`` to states H of any
  leading shape ``(..., d)``; the projection is computed in float64 and cast back to H's dtype.
* :func:`random_subspace`: an orthonormal control of equal rank. :func:`typical_projection_norm`: the
  scale for expressing a steering strength alpha in relative units (P28).

Pitfalls handled (anchors section 5.6): P25 float64 accumulation and bootstrap stability; P26 centred
paired differences, QR before ``U U^T``, explained variance, random controls; P28 alpha units.
"""

from __future__ import annotations

import numpy as np
import torch

from mechdiff.cka import match_input, to_float64
from mechdiff.stats import group_codes

__all__ = [
    "bootstrap_stability",
    "diff_in_means",
    "project_in",
    "project_out",
    "projector",
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
        wa = _resample_counts(codes_a, rng)
        wb = wa if paired else _resample_counts(codes_b, rng)
        diff = _weighted_mean(At, wa) - _weighted_mean(Bt, wb)
        cosines[b] = float(diff @ full / diff.norm()) if diff.norm() > 0 else float("nan")
    return cosines


def _resample_counts(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row counts (n,) of one bootstrap draw of the groups (codes 0..G-1)."""
    n_groups = int(codes.max()) + 1
    return np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[codes]


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


def _like_h(T: torch.Tensor, H):
    """Cast T back to H's dtype and kind (numpy or tensor)."""
    if isinstance(H, torch.Tensor):
        return T.to(H.dtype)
    return T.cpu().numpy().astype(np.asarray(H).dtype, copy=False)


def projector(U):
    """Projector ``P = U U^T`` of shape (d, d) for U of shape (d, k) with orthonormal columns."""
    Ut = orthonormal_basis(U, None)
    return match_input(Ut @ Ut.T, U)


def project_out(H, U):
    """Ablate the subspace: ``H - H U U^T`` for H of shape (..., d), U (d, k) orthonormal.

    Returns states of H's shape, dtype and kind with no component left along U (exactly, in float64)
    and the orthogonal complement unchanged.
    """
    Ht = to_float64(H)
    Ut = orthonormal_basis(U, Ht.device)
    return _like_h(Ht - (Ht @ Ut) @ Ut.T, H)


def project_in(H, U, alpha: float):
    """Steer along the subspace: ``H + alpha H U U^T`` for H of shape (..., d), U (d, k) orthonormal.

    The component of H along U is multiplied by ``1 + alpha``; the orthogonal complement is unchanged.
    ``alpha = -1`` equals :func:`project_out`.
    """
    Ht = to_float64(H)
    Ut = orthonormal_basis(U, Ht.device)
    return _like_h(Ht + alpha * ((Ht @ Ut) @ Ut.T), H)


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
