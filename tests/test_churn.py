"""Churn statistics on constructed score tables with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechdiff.data.target import BUILTIN
from mechdiff.rq4 import churn as ch

L, H = 4, 8
LAYER_OF = np.repeat(np.arange(L), H)
NATS = ch.ImportanceRule(z=2.0, threshold=0.5, units="nats")
ABS = ch.ImportanceRule(z=99.0, threshold=0.5, units="nats")  # the absolute rule alone


def _scores(effects: np.ndarray, n: int = 40, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return effects[None, :] + noise * rng.standard_normal((n, len(effects)))


def _effects(important_heads, value=2.0) -> np.ndarray:
    e = np.zeros(L * H)
    e[list(important_heads)] = value
    return e


def test_identical_rankings_give_no_churn():
    s = _scores(_effects([1, 10, 20]))
    m = np.zeros(len(s))
    out = ch.compare(s, m, s, m, LAYER_OF, NATS, k=3)
    assert out["churn"] == 0.0 and out["jaccard"] == 1.0 and out["spearman"] == pytest.approx(1.0)
    assert out["n_important_a"] == 3


def test_disjoint_top_heads_give_full_churn():
    a, b = _scores(_effects([1, 10, 20]), seed=1), _scores(_effects([2, 11, 21]), seed=2)
    m = np.zeros(len(a))
    out = ch.compare(a, m, b, m, LAYER_OF, ABS, k=3)
    assert out["churn"] == 1.0 and out["jaccard"] == 0.0 and out["n_union"] == 6
    half = ch.compare(a, m, _scores(_effects([1, 10, 21]), seed=3), m, LAYER_OF, ABS, k=3)
    assert half["churn"] == pytest.approx(2 / 4)


def test_importance_rules_and_units():
    e = np.zeros(L * H)
    e[3] = 0.2  # small, but an outlier within layer 0 (z = sqrt(H - 1) = 2.65)
    e[12] = -0.7  # over the absolute threshold (sign does not matter)
    imp = ch.important(e[None, :], np.zeros(1), LAYER_OF, NATS)
    assert set(np.flatnonzero(imp)) == {3, 12}
    assert ch.random_jaccard(16, 10) == pytest.approx(0.4619, abs=1e-4) and ch.random_jaccard(8, 8) == 1.0
    # refusal units: effect on the probability = p * d log p, in percentage points
    scores = np.full((2, 1), 0.5)  # +0.5 nat of log p(refusal)
    metric = np.log(np.array([0.2, 0.02]))  # p = 20% and 2%
    assert ch.head_effects(scores, metric, "pp")[0] == pytest.approx(100 * (0.2 * 0.5 + 0.02 * 0.5) / 2)
    assert ch.rule_for(BUILTIN["cultural"].units, 2.0, 0.5, 5.0).units == "pp"
    assert ch.rule_for(BUILTIN["cognitive"].units, 2.0, 0.5, 5.0).threshold == 0.5
    assert ch.churn(np.zeros(4, bool), np.zeros(4, bool)) == 0.0


def test_split_half_noise_floor_of_pure_noise_is_high_and_of_signal_low():
    rng = np.random.default_rng(0)
    noise = {m: rng.standard_normal((30, L * H)) for m in ("base", "tuned")}
    metric = {m: np.zeros(30) for m in noise}
    rule = ch.ImportanceRule(z=1.5, threshold=0.4, units="nats")
    floor = ch.split_half(noise, metric, LAYER_OF, rule, k=5, n_splits=20, seed=0)["within"]
    assert np.mean(floor["churn"]) > 0.6 and abs(np.mean(floor["spearman"])) < 0.3
    signal = {m: _scores(_effects([1, 10, 20]), n=30, noise=0.3, seed=i) for i, m in enumerate(noise)}
    low = ch.split_half(signal, metric, LAYER_OF, ABS, k=3, n_splits=20, seed=0)["within"]
    assert np.mean(low["churn"]) < 0.1 and np.mean(low["jaccard"]) > 0.9


def test_bootstrap_interval_contains_point_and_summary_reads_rewiring():
    scores = {"base": _scores(_effects([1, 10, 20]), noise=0.5, seed=1),
              "tuned": _scores(_effects([2, 10, 21, 30]), noise=0.5, seed=2)}
    metric = {m: np.zeros(40) for m in scores}
    heads = np.stack([LAYER_OF, np.tile(np.arange(H), L)], 1)
    out = ch.summarise(scores, metric, heads, ABS, k=4, n_boot=100, n_splits=20, seed=0)
    assert out["churn"] == pytest.approx(5 / 6)  # union {1, 2, 10, 20, 21, 30}, shared {10}
    for s in ("churn", "jaccard", "spearman"):
        lo, hi = out[f"{s}_ci"]
        assert lo <= out[s] <= hi
    assert out["noise_floor"]["churn_mean"] < 0.2 and out["churn_above_floor"]
    assert out["n_important_union"] == 6 and ch.summarise(scores, metric, heads, NATS, 4, 5, 5, 0)["z_attainable"]
    same = ch.summarise({m: scores["base"] for m in scores}, metric, heads, ABS, 4, 50, 20, 0)
    assert same["churn"] == 0.0 and same["churn_ci"] == [0.0, 0.0]
    assert same["half_sample"]["churn_mean"] == pytest.approx(same["noise_floor"]["churn_mean"], abs=0.1)
    four = np.stack([np.repeat(np.arange(8), 4), np.tile(np.arange(4), 8)], 1)  # 4 heads per layer: z <= sqrt(3)
    assert not ch.summarise(scores, metric, four, NATS, 4, 5, 5, 0)["z_attainable"]


def test_score_arrays_pivot_and_completeness():
    rows = [{"id": pid, "model": m, "layer": layer, "head": h, "score": float(i * 10 + layer + h / 10),
             "metric": -float(i), "score_ig": 0.25, "metric_ablated": -float(i) - 2.0}
            for m in ("tuned", "base") for i, pid in enumerate(["p1", "p0"]) for layer in (1, 3) for h in range(2)]
    table = pd.DataFrame(rows)
    heads, scores, metric, ids = ch.score_arrays(table)
    assert ids == ["p0", "p1"] and heads.tolist() == [[1, 0], [1, 1], [3, 0], [3, 1]]
    np.testing.assert_allclose(scores["base"][0], [11, 11.1, 13, 13.1])  # p0 has i = 1
    np.testing.assert_allclose(metric["tuned"], [-1.0, 0.0])
    comp = ch.completeness(table)  # sum IG = 4 * 0.25 = 1 vs a gap of 2: relative error 0.5
    assert comp["ig"]["rel_error_max"] == pytest.approx(0.5) and comp["mean_gap"] == pytest.approx(2.0)
    assert ch.completeness(table.drop(columns=["score_ig"])) is None
    with pytest.raises(ch.ChurnError):
        ch.score_arrays(table[table["model"] == "base"])
    agree = ch.rank_agreement(np.array([3.0, -2.0, 1.0, 0.1]), np.array([-0.9, 0.5, 0.2, 0.0]), k=2)
    assert agree["spearman"] == pytest.approx(1.0) and agree["jaccard"] == 1.0


def test_patch_agreement_reads_zero_ablation_rows_per_model():
    heads = np.array([[1, 0], [1, 1], [3, 0], [3, 1]])
    scores = {"base": np.array([[1.0, 0.2, -3.0, 0.1]]), "tuned": np.array([[0.1, 2.0, 0.3, -1.0]])}
    rows = []  # head_patch.csv: delta_* = ablated - clean; only zero-ablation single-head rows count
    for split, scale in (("dev", 1.0), ("test", 3.0)):
        for (layer, head), b, t in zip(heads.tolist(), [-1.0, -0.2, 3.0, -0.1], [-0.1, -2.0, -0.3, 1.0]):
            rows.append({"kind": "zero", "heads": str(head), "head": head, "layer": layer, "split": split,
                         "delta_base": scale * b, "delta_tuned": scale * t, "effect": 0.0})
            rows.append({"kind": "mean", "heads": str(head), "head": head, "layer": layer, "split": split,
                         "delta_base": 9.0, "delta_tuned": -9.0, "effect": 0.0})
    rows.append({"kind": "zero", "heads": "0 1", "head": -1, "layer": 1, "split": "test", "delta_base": 50.0,
                 "delta_tuned": 50.0, "effect": 0.0})
    out = ch.patch_agreement(pd.DataFrame(rows), heads, scores, k=2)
    assert sorted(out) == ["base", "tuned"]
    for m in out:
        assert out[m]["spearman"] == pytest.approx(1.0) and out[m]["spearman_signed"] == pytest.approx(1.0)
        assert out[m]["jaccard"] == 1.0 and out[m]["n_heads"] == 4 and out[m]["layers"] == [1, 3]
    with pytest.raises(ch.ChurnError, match="expected columns"):
        ch.patch_agreement(pd.DataFrame(rows).drop(columns=["delta_base"]), heads, scores, k=2)
