"""Ridge regression for a whole grid of penalties from one factorisation, and K-fold CV grouped by prompt.

The solver under :class:`mechdiff.rq2.linear_map.LinearMap` (RQ2, fit_clt):

* :class:`RidgeGrid`: ridge for a whole lambda grid from ONE factorisation (SVD of X, or eigendecomposition
  of ``X^T X`` / of the Gram matrix ``X X^T`` when n < d), float64, on the inputs' device.
* :func:`grouped_folds`, :func:`grouped_cv_lambda`: K-fold CV grouped by prompt, one factorisation a fold;
  a ``prepare`` callable refits any preprocessing inside each fold on the fold's training rows only, so
  held-out rows never leak into lambda (anchors P20).
"""

from __future__ import annotations

import numpy as np
import torch

from mechdiff.rq1.cka import to_float64
from mechdiff.stats import group_codes

__all__ = ["RidgeGrid", "check_fitted", "check_rows", "grouped_cv_lambda", "grouped_folds"]


def check_fitted(est, attr: str) -> None:
    """Raise when the estimator ``est`` lacks the fitted attribute ``attr`` (``fit()`` not called yet)."""
    if not hasattr(est, attr):
        raise RuntimeError(f"this {type(est).__name__} is not fitted yet; call fit() first")


def check_rows(X: torch.Tensor, Y: torch.Tensor) -> None:
    """Raise unless X (n, d_in) and Y (n, d_out) are 2-D, finite and have equal rows."""
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X (n, d_in) and Y (n, d_out) must be 2-D with equal rows; got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        raise ValueError("X and Y must be finite (no nan/inf)")


# --------------------------------------------------------------------------------------------------
# ridge for a grid of lambdas from one factorisation


def _factorize(X: torch.Tensor, Y: torch.Tensor, solver: str):
    """Return (A, ev, B) with ``W(lam) = A diag(1 / (ev + lam)) B`` for every lam.

    X: (n, d), Y: (n, m) -> A: (d, r), ev: (r,) squared singular values of X, B: (r, m). Directions with
    ``ev`` below the numerical rank tolerance are dropped (a pseudo-inverse at lam = 0).
    """
    n, d = X.shape
    if solver == "auto":
        solver = "eigh"
    if solver == "svd":
        U, s, Vh = torch.linalg.svd(X, full_matrices=False)  # U: (n, r), s: (r,), Vh: (r, d)
        A, ev, B = Vh.T, s.square(), s[:, None] * (U.T @ Y)  # S U^T Y = V^T X^T Y
    elif n >= d:
        ev, V = torch.linalg.eigh(X.T @ X)  # primal: (d, d)
        A, B = V, V.T @ (X.T @ Y)
    else:
        ev, U = torch.linalg.eigh(X @ X.T)  # dual, Gram matrix: (n, n)
        A, B = X.T @ U, U.T @ Y  # W = X^T (X X^T + lam I)^-1 Y
    keep = ev > ev.max().clamp(min=0) * max(n, d) * torch.finfo(torch.float64).eps
    return A[:, keep], ev[keep], B[keep]


class RidgeGrid:
    """Ridge regression ``min ||X W - Y||^2 + lam ||W||^2`` for every lam of a grid, one factorisation.

    The penalty follows scikit-learn's ``Ridge(alpha=lam)``: ``W(lam) = (X^T X + lam I)^-1 X^T Y`` on the
    (centred, if ``fit_intercept``) data. One factorisation of X serves all lambdas; ``n_factorizations_``
    counts them so a test can assert it is 1.

    Parameters
    ----------
    lambdas : sequence of float
        Penalties (>= 0), kept in the given order.
    fit_intercept : bool, default True
        Centre X and Y with their means and fit an intercept.
    solver : {'auto', 'eigh', 'svd'}, default 'auto'
        'eigh' (= 'auto') eigendecomposes the smaller of ``X^T X`` (d, d) and ``X X^T`` (n, n): fastest;
        'svd' takes the thin SVD of X: better conditioned at tiny lambdas.
    store_coefs : bool, default True
        Materialise ``coefs_`` (n_lambda, d_in, d_out); set False for large d and use :meth:`coef`.

    Attributes
    ----------
    lambdas_ : Tensor of shape (n_lambda,)
    components_ : Tensor of shape (d_in, r)
    spectrum_ : Tensor of shape (r,)
        Squared singular values of (centred) X kept by the rank tolerance.
    projected_targets_ : Tensor of shape (r, d_out)
    x_mean_ : Tensor of shape (d_in,)
    y_mean_ : Tensor of shape (d_out,)
    coefs_ : Tensor of shape (n_lambda, d_in, d_out)
        Only when ``store_coefs``.
    intercepts_ : Tensor of shape (n_lambda, d_out)
        Only when ``store_coefs``.
    n_factorizations_ : int
    """

    def __init__(self, lambdas, *, fit_intercept: bool = True, solver: str = "auto", store_coefs: bool = True):
        self.lambdas = lambdas
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.store_coefs = store_coefs

    def fit(self, X, Y) -> "RidgeGrid":
        """Factorise X (n, d_in) once and prepare W for every lambda; Y: (n, d_out)."""
        if self.solver not in ("auto", "eigh", "svd"):
            raise ValueError(f"solver must be 'auto', 'eigh' or 'svd'; got {self.solver!r}")
        Xt = to_float64(X)
        Yt = to_float64(Y, device=Xt.device)
        check_rows(Xt, Yt)
        self.lambdas_ = to_float64(self.lambdas, device=Xt.device).reshape(-1)
        if self.lambdas_.numel() == 0 or (self.lambdas_ < 0).any():
            raise ValueError(f"lambdas must be a non-empty list of penalties >= 0; got {self.lambdas}")
        zeros = lambda k: torch.zeros(k, dtype=torch.float64, device=Xt.device)  # noqa: E731
        self.x_mean_ = Xt.mean(0) if self.fit_intercept else zeros(Xt.shape[1])
        self.y_mean_ = Yt.mean(0) if self.fit_intercept else zeros(Yt.shape[1])
        factors = _factorize(Xt - self.x_mean_, Yt - self.y_mean_, self.solver)
        self.components_, self.spectrum_, self.projected_targets_ = factors
        self.n_factorizations_ = 1
        if self.store_coefs:
            self.coefs_ = torch.stack([self.coef(lam) for lam in self.lambdas_.tolist()])
            self.intercepts_ = self.y_mean_ - self.x_mean_ @ self.coefs_  # (n_lambda, d_out)
        return self

    def coef(self, lam: float) -> torch.Tensor:
        """Coefficients W (d_in, d_out) for one penalty ``lam`` (need not be on the grid)."""
        check_fitted(self, "components_")
        return (self.components_ / (self.spectrum_ + lam)) @ self.projected_targets_

    def predict(self, X, lam: float) -> torch.Tensor:
        """Predictions (n, d_out) at penalty ``lam`` for X (n, d_in), as a float64 tensor."""
        check_fitted(self, "components_")
        Z = (to_float64(X, device=self.x_mean_.device) - self.x_mean_) @ self.components_  # (n, r)
        return (Z / (self.spectrum_ + lam)) @ self.projected_targets_ + self.y_mean_

    def validation_mse(self, X, Y, lambdas=None) -> torch.Tensor:
        """Mean squared error over all entries of Y (n, d_out) for each lambda; shape (n_lambda,)."""
        check_fitted(self, "components_")
        lams = self.lambdas_ if lambdas is None else to_float64(lambdas, device=self.x_mean_.device)
        Z = (to_float64(X, device=self.x_mean_.device) - self.x_mean_) @ self.components_  # (n, r) once
        R = to_float64(Y, device=self.x_mean_.device) - self.y_mean_
        return torch.stack([((Z / (self.spectrum_ + lam)) @ self.projected_targets_ - R).square().mean()
                            for lam in lams.tolist()])


# --------------------------------------------------------------------------------------------------
# grouped cross-validation


def grouped_folds(groups, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds over groups: every group's rows fall in exactly one validation fold.

    Parameters
    ----------
    groups : array-like of shape (n,)
        Group (prompt) label of each row.
    n_folds : int
        2 <= n_folds <= number of groups.
    seed : int, default 0
        Shuffles the groups before they are dealt to folds (balanced in number of groups).

    Returns
    -------
    list of (train_idx, val_idx) index arrays.
    """
    codes = group_codes(groups, len(groups))
    n_groups = int(codes.max()) + 1
    if not 2 <= n_folds <= n_groups:
        raise ValueError(f"n_folds must be in [2, n_groups={n_groups}]; got {n_folds}")
    fold_of_group = np.empty(n_groups, dtype=int)
    fold_of_group[np.random.default_rng(seed).permutation(n_groups)] = np.arange(n_groups) % n_folds
    fold_of_row = fold_of_group[codes]
    return [(np.flatnonzero(fold_of_row != k), np.flatnonzero(fold_of_row == k)) for k in range(n_folds)]


def grouped_cv_lambda(X, Y, groups, lambdas, n_folds: int = 5, *, seed: int = 0, per_row: bool = False,
                      solver: str = "auto", prepare=None) -> dict:
    """Choose the ridge penalty by K-fold CV grouped by prompt, one factorisation per fold.

    Parameters
    ----------
    X : ndarray or Tensor of shape (n, d_in)
    Y : ndarray or Tensor of shape (n, d_out)
    groups : array-like of shape (n,)
    lambdas : sequence of float
    n_folds : int, default 5
    seed : int, default 0
    per_row : bool, default False
        If True a fit on m rows uses the penalty ``lam * m`` (objective: mean squared error + lam ||W||^2),
        so the same lambda means the same thing for folds and for the final fit.
    solver : {'auto', 'eigh', 'svd'}
    prepare : callable, optional
        ``prepare(X_train, Y_train)`` returns a preprocessor fitted on the fold's TRAINING rows only, with
        ``apply(X, Y) -> (Z, R)`` (regressors, targets); the fold fits on ``apply(train)`` and is validated
        on ``apply(val)``, so no statistic of the held-out rows reaches the choice of lambda. None: the
        rows are used as given.

    Returns
    -------
    dict
        ``lambda`` (float, the minimiser of the mean validation MSE; ties go to the larger lambda),
        ``lambdas`` (n_lambda,), ``cv_mse`` (n_lambda,), ``fold_mse`` (n_folds, n_lambda) as numpy
        arrays (in each fold's own units when ``prepare`` rescales), ``n_factorizations`` (int, = n_folds
        plus any the preprocessors count in ``n_factorizations_``), ``preprocessors`` (one a fold, or
        None a fold without ``prepare``).
    """
    Xt = to_float64(X)
    Yt = to_float64(Y, device=Xt.device)
    lams = np.sort(np.asarray(lambdas, dtype=float).reshape(-1))
    folds = grouped_folds(groups, n_folds, seed)
    fold_mse, sizes, preps, n_fact = [], [], [], 0
    for train, val in folds:
        prep = None if prepare is None else prepare(Xt[train], Yt[train])
        (Ztr, Rtr), (Zva, Rva) = ((Xt[train], Yt[train]), (Xt[val], Yt[val])) if prep is None else \
            (prep.apply(Xt[train], Yt[train]), prep.apply(Xt[val], Yt[val]))
        scale = len(train) if per_row else 1.0
        grid = RidgeGrid(lams * scale, solver=solver, store_coefs=False).fit(Ztr, Rtr)
        fold_mse.append(grid.validation_mse(Zva, Rva).cpu().numpy())
        sizes.append(len(val))
        preps.append(prep)
        n_fact += grid.n_factorizations_ + getattr(prep, "n_factorizations_", 0)
    fold_mse = np.stack(fold_mse)
    cv_mse = np.average(fold_mse, axis=0, weights=sizes)
    best = len(lams) - 1 - int(np.argmin(cv_mse[::-1]))
    return {"lambda": float(lams[best]), "lambdas": lams, "cv_mse": cv_mse, "fold_mse": fold_mse,
            "n_factorizations": n_fact, "preprocessors": preps}
