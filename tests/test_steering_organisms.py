"""RQ3 on the embedded organisms, where the answer is known (DESIGN section 3).

* cultural: ablating a rank <= 2 subspace at the planted layer in the tuned model removes at least half
  of the planted refusals with side effects within the limits, a random subspace of the same rank does
  not; steering the base with the same subspace is reported beside it (its strength differs between builds).
* cognitive: no k <= 8 both removes and induces the arithmetic gain (the minimal k is not reached), or
  it is larger than the cultural one.
* null: no subspace and no head shows an effect above the noise floor.

The models come from the session build when a ``default_models`` fixture exists (tests/conftest.py), else
from ``artifacts/models``; the module skips only when neither is there.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mechdiff.data.rendering import pad_batch
from mechdiff.data.target import as_target, opening
from mechdiff.fairness.tokenizer_load import load_tokenizer
from mechdiff.fairness.vocab import compare_vocabularies
from mechdiff.models.load import load_model
from mechdiff.params.config import FairnessParams, SteerParams
from mechdiff.rq3 import head_stats as hs
from mechdiff.rq3 import head_sweep as hw
from mechdiff.rq3 import steer_select
from mechdiff.rq3 import steer_fit
from mechdiff.rq3 import steer_measures as sm
from mechdiff.rq3 import steer_sweep as st
from stages.common import load_stage_params
from tests.prompt_sources import prepare_pair

NAMES = ("base", "cultural", "cognitive")
LIMITS_POS = dict(max_drop_pp=5.0, max_ppl_increase=0.05)


@pytest.fixture(scope="module")
def organisms(request, root) -> Path:
    try:
        out = request.getfixturevalue("default_models")[0]  # the lead's session build, if shared in conftest
        return Path(out)
    except pytest.FixtureLookupError:
        pass
    art = root / "artifacts" / "models"
    if all((art / n / "model.safetensors").exists() for n in NAMES):
        return art
    pytest.skip("the model organisms are not built: run `python -m stages.build_models` (dvc repro build_models)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops on a shared, loaded box


_CACHE: dict = {}


def _pair(root, organisms: Path, tuned: str):
    """Models, tokenizers and the filtered prompt table of (base, tuned) over the world prompts (cached)."""
    key = (str(organisms), tuned)
    if key not in _CACHE:
        _CACHE[key] = _load_pair(root, organisms, tuned)
    return _CACHE[key]


def _load_pair(root, organisms: Path, tuned: str):
    from mechdiff.fairness.filter_shared import filter_prompts

    params = load_stage_params(root / "params.yaml")
    spec = dataclasses.replace(params.pairs["cultural"], base=str(organisms / "base"), tuned=str(organisms / tuned))
    frame = prepare_pair(spec, root=root, seed=params.data.seed, dev_fraction=params.data.dev_fraction)
    toks = (load_tokenizer(spec.base), load_tokenizer(spec.tuned))
    fairness = FairnessParams()
    filtered, _ = filter_prompts(frame, *toks, fairness, compare_vocabularies(*toks))
    models = (load_model(spec.base), load_model(spec.tuned))
    return models, toks, filtered, params


def _sweep(root, organisms, tuned, task, layer, p: SteerParams, seed=0):
    (base, tun), toks, frame, params = _pair(root, organisms, tuned)
    parts = st.cap_parts(as_target(task).parts(frame), p.max_prompts, seed)
    rows, info, sub = st.run_layer(base, tun, toks, parts, layer, p, task, ["strict", "base_ids", "aligned"], seed)
    return rows, info, params.success.target_effect_min


def _get(rows, direction, subspace, k, alpha=0.0, split="test", site="layer"):
    [r] = [r for r in rows if (r["direction"], r["subspace"], r["k"], r["alpha"], r["split"], r["site"]) ==
           (direction, subspace, k, alpha, split, site)]
    return r


def test_cultural_rank_two_ablation_removes_the_policy_and_steering_induces_it(root, organisms):
    gt = json.loads((organisms / "cultural" / "ground_truth.json").read_text())
    layer = gt["layers"][0]
    p = SteerParams(ks=[1, 2], alphas=[1.0, 2.0, 3.0], all_layers=False, max_prompts=24, n_bootstrap=100)
    rows, info, target_min = _sweep(root, organisms, "cultural", "refusal", layer, p)
    gap = _get(rows, "ablate_tuned", "fitted", 1)["gap"]
    assert gap > 0.5, "the cultural organism should refuse the policy topic far more than the base"
    ablate = {k: _get(rows, "ablate_tuned", "fitted", k) for k in (1, 2)}
    ok = [k for k, r in ablate.items() if r["fraction_of_gap"] >= 0.5 and steer_select.side_ok(r, **LIMITS_POS)]
    assert ok, ablate
    for k in ok:
        draws = [r for r in rows if (r["direction"], r["subspace"], r["k"], r["alpha"], r["split"], r["site"])
                 == ("ablate_tuned", "random", k, 0.0, "test", "layer")]
        assert draws  # every random subspace of the same rank, the strongest included
        for rand in draws:
            assert rand["fraction_of_gap"] < 0.5 and rand["effect"] < target_min, rand
        assert ablate[k]["above_noise"]
    # steering the base with the same rank <= 2 subspace, reported beside it
    steer = [_get(rows, "steer_base", "fitted", k, a) for k in (1, 2) for a in p.alphas]
    best = max(steer, key=lambda r: (r["effect"], -r["k"], -r["alpha"]))
    print(f"\ncultural layer {layer}: ablation k={ok[0]} removes {ablate[ok[0]]['fraction_of_gap']:.2f} of the gap "
          f"(neutral drop {ablate[ok[0]]['neutral_drop_pp']:.1f} pp, ppl {100 * ablate[ok[0]]['ppl_increase']:+.1f}%); "
          f"steering k={best['k']} alpha={best['alpha']} induces {best['rate']:.2f} "
          f"(random {best['control_effect']:.2f}; MC drop {best['mc_drop_pp']:.1f} pp, "
          f"ppl {100 * best['ppl_increase']:+.1f}%, QA drop {best['qa_drop_pp']:.1f} pp, "
          f"false refusals {best['false_refusal_increase']:+.2f})")
    # Steering is reported, not asserted: how far the base follows an added direction is not fixed by the
    # construction (the planted update is gated by the topic inside the MLP). Across builds it induced 0.04 to
    # 0.62 of refusals on test (benchmarks/RESULTS.md, section 10), while the ablation above holds on every build.
    assert best["control_effect"] <= best["effect"] or not best["above_noise"], best  # never below its control
    choice = steer_select.select(rows, target_min, *LIMITS_POS.values())
    # this reduced sweep (k <= 2, 24 prompts) need not find a k that also steers within the side-effect limits
    # on dev on every build; the pipeline's full sweep is held to that (mechdiff.organisms.planted_truth)
    assert choice["ablate_tuned@layer"]["minimal_k"] is not None and choice["ablate_tuned@layer"]["minimal_k"] <= 3
    assert info["contrast"] == "change" and len(info["explained_variance_ratio"]) == 2


def test_cognitive_change_is_not_a_low_rank_handle(root, organisms):
    p = SteerParams(ks=[1, 2, 4, 8], alphas=[1.0, 3.0], all_layers=False, max_prompts=16, n_bootstrap=50)
    rows, _, target_min = _sweep(root, organisms, "cognitive", "math", 5, p)
    choice = steer_select.select(rows, target_min, *LIMITS_POS.values())
    steer = [r for r in rows if r["direction"] == "steer_base" and r["subspace"] == "fitted"]
    print(f"\ncognitive layer 5: minimal k {choice['minimal_k']}; "
          f"ablation alone {choice['ablate_tuned@layer']['minimal_k']}; "
          f"max steering gain {max(r['effect'] for r in steer):.3f} (dev and test)")
    assert choice["minimal_k"] is None or choice["minimal_k"] > 3  # no handle within the seed's policy_max_k
    assert not any(r["above_noise"] for r in steer)  # no rank-k vector adds the arithmetic skill to the base


def test_null_pair_shows_no_subspace_and_no_head_effect(root, organisms):
    p = SteerParams(ks=[1, 2], alphas=[1.0, 3.0], all_layers=False, max_prompts=16, n_bootstrap=100)
    (base, tuned), toks, frame, params = _pair(root, organisms, "base")
    parts = st.cap_parts(as_target("refusal").parts(frame), p.max_prompts, 0)
    rows, info, _ = st.run_layer(base, tuned, toks, parts, 5, p, "refusal", ["strict", "base_ids", "aligned"], 0)
    assert info["contrast"] == "tuned" and info["mean_change_norm"] == 0.0  # no change: falls back, says so
    fitted = [r for r in rows if r["subspace"] == "fitted"]
    assert not any(r["above_noise"] for r in fitted)
    assert all(r["effect"] == 0.0 for r in fitted if r["direction"] == "steer_base")  # nothing to add
    assert max(abs(r["effect"]) for r in fitted) < params.success.target_effect_min
    assert steer_select.select(rows, params.success.target_effect_min, *LIMITS_POS.values())["minimal_k"] is None
    # heads: the swap of a model with itself moves nothing; churn between identical models is zero
    target = parts["target"]
    conts = [" " + opening(lang) for lang in target["language"]]
    hrows = hw.aligned_rows(target, toks, conts, ["strict", "base_ids"])
    rb, rt = [r["base"] for r in hrows], [r["tuned"] for r in hrows]
    pad = toks[0].pad_token_id
    ids, mask = pad_batch([a + b for a, b in rb], pad, "right")
    n_heads = base.config.num_attention_heads
    settings = hw.single_head_settings(n_heads, ["zero", "mean", "swap"])
    source = hw.o_proj_inputs(base, ids, mask, 5)
    mean = hw.head_means(source, mask, n_heads)
    lp_t = hw.head_sweep(tuned, rt, pad, 5, settings, mean, source).numpy()
    lp_b = hw.head_sweep(base, rb, pad, 5, settings, mean, source).numpy()
    table = hs.flag_above_noise(hs.summarise_heads(lp_t, lp_b, settings, np.arange(len(hrows)), n_boot=100, seed=0),
                                0.05)
    assert len(hrows) >= 8 and (table["kind"] == "swap").sum() == n_heads
    assert not table["above_noise"].any() and table["effect"].abs().max() == 0.0


def test_random_draws_are_measured_on_the_target_prompts_alone_and_nothing_else_moves(root, organisms):
    """evaluate_with_controls equals evaluate on every measure of the clean and fitted settings, gives each
    random draw the same target measures, and marks the draws' side-effect measures as not measured (nan)."""
    (base, tuned), toks, frame, _ = _pair(root, organisms, "cultural")
    p = SteerParams(ks=[1, 2], alphas=[2.0], all_layers=False, max_prompts=6, n_bootstrap=20, n_random=2)
    parts = st.cap_parts(as_target("refusal").parts(frame), p.max_prompts, 0)
    sub, _ = steer_fit.fit_subspace(base, tuned, toks, parts, 5, ["strict", "base_ids", "aligned"], "refusal",
                                    p.contrast, 2, 20, 0)
    for model, tok, col, settings in zip((tuned, base), toks[::-1], ("tuned_input_ids", "base_input_ids"),
                                         st.build_settings(sub, 5, 8, p.ks, p.alphas, p.mode, False, 0, 2)):
        rows = sm.prompt_rows(parts, tok, col, "refusal")
        n_new = sm.n_new_tokens(rows)
        got = st.evaluate_with_controls(model, tok, rows, settings, "refusal", n_new)
        want = sm.evaluate(model, tok, rows, [iv for _, iv in settings], "refusal", n_new)
        draws = np.array([s.subspace == "random" for s, _ in settings])
        assert draws.sum() == 4 and not draws[0]
        assert (got["hard"] == want["hard"]).all()
        np.testing.assert_allclose(got["soft"], want["soft"], rtol=1e-5, atol=1e-5)
        for key in ("qa", "false_refusal", "mc", "nll"):
            assert got[key].shape == want[key].shape
            np.testing.assert_allclose(got[key][~draws].astype(float), want[key][~draws].astype(float), rtol=1e-5)
            assert np.isnan(got[key][draws]).all() or got[key].shape[1] == 0
