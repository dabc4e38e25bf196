"""Cross-model linear map base -> tuned at one layer (RQ2, fit_clt).

The seed calls this map "CLT". It is NOT a cross-layer transcoder (the "CLT" of circuit tracing,
Ameisen et al. 2025): it is one linear (affine) map from the base model's residual states to the tuned
model's states at the same positions and layer, fitted by ridge regression or scaled orthogonal
Procrustes.

Pieces:

* :class:`Standardizer`: per-dimension mean/std from training rows only, with a floor for constant dims.
* :class:`RidgePreprocess`: the standardisers, identity prior's scales and PCA, refitted inside each CV
  fold (:func:`mechdiff.rq2.ridge.grouped_cv_lambda`) on the fold's training rows only, so held-out rows never
  leak into lambda. The ridge solver itself (one factorisation for a lambda grid) is :mod:`mechdiff.rq2.ridge`.
* :class:`LinearMap`: standardise (train-only), optional PCA, grouped-CV ridge or Procrustes; ``predict``
  returns tuned-space states in ORIGINAL units.
* :func:`map_scores`, :func:`baseline_scores`, :func:`gain_over_identity`: R2 (uniform, variance-weighted,
  per dim), CKA, cosine; identity, mean and shuffled-pair baselines.

Pitfalls handled (anchors section 5.5): P20 grouped CV over a wide grid, held-out scores; P21 baselines;
P22 both R2 aggregations plus per-dim values, train-only standardisation; P24 the name.
"""

from __future__ import annotations

import numpy as np
import torch

from mechdiff.rq1.cka import linear_cka, match_input, to_float64
from mechdiff.rq2.ridge import RidgeGrid, check_fitted, check_rows, grouped_cv_lambda

__all__ = [
    "DEFAULT_LAMBDAS",
    "LinearMap",
    "RidgePreprocess",
    "Standardizer",
    "baseline_scores",
    "gain_over_identity",
    "map_scores",
]


#: Per-row ridge penalties used by :class:`LinearMap` when none are given (see its ``lambdas``).
DEFAULT_LAMBDAS = tuple(float(x) for x in np.logspace(-6, 4, 11))


# --------------------------------------------------------------------------------------------------
# Standardizer


class Standardizer:
    """Per-dimension standardisation with statistics of the rows it is fitted on.

    Parameters
    ----------
    min_scale : float, default 1e-4
        Floor of the scale, relative to the mean std over dimensions: a constant (or near-constant)
        dimension is divided by ``min_scale * mean(std)`` instead of ~0.

    Attributes
    ----------
    mean_ : Tensor of shape (d,)
    scale_ : Tensor of shape (d,)
        Population std (ddof=0), floored.
    """

    def __init__(self, min_scale: float = 1e-4):
        self.min_scale = min_scale

    def fit(self, X) -> "Standardizer":
        """Learn ``mean_`` and ``scale_`` from X of shape (n, d)."""
        Xt = to_float64(X)
        std = Xt.std(0, correction=0)  # (d,)
        floor = self.min_scale * std.mean() if std.mean() > 0 else torch.ones((), dtype=torch.float64)
        self.mean_, self.scale_ = Xt.mean(0), torch.clamp(std, min=float(floor))
        return self

    def transform(self, X):
        """Return ``(X - mean_) / scale_`` (float64, numpy in -> numpy out)."""
        check_fitted(self, "mean_")
        Xt = to_float64(X, device=self.mean_.device)
        return match_input((Xt - self.mean_) / self.scale_, X)

    def inverse_transform(self, Z):
        """Return ``Z * scale_ + mean_``."""
        check_fitted(self, "mean_")
        Zt = to_float64(Z, device=self.mean_.device)
        return match_input(Zt * self.scale_ + self.mean_, Z)


# --------------------------------------------------------------------------------------------------
# what the map learns before the penalty


class RidgePreprocess:
    """What the ridge map learns from its training rows before the penalty: standardisers, prior, PCA.

    Fitted on one set of rows (a CV fold's training rows, or all training rows for the final map) and
    applied to any rows with those rows' statistics.

    Parameters
    ----------
    prior : {'identity', 'zero'}
    pca_dim : int, optional
    min_scale : float, default 1e-4

    Attributes
    ----------
    x_scaler_, y_scaler_ : Standardizer
    w0_ : Tensor of shape (d_out,) or None
        Diagonal of the identity map written in standardised units (``std_x / std_y``); None for 'zero'.
    pca_components_ : Tensor of shape (d_in, k) or None
    n_factorizations_ : int
        1 with PCA, else 0.
    """

    def __init__(self, prior: str = "identity", pca_dim: int | None = None, min_scale: float = 1e-4):
        self.prior, self.pca_dim, self.min_scale = prior, pca_dim, min_scale

    def fit(self, X, Y) -> "RidgePreprocess":
        """Learn the statistics from X (n, d_in) and Y (n, d_out)."""
        self.x_scaler_ = Standardizer(self.min_scale).fit(X)
        self.y_scaler_ = Standardizer(self.min_scale).fit(Y)
        self.w0_ = None
        if self.prior == "identity":
            if X.shape[1] != Y.shape[1]:
                raise ValueError(f"prior='identity' needs d_in == d_out; got {X.shape[1]} and {Y.shape[1]}")
            self.w0_ = self.x_scaler_.scale_ / self.y_scaler_.scale_
        self.pca_components_, self.n_factorizations_ = None, 0
        if self.pca_dim is not None:
            Xs = self.x_scaler_.transform(to_float64(X))
            k = min(self.pca_dim, *Xs.shape)
            Vh = torch.linalg.svd(Xs - Xs.mean(0), full_matrices=False)[2]  # (r, d_in)
            self.pca_components_, self.n_factorizations_ = Vh[:k].T, 1  # (d_in, k)
        return self

    def apply(self, X, Y) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z, R): regressors (n, k or d_in) and the residual target ``Ys - Xs * w0`` (n, d_out), standardised."""
        check_fitted(self, "x_scaler_")
        Xs, Ys = self.x_scaler_.transform(to_float64(X)), self.y_scaler_.transform(to_float64(Y))
        R = Ys if self.w0_ is None else Ys - Xs * self.w0_
        return (Xs if self.pca_components_ is None else Xs @ self.pca_components_), R


# --------------------------------------------------------------------------------------------------
# the map


class LinearMap:
    """Affine map from base states to tuned states at the same positions (the seed's "CLT").

    ``method='ridge'``: standardise X and Y with the training rows' statistics, optionally project X on
    its top ``pca_dim`` principal directions, then fit ``Ys ~ Xs W0 + Z Delta`` by ridge with the
    penalty chosen by K-fold CV grouped by prompt (each fold refits the standardisers, W0 and the PCA on
    its own training rows; the final map refits them on all training rows). ``W0`` is the prior the
    penalty shrinks towards: the identity map (in original units) when ``prior='identity'``, zero when
    ``prior='zero'``. Tuned states sit near base states (P21), so shrinking towards the identity keeps an
    N < d fit from falling below the identity baseline. ``method='procrustes'``: scaled orthogonal
    Procrustes on centred data, ``min ||s Xc R - Yc||_F`` over orthogonal R (reflections allowed) and
    s > 0; no penalty, no groups.

    Parameters
    ----------
    method : {'ridge', 'procrustes'}, default 'ridge'
    lambdas : sequence of float, optional
        Per-row penalties: the objective is ``mean_rows ||.||^2 + lam ||Delta||_F^2`` on standardised
        data, so lambda is in units of the eigenvalues of X's correlation matrix (mean 1) and does not
        depend on the number of rows. Default :data:`DEFAULT_LAMBDAS` (1e-6 ... 1e4).
    cv_folds : int, default 5
        Grouped folds; CV is skipped when only one lambda is given.
    pca_dim : int, optional
        Regress on the top ``pca_dim`` principal components of standardised X (for N < d).
    prior : {'auto', 'identity', 'zero'}, default 'auto'
        'auto' is 'identity' when d_in == d_out, else 'zero'.
    min_scale : float, default 1e-4
        Relative std floor of the :class:`Standardizer`.
    solver : {'auto', 'eigh', 'svd'}, default 'auto'
    seed : int, default 0
        Seed of the fold assignment.

    Attributes
    ----------
    coef_ : Tensor of shape (d_in, d_out)
        In original units: ``predict(X) = X @ coef_ + intercept_``.
    intercept_ : Tensor of shape (d_out,)
    lambda_ : float or None
        Chosen per-row penalty (None for Procrustes).
    cv_ : dict or None
        Output of :func:`mechdiff.rq2.ridge.grouped_cv_lambda` (``cv_mse`` is on standardised Y).
    prior_ : str
    x_scaler_, y_scaler_ : Standardizer
        Ridge only.
    pca_components_ : Tensor of shape (d_in, pca_dim) or None
    rotation_ : Tensor of shape (d, d), scale_ : float
        Procrustes only.
    n_factorizations_ : int
        Matrix factorisations used: one per CV fold and one for the final fit, plus one per PCA (one a
        fold and one final) when ``pca_dim`` is set.
    """

    def __init__(self, method: str = "ridge", *, lambdas=None, cv_folds: int = 5, pca_dim: int | None = None,
                 prior: str = "auto", min_scale: float = 1e-4, solver: str = "auto", seed: int = 0):
        self.method = method
        self.lambdas = lambdas
        self.cv_folds = cv_folds
        self.pca_dim = pca_dim
        self.prior = prior
        self.min_scale = min_scale
        self.solver = solver
        self.seed = seed

    def fit(self, X, Y, groups=None) -> "LinearMap":
        """Fit on X (n, d_in) base states and Y (n, d_out) tuned states; groups (n,) are prompt ids."""
        self._check_params()
        Xt = to_float64(X)
        Yt = to_float64(Y, device=Xt.device)
        check_rows(Xt, Yt)
        groups = np.arange(Xt.shape[0]) if groups is None else np.asarray(groups)
        if self.method == "procrustes":
            self._fit_procrustes(Xt, Yt)
        else:
            self._fit_ridge(Xt, Yt, groups)
        assert self.coef_.shape == (Xt.shape[1], Yt.shape[1]) and torch.isfinite(self.coef_).all()
        return self

    def predict(self, X):
        """Tuned-space predictions (n, d_out) in original units; numpy in -> numpy out."""
        check_fitted(self, "coef_")
        return match_input(to_float64(X, device=self.coef_.device) @ self.coef_ + self.intercept_, X)

    def score(self, X, Y) -> dict:
        """:func:`map_scores` of the predictions for X (n, d_in) against Y (n, d_out)."""
        return map_scores(Y, self.predict(X))

    def _check_params(self) -> None:
        if self.method not in ("ridge", "procrustes"):
            raise ValueError(f"method must be 'ridge' or 'procrustes'; got {self.method!r}")
        if self.prior not in ("auto", "identity", "zero"):
            raise ValueError(f"prior must be 'auto', 'identity' or 'zero'; got {self.prior!r}")
        if self.pca_dim is not None and (self.method == "procrustes" or self.pca_dim < 1):
            raise ValueError(f"pca_dim must be None or a positive int, and only with method='ridge'; "
                             f"got {self.pca_dim}")

    def _fit_procrustes(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        if X.shape[1] != Y.shape[1]:
            raise ValueError(f"procrustes needs d_in == d_out; got {X.shape[1]} and {Y.shape[1]}")
        mx, my = X.mean(0), Y.mean(0)
        Xc, Yc = X - mx, Y - my
        U, S, Vh = torch.linalg.svd(Xc.T @ Yc)  # (d, d) cross-covariance
        self.rotation_ = U @ Vh
        self.scale_ = float(S.sum() / Xc.square().sum())
        self.coef_ = self.scale_ * self.rotation_
        self.intercept_ = my - mx @ self.coef_
        self.lambda_, self.cv_, self.prior_, self.n_factorizations_ = None, None, "none", 1

    def _fit_ridge(self, X: torch.Tensor, Y: torch.Tensor, groups: np.ndarray) -> None:
        self.prior_ = self.prior if self.prior != "auto" else ("identity" if X.shape[1] == Y.shape[1] else "zero")

        def prepare(Xr, Yr):  # fitted on the given rows only: a fold's training rows, or all of them
            return RidgePreprocess(self.prior_, self.pca_dim, self.min_scale).fit(Xr, Yr)

        lambdas = DEFAULT_LAMBDAS if self.lambdas is None else self.lambdas
        self.cv_ = None
        self.lambda_ = float(np.asarray(lambdas, dtype=float).reshape(-1)[0])
        if len(np.asarray(lambdas).reshape(-1)) > 1:
            self.cv_ = grouped_cv_lambda(X, Y, groups, lambdas, self.cv_folds, seed=self.seed, per_row=True,
                                         solver=self.solver, prepare=prepare)
            self.lambda_ = self.cv_["lambda"]
        prep = prepare(X, Y)  # the final map: statistics of every training row
        self.x_scaler_, self.y_scaler_, self.pca_components_ = prep.x_scaler_, prep.y_scaler_, prep.pca_components_
        Z, R = prep.apply(X, Y)  # (n, pca_dim or d_in), (n, d_out)
        grid = RidgeGrid([self.lambda_ * X.shape[0]], solver=self.solver).fit(Z, R)
        delta = grid.coefs_[0] if self.pca_components_ is None else self.pca_components_ @ grid.coefs_[0]
        W = delta if prep.w0_ is None else delta + torch.diag(prep.w0_)  # (d_in, d_out), standardised units
        sx, sy = self.x_scaler_.scale_, self.y_scaler_.scale_
        self.coef_ = W / sx[:, None] * sy[None, :]
        self.intercept_ = self.y_scaler_.mean_ + grid.intercepts_[0] * sy - self.x_scaler_.mean_ @ self.coef_
        n_cv = 0 if self.cv_ is None else self.cv_["n_factorizations"]
        self.n_factorizations_ = n_cv + grid.n_factorizations_ + prep.n_factorizations_


# --------------------------------------------------------------------------------------------------
# scores and baselines


def _r2_per_dim(T: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-dim R2 as scikit-learn's r2_score (a constant true dim scores 1 if matched, else 0)."""
    sse = (T - P).square().sum(0)  # (d,)
    sst = (T - T.mean(0)).square().sum(0)  # (d,)
    exact = torch.where(sse == 0, 1.0, 0.0).to(torch.float64)
    r2 = torch.where(sst > 0, 1 - sse / torch.where(sst > 0, sst, 1.0), exact)
    return r2, sse, sst


def map_scores(Y_true, Y_pred) -> dict:
    """Scores of predicted tuned states against the real ones at the same positions.

    Parameters
    ----------
    Y_true : ndarray or Tensor of shape (n, d)
    Y_pred : ndarray or Tensor of shape (n, d)

    Returns
    -------
    dict
        ``r2_uniform`` (mean over dims of per-dim R2), ``r2_variance_weighted`` (1 - total SSE / total SST),
        ``r2_per_dim`` (ndarray (d,)), ``cka`` (biased linear CKA), ``cka_debiased`` (nan when n < 4),
        ``mean_cosine`` (mean over rows of the cosine of true and predicted rows, zero rows skipped),
        ``n`` (rows). Scalars are python floats.
    """
    T = to_float64(Y_true)
    P = to_float64(Y_pred, device=T.device)
    if T.shape != P.shape or T.ndim != 2:
        raise ValueError(f"Y_true and Y_pred must both be (n, d); got {tuple(T.shape)} and {tuple(P.shape)}")
    r2, sse, sst = _r2_per_dim(T, P)
    norms = T.norm(dim=1) * P.norm(dim=1)  # (n,)
    cosine = (T * P).sum(1)[norms > 0] / norms[norms > 0]
    return {
        "r2_uniform": float(r2.mean()),
        "r2_variance_weighted": float(1 - sse.sum() / sst.sum()) if sst.sum() > 0 else float("nan"),
        "r2_per_dim": r2.cpu().numpy(),
        "cka": linear_cka(T, P),
        "cka_debiased": linear_cka(T, P, debiased=True) if T.shape[0] >= 4 else float("nan"),
        "mean_cosine": float(cosine.mean()) if cosine.numel() else float("nan"),
        "n": int(T.shape[0]),
    }


def baseline_scores(X_train, Y_train, X_test, Y_test, groups_train=None, *, seed: int = 0,
                    map_params: dict | None = None) -> dict:
    """:func:`map_scores` on the test rows for three reference predictors (P21).

    Parameters
    ----------
    X_train : ndarray or Tensor of shape (n_train, d_in)
    Y_train : ndarray or Tensor of shape (n_train, d_out)
    X_test : ndarray or Tensor of shape (n_test, d_in)
    Y_test : ndarray or Tensor of shape (n_test, d_out)
    groups_train : array-like of shape (n_train,), optional
        Prompt ids of the training rows (for the shuffled map's grouped CV).
    seed : int, default 0
        Seed of the row shuffle.
    map_params : dict, optional
        Keyword arguments of the :class:`LinearMap` fitted on shuffled pairs: pass the settings of the
        real map. With its identity prior the shuffled map lands near the identity baseline; pass
        ``{'prior': 'zero'}`` for the classic chance level.

    Returns
    -------
    dict
        ``identity`` (Y_pred = X_test; None when d_in != d_out), ``mean`` (every row predicted as the
        training mean of Y) and ``shuffled`` (a map fitted after permuting the rows of Y_train).
    """
    Xtr = to_float64(X_train)
    Ytr, Xte, Yte = (to_float64(A, device=Xtr.device) for A in (Y_train, X_test, Y_test))
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(Ytr.shape[0]), device=Xtr.device)
    shuffled = LinearMap(**dict(map_params or {})).fit(Xtr, Ytr[perm], groups_train)
    return {
        "identity": map_scores(Yte, Xte) if Xte.shape[1] == Yte.shape[1] else None,
        "mean": map_scores(Yte, Ytr.mean(0).expand_as(Yte)),
        "shuffled": map_scores(Yte, shuffled.predict(Xte)),
    }


def gain_over_identity(scores: dict, identity_scores: dict | None) -> dict:
    """Differences ``scores[k] - identity_scores[k]`` for every scalar score k (e.g. ``r2_uniform``)."""
    if identity_scores is None:
        raise ValueError("no identity baseline: d_in != d_out, so the identity map is undefined")
    return {k: float(v) - float(identity_scores[k]) for k, v in scores.items()
            if isinstance(v, float) and k in identity_scores}
