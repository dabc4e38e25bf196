"""RQ2, the fit_clt stage's science: the cross-model linear map base -> tuned at the chosen layers, scored.

CLT here means a cross-model linear transfer (a linear map from the base model's to the tuned model's
residual states at one layer), not a cross-layer transcoder. The estimator is
:class:`mechdiff.rq2.linear_map.LinearMap` (ridge solver: :mod:`mechdiff.rq2.ridge`); whether the mapped state acts
like the real one is :mod:`mechdiff.rq2.mapped_patch`. This module holds the orchestration around them; it
reads and writes no files.

Scores (:func:`fit_layer`). Prompts, not positions, are split: a fraction of the prompt ids is held out
(:func:`split_rows`) and every score is computed on the held-out prompts' positions only. The ridge map
(train-only standardisation, lambda by CV grouped by prompt) is compared with the identity map
(Y = X), the mean predictor, a map fitted on shuffled pairs (zero prior: the chance level), scaled
orthogonal Procrustes and the random change (:func:`random_change_like`). R2 is reported uniform and
variance-weighted, with quantiles of its per-dimension distribution; also CKA(mapped, tuned), mean cosine,
and the gain over the identity map (anchors P20-P22). The linear ceiling of the mapped patch
(:func:`fit_ceiling`, :func:`with_ceiling`) is the same ridge refitted in-sample on the patched positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from mechdiff.errors import MechdiffError
from mechdiff.rq1.cka import to_float64
from mechdiff.rq2.linear_map import LinearMap, baseline_scores, gain_over_identity, map_scores
from mechdiff.rq2.mapped_patch import agreement_line
from mechdiff.verdict import CEILING_CAVEATS

__all__ = ["AffineMap", "LayerFit", "TooFewPromptsError", "captured_layers", "fit_ceiling", "fit_layer",
           "fit_warnings", "layer_report", "map_tensors", "prompt_classes", "random_change_like", "report_lines",
           "split_rows", "with_ceiling"]


#: Scalar scores of :func:`mechdiff.rq2.linear_map.map_scores` carried into the metrics.
SCALARS = ("r2_uniform", "r2_variance_weighted", "cka", "cka_debiased", "mean_cosine")


# --------------------------------------------------------------------------------------------------
# rows: held-out prompts and the position budget


class TooFewPromptsError(MechdiffError, ValueError):
    """Too few prompts to hold some out and still run the grouped cross-validation."""


def split_rows(prompt_ids, n_max: int, heldout_fraction: float, min_train_prompts: int,
               seed: int = 0, strata=None) -> tuple[np.ndarray, np.ndarray]:
    """Choose the rows to use and mark the held-out prompts' rows.

    Parameters
    ----------
    prompt_ids : array-like of shape (n,)
        Prompt id of each captured position (the grouping of every split and fold).
    n_max : int
        At most this many rows are kept (a seeded sample without replacement, in original order).
    heldout_fraction : float
        Share of the prompts (not positions) held out, rounded, at least one prompt.
    min_train_prompts : int
        The training prompts needed (the CV folds); fewer raise :class:`TooFewPromptsError`.
    seed : int
    strata : array-like of shape (n,), optional
        A class label per row (constant within a prompt, e.g. the prompt's task). The held-out share is
        then taken within each class (rounded, at least one prompt of every class that has two or more),
        so a rare class such as the fine-tune's target prompts is held out in proportion, not by luck.

    Returns
    -------
    rows : ndarray of shape (n_kept,)
        Row indices, increasing.
    test : ndarray of shape (n_kept,), bool
        True where the row's prompt is held out.
    """
    ids = np.asarray(prompt_ids).astype(str)
    uniq = np.unique(ids)
    rng = np.random.default_rng(seed)
    if strata is None:
        groups = [uniq]
    else:
        label = dict(zip(ids, np.asarray(strata).astype(str)))
        groups = [uniq[[label[u] == c for u in uniq]] for c in sorted(set(label.values()))]
    held = []
    for g in groups:
        k = max(1, int(round(heldout_fraction * len(g)))) if (len(g) > 1 or strata is None) else 0
        held += list(rng.permutation(g)[:k])
    n_test = len(held)
    if len(uniq) - n_test < min_train_prompts:
        raise TooFewPromptsError(f"{len(uniq)} prompts leave {len(uniq) - n_test} for training after holding out "
                                 f"{n_test}; the map needs at least {min_train_prompts} (clt.cv_folds): add prompts "
                                 "or lower clt.cv_folds / clt.heldout_fraction")
    rows = np.arange(len(ids))
    if len(rows) > n_max:
        rows = np.sort(rng.choice(rows, size=n_max, replace=False))
    return rows, np.isin(ids[rows], held)


def prompt_classes(prompts: pd.DataFrame) -> dict[str, str]:
    """Prompt id -> class: its task, with the fine-tune's target prompts apart (``"<task>:target"``)."""
    task = prompts["task"].astype(str) if "task" in prompts else pd.Series("all", index=prompts.index)
    target = prompts["target"].fillna(False).astype(bool) if "target" in prompts else False
    label = task.where(~target, task + ":target")
    return dict(zip(prompts["id"].astype(str), label))


# --------------------------------------------------------------------------------------------------
# maps


@dataclass(frozen=True)
class AffineMap:
    """A fixed affine map ``predict(X) = X @ coef_ + intercept_`` (coef_ (d_in, d_out), intercept_ (d_out,))."""

    coef_: torch.Tensor
    intercept_: torch.Tensor

    def predict(self, X) -> torch.Tensor:
        """(n, d_out) float64 predictions for X (n, d_in)."""
        return to_float64(X, device=self.coef_.device) @ self.coef_ + self.intercept_


def _random_orthogonal(d_in: int, d_out: int, rng: np.random.Generator) -> np.ndarray:
    """(d_in, d_out) with orthonormal columns (d_in >= d_out) or rows, Haar-distributed."""
    G = rng.standard_normal((max(d_in, d_out), min(d_in, d_out)))
    Q, R = np.linalg.qr(G)
    Q = Q * np.sign(np.diag(R))  # sign fix makes Q Haar-distributed
    return Q if d_in >= d_out else Q.T


def random_change_like(fitted, seed: int = 0) -> AffineMap:
    """The fitted map's change in a random direction: ``h + (fitted(h) - h) R``, R a Haar-random (d, d) rotation.

    For every row the change has exactly the map's size (``||(M(h) - h) R|| = ||M(h) - h||``), so a control
    that closes as much of the gap as the map says the map's direction carries nothing. ``fitted``: any
    affine map with ``coef_`` (d, d) and ``intercept_`` (d,) (same width in and out). Returned as an affine
    map: coef ``I + (C - I) R``, intercept ``b R``.
    """
    C, b = fitted.coef_, fitted.intercept_
    if C.shape[0] != C.shape[1]:
        raise ValueError(f"a random change needs a map between states of one width, got coef {tuple(C.shape)}")
    R = torch.as_tensor(_random_orthogonal(C.shape[0], C.shape[0], np.random.default_rng(seed)),
                        dtype=torch.float64, device=C.device)
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    return AffineMap(eye + (C.double() - eye) @ R, b.double() @ R)


# --------------------------------------------------------------------------------------------------
# fitting and scoring one layer


class LayerFit(NamedTuple):
    """Everything fitted and scored at one layer."""

    ridge: LinearMap
    procrustes: LinearMap
    random: tuple[AffineMap, ...]  # the random-change control, one per draw
    ceiling: LinearMap | None  # the ridge refitted on the patched positions at ridge.lambda_ (with_ceiling)
    scores: dict  # JSON-ready: held-out and train scores, gains, lambda, counts
    r2_per_dim: dict[str, np.ndarray]  # (d_out,) held-out per-dimension R2 of each predictor


def _summary(scores: dict | None) -> dict | None:
    if scores is None:
        return None
    q = np.quantile(scores["r2_per_dim"], [0.05, 0.5, 0.95])
    return {**{k: float(scores[k]) for k in SCALARS}, "r2_dim_q05": float(q[0]), "r2_dim_median": float(q[1]),
            "r2_dim_q95": float(q[2])}


def fit_layer(X, Y, groups, test, *, map_kwargs: Mapping | None = None, seed: int = 0,
              n_random: int = 5) -> LayerFit:
    """Fit the ridge map, Procrustes and the random control on training prompts; score on held-out ones.

    Parameters
    ----------
    X : Tensor of shape (n, d_in)
        Base states.
    Y : Tensor of shape (n, d_out)
        Tuned states at the same positions.
    groups : array-like of shape (n,)
        Prompt id of each row.
    test : ndarray of shape (n,), bool
        Held-out rows (whole prompts, see :func:`split_rows`).
    map_kwargs : mapping, optional
        Keyword arguments of the ridge :class:`LinearMap` (``lambdas``, ``cv_folds``, ``prior``,
        ``pca_dim``); the shuffled-pairs baseline uses the same ones with ``prior='zero'``.
    seed : int
        Seed of the folds, the shuffle and the random map.
    n_random : int
        Draws of the random-change control (:func:`random_change_like`); held-out scores are the first draw's.
    """
    kw = dict(map_kwargs or {})
    groups, test = np.asarray(groups), np.asarray(test, dtype=bool)
    Xtr, Ytr, Xte, Yte, gtr = X[~test], Y[~test], X[test], Y[test], groups[~test]
    ridge = LinearMap("ridge", seed=seed, **kw).fit(Xtr, Ytr, gtr)
    procrustes = LinearMap("procrustes").fit(Xtr, Ytr)
    random = tuple(random_change_like(ridge, seed + k) for k in range(n_random))
    held = {"map": ridge.score(Xte, Yte), "procrustes": procrustes.score(Xte, Yte),
            "random": map_scores(Yte, random[0].predict(Xte)),
            **baseline_scores(Xtr, Ytr, Xte, Yte, gtr, seed=seed, map_params={**kw, "prior": "zero", "seed": seed})}
    train = ridge.score(Xtr, Ytr)
    lambdas = sorted(ridge.cv_["lambdas"]) if ridge.cv_ is not None else [ridge.lambda_]
    scores = {
        "heldout": {k: _summary(v) for k, v in held.items() if v is not None},
        "train": {"map": {k: float(train[k]) for k in ("r2_uniform", "r2_variance_weighted")}},
        "gain_over_identity": ({k: v for k, v in gain_over_identity(held["map"], held["identity"]).items()
                                if k in SCALARS} if held["identity"] is not None else None),
        "lambda": ridge.lambda_, "lambda_at_grid_edge": int(ridge.lambda_ in (lambdas[0], lambdas[-1])),
        "n_train": int((~test).sum()), "n_test": int(test.sum()), "n_dims": int(X.shape[1]),
        "n_train_prompts": len(np.unique(gtr)), "n_test_prompts": len(np.unique(groups[test])),
    }
    per_dim = {k: v["r2_per_dim"] for k, v in held.items() if v is not None}
    return LayerFit(ridge, procrustes, random, None, scores, per_dim)


def fit_ceiling(X, Y, ridge: LinearMap, map_kwargs: Mapping | None = None) -> LinearMap:
    """The linear ceiling: the ridge map refitted on X (n, d_in) -> Y (n, d_out), the states at the positions
    the patch overwrites, at the fitted map's per-row lambda (no CV). In-sample on purpose: no ridge map with
    this penalty has a lower penalised squared error on these rows."""
    kw = {k: v for k, v in dict(map_kwargs or {}).items() if k not in ("lambdas", "cv_folds")}
    return LinearMap("ridge", lambdas=[ridge.lambda_], **kw).fit(X, Y)


def with_ceiling(fit: LayerFit, X, Y, n_prompts: int, map_kwargs: Mapping | None = None) -> LayerFit:
    """``fit`` with its linear ceiling fitted on X (n, d) base -> Y (n, d) tuned states at every patched
    position of ``n_prompts`` patch prompts (:func:`mechdiff.rq2.mapped_patch.patched_states`), and ``scores["ceiling"]``: rows,
    dimensions, prompts, lambda, ``determined`` (rows >= dimensions) and the caveats of the bound."""
    n, d = int(X.shape[0]), int(X.shape[1])
    info = {"n_rows": n, "n_dims": d, "n_prompts": int(n_prompts), "lambda": fit.ridge.lambda_,
            "determined": int(n >= d), "in_sample": 1, "caveats": list(CEILING_CAVEATS)}
    return fit._replace(ceiling=fit_ceiling(X, Y, fit.ridge, map_kwargs), scores={**fit.scores, "ceiling": info})


# --------------------------------------------------------------------------------------------------
# what the stage writes


def map_tensors(fits: Mapping[int, LayerFit]) -> dict[str, torch.Tensor]:
    """Float32 tensors to store: ``layers.{L}.{ridge|procrustes|ceiling|random.k}.{coef|intercept}`` (coef
    (d_in, d_out), intercept (d_out,); ``h_tuned ~ h_base @ coef + intercept``) and
    ``layers.{L}.r2_per_dim.{predictor}`` (d_out,) held-out per-dimension R2."""
    out = {}
    for layer, f in fits.items():
        named = [("ridge", f.ridge), ("procrustes", f.procrustes)] + ([("ceiling", f.ceiling)] if f.ceiling else [])
        for name, est in named + [(f"random.{k}", r) for k, r in enumerate(f.random)]:
            out[f"layers.{layer}.{name}.coef"] = est.coef_.detach().float().cpu().contiguous()
            out[f"layers.{layer}.{name}.intercept"] = est.intercept_.detach().float().cpu().contiguous()
        for name, r2 in f.r2_per_dim.items():
            out[f"layers.{layer}.r2_per_dim.{name}"] = torch.as_tensor(r2, dtype=torch.float32)
    return out


def captured_layers(chosen: list[int], captured: list[int]) -> tuple[list[int], dict[int, int]]:
    """The layers to fit the map at: each chosen layer that was captured, else the nearest captured layer
    below it (an exact entry found by refining between scanned layers lies off the capture grid).
    Returns ``(layers, {chosen layer: captured layer used instead})``, layers unique in chosen order."""
    layers, instead = [], {}
    for layer in chosen:
        use = layer if layer in captured else max((c for c in captured if c < layer), default=None)
        if use is None:
            continue
        if use != layer:
            instead[layer] = use
        if use not in layers:
            layers.append(use)
    return layers, instead


def layer_report(fits: Mapping[int, LayerFit], patch: Mapping[int, dict]) -> dict:
    """``{"headline": ..., "layers": {L: scores + patch}}``; the headline is the first layer's map R2,
    identity R2, gain, CKA, mapped- vs real-patch fractions, the patch's mean gap (nats) and the mass
    outside the shared vocabulary (``lost_base``, ``lost_tuned``) that gap drops (same keys for every pair)."""
    layers = {str(layer): {**f.scores, "patch": dict(patch[layer])} for layer, f in fits.items()}
    first_layer = next(iter(fits))
    first = layers[str(first_layer)]
    held = first["heldout"]
    headline = {"layer": int(first_layer), "cka": held["map"]["cka"],
                "r2_uniform": held["map"]["r2_uniform"], "r2_variance_weighted": held["map"]["r2_variance_weighted"],
                "identity_r2_uniform": (held.get("identity") or {}).get("r2_uniform", float("nan")),
                "gain_r2_uniform": (first["gain_over_identity"] or {}).get("r2_uniform", float("nan")),
                **{k: first["patch"].get(k, float("nan")) for k in ("mapped_closed", "real_closed", "ceiling_closed",
                                                                     "agreement", "mapped_minus_real_ci", "gap",
                                                                     "lost_base", "lost_tuned")},
                "ceiling_rows": (first.get("ceiling") or {}).get("n_rows"),
                "ceiling_dims": (first.get("ceiling") or {}).get("n_dims")}
    return {"headline": headline, "layers": layers}


def fit_warnings(f: LayerFit) -> list[str]:
    """What limits one layer's fit, for a reader: fewer training rows than input dimensions (the map is
    under-determined), fewer ceiling rows than dimensions (the in-sample ceiling can memorise and says
    nothing about linearity), and a lambda on the grid's largest value (the grid may be too narrow)."""
    out = []
    d_in, n = int(f.ridge.coef_.shape[0]), f.scores["n_train"]
    if n < d_in:
        out.append(f"{n} training rows < {d_in} dimensions: the map is under-determined; add positions "
                   "(clt.n_positions) or set clt.pca_dim")
    ceil = f.scores.get("ceiling") or {}
    if ceil and ceil["n_rows"] < ceil["n_dims"]:
        out.append(f"the linear ceiling is fitted on {ceil['n_rows']} rows < {ceil['n_dims']} dimensions (every "
                   "patched position of the patch prompts): it can memorise, read it as an upper bound only; add "
                   "patch prompts (clt.patch_prompts) or set clt.pca_dim")
    cv = f.ridge.cv_
    if cv is not None and len(cv["lambdas"]) > 1 and f.ridge.lambda_ >= max(cv["lambdas"]):
        mse = np.asarray(cv["cv_mse"], dtype=float)[np.argsort(cv["lambdas"])]
        if mse[-2] - mse[-1] > 1e-6 * mse[-2] + 1e-12:  # strictly preferred, not a tie (a null pair ties)
            out.append(f"lambda {f.ridge.lambda_:g} is the grid's largest and still improving: extend clt.lambdas "
                       "upwards")
    return out


def report_lines(pair: str, fits: Mapping[int, LayerFit], patch: Mapping[int, dict], tolerance: float) -> list[str]:
    """Two lines a layer: held-out R2 with the gain over identity, then :func:`agreement_line`; then a
    ``note:`` line per :func:`fit_warnings`."""
    lines = []
    for layer, f in fits.items():
        gain = (f.scores["gain_over_identity"] or {}).get("r2_uniform", float("nan"))
        lines.append(f"fit_clt@{pair} layer {layer}: held-out R2 {f.scores['heldout']['map']['r2_uniform']:.4f} "
                     f"(identity {f.scores['heldout'].get('identity', {}).get('r2_uniform', float('nan')):.4f}, "
                     f"gain {gain:+.4f}, lambda {f.scores['lambda']:g})")
        lines.append(agreement_line(pair, layer, patch[layer], tolerance, f.scores.get("ceiling")))
        lines += [f"fit_clt@{pair} layer {layer}: note: {w}" for w in fit_warnings(f)]
    return lines
