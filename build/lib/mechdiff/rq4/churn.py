"""RQ4 head churn: which heads matter for the target in each model, and how much that set changes.

Inputs are per-prompt head scores (:mod:`mechdiff.rq4.attribution`): ``scores`` (P, K) for P prompts and
K = L x H heads (scanned layers x heads, layer-major), and the prompts' clean metric ``metric`` (P,).

Effect of a head, in the units of its threshold (:func:`head_effects`):

* ``nats`` (cognitive; the metric is the log-prob of the correct answer): the mean score over prompts,
  i.e. the first-order change of the answer log-prob when the head is zero-ablated.
* ``pp`` (cultural and null; the metric is the soft refusal score ``log p(refusal opening)``): the
  threshold is on the refusal **probability** ``p = exp(metric)``. By the chain rule grad x act of ``p``
  is ``p * (grad x act of log p)``, so the effect is ``100 * mean_b(p_b * score_b)`` percentage points:
  the same first-order estimate, in probability units. A model that puts little mass on the refusal
  (a base model on the policy topic) has small pp effects; the z rule still ranks its heads.

A head is **important** when ``z >= churn.z`` within its layer (z of the head's ``|mean score|``
against its layer's heads, population std: scale-free, so the same in any unit; note that with ``n``
heads per layer z cannot exceed ``sqrt(n - 1)``, so z >= 2 needs at least 5 heads per layer and is
reported as ``z_attainable``; ``k`` equal outliers among ``n`` reach only ``sqrt((n - k) / k)``, e.g. two of 8
heads 1.73, so a pair of equally strong heads is named by the absolute threshold) or ``|effect| >=`` the
absolute threshold. ``per_head`` of :func:`summarise` lists every head's scores, z and importance per model. **Churn** is the share of heads
important in either model whose importance differs: ``|A xor B| / |A or B|`` (0 when neither model has
an important head). Rankings (top-k Jaccard, with its chance level, and Spearman correlation) use
``|mean score|``, the attribution of the target scalar itself.

Uncertainty: bootstrap over prompts (the same resample in both models: prompts are paired), and a
split-half **noise floor**: churn between two random halves of the prompts of the same model. Since a
half has half the prompts, the between-model churn is also computed on halves (base on one half, tuned
on the other) so that it is compared with the floor at equal sample size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import hypergeom, spearmanr

from mechdiff.errors import MechdiffError
from mechdiff.stats import percentile_interval, resample_indices

UNITS = ("nats", "pp")


class ChurnError(MechdiffError):
    """The score table cannot be compared (missing models, unpaired prompts)."""


@dataclass(frozen=True)
class ImportanceRule:
    """When a head is important: ``z`` within its layer, or ``|effect| >= threshold`` in ``units``."""

    z: float
    threshold: float
    units: str

    def __post_init__(self):
        if self.units not in UNITS:
            raise ChurnError(f"units must be one of {UNITS}, got {self.units!r}")


def rule_for(units: str, z: float, math_nats: float, refusal_pp: float) -> ImportanceRule:
    """The importance rule in the ``units`` of the pair's target (:attr:`mechdiff.data.target.Target.units`): nats
    (``math_nats``; answer and logprob measures) or pp of the continuation's probability (``refusal_pp``;
    refusal and match)."""
    if units not in UNITS:
        raise ChurnError(f"units must be one of {UNITS}, got {units!r}")
    return ImportanceRule(z, math_nats if units == "nats" else refusal_pp, units)


# --------------------------------------------------------------------------------------------------
# one set of prompts


def head_effects(scores: np.ndarray, metric: np.ndarray, units: str) -> np.ndarray:
    """Effect (K,) of each head in threshold units from ``scores`` (P, K) and ``metric`` (P,)."""
    if units == "nats":
        return scores.mean(0)
    return 100.0 * (np.exp(metric)[:, None] * scores).mean(0)


def layer_z(values: np.ndarray, layer_of: np.ndarray) -> np.ndarray:
    """z-score (K,) of each value against the values of its layer (population std; 0 for a flat layer)."""
    z = np.zeros(len(values))
    for layer in np.unique(layer_of):
        sel = layer_of == layer
        v = values[sel]
        sd = v.std()
        z[sel] = (v - v.mean()) / sd if sd > 0 else 0.0
    return z


def important(scores: np.ndarray, metric: np.ndarray, layer_of: np.ndarray, rule: ImportanceRule) -> np.ndarray:
    """Bool (K,): the head's mean ``|score|`` has z >= ``rule.z`` within its layer, or its effect in
    threshold units (:func:`head_effects`) reaches ``rule.threshold`` in absolute value."""
    z = layer_z(np.abs(scores.mean(0)), layer_of)
    return (z >= rule.z) | (np.abs(head_effects(scores, metric, rule.units)) >= rule.threshold)


def churn(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the heads important in either set whose importance differs (0 when both are empty)."""
    union = int((a | b).sum())
    return float((a ^ b).sum()) / union if union else 0.0


def top_k(effects: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``|effect|`` (ties broken by index, deterministic)."""
    return np.lexsort((np.arange(len(effects)), -np.abs(effects)))[:k]


def top_k_jaccard(ea: np.ndarray, eb: np.ndarray, k: int) -> float:
    """Jaccard overlap of the top-``k`` heads by ``|effect|`` of two models."""
    a, b = set(top_k(ea, k).tolist()), set(top_k(eb, k).tolist())
    return len(a & b) / len(a | b)


def random_jaccard(n: int, k: int) -> float:
    """Expected Jaccard overlap of two independent random ``k``-subsets of ``n`` heads (the chance
    level of :func:`top_k_jaccard`; high when ``k`` is a large share of ``n``)."""
    i = np.arange(max(0, 2 * k - n), k + 1)
    pmf = hypergeom(n, k, k).pmf(i)
    return float((pmf * i / (2 * k - i)).sum())


def rank_spearman(ea: np.ndarray, eb: np.ndarray) -> float:
    """Spearman correlation of the heads' ``|effect|`` rankings (``nan`` when one side is constant)."""
    a, b = np.abs(ea), np.abs(eb)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def compare(sa: np.ndarray, ma: np.ndarray, sb: np.ndarray, mb: np.ndarray, layer_of: np.ndarray,
            rule: ImportanceRule, k: int) -> dict[str, float]:
    """Churn, top-k Jaccard, Spearman and important-head counts between two score sets (P_a, K), (P_b, K).

    Rankings use the mean score (the attribution of the target scalar itself); importance uses
    :func:`important`.
    """
    ea, eb = sa.mean(0), sb.mean(0)
    ia, ib = important(sa, ma, layer_of, rule), important(sb, mb, layer_of, rule)
    return {"churn": churn(ia, ib), "jaccard": top_k_jaccard(ea, eb, k), "spearman": rank_spearman(ea, eb),
            "n_important_a": int(ia.sum()), "n_important_b": int(ib.sum()), "n_union": int((ia | ib).sum())}


# --------------------------------------------------------------------------------------------------
# uncertainty


def _halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    return perm[: n // 2], perm[n // 2:]


def split_half(scores: dict[str, np.ndarray], metric: dict[str, np.ndarray], layer_of: np.ndarray,
               rule: ImportanceRule, k: int, n_splits: int, seed: int) -> dict[str, np.ndarray]:
    """Split-half statistics over ``n_splits`` random halvings of the (paired) prompts.

    ``within``: for each model, half A vs half B of the same model (the noise floor; both models'
    values concatenated). ``between``: base on half A vs tuned on half B (equal sample size).
    Each maps a statistic name to an array of values.
    """
    rng = np.random.default_rng(seed)
    n = len(metric["base"])
    if n < 4:
        raise ChurnError(f"a split-half noise floor needs at least 4 prompts, got {n}")
    within, between = [], []
    for _ in range(n_splits):
        a, b = _halves(n, rng)
        for m in ("base", "tuned"):
            within.append(compare(scores[m][a], metric[m][a], scores[m][b], metric[m][b], layer_of, rule, k))
        between.append(compare(scores["base"][a], metric["base"][a], scores["tuned"][b], metric["tuned"][b],
                               layer_of, rule, k))
    return {name: pd.DataFrame(rows)[["churn", "jaccard", "spearman"]].to_dict("list")
            for name, rows in (("within", within), ("between", between))}


def bootstrap(scores: dict[str, np.ndarray], metric: dict[str, np.ndarray], layer_of: np.ndarray,
              rule: ImportanceRule, k: int, n_boot: int, seed: int) -> dict[str, list[float]]:
    """Between-model statistics on ``n_boot`` prompt resamples (the same indices in both models)."""
    rows = []
    for idx in resample_indices(len(metric["base"]), n_boot, seed):
        rows.append(compare(scores["base"][idx], metric["base"][idx], scores["tuned"][idx], metric["tuned"][idx],
                            layer_of, rule, k))
    return pd.DataFrame(rows)[["churn", "jaccard", "spearman"]].to_dict("list")


# --------------------------------------------------------------------------------------------------
# tables


def score_arrays(table: pd.DataFrame, column: str = "score") -> tuple[np.ndarray, dict, dict, list[str]]:
    """Pivot the long attribution table into ``heads`` (K, 2) [layer, head], ``scores[model]`` (P, K),
    ``metric[model]`` (P,) and the prompt ids, with prompts paired across ``base`` and ``tuned``."""
    models = set(table["model"].unique())
    if models != {"base", "tuned"}:
        raise ChurnError(f"the attribution table must hold models 'base' and 'tuned', found {sorted(models)}")
    ids = sorted(table["id"].unique())
    heads = table[["layer", "head"]].drop_duplicates().sort_values(["layer", "head"]).to_numpy()
    scores, metric = {}, {}
    for m, sub in table.groupby("model"):
        wide = sub.pivot_table(index="id", columns=["layer", "head"], values=column, aggfunc="first")
        if len(wide) != len(ids) or wide.isna().any().any():
            raise ChurnError(f"model {m!r} lacks scores for some (prompt, head); prompts must be paired")
        scores[m] = wide.loc[ids, [tuple(h) for h in heads]].to_numpy(dtype=np.float64)
        metric[m] = sub.groupby("id")["metric"].first().loc[ids].to_numpy(dtype=np.float64)
    return heads, scores, metric, ids


def summarise(scores: dict[str, np.ndarray], metric: dict[str, np.ndarray], heads: np.ndarray,
              rule: ImportanceRule, k: int, n_boot: int, n_splits: int, seed: int) -> dict:
    """Headline RQ4 statistics: churn with a bootstrap interval, Jaccard, Spearman, the noise floor."""
    layer_of = heads[:, 0]
    k = min(k, len(heads))
    point = compare(scores["base"], metric["base"], scores["tuned"], metric["tuned"], layer_of, rule, k)
    boot = bootstrap(scores, metric, layer_of, rule, k, n_boot, seed)
    halves = split_half(scores, metric, layer_of, rule, k, n_splits, seed + 1)
    floor = {f"{s}_mean": float(np.nanmean(v)) for s, v in halves["within"].items()}
    floor["churn_q95"] = float(np.quantile(halves["within"]["churn"], 0.95))
    half = {f"{s}_mean": float(np.nanmean(v)) for s, v in halves["between"].items()}
    heads_per_layer = int(pd.Series(layer_of).value_counts().min())
    return {
        **{s: point[s] for s in ("churn", "jaccard", "spearman")},
        **{f"{s}_ci": list(percentile_interval(boot[s])) for s in ("churn", "jaccard", "spearman")},
        "n_important_base": point["n_important_a"], "n_important_tuned": point["n_important_b"],
        "n_important_union": point["n_union"], "n_heads": int(len(heads)), "n_prompts": int(len(metric["base"])),
        "top_k": k, "jaccard_chance": random_jaccard(len(heads), k), "units": rule.units,
        "threshold": rule.threshold, "z": rule.z,
        "z_attainable": bool(np.sqrt(heads_per_layer - 1) >= rule.z),
        "noise_floor": floor, "half_sample": half,
        "churn_excess_over_floor": half["churn_mean"] - floor["churn_mean"],
        "churn_above_floor": bool(half["churn_mean"] > floor["churn_q95"]),
        "churn_bootstrap": [float(v) for v in boot["churn"]],
        "per_head": per_head(scores, metric, heads, rule),
        "changed_heads": [[int(layer), int(h)] for (layer, h), a, b in zip(
            heads, important(scores["base"], metric["base"], layer_of, rule),
            important(scores["tuned"], metric["tuned"], layer_of, rule)) if a != b],
    }


def per_head(scores: dict[str, np.ndarray], metric: dict[str, np.ndarray], heads: np.ndarray,
             rule: ImportanceRule) -> list[dict]:
    """One record per head ``heads`` (K, 2) [layer, head]: per model the mean score (nats of the target
    log-prob), the effect in threshold units, the within-layer z of ``|mean score|`` and ``important``;
    ``score_change`` = tuned - base mean score and ``changed`` = important in exactly one model (the heads
    churn counts)."""
    layer_of = heads[:, 0]
    cols = {}
    for m in ("base", "tuned"):
        cols[f"score_{m}"] = scores[m].mean(0)
        cols[f"effect_{m}"] = head_effects(scores[m], metric[m], rule.units)
        cols[f"z_{m}"] = layer_z(np.abs(scores[m].mean(0)), layer_of)
        cols[f"important_{m}"] = important(scores[m], metric[m], layer_of, rule)
    out = []
    for i, (layer, head) in enumerate(heads):
        rec = {"layer": int(layer), "head": int(head)}
        for name, v in cols.items():
            rec[name] = bool(v[i]) if v.dtype == bool else float(v[i])
        rec["score_change"] = rec["score_tuned"] - rec["score_base"]
        rec["changed"] = rec["important_base"] != rec["important_tuned"]
        out.append(rec)
    return out


def completeness(table: pd.DataFrame) -> dict | None:
    """IG completeness per prompt and model: ``sum(IG) - (metric - metric_ablated)``, relative to the gap.

    Returns ``None`` without integrated gradients in the table. The same check is reported for plain
    grad x act (which need not be complete: it is a first-order estimate).
    """
    if "score_ig" not in table.columns:
        return None
    g = table.groupby(["model", "id"])
    gap = g["metric"].first() - g["metric_ablated"].first()
    out = {}
    for col, name in (("score_ig", "ig"), ("score", "grad_x_act")):
        err = (g[col].sum() - gap).abs()
        rel = (err / gap.abs().clip(lower=1e-12)).to_numpy()
        out[name] = {"rel_error_median": float(np.median(rel)), "rel_error_max": float(rel.max()),
                     "abs_error_max": float(err.max())}
    out["mean_gap"] = float(gap.mean())
    out["mean_abs_gap"] = float(gap.abs().mean())
    return out


def patch_contributions(patch: pd.DataFrame) -> dict[str, pd.Series]:
    """Per model, each single head's zero-ablation contribution ``clean - ablated`` (the quantity grad x
    act estimates), indexed by (layer, head), from a head patching table (``head_patch.csv``).

    Reads ``kind == 'zero'`` single-head rows (``head >= 0``) and the per-model mean changes
    ``delta_tuned`` / ``delta_base`` (``ablated - clean``), averaged over splits.
    """
    need = {"layer", "head", "kind", "delta_tuned", "delta_base"}
    if not need <= set(patch.columns):
        raise ChurnError(f"head patching table: expected columns {sorted(need)}; found {list(patch.columns)}")
    zero = patch[(patch["kind"] == "zero") & (patch["head"] >= 0)]
    grouped = zero.groupby(["layer", "head"])
    return {m: -grouped[f"delta_{m}"].mean() for m in ("base", "tuned")}


def patch_agreement(patch: pd.DataFrame, heads: np.ndarray, scores: dict[str, np.ndarray], k: int) -> dict:
    """Agreement of attribution (mean score per head) with real zero ablation, per model, over the heads
    both cover: Spearman of magnitudes, top-k Jaccard and the signed Spearman (grad x act can miss
    effects through saturation or cancellation, AtP* arXiv 2403.00745)."""
    out = {}
    for model, contrib in patch_contributions(patch).items():
        idx = [i for i, (layer, head) in enumerate(heads) if (layer, head) in contrib.index]
        if len(idx) < 2:
            continue
        real = np.array([contrib[tuple(heads[i])] for i in idx])
        attr = scores[model].mean(0)[idx]
        out[model] = {**rank_agreement(attr, real, k),
                      "spearman_signed": float(spearmanr(attr, real).statistic) if np.ptp(real) > 0 else float("nan"),
                      "layers": sorted({int(heads[i][0]) for i in idx})}
    return out


def rank_agreement(attr_effects: np.ndarray, patch_effects: np.ndarray, k: int) -> dict[str, float]:
    """Agreement of attribution and real patching on the same heads: Spearman of ``|effect|`` and top-k
    Jaccard (AtP can miss heads through saturation or cancellation: arXiv 2403.00745)."""
    k = min(k, len(attr_effects))
    return {"spearman": rank_spearman(attr_effects, patch_effects),
            "jaccard": top_k_jaccard(attr_effects, patch_effects, k), "top_k": k, "n_heads": int(len(attr_effects))}
