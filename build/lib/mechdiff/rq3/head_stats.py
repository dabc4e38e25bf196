"""Which single-head edits of the head_patch stage (RQ3) are above noise.

Per setting, the change of the target continuation's log-prob against the clean run, per prompt
(:func:`summarise_heads`), a two-sided one-sample t-test of those per-prompt effects
(:func:`t_test_p_values`, Student's t), Benjamini-Hochberg q-values over a family of tests
(:func:`bh_qvalues`, :func:`flag_above_noise`), the heads above noise per kind (:func:`heads_above_noise`,
:func:`noise_summary`) and the confirmation of a top set against random sets of the same size
(:func:`confirm_top`). Pure functions of log-prob arrays and tables; no model runs here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mechdiff.rq3.head_sweep import HeadSetting
from mechdiff.stats import percentile_interval, resample_indices

__all__ = ["bh_qvalues", "confirm_top", "flag_above_noise", "heads_above_noise", "noise_summary", "summarise_heads",
           "t_test_p_values"]


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    f = d
    for m in range(1, 400):  # the fraction's even and odd terms, m(b-m)x/... and -(a+m)(a+b+m)x/...
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + num * d)
            c = guard(1.0 + num / c)
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def t_test_p_values(per_prompt: np.ndarray) -> np.ndarray:
    """Two-sided one-sample t-test p-values (K,) of per-prompt effects ``per_prompt`` (K, N) against a mean
    of 0: ``t = mean / (sd / sqrt(N))`` with N - 1 degrees of freedom (Student's t, not the normal: with tens
    of prompts the normal tail, at the small p that a correction over many heads reads, is too light).

    No spread (every prompt moves by the same amount): p = 1 for an effect of exactly 0 (the head's edit
    changed nothing, e.g. a swap of identical inputs), 0 otherwise. NaN for a row with a non-finite value
    or fewer than 2 prompts.
    """
    x = np.asarray(per_prompt, float)
    out = np.full(x.shape[0], np.nan)
    n = x.shape[1]
    for k, row in enumerate(x):
        if n < 2 or not np.isfinite(row).all():
            continue
        mean, sd = float(row.mean()), float(row.std(ddof=1))
        if sd == 0.0 or not sd > 1e-12 * abs(mean):  # identical values up to rounding
            out[k] = 1.0 if mean == 0.0 else 0.0
            continue
        t2 = n * mean * mean / (sd * sd)
        out[k] = _betainc((n - 1) / 2.0, 0.5, (n - 1) / (n - 1 + t2))  # P(|T_{N-1}| >= |t|)
    return out


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (K,) of ``p`` (K,): ``q_(i) = min_{j >= i} p_(j) * m / j`` over
    the ascending order, capped at 1; ``q <= alpha`` rejects exactly the BH step-up set at FDR ``alpha``.
    NaN p-values are not tested (not counted in m) and get NaN."""
    p = np.asarray(p, float)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def summarise_heads(lp_tuned: np.ndarray, lp_base: np.ndarray, settings: Sequence[HeadSetting], cols: np.ndarray,
                    n_boot: int, seed: int) -> pd.DataFrame:
    """Per edited setting (setting 0 must be ``none``): the change of the target log-prob and its noise.

    ``lp_tuned``/``lp_base`` (S, N): continuation log-probs of each setting in the tuned and the base model
    (NaN rows where a setting was not run in that model, e.g. ``swap`` in the base); ``cols`` the prompts
    summarised. Columns: ``delta_tuned``/``delta_base`` (mean change vs clean, nats), ``churn`` = delta_tuned -
    delta_base (how differently the two models use the head), ``fraction_closed`` = share of the
    base-to-tuned log-prob gap closed in the tuned model, ``effect`` (the model-difference measure: the
    swap's delta, or the churn), ``se`` and ``ci_low``/``ci_high`` (bootstrap over prompts) and ``p_value``
    (two-sided t-test of the per-prompt effects, :func:`t_test_p_values`). Which heads are above noise
    depends on every test of the run: :func:`flag_above_noise` adds it.
    """
    if settings[0].kind != "none":
        raise ValueError("setting 0 must be the clean run (kind 'none')")
    t, b = lp_tuned[:, cols], lp_base[:, cols]
    gap = float(t[0].mean() - b[0].mean())
    boot = resample_indices(len(cols), n_boot, seed)
    rows = []
    for s, st in enumerate(settings[1:], start=1):
        d_t, d_b = t[s] - t[0], b[s] - b[0]
        effect_pp = d_t if st.kind == "swap" else d_t - d_b  # per prompt
        means = effect_pp[boot].mean(1)
        se = float(means.std()) if np.isfinite(means).all() else float("nan")
        effect = float(effect_pp.mean())
        swap = st.kind == "swap"
        rows.append({"kind": st.kind, "heads": " ".join(map(str, st.heads)),
                     "head": st.heads[0] if len(st.heads) == 1 else -1, "delta_tuned": float(d_t.mean()),
                     "delta_base": float("nan") if swap else float(d_b.mean()),
                     "churn": float((d_t - d_b).mean()) if st.kind != "swap" else float("nan"),
                     "fraction_closed": -float(d_t.mean()) / gap if abs(gap) > 1e-6 else float("nan"),
                     "effect": effect, "se": se, **dict(zip(("ci_low", "ci_high"), percentile_interval(means))),
                     "p_value": float(t_test_p_values(effect_pp[None])[0]),
                     "gap": gap, "n_prompts": len(cols)})
    return pd.DataFrame(rows)


def flag_above_noise(table: pd.DataFrame, fdr: float, family: Sequence[str] = ()) -> pd.DataFrame:
    """``table`` with ``q_value`` (Benjamini-Hochberg over every row with the same values of the ``family``
    columns, e.g. ``("split",)``: all heads x kinds x layers of one split of a stage run; ``()``: the whole
    table) and ``above_noise`` = ``q_value <= fdr``; rows with a NaN ``p_value`` are not tested and never
    above noise."""
    p = table["p_value"].to_numpy(float)
    q = np.full(len(p), np.nan)
    groups = table.groupby(list(family), sort=False).indices.values() if family else [np.arange(len(p))]
    for idx in groups:  # positions
        q[idx] = bh_qvalues(p[idx])
    return table.assign(q_value=q, above_noise=q <= fdr)


def heads_above_noise(table: pd.DataFrame, kind: str) -> list[int]:
    """Single heads of ``kind`` flagged ``above_noise`` in ``table`` (one layer, one split), largest
    ``|effect|`` first (ties by head index)."""
    d = table[(table["kind"] == kind) & (table["head"] >= 0) & table["above_noise"].astype(bool)]
    d = d.assign(a=-d["effect"].abs()).sort_values(["a", "head"], kind="stable")
    return [int(h) for h in d["head"]]


def noise_summary(table: pd.DataFrame, kinds: Sequence[str], fdr: float, where: str = "") -> dict:
    """Which kinds of patching saw a change in ``table`` (one layer, one split, flagged by
    :func:`flag_above_noise`): per kind ``{"n_above_noise", "n_heads", "heads" (largest |effect| first),
    "text"}``; ``text`` names the heads, or says that no head is above noise at the BH level ``fdr``."""
    out = {}
    for kind in kinds:
        heads = heads_above_noise(table, kind)
        n = int(((table["kind"] == kind) & (table["head"] >= 0)).sum())
        rule = f"BH q <= {fdr:g}"
        text = (f"{len(heads)} of {n} heads above noise ({rule}) for {kind}{where}: {', '.join(map(str, heads))}"
                if heads else f"no head above noise ({rule}) for {kind}{where}")
        out[kind] = {"n_above_noise": len(heads), "n_heads": n, "heads": heads, "text": text}
    return out


def confirm_top(lp: np.ndarray, cols: np.ndarray, gap: float, min_fraction: float) -> dict:
    """Top-set row 1 against random-set rows 2.. (row 0 clean), on prompts ``cols``: effects (mean change of
    the target log-prob), the top set's fraction of the gap closed, its percentile among the random sets,
    and ``confirmed``: larger in magnitude than every random set AND closing at least ``min_fraction`` of
    the base-to-tuned gap (a statistically clear but negligible effect is not a finding; no gap, no
    confirmation)."""
    eff = (lp[:, cols] - lp[0, cols]).mean(1)
    top, rand = float(eff[1]), eff[2:]
    frac = -top / gap if abs(gap) > 1e-6 else float("nan")
    return {"top_effect": top, "top_fraction_closed": frac, "random_effect_mean": float(rand.mean()),
            "random_abs_q95": float(np.quantile(np.abs(rand), 0.95)),
            "percentile_abs": float((np.abs(rand) < abs(top)).mean()),
            "beats_random": bool(abs(top) > np.abs(rand).max()),
            "confirmed": bool(abs(top) > np.abs(rand).max() and abs(frac) >= min_fraction)}
