"""RQ2 fit_clt: the cross-model linear map on the small on-disk pair (planted change at layer 2) and on a
null pair (the base model against itself), run as real stages; plus unit tests of mechdiff.rq2.fit_clt and mechdiff.rq2.mapped_patch.

Known-answer tests of the estimator itself (planted map, N < d, one factorisation) are in
tests/test_linear_map.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mechdiff.rq2 import fit_clt as fc
from mechdiff.rq2 import mapped_patch as mp
from mechdiff.rq2.linear_map import LinearMap
from mechdiff.verdict import CEILING_CAVEATS
from tests.small_project import build, stage


WORDS = ("the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red", "box", "in", "sun", "hat", "old")


def _distinct_prompts(tmp, n: int = 40) -> None:
    """Replace the fixture's prompts by ``n`` distinct English ones (its own repeat some texts verbatim,
    which would put exact twins of held-out prompts into the training set)."""
    rng = np.random.default_rng(0)
    texts: list[str] = []
    while len(texts) < n:
        t = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))
        texts += [t] if t not in texts else []
    rows = [{"id": f"en-{i}", "text": t, "language": "en", "task": "topic", "group": f"en-{i}",
             "split": "dev" if i % 2 else "test", "answer": None, "choices": None, "topic": None, "target": False,
             "source": "fixture"} for i, t in enumerate(texts)]
    pd.DataFrame(rows).to_parquet(tmp / "data" / "prepared.parquet", index=False)


def _fit_clt(tmp, params, acts, chosen, out):
    return stage("fit_clt", "--pair", "small", "--acts", str(acts), "--filtered", str(tmp / "filtered"),
                 "--chosen", str(chosen), "--maps", str(out / "maps"), "--metrics", str(out / "clt.json"),
                 "--fig", str(out / "clt.png"), "--params", str(params))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """filter_shared -> collect_acts -> cka -> layer_patch -> fit_clt on the planted pair."""
    tmp = tmp_path_factory.mktemp("clt")
    params = build(tmp)
    _distinct_prompts(tmp)
    stage("filter_shared", "--pair", "small", "--prepared", str(tmp / "data/prepared.parquet"),
          "--out", str(tmp / "filtered"), "--report", str(tmp / "fairness.json"), "--params", str(params))
    stage("collect_acts", "--pair", "small", "--filtered", str(tmp / "filtered"), "--out", str(tmp / "acts"),
          "--params", str(params))
    stage("cka", "--pair", "small", "--acts", str(tmp / "acts"), "--table", str(tmp / "cka.csv"),
          "--metrics", str(tmp / "cka.json"), "--fig", str(tmp / "cka.png"),
          "--change-rank", str(tmp / "change_rank.csv"), "--params", str(params))
    stage("layer_patch", "--pair", "small", "--filtered", str(tmp / "filtered"), "--cka", str(tmp / "cka.csv"),
          "--table", str(tmp / "lp.csv"), "--chosen", str(tmp / "layers.json"), "--fig", str(tmp / "lp.png"),
          "--params", str(params))
    run = _fit_clt(tmp, params, tmp / "acts", tmp / "layers.json", tmp)
    return tmp, run


@pytest.fixture(scope="module")
def null(tmp_path_factory):
    """The base model against itself; layers.json written by hand (fit_clt reads only its layer list)."""
    tmp = tmp_path_factory.mktemp("clt_null")
    params = build(tmp)
    _distinct_prompts(tmp, 24)
    data = yaml.safe_load(params.read_text())
    data["pairs"]["small"]["tuned"] = data["pairs"]["small"]["base"]
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    stage("filter_shared", "--pair", "small", "--prepared", str(tmp / "data/prepared.parquet"),
          "--out", str(tmp / "filtered"), "--report", str(tmp / "fairness.json"), "--params", str(params))
    stage("collect_acts", "--pair", "small", "--filtered", str(tmp / "filtered"), "--out", str(tmp / "acts"),
          "--params", str(params))
    (tmp / "layers.json").write_text(json.dumps({"layers": [2, 3], "reasons": ["test"], "mode": "strict"}))
    run = _fit_clt(tmp, params, tmp / "acts", tmp / "layers.json", tmp)
    return tmp, run


def test_outputs_exist_and_describe_themselves(small):
    tmp, run = small
    maps = load_file(str(tmp / "maps" / "maps.safetensors"))
    config = json.loads((tmp / "maps" / "config.json").read_text())
    layers = json.loads((tmp / "layers.json").read_text())["layers"]
    assert config["layers"] == layers and config["mode"] == "strict"
    for layer in layers:
        assert maps[f"layers.{layer}.ridge.coef"].shape == (32, 32)
        assert maps[f"layers.{layer}.ridge.intercept"].shape == (32,)
        assert maps[f"layers.{layer}.r2_per_dim.map"].shape == (32,)
    metrics = json.loads((tmp / "clt.json").read_text())
    assert set(metrics["headline"]) >= {"r2_uniform", "identity_r2_uniform", "gain_r2_uniform", "mapped_closed",
                                        "real_closed", "agreement"}
    assert (tmp / "clt.png").stat().st_size > 0
    # held-out prompts never trained on, and the patch uses only held-out prompts
    assert set(config["patch_prompts"]) <= set(config["heldout_prompts"])


def test_map_beats_identity_at_the_planted_layer_on_heldout_prompts(small):
    tmp, _ = small
    layer = json.loads((tmp / "clt.json").read_text())["layers"]["2"]
    held = layer["heldout"]
    assert held["map"]["r2_uniform"] > held["identity"]["r2_uniform"] + 0.05
    assert layer["gain_over_identity"]["r2_uniform"] > 0.05
    assert held["map"]["r2_uniform"] > held["shuffled"]["r2_uniform"]
    assert held["map"]["r2_uniform"] > held["mean"]["r2_uniform"]
    n_strict = int(pd.read_parquet(tmp / "filtered" / "prompts.parquet")["kept_strict"].sum())
    assert layer["n_test_prompts"] >= 1 and layer["n_train_prompts"] + layer["n_test_prompts"] == n_strict


def test_mapped_patch_vs_real_patch_is_reported(small):
    tmp, run = small
    patch = json.loads((tmp / "clt.json").read_text())["layers"]["2"]["patch"]
    assert patch["gap"] > 0 and patch["identity_closed"] == pytest.approx(0.0, abs=1e-6)
    assert patch["real_closed"] > 0.5  # the real patch carries the planted change
    assert patch["mapped_closed"] > patch["random_closed"]
    assert patch["agreement"] == mp.agreement(patch["mapped_closed"], patch["real_closed"], 0.1,
                                              patch["mapped_minus_real_ci"])
    assert "fit_clt@small layer 2: mapped-patch closes" in run.stdout and "real-patch" in run.stdout
    # the in-sample linear ceiling closes at least about what the held-out map does; per-class fractions
    assert patch["ceiling_closed"] >= patch["mapped_closed"] - 0.05 and "linear ceiling" in run.stdout
    # the ceiling is fitted on every patched content position of the patch prompts, rows and dims recorded
    ceiling = json.loads((tmp / "clt.json").read_text())["layers"]["2"]["ceiling"]
    config = json.loads((tmp / "maps" / "config.json").read_text())
    assert ceiling["n_prompts"] == patch["n_prompts"] == len(config["patch_prompts"]) and ceiling["n_dims"] == 32
    assert ceiling["n_rows"] >= ceiling["n_prompts"] and ceiling["determined"] == int(ceiling["n_rows"] >= 32)
    if not ceiling["determined"]:
        assert "not linear" not in run.stdout
    assert set(patch["by_class"]) == {"topic"} and patch["by_class"]["topic"]["n_prompts"] == patch["n_prompts"]
    lo, hi = patch["mapped_minus_real_ci"]
    assert lo <= patch["mapped_minus_real"] <= hi
    maps = load_file(str(tmp / "maps" / "maps.safetensors"))
    assert maps["layers.2.ceiling.coef"].shape == (32, 32)


def test_null_pair_reads_no_difference_and_no_gap(null):
    tmp, run = null
    metrics = json.loads((tmp / "clt.json").read_text())
    for layer in ("2", "3"):
        m = metrics["layers"][layer]
        assert m["heldout"]["map"]["r2_uniform"] >= 0.999
        assert m["heldout"]["identity"]["r2_uniform"] == pytest.approx(m["heldout"]["map"]["r2_uniform"], abs=1e-6)
        assert m["patch"]["gap"] == 0.0
        assert all(m["patch"][f"{arm}_closed"] is None for arm in mp.ARMS)  # nan -> null, no division by zero
        assert m["patch"]["agreement"] == "no gap"
    assert metrics["headline"]["agreement"] == "no gap"
    assert "no gap to close" in run.stdout and "NaN" not in (tmp / "clt.json").read_text()


# --------------------------------------------------------------------------------------------------
# library units


def test_split_rows_holds_out_whole_prompts():
    ids = np.repeat([f"p{i}" for i in range(20)], 5)
    rows, test = fc.split_rows(ids, n_max=60, heldout_fraction=0.2, min_train_prompts=5, seed=3)
    assert len(rows) == 60 and np.all(np.diff(rows) > 0)
    assert not set(ids[rows][test]) & set(ids[rows][~test])
    assert len(set(ids[np.isin(ids, ids[rows][test])])) == 4  # 20% of 20 prompts
    with pytest.raises(fc.TooFewPromptsError, match="needs at least 5"):
        fc.split_rows(ids[:25], 100, 0.2, 5)


def test_split_rows_stratified_holds_out_a_rare_class_in_proportion():
    ids = np.repeat([f"p{i}" for i in range(40)], 3)
    strata = np.repeat(["target"] * 5 + ["other"] * 35, 3)  # 5 target prompts of 40
    for seed in range(10):
        rows, test = fc.split_rows(ids, 1000, 0.2, 5, seed=seed, strata=strata)
        held = set(ids[rows][test])
        assert len({p for p in held if int(p[1:]) < 5}) == 1  # round(0.2 * 5) target prompts, every seed
        assert len(held) == 1 + 7 and not held & set(ids[rows][~test])
    # without strata the split is unchanged by the new argument (same seed, same prompts)
    a = fc.split_rows(ids, 1000, 0.2, 5, seed=4)
    b = fc.split_rows(ids, 1000, 0.2, 5, seed=4, strata=None)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # a one-prompt class stays in training (holding it out would leave the map nothing of it)
    _, test = fc.split_rows(ids, 1000, 0.2, 5, seed=0, strata=np.repeat(["solo"] + ["other"] * 39, 3))
    assert not test[:3].any()


def test_prompt_classes_put_the_target_prompts_apart():
    prompts = pd.DataFrame({"id": ["a", "b", "c"], "task": ["topic", "topic", "math"], "target": [True, False, None]})
    assert fc.prompt_classes(prompts) == {"a": "topic:target", "b": "topic", "c": "math"}


def test_ceiling_is_the_ridge_fitted_in_sample_on_the_patched_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 8))
    A = np.eye(8) + 0.3 * rng.normal(size=(8, 8))
    groups = np.repeat(np.arange(100), 4)
    patched = groups >= 80  # the held-out prompts stand for the patch prompts
    fit = fc.fit_layer(torch.tensor(X), torch.tensor(X @ A), groups, patched, map_kwargs={"lambdas": [1e-6, 1e-3]})
    assert fit.ceiling is None  # fitted only on the patched positions, once they are known
    linear = fc.with_ceiling(fit, torch.tensor(X[patched]), torch.tensor(X[patched] @ A), 20)
    torch.testing.assert_close(linear.ceiling.coef_, torch.tensor(A), atol=1e-4, rtol=0)  # exact when linear
    assert linear.ceiling.lambda_ == linear.ridge.lambda_
    assert linear.scores["ceiling"] | {"caveats": None} == {
        "n_rows": 80, "n_dims": 8, "n_prompts": 20, "lambda": fit.ridge.lambda_, "determined": 1, "in_sample": 1,
        "caveats": None}
    # in-sample on the patched rows: no larger squared error there than the held-out map's (tiny penalty)
    u, v = np.eye(8)[0], 3 * np.eye(8)[1]
    Yg = X + np.maximum(X @ u, 0)[:, None] * v[None]  # a change that switches on with x . u > 0
    gated = fc.fit_layer(torch.tensor(X), torch.tensor(Yg), groups, patched, map_kwargs={"lambdas": [1e-6]})
    gated = fc.with_ceiling(gated, torch.tensor(X[patched]), torch.tensor(Yg[patched]), 20)
    Xp, Yp = torch.tensor(X[patched]), torch.tensor(Yg[patched])
    ceiling_sse = float((Yp - gated.ceiling.predict(Xp)).square().sum())
    assert ceiling_sse <= float((Yp - gated.ridge.predict(Xp)).square().sum()) * (1 + 1e-6)
    assert float((Yp - gated.ceiling.predict(Xp))[:, 1].var()) > 0.1 * float(Yp[:, 1].var())  # still far off


def test_an_under_determined_ceiling_never_reads_as_not_linear():
    """Fewer patched rows than dimensions (the 8B-shaped rerun: 3,217 rows for 4,096 dims): the in-sample
    ceiling can memorise, so whatever it closes, no line says the change is not linear."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(120, 48))
    Y = X + np.maximum(X[:, :1], 0) * 3  # gated: a determined ceiling could fall short here
    groups = np.repeat(np.arange(40), 3)
    patched = groups >= 30  # 30 rows < 48 dims
    fit = fc.fit_layer(torch.tensor(X), torch.tensor(Y), groups, patched, map_kwargs={"lambdas": [1e-6, 1e-3]})
    fit = fc.with_ceiling(fit, torch.tensor(X[patched]), torch.tensor(Y[patched]), 10)
    assert fit.scores["ceiling"]["determined"] == 0
    assert any("ceiling is fitted on 30 rows < 48 dimensions" in w for w in fc.fit_warnings(fit))
    for ceiling, real in ((0.0, 1.0), (0.3, 1.0), (0.9, 0.2), (1.0, 0.5)):
        s = {"agreement": "disagree", "gap": 1.0, "mapped_closed": 0.1, "real_closed": real, "ceiling_closed": ceiling,
             "identity_closed": 0.0, "random_closed": 0.0, "mapped_minus_real_ci": [-0.9, -0.5]}
        line = mp.agreement_line("p", 2, s, 0.1, fit.scores["ceiling"])
        assert "not linear" not in line and "no reading of linearity" in line
        assert "not linear" not in mp.agreement_line("p", 2, s, 0.1)  # rows and dims unknown: no claim either


def test_fit_warnings_name_an_under_determined_map_and_a_grid_too_narrow_but_not_a_tie():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(20), 2)
    X = rng.normal(size=(40, 64))  # 32 training rows, 64 dimensions
    few = fc.fit_layer(torch.tensor(X), torch.tensor(X + 0.1 * rng.normal(size=X.shape)), groups, groups >= 16,
                       map_kwargs={"lambdas": [1e-3, 1e-1]})
    assert any("32 training rows < 64 dimensions" in w for w in fc.fit_warnings(few))
    X = rng.normal(size=(400, 8))
    groups = np.repeat(np.arange(100), 4)
    noise = fc.fit_layer(torch.tensor(X), torch.tensor(rng.normal(size=(400, 8))), groups, groups >= 80,
                         map_kwargs={"lambdas": [1e-3, 1e-1], "prior": "zero"})  # nothing to learn: shrink harder
    assert noise.ridge.lambda_ == 1e-1 and fc.fit_warnings(noise) == [
        "lambda 0.1 is the grid's largest and still improving: extend clt.lambdas upwards"]
    same = fc.fit_layer(torch.tensor(X), torch.tensor(X), groups, groups >= 80, map_kwargs={"lambdas": [1e-3, 1e-1]})
    assert fc.fit_warnings(same) == []  # identity prior on an identical pair: every lambda ties


def test_summarise_patch_by_class_and_bootstrap_interval():
    def rows_for(k, label, gap, rem):
        return [{"prompt": k, "id": f"{label}{k}", "layer": 5, "arm": arm, "gap": gap, "remaining": r}
                for arm, r in zip(mp.ARMS, rem)]
    # the gap is carried by 2 target prompts: mapped closes half of it there and worsens the others
    rows = pd.DataFrame([r for k in range(2) for r in rows_for(k, "t", 8.0, (0.0, 4.0, 2.0, 8.0, 20.0))]
                        + [r for k in range(2, 10) for r in rows_for(k, "o", 0.1, (0.0, 0.2, 0.1, 0.1, 1.0))])
    classes = {f"t{k}": "topic:target" for k in range(2)} | {f"o{k}": "topic" for k in range(2, 10)}
    s = mp.summarise_patch(rows, 0.1, classes, n_boot=500, seed=0)[5]
    t, o = s["by_class"]["topic:target"], s["by_class"]["topic"]
    assert t["n_prompts"] == 2 and t["mapped_closed"] == pytest.approx(0.5)
    assert t["ceiling_closed"] == pytest.approx(0.75)
    assert o["mapped_closed"] == pytest.approx(-1.0) and o["real_closed"] == pytest.approx(1.0)
    lo, hi = s["mapped_minus_real_ci"]
    assert lo <= s["mapped_minus_real"] <= hi and hi - lo > 0.05  # resampling which prompts carry the gap
    line = mp.agreement_line("p", 5, s, 0.1)  # the ceiling's rows and dimensions unknown: no linearity claim
    assert "linear ceiling" in line and "not linear" not in line and "topic:target: mean gap 8" in line
    line = mp.agreement_line("p", 5, s, 0.1, {"n_rows": 40, "n_dims": 32})  # determined: a hedged reading
    assert "may not be linear in the base state" in line and all(c in line for c in CEILING_CAVEATS)
    same = pd.DataFrame([r for k in range(6) for r in rows_for(k, "t", 1.0, (0.0, 0.5, 0.0, 1.0, 2.0))])
    assert mp.summarise_patch(same, 0.1)[5]["mapped_minus_real_ci"] == pytest.approx([-0.5, -0.5])


def test_the_random_control_makes_the_maps_change_at_every_row_in_a_random_direction():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 12)) * rng.uniform(0.5, 3, 12) + 1
    Y = X @ rng.normal(size=(12, 12)) * 0.3 + X
    m = LinearMap(lambdas=[1e-3, 1e-1]).fit(X, Y, np.repeat(np.arange(50), 4))
    Xt = torch.as_tensor(X, dtype=torch.float64)
    change = m.predict(Xt) - Xt
    draws = [fc.random_change_like(m, seed=s) for s in range(3)]
    for r in draws:  # the same size of change per row as the map's, not the map's norm
        torch.testing.assert_close((r.predict(Xt) - Xt).norm(dim=1), change.norm(dim=1), atol=1e-9, rtol=1e-9)
    cos = torch.nn.functional.cosine_similarity(draws[0].predict(Xt) - Xt, change, dim=1)
    assert float(cos.abs().mean()) < 0.5  # in another direction
    assert not torch.allclose(draws[0].coef_, draws[1].coef_)  # independent draws
    exact = fc.AffineMap(torch.eye(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(fc.random_change_like(exact).predict(Xt), Xt)  # no change: none to rotate


def test_the_mapped_patch_carries_the_mass_on_the_tuned_models_appended_tokens():
    """A tuned model whose appended tokens take a known share of its next-token mass: the rows, the
    per-layer summary and the printed line read that share beside the masked KL (which ignores it)."""
    from tests.tiny import tiny_llama, with_appended_tokens

    base, mass = tiny_llama(seed=0), 0.14
    tuned = with_appended_tokens(tiny_llama(seed=0), 8, mass)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # a change, so there is a gap
    ids = [[1, 5, 9, 11, 3, 7], [1, 8, 4, 6], [1, 6, 6, 10, 12]]
    pairs = [np.stack([np.arange(1, len(x)), np.arange(1, len(x))], 1) for x in ids]  # content positions
    same = fc.AffineMap(torch.eye(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64))
    maps = {2: {"mapped": same, "ceiling": same, "random": [same]}}
    rows = pd.DataFrame(mp.patch_batch(base, tuned, (ids, ids), pairs, maps, (np.arange(64), np.arange(64)), (0, 0)))
    rows["id"] = rows["prompt"].astype(str)
    np.testing.assert_allclose(rows["lost_tuned"], mass, atol=1e-5)
    assert (rows["lost_base"] == 0).all() and (rows["lost_patched"] == 0).all()  # the base gets the patch
    s = mp.summarise_patch(rows, 0.1, {str(k): "topic" for k in range(3)}, n_boot=50)[2]
    assert s["gap"] > 0 and s["lost_tuned"] == pytest.approx(mass, abs=1e-5) and s["lost_base"] == 0
    assert s["by_class"]["topic"]["lost_tuned"] == pytest.approx(mass, abs=1e-5)
    assert "14% of the tuned model's mass outside the shared vocabulary" in mp.agreement_line("p", 2, s, 0.1)


def test_summarise_patch_fractions_and_no_gap():
    rows = pd.DataFrame([{"prompt": k, "id": f"p{k}", "layer": 5, "arm": arm, "gap": 2.0, "remaining": rem}
                         for k in range(2) for arm, rem in (("real", 0.2), ("mapped", 0.3), ("identity", 2.0),
                                                            ("random", 5.0))]
                        + [{"prompt": 0, "id": "p0", "layer": 7, "arm": arm, "gap": 0.0, "remaining": 0.0}
                           for arm in mp.ARMS])
    s = mp.summarise_patch(rows, tolerance=0.1)
    assert s[5]["real_closed"] == pytest.approx(0.9) and s[5]["mapped_closed"] == pytest.approx(0.85)
    assert s[5]["identity_closed"] == 0.0 and s[5]["random_closed"] == pytest.approx(-1.5)
    assert s[5]["agreement"] == "agree" and mp.summarise_patch(rows, 0.01)[5]["agreement"] == "disagree"
    assert math.isnan(s[7]["real_closed"]) and s[7]["agreement"] == "no gap"


@pytest.mark.parametrize("interval, expected", [((-0.05, 0.08), "agree"), ((0.15, 0.4), "disagree"),
                                                ((-0.6, -0.2), "disagree"), ((-0.23, 0.06), "inconclusive"),
                                                ((0.05, 0.3), "inconclusive")])
def test_mapped_vs_real_is_an_equivalence_test_on_the_interval(interval, expected):
    # the cognitive case: point estimate inside the tolerance, interval [-0.23, 0.06] straddling it
    assert mp.agreement(0.20, 0.21, 0.1, interval) == expected
    assert mp.agreement(float("nan"), 0.5, 0.1, interval) == "no gap"
    assert mp.agreement(0.20, 0.21, 0.1) == "agree"  # without an interval: the point estimate


def test_a_chosen_layer_off_the_capture_grid_is_fitted_at_the_captured_layer_below_and_named():
    from mechdiff.rq2.fit_clt import captured_layers

    assert captured_layers([3, 5], [1, 3, 5]) == ([3, 5], {})
    assert captured_layers([4, 5], [1, 3, 5]) == ([3, 5], {4: 3})  # an exact entry between scanned layers
    assert captured_layers([4, 3], [1, 3, 5]) == ([3], {4: 3})  # no layer twice
    assert captured_layers([0], [1, 3]) == ([], {})  # nothing captured below: the stage's error names it
