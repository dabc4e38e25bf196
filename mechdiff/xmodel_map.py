"""RQ2: the cross-model linear map base -> tuned at the chosen layers, scored and checked causally.

The seed calls this "CLT" and the stage keeps the name ``fit_clt``, but it is NOT a cross-layer
transcoder: it is one affine map from the base model's residual states to the tuned model's states at
the same positions and layer (:class:`mechdiff.linear_map.LinearMap`). This module holds the
orchestration around that estimator; it reads and writes no files.

Scores (:func:`fit_layer`). Prompts, not positions, are split: a fraction of the prompt ids is held out
(:func:`split_rows`) and every score is computed on the held-out prompts' positions only. The ridge map
(train-only standardisation, lambda by CV grouped by prompt) is compared with the identity map
(Y = X), the mean predictor, a map fitted on shuffled pairs (zero prior: the chance level), scaled
orthogonal Procrustes and the random map below. R2 is reported uniform and variance-weighted, with
quantiles of its per-dimension distribution; also CKA(mapped, tuned), mean cosine, and the gain over
the identity map (anchors P20-P22).

Mapped patch (:func:`patch_batch`, :func:`summarise_patch`): does the predicted tuned state act like
the real one? The map predicts tuned states, so it is checked where the real tuned state is used: the
tuned -> base cross-model patch. At layer L the BASE model's residual ``h_b`` at the patched positions
is replaced by ``h_b + alpha * (v - h_b)`` for four candidate states v, all at the same ``alpha`` and
the same positions (anchors P23):

* ``real``: v = h_tuned, the tuned model's real state (the real cross-model patch);
* ``mapped``: v = map(h_base), the fitted ridge map's prediction of it;
* ``ceiling``: v = the linear ceiling's prediction: the same ridge (same lambda) fitted on the very
  positions the patch overwrites, every content position of the patch prompts (:func:`patched_states`,
  :func:`fit_ceiling`, :func:`with_ceiling`). An in-sample bound: were the change linear (h_tuned = h_base
  A + b) and the fit determined (rows >= dimensions), it would reproduce the change and close the whole
  gap. A shortfall of the ceiling does not prove the change non-linear: the bound is in-sample, shrunk
  by the ridge penalty, and fitted on squared error while the patch is judged by KL; with fewer rows
  than dimensions it can memorise and says nothing about linearity. Its rows and dimensions are
  recorded (``scores["ceiling"]``) and :func:`mechdiff.verdict.ceiling_reading` words the reading;
* ``identity``: v = h_base, the identity map, which is the base model's own state, i.e. no change:
  the floor, it closes exactly 0 of the gap;
* ``random``: v = h_base + (map(h_base) - h_base) R, R a random rotation (:func:`random_change_like`): a
  change of exactly the map's size at every row, in a random direction; the mean over ``n_random`` draws
  (each draw's fraction closed is kept too), the control that tells whether the map's *direction* matters.

Fractions are also given per prompt class (:func:`summarise_patch` with ``classes``, e.g. the prompt's
task with the fine-tune's target prompts apart), because the mean gap is often carried by a few prompts
of one class, and with a bootstrap interval over prompts of ``mapped - real``.

Why the base model receives the patch: writing map(h_base) into the TUNED model would compare it with
the base state h_base; a perfect map gives map(h_base) = h_tuned there, a no-op that closes nothing
while the real patch closes the gap, so a good map could never agree with the real patch.

``alpha = 1`` replaces the state; ``alpha < 1`` moves part of the way and closes less of the gap for
every arm, so fractions are comparable across arms only at the same alpha. Positions patched: the
compared content positions of the mode (the positions the map is fitted on; BOS and template specials
are excluded, so unlike ``layer_patch`` the BOS state is left alone in every arm). The effect is read
at the last content token over the shared vocabulary: ``fraction closed = 1 - mean KL(P_tuned ||
P_patched) / mean KL(P_tuned || P_base)`` over prompts (the ``tuned->base`` direction of
``layer_patch``), ``nan`` when there is no gap (a null pair). The mapped patch "agrees" with the real
patch when the two fractions differ by at most a tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from mechdiff.architecture import site_name
from mechdiff.capture import capture
from mechdiff.cka import to_float64
from mechdiff.collect_acts import input_ids_for, length_sorted_batches
from mechdiff.errors import MechdiffError
from mechdiff.layer_patch import content_positions, last_rows, row_positions
from mechdiff.linear_map import LinearMap, baseline_scores, gain_over_identity, map_scores
from mechdiff.masking import shared_kl
from mechdiff.patching import fraction_closed, run_patched
from mechdiff.rendering import pad_batch
from mechdiff.stats import percentile_interval, resample_indices
from mechdiff.verdict import CEILING_CAVEATS, ceiling_reading

__all__ = ["ARMS", "ARM_DOC", "AffineMap", "LayerFit", "TooFewPromptsError", "agreement", "agreement_line",
           "bootstrap_difference", "fit_ceiling", "fit_layer", "fit_warnings", "layer_report", "map_tensors",
           "mapped_patch", "patch_batch", "patched_states", "prompt_classes", "random_change_like",
           "report_lines", "split_rows", "summarise_patch", "with_ceiling"]

#: Candidate states of the mapped-patch comparison, in report order.
ARMS = ("real", "mapped", "ceiling", "identity", "random")
#: What each arm writes, stored beside the maps.
ARM_DOC = {"patched": "BASE model: h_base + alpha * (v - h_base) at the compared content positions (BOS excluded)",
           "real": "v = h_tuned", "mapped": "v = ridge map(h_base)",
           "ceiling": "v = the same ridge (same lambda) fitted on every patched content position of the patch "
                      "prompts (an in-sample bound; shrunk by the penalty; squared-error fit judged by KL)",
           "identity": "v = h_base (no change: floor 0)",
           "random": "v = h_base + (ridge map(h_base) - h_base) R, R a random rotation: the map's change, same size per "
                     "row, random direction; one arm row per draw",
           "maps": "h_tuned ~= h_base @ coef + intercept (float32, original units)"}
#: Scalar scores of :func:`mechdiff.linear_map.map_scores` carried into the metrics.
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
    position of ``n_prompts`` patch prompts (:func:`patched_states`), and ``scores["ceiling"]``: rows,
    dimensions, prompts, lambda, ``determined`` (rows >= dimensions) and the caveats of the bound."""
    n, d = int(X.shape[0]), int(X.shape[1])
    info = {"n_rows": n, "n_dims": d, "n_prompts": int(n_prompts), "lambda": fit.ridge.lambda_,
            "determined": int(n >= d), "in_sample": 1, "caveats": list(CEILING_CAVEATS)}
    return fit._replace(ceiling=fit_ceiling(X, Y, fit.ridge, map_kwargs), scores={**fit.scores, "ceiling": info})


# --------------------------------------------------------------------------------------------------
# the mapped patch


@torch.no_grad()
def patched_states(base, tuned, records: Sequence[Mapping], mode: str, layers: Sequence[int],
                   pad_ids: tuple[int, int], batch_size: int = 32) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (base (n, d), tuned (n, d)) residual states at every position :func:`mapped_patch` overwrites:
    all compared content positions (:func:`~mechdiff.layer_patch.content_positions`) of the patch prompts, in batch order."""
    sites = {layer: site_name(layer) for layer in layers}
    got: dict[int, list] = {layer: [[], []] for layer in layers}
    for batch in length_sorted_batches([len(input_ids_for(r, mode)[1]) for r in records], batch_size):
        recs = [records[i] for i in batch]
        ids = [list(x) for x in zip(*(input_ids_for(r, mode) for r in recs))]
        pairs = [content_positions(r, mode) for r in recs]
        for s, m in enumerate((base, tuned)):
            acts = capture(m, *pad_batch(ids[s], pad_ids[s], "right"), list(sites.values()), row_positions(pairs, s))
            for layer, site in sites.items():
                got[layer][s].append(acts[site].double())
    return {layer: (torch.cat(b), torch.cat(t)) for layer, (b, t) in got.items()}


def _candidates(h_b: torch.Tensor, h_t: torch.Tensor,
                maps: Mapping[str, object]) -> list[tuple[str, int, torch.Tensor]]:
    """(arm, draw, v): the state v (n_sel, d) float64 each arm writes into the base model (before the alpha
    interpolation); ``maps["random"]`` is a sequence of draws, every other arm has draw 0."""
    fixed = {"real": h_t.double(), "mapped": to_float64(maps["mapped"].predict(h_b)),
             "ceiling": to_float64(maps["ceiling"].predict(h_b)), "identity": h_b.double()}
    return ([(arm, 0, v) for arm, v in fixed.items()]
            + [("random", k, to_float64(m.predict(h_b))) for k, m in enumerate(maps["random"])])


@torch.no_grad()
def patch_batch(base, tuned, ids: tuple[list, list], pairs: Sequence[np.ndarray],
                maps: Mapping[int, Mapping[str, object]], id_map, pad_ids: tuple[int, int],
                alpha: float = 1.0) -> list[dict]:
    """Per prompt, layer and arm: gap KL(P_tuned || P_base) and remaining KL(P_tuned || P_patched), nats,
    at the last content token, the base model patched (see the module docstring); with the mass outside
    the shared vocabulary that those masked KLs drop (``lost_base``, ``lost_tuned`` of the unpatched models,
    ``lost_patched`` of the patched base), fractions of each model's next-token mass.

    ``ids`` = (base ids per prompt, tuned ids per prompt); ``pairs[k]`` (n_k, 2) patched positions
    (base, tuned) of prompt k, last content token last; ``maps[layer]`` holds the ``mapped``,
    ``ceiling`` and ``random`` predictors (``predict(h_base) -> h_tuned``) of that layer.
    """
    inputs = [pad_batch(ids[s], pad_ids[s], "right") for s in (0, 1)]
    pos = [row_positions(pairs, s) for s in (0, 1)]  # (n_sel, 2) rows (batch, token)
    last = torch.stack([torch.arange(len(pairs)), torch.as_tensor([p[-1, 0] for p in pairs])], 1)
    sites = {layer: site_name(layer) for layer in maps}
    acts, logits = zip(*(capture(m, *inputs[s], list(sites.values()), pos[s], return_logits=True)
                         for s, m in enumerate((base, tuned))))
    lb, lt = (lg[last_rows(pairs)] for lg in logits)  # (n_prompts, V_side)
    clean = shared_kl(lb, lt, id_map, direction="tuned||base")
    gap = clean.kl
    rows = []
    for layer, site in sites.items():
        h_b = acts[0][site].double()  # (n_sel, d)
        for arm, draw, v in _candidates(acts[0][site], acts[1][site], maps[layer]):
            patched = run_patched(base, *inputs[0], site, pos[0], h_b + alpha * (v - h_b), last)
            out = shared_kl(patched, lt, id_map, direction="tuned||base")
            rows += [{"prompt": k, "layer": layer, "arm": arm, "draw": draw, "gap": float(gap[k]),
                      "remaining": float(out.kl[k]), "lost_base": float(clean.lost_base[k]),
                      "lost_tuned": float(clean.lost_tuned[k]), "lost_patched": float(out.lost_base[k])}
                     for k in range(len(pairs))]
    return rows


def mapped_patch(base, tuned, records: Sequence[Mapping], mode: str, maps: Mapping[int, Mapping[str, object]],
                 id_map, pad_ids: tuple[int, int], alpha: float = 1.0, batch_size: int = 32) -> pd.DataFrame:
    """:func:`patch_batch` over filtered prompt records in length-sorted batches; one row per
    (prompt ``id``, ``layer``, ``arm``) with ``gap``, ``remaining`` and the ``lost_*`` masses."""
    rows = []
    for batch in length_sorted_batches([len(input_ids_for(r, mode)[1]) for r in records], batch_size):
        recs = [records[i] for i in batch]
        ids = tuple(list(x) for x in zip(*(input_ids_for(r, mode) for r in recs)))
        out = patch_batch(base, tuned, ids, [content_positions(r, mode) for r in recs], maps, id_map, pad_ids, alpha)
        rows += [{**o, "id": recs[o["prompt"]]["id"]} for o in out]
    return pd.DataFrame(rows, columns=["prompt", "layer", "arm", "draw", "gap", "remaining", "lost_base", "lost_tuned",
                                       "lost_patched", "id"])


def agreement(mapped: float, real: float, tolerance: float, interval: Sequence[float] | None = None) -> str:
    """Mapped- vs real-patch, as an equivalence test on ``mapped - real`` (fractions of the gap closed).

    With ``interval`` (its 95% bootstrap interval over prompts): ``'agree'`` when the interval lies inside
    [-tolerance, tolerance], ``'disagree'`` when it lies wholly outside, ``'inconclusive'`` otherwise (too few
    prompts to tell). Without one, the point estimate decides (``'agree'`` / ``'disagree'``). ``'no gap'``
    when either fraction is nan (nothing to close).
    """
    if not (np.isfinite(mapped) and np.isfinite(real)):
        return "no gap"
    if interval is None or not all(np.isfinite(interval)):
        return "agree" if abs(mapped - real) <= tolerance else "disagree"
    lo, hi = float(min(interval)), float(max(interval))
    if -tolerance <= lo and hi <= tolerance:
        return "agree"
    return "disagree" if lo > tolerance or hi < -tolerance else "inconclusive"


def _lost(sub: pd.DataFrame) -> dict[str, float]:
    """Mean mass (fractions) each unpatched model puts outside the shared vocabulary, over one layer's
    real-arm rows (one per prompt); nan for rows without the columns."""
    real = sub[sub["arm"] == "real"]
    return {c: float(real[c].mean()) if c in real and len(real) else float("nan") for c in ("lost_base", "lost_tuned")}


def lost_note(lost_tuned: float) -> str:
    """The parenthetical that goes with a masked KL: the tuned model's mass outside the shared vocabulary."""
    if lost_tuned != lost_tuned:  # nan: not measured
        return ""
    return f" ({100 * lost_tuned:.3g}% of the tuned model's mass outside the shared vocabulary)"


def _closed(sub: pd.DataFrame) -> tuple[float, dict[str, float]]:
    """Mean gap (nats) of one layer's rows and the fraction of it each arm present closes."""
    gap = float(sub.loc[sub["arm"] == "real", "gap"].mean())
    arms = [a for a in ARMS if (sub["arm"] == a).any()]
    return gap, {a: fraction_closed(gap, float(sub.loc[sub["arm"] == a, "remaining"].mean())) for a in arms}


def bootstrap_difference(sub: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``mapped_closed - real_closed`` over prompts resampled with replacement
    (one layer's rows); (nan, nan) when no resample has a gap."""
    wide = sub.pivot_table(index="id", columns="arm", values="remaining", aggfunc="first")
    gap = sub[sub["arm"] == "real"].set_index("id")["gap"].reindex(wide.index).to_numpy()
    mapped, real = wide["mapped"].to_numpy(), wide["real"].to_numpy()
    idx = resample_indices(len(gap), n_boot, seed)
    g = gap[idx].mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = (real[idx].mean(1) - mapped[idx].mean(1)) / g  # (1 - m/g) - (1 - r/g)
    return percentile_interval(np.where(g > 1e-9, diff, np.nan), level)


def summarise_patch(rows: pd.DataFrame, tolerance: float, classes: Mapping[str, str] | None = None,
                    n_boot: int = 1000, seed: int = 0) -> dict[int, dict]:
    """Per layer: mean gap (nats), fraction of the mean gap closed by each arm (nan without a gap; the random
    control's is the mean over its draws, each draw's in ``random_closed_draws``), ``mapped_minus_real`` with
    its 95% bootstrap interval over prompts, and the ``agreement`` verdict (:func:`agreement`: an equivalence
    test on that interval), and ``lost_base`` / ``lost_tuned``: the mean next-token mass each unpatched model
    puts outside the shared vocabulary, which the masked KLs drop (nan when the rows lack it). With
    ``classes`` (prompt id -> class label), ``by_class`` gives the same gap, fractions and masses within
    each class."""
    out = {}
    for layer, sub in rows.groupby("layer", sort=True):
        gap, closed = _closed(sub)
        ci = list(bootstrap_difference(sub, n_boot, seed))
        rand = sub[sub["arm"] == "random"]
        draws = ([fraction_closed(gap, float(d["remaining"].mean())) for _, d in rand.groupby("draw", sort=True)]
                 if "draw" in rand else [])
        out[int(layer)] = {"gap": gap, "n_prompts": int(sub["id"].nunique()), **_lost(sub),
                           **{f"{arm}_closed": v for arm, v in closed.items()},
                           "random_closed_draws": draws,
                           "mapped_minus_real": closed["mapped"] - closed["real"],
                           "mapped_minus_real_ci": ci,
                           "agreement": agreement(closed["mapped"], closed["real"], tolerance, ci)}
        if classes is not None:
            by = {}
            for label, part in sub.groupby(sub["id"].map(lambda i: classes.get(str(i), "unlabelled")), sort=True):
                g, c = _closed(part)
                by[str(label)] = {"gap": g, "n_prompts": int(part["id"].nunique()), **_lost(part),
                                  **{f"{arm}_closed": v for arm, v in c.items()}}
            out[int(layer)]["by_class"] = by
    return out


def agreement_line(pair: str, layer: int, s: Mapping, tolerance: float, ceiling: Mapping | None = None) -> str:
    """The one-line verdict printed by the stage; ``ceiling``: the layer's ``scores["ceiling"]`` (rows and
    dimensions of the ceiling's fit), without which the ceiling is not read (:func:`ceiling_reading`)."""
    head = f"fit_clt@{pair} layer {layer}: "
    if s["agreement"] == "no gap":
        return (head + f"no gap to close (mean KL {s['gap']:.3g} nats{lost_note(s.get('lost_tuned', float('nan')))}): "
                "mapped-patch vs real-patch not comparable")
    verdict = {"agree": f"agree within {tolerance:g}", "disagree": f"disagree (tolerance {tolerance:g})",
               "inconclusive": f"inconclusive (the interval straddles the tolerance {tolerance:g})"}[s["agreement"]]
    lo, hi = s.get("mapped_minus_real_ci") or (float("nan"), float("nan"))
    line = (head + f"mapped-patch closes {s['mapped_closed']:.3f} of the {s['gap']:.3g}-nat gap"
            f"{lost_note(s.get('lost_tuned', float('nan')))} vs real-patch {s['real_closed']:.3f}: "
            + verdict + f" (mapped - real 95% CI [{lo:.3f}, {hi:.3f}] over prompts)"
            + (f" [in-sample linear ceiling {s['ceiling_closed']:.3f}," if "ceiling_closed" in s else " [")
            + f" identity {s['identity_closed']:.3f}, random change of the map's size {s['random_closed']:.3f}"
            + (f" (max of {len(s['random_closed_draws'])} draws {max(s['random_closed_draws']):.3f})]"
               if s.get("random_closed_draws") else "]"))
    if s["agreement"] == "disagree" and "ceiling_closed" in s:
        info = ceiling or {}
        reading = ceiling_reading(float(s["ceiling_closed"]), float(s["real_closed"]), tolerance,
                                  info.get("n_rows"), info.get("n_dims"))
        line += f"; {reading}" if reading else ""
    for label, c in (s.get("by_class") or {}).items():
        if np.isfinite(c["real_closed"]):
            line += (f"\n  {label}: mean gap {c['gap']:.3g} nats{lost_note(c.get('lost_tuned', float('nan')))} over "
                     f"{c['n_prompts']} prompts, mapped "
                     f"{c['mapped_closed']:.3f} vs real {c['real_closed']:.3f}")
    return line


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
