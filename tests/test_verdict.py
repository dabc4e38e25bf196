"""The verdict rules on constructed evidence: a sharp low-rank change reads policy-like, a gradual one
without a low-rank handle reads rewiring-like, disagreement reads mixed, and a null pair needs every
delta to vanish."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mechdiff.rq1.layer_entry import entry_profile
from mechdiff.verdict import Thresholds, criteria, headline_measure, significant, verdict

T = Thresholds()


def _patch(closed, lo=None, hi=None):
    """A base->tuned layer-patch summary at layers 1, 3, 5, 7; the fractions' intervals default to the
    point (as from many prompts that agree)."""
    layers = [1, 3, 5, 7]
    return pd.DataFrame({"direction": "base->tuned", "layer": layers, "gap": 0.4, "remaining": 0.0,
                         "fraction_closed": closed, "fraction_closed_lo": closed if lo is None else lo,
                         "fraction_closed_hi": closed if hi is None else hi})


def _steer(k, confirmed=True):
    """steer.json with the dev minimal k (None: no k) held to test: ``confirmed`` says whether the test split
    reaches the target with the dev-chosen setting in both directions."""
    test = {"effect": 0.9, "effect_lo": 0.8, "effect_hi": 1.0}
    miss = {"effect": 0.04, "effect_lo": -0.05, "effect_hi": 0.12}
    handle = None if k is None else {
        "k": k, "ablate_tuned@layer": {"alpha": 0.0, "test": test, "test_reached": True},
        "steer_base@layer": {"alpha": 1.0, "test": test if confirmed else miss, "test_reached": confirmed},
        "test_confirmed": confirmed}
    return {"task": "refusal", "minimal_k": k, "best_layer": 5, "target_effect_min": 0.1,
            "test_confirmed": None if k is None else confirmed, "confirmed_minimal_k": k if k and confirmed else None,
            "per_layer": {"5": {"ablate_tuned@layer": {"minimal_k": k, "test": test},
                                "steer_base@layer": {"test": test}, "handle": handle}}}


def _measure(base, tuned, lo, hi):
    return {"base": base, "tuned": tuned, "delta": tuned - base, "delta_lo": lo, "delta_hi": hi, "n": 48}


def _evidence(closed, k):
    return {"layer_patch": _patch(closed), "steer": _steer(k),
            "behaviour": {"measures": {"refusal_rate": _measure(0.0, 0.9, 0.8, 1.0)}},
            "clt": {"headline": {"layer": 5, "r2_uniform": 0.97, "identity_r2_uniform": 0.9, "mapped_closed": 0.9,
                                 "real_closed": 1.0}},
            "churn": {"churn": 0.2, "churn_ci": [0.0, 0.5], "noise_floor": {"churn_q95": 0.5}, "spearman": 0.8,
                      "jaccard": 0.7, "jaccard_chance": 0.4, "top_k": 4, "z": 2.0, "z_attainable": False,
                      "n_important_union": 1, "n_heads": 16},
            "cka": {"strict": {"min_cka_debiased": 0.98, "layer_of_min": 5}}}


def test_entry_profile_needs_the_rise_in_both_directions():
    """A change made at one layer closes the whole gap from there on in both directions; a distributed change
    that front-loads one direction (the base->tuned patch closing 0.55 at the first scanned layer) does not
    read as a sharp entry when the other direction rises slowly."""
    both = pd.concat([_patch([0.0, 0.0, 1.0, 1.0]), _patch([0.0, 0.0, 1.0, 1.0]).assign(direction="tuned->base")])
    prof = entry_profile(both)
    assert prof["entry_layer"] == 5 and prof["max_rise"] == 1.0 and prof["closed_reverse"] == [0.0, 0.0, 1.0, 1.0]
    front = pd.concat([_patch([0.55, 0.7, 0.8, 0.9]), _patch([-0.03, 0.1, 0.25, 0.35]).assign(direction="tuned->base")])
    prof = entry_profile(front)
    assert prof["max_rise"] == pytest.approx(0.13) and prof["entry_layer"] == 3
    assert entry_profile(_patch([0.55, 0.7, 0.8, 0.9]))["max_rise"] == pytest.approx(0.55)  # one direction alone


def test_entry_profile_finds_the_largest_rise():
    prof = entry_profile(_patch([0.0, 0.0, 1.0, 1.0]))
    assert prof["entry_layer"] == 5 and prof["max_rise"] == 1.0
    prof = entry_profile(_patch([0.2, 0.49, 0.7, 0.81]))
    assert prof["entry_layer"] == 3 and prof["max_rise"] == pytest.approx(0.29)
    none = entry_profile(_patch([float("nan")] * 4))  # no gap: no entry layer
    assert none["entry_layer"] is None and none["max_rise"] != none["max_rise"]


def test_sharp_low_rank_change_reads_policy_like_and_cites_its_numbers():
    v = verdict("cultural", _evidence([0.0, 0.0, 1.0, 1.0], 1), T)
    assert v["label"] == "policy-like"
    text = " ".join(v["reasons"])
    assert "minimal k = 1" in text and "largest rise in both directions 1.00 [1.00, 1.00] at layer 5" in text and "agree" in text
    assert "unattainable" in text  # churn's z caveat is stated, not hidden
    ev = _evidence([0.0, 0.0, 1.0, 1.0], 1)
    ev["churn"]["head_patch_agreement"] = {"tuned": {"spearman": 0.8, "jaccard": 0.5, "top_k": 2, "layers": [5]}}
    assert "real zero ablation of the same heads (tuned, layers [5]): Spearman 0.80" in " ".join(
        verdict("cultural", ev, T)["reasons"])


def test_gradual_change_without_a_handle_reads_rewiring_like():
    v = verdict("cognitive", _evidence([0.2, 0.49, 0.7, 0.81], None), T)
    assert v["label"] == "rewiring-like"
    assert "no swept k" in " ".join(v["reasons"])


def test_disagreeing_criteria_read_mixed_and_a_missing_input_inconclusive():
    assert verdict("cultural", _evidence([0.2, 0.49, 0.7, 0.81], 1), T)["label"] == "mixed"
    assert verdict("cultural", _evidence([0.0, 0.0, 1.0, 1.0], 4), T)["label"] == "mixed"  # k above policy_max_k
    ev = _evidence([0.0, 0.0, 1.0, 1.0], 1)
    ev["steer"] = None
    assert verdict("cultural", ev, T)["label"] == "inconclusive"


def test_a_dev_minimal_k_that_fails_on_test_is_no_evidence_and_the_reasons_cite_the_test_split():
    """The minimal k is chosen on dev; only a k whose dev-chosen setting reaches the target on the test split
    in both directions counts for a low-rank policy. One that does not reads inconclusive (not policy-like,
    and not rewiring either: a k was found), and the reason names the test numbers it rests on."""
    sharp = [0.0, 0.0, 1.0, 1.0]
    ok = verdict("cultural", _evidence(sharp, 1), T)
    assert ok["label"] == "policy-like"
    assert "confirmed on test" in ok["criteria"]["low_rank_handle"]["text"]
    assert "ablation removes 0.90 [0.80, 1.00]" in ok["criteria"]["low_rank_handle"]["text"]
    ev = _evidence(sharp, 1)
    ev["steer"] = _steer(1, confirmed=False)
    v = verdict("cultural", ev, T)
    handle = v["criteria"]["low_rank_handle"]
    assert v["label"] != "policy-like" and handle["reads"] is None and v["label"] == "inconclusive"
    assert "NOT confirmed on test" in handle["text"]
    assert "steering (alpha 1) induces 0.04 [-0.05, 0.12]" in handle["text"]  # the test numbers it rests on
    ev["steer"].pop("test_confirmed")  # a steer.json without the test check confirms nothing
    assert verdict("cultural", ev, T)["criteria"]["low_rank_handle"]["reads"] is None
    ev["steer"] = _steer(4, confirmed=False)  # above the threshold on dev already: no low-rank handle either way
    assert verdict("cultural", ev, T)["criteria"]["low_rank_handle"]["reads"] == "rewiring"


@pytest.mark.parametrize("measure", [_measure(0.0, 0.0, 0.0, 0.0),  # the tuned model never shows it
                                     _measure(0.1, 0.15, -0.02, 0.12),  # a gap whose interval holds 0
                                     _measure(0.9, 0.1, -0.9, -0.7)])  # less of it in the tuned model
def test_without_a_behaviour_gap_the_steering_criterion_is_inconclusive(measure):
    """No swept k removes and induces a behaviour the tuned model does not show more than the base: that
    is no evidence of rewiring, so a sharp one-layer edit reads inconclusive, not mixed."""
    for k in (None, 1):
        ev = _evidence([0.0, 0.0, 1.0, 1.0], k)
        ev["behaviour"]["measures"]["refusal_rate"] = measure
        v = verdict("cultural", ev, T)
        assert v["criteria"]["low_rank_handle"]["reads"] is None and v["label"] == "inconclusive", v["reasons"]
        assert "no behavioural gap to explain" in v["criteria"]["low_rank_handle"]["text"]
    ev = _evidence([0.0, 0.0, 1.0, 1.0], None)  # with the gap, the same sweep is evidence again
    assert verdict("cultural", ev, T)["criteria"]["low_rank_handle"]["reads"] == "rewiring"
    del ev["behaviour"]  # the gap not measured: the criterion reads the sweep as before
    assert verdict("cultural", ev, T)["criteria"]["low_rank_handle"]["reads"] == "rewiring"


def test_the_headline_measure_is_the_largest_significant_change():
    zero = _measure(0.0, 0.0, 0.0, 0.0)
    flat = _measure(0.2, 0.25, -0.05, 0.15)
    ppl = {"base": 20.0, "tuned": 26.9, "delta": 6.9, "delta_lo": 0.4, "delta_hi": 11.8}
    # only perplexity moved: it is the headline, not the unmoved target measure
    assert headline_measure({"refusal_rate": zero, "math_acc": flat, "ppl_char": ppl}, "refusal_rate") == "ppl_char"
    # the target measure comes first whenever its interval excludes 0, however large the others
    big = {"delta": -2.23, "delta_lo": -2.56, "delta_hi": -1.89}
    moved = {"refusal_rate": _measure(0.0, 0.5, 0.3, 0.7), "refusal_soft": big, "ppl_char": ppl}
    assert headline_measure(moved, "refusal_rate") == "refusal_rate"
    # otherwise the largest |delta| in units of its own interval half-width: -2.23 / 0.335 beats 6.9 / 5.7
    assert headline_measure({**moved, "refusal_rate": zero}, "refusal_rate") == "refusal_soft"
    # per-token perplexity stands aside when the per-character one is measured (tokenizers may differ)
    tok = {"delta": 0.5, "delta_lo": 0.49, "delta_hi": 0.51}
    both = {"refusal_rate": zero, "ppl_char": flat, "ppl_token": tok}
    assert headline_measure(both, "refusal_rate") == "refusal_rate"
    assert headline_measure({"refusal_rate": zero, "ppl_token": tok}, "refusal_rate") == "ppl_token"
    # nothing moved: the target measure, read as no measurable change
    assert headline_measure({"refusal_rate": zero, "math_acc": flat}, "refusal_rate") == "refusal_rate"
    assert significant(ppl) and significant(big) and not significant(flat) and not significant(zero)


def test_threshold_moves_the_verdict():
    ev = _evidence([0.0, 0.3, 0.7, 1.0], 2)
    assert verdict("cultural", ev, Thresholds(sharp_entry_min=0.5))["label"] == "mixed"
    assert verdict("cultural", ev, Thresholds(sharp_entry_min=0.35))["label"] == "policy-like"


def test_null_pair_needs_every_delta_to_vanish():
    ev = {"behaviour": {"measures": {"refusal_rate": {"delta": 0.0}, "math_acc": {"delta": 0.0}}},
          "cka": {"strict": {"min_cka_debiased": 1.0}},
          "layer_patch": _patch([0.0, 0.0, 0.0, 0.0]).assign(gap=0.0)}
    assert verdict("null", ev, T)["label"] == "no difference"
    ev["behaviour"]["measures"]["math_acc"]["delta"] = 0.01
    v = verdict("null", ev, T)
    assert v["label"] == "difference in a null pair" and "0.01" in v["reasons"][0]


def test_churn_comparison_states_the_result_or_why_it_cannot_be_read():
    from mechdiff.verdict import churn_comparison

    good = {"churn": 0.1, "churn_ci": [0.0, 0.2], "z_attainable": True, "n_important_union": 10, "churn_above_floor": True}
    high = {**good, "churn": 0.7, "churn_ci": [0.5, 0.9]}
    c = churn_comparison(good, high)
    assert c["expected"] and c["separated"] and "intervals separated" in c["text"]
    tiny = {"churn": 1.0, "churn_ci": [0.0, 1.0], "z_attainable": False, "z": 2.0, "n_heads": 16,
            "n_important_union": 1, "churn_above_floor": False}
    c = churn_comparison(tiny, {**tiny, "churn": 0.0, "churn_ci": [0.0, 0.0], "n_important_union": 0})
    assert not c["expected"] and "NOT ordered" in c["text"]
    assert "unattainable with this few heads per layer (16 heads" in c["text"] and "only 1 important heads" in c["text"]


def test_mapped_patch_disagreement_reads_the_linear_ceiling_only_when_determined_and_with_its_caveats():
    def reason(ceiling, rows=5000, dims=4096):
        ev = _evidence([0.0, 0.0, 1.0, 1.0], 1)
        ev["clt"]["headline"].update(mapped_closed=0.52, real_closed=1.0, ceiling_closed=ceiling,
                                     ceiling_rows=rows, ceiling_dims=dims)
        return verdict("cultural", ev, T)["criteria"]["mapped_patch"]["text"]
    short = reason(0.6)
    assert "disagree" in short and "may not be linear in the base state" in short
    assert all(c in short for c in ("in-sample", "ridge penalty", "squared error", "KL"))
    assert "limited by its training prompts" in reason(0.95)
    for ceiling in (0.0, 0.6, 0.95):  # under-determined (the 8B-shaped case) or unrecorded: no linearity claim
        for rows, dims in ((3217, 4096), (None, None)):
            text = reason(ceiling, rows, dims)
            assert "not linear" not in text and "no reading of linearity" in text
    ev = _evidence([0.0, 0.0, 1.0, 1.0], 1)  # agreeing: no cause is claimed
    assert "linear" not in verdict("cultural", ev, T)["criteria"]["mapped_patch"]["text"]


def _both_ways(closed, lo, hi):
    p = _patch(closed, lo, hi)
    return pd.concat([p, p.assign(direction="tuned->base")], ignore_index=True)


def test_a_sharp_entry_is_decided_by_the_interval_of_the_rise_not_its_point():
    """The same point fractions (0 then 0.7 at layer 3): sharp when the entry's lower bound clears the
    threshold, inconclusive when its interval straddles it, rewiring-like when every upper bound is below it;
    the reason names the numbers with their intervals."""
    closed = [0.0, 0.7, 0.8, 0.9]
    sharp = criteria({"layer_patch": _both_ways(closed, [0.0, 0.6, 0.7, 0.8], [0.0, 0.8, 0.9, 1.0])}, T)["sharp_entry"]
    assert sharp["reads"] == "policy"
    assert "0.70 [0.60, 0.80] at layer 3" in sharp["text"] and "L3: 0.70 [0.60, 0.80]" in sharp["text"]
    wide = criteria({"layer_patch": _both_ways(closed, [0.0, 0.3, 0.5, 0.6], [0.0, 0.9, 0.95, 1.0])}, T)["sharp_entry"]
    assert wide["reads"] is None and "straddles 0.5" in wide["text"] and "L3: [0.30, 0.90]" in wide["text"]
    # the layer below the entry is uncertain too: its upper bound counts against the rise's lower bound
    below = criteria({"layer_patch": _both_ways(closed, [-0.1, 0.6, 0.7, 0.8], [0.2, 0.8, 0.9, 1.0])}, T)["sharp_entry"]
    assert below["reads"] is None
    slow = [0.1, 0.3, 0.5, 0.7]
    gradual = criteria({"layer_patch": _both_ways(slow, [x - 0.1 for x in slow], [x + 0.1 for x in slow])}, T)
    assert gradual["sharp_entry"]["reads"] == "rewiring" and "upper bound < 0.5" in gradual["sharp_entry"]["text"]
    ev = _evidence(closed, 1)
    ev["layer_patch"] = _both_ways(closed, [0.0, 0.3, 0.5, 0.6], [0.0, 0.9, 0.95, 1.0])
    assert verdict("cultural", ev, T)["label"] == "inconclusive"


def test_without_recorded_intervals_the_sharp_entry_is_not_decided():
    table = _patch([0.0, 0.0, 1.0, 1.0]).drop(columns=["fraction_closed_lo", "fraction_closed_hi"])
    crit = criteria({"layer_patch": table}, T)["sharp_entry"]
    assert crit["reads"] is None and "no prompt-bootstrap interval" in crit["text"]


def test_the_sharp_entry_from_per_prompt_patches_follows_the_number_of_prompts():
    """Known answer end to end: the change enters at layer 3 where prompts close 0.55 of the gap on average
    (+-0.45 from prompt to prompt). Few prompts leave the interval across 0.5 (inconclusive); many clear it."""
    from mechdiff.rq1.layer_patch import summarise
    from tests.test_layer_patch import _rows

    closed = {1: 0.0, 3: 0.55, 5: 1.0}
    few = criteria({"layer_patch": summarise(_rows(12, 1, closed, noise=0.45), n_boot=500)}, T)["sharp_entry"]
    many = criteria({"layer_patch": summarise(_rows(4000, 1, closed, noise=0.45), n_boot=500)}, T)["sharp_entry"]
    assert few["reads"] is None and many["reads"] == "policy"


def test_churn_comparison_reads_the_difference_interval_from_the_two_bootstraps():
    from mechdiff.verdict import churn_comparison

    rng = np.random.default_rng(0)
    base = {"z_attainable": True, "n_important_union": 10, "churn_above_floor": True}
    low = {**base, "churn": 0.2, "churn_ci": [0.1, 0.3], "churn_bootstrap": list(rng.uniform(0.1, 0.3, 200))}
    high = {**base, "churn": 0.6, "churn_ci": [0.5, 0.7], "churn_bootstrap": list(rng.uniform(0.5, 0.7, 200))}
    c = churn_comparison(low, high)
    lo, hi = c["difference_ci"]
    assert c["separated"] and c["difference"] == pytest.approx(0.4) and 0.2 < lo < 0.4 < hi < 0.6
    assert "excludes 0" in c["text"]
    # overlapping draws: ordered as expected, but the difference's interval holds 0
    near = {**base, "churn": 0.25, "churn_ci": [0.1, 0.4], "churn_bootstrap": list(rng.uniform(0.1, 0.4, 200))}
    c = churn_comparison(low, near)
    assert c["expected"] and not c["separated"] and c["difference_ci"][0] < 0 < c["difference_ci"][1]
    assert "includes 0" in c["text"]
    c = churn_comparison(high, low)  # reversed
    assert not c["expected"] and c["difference_ci"][1] < 0 and "NOT ordered" in c["text"]
