"""The verdict rules on constructed evidence: a sharp low-rank change reads policy-like, a gradual one
without a low-rank handle reads rewiring-like, disagreement reads mixed, and a null pair needs every
delta to vanish."""

from __future__ import annotations

import pandas as pd
import pytest

from mechdiff.verdict import Thresholds, entry_profile, verdict

T = Thresholds()


def _patch(closed):
    layers = [1, 3, 5, 7]
    return pd.DataFrame({"direction": "base->tuned", "layer": layers, "gap": 0.4, "remaining": 0.0,
                         "fraction_closed": closed})


def _steer(k):
    test = {"effect": 0.9, "effect_lo": 0.8, "effect_hi": 1.0}
    return {"minimal_k": k, "best_layer": 5,
            "per_layer": {"5": {"ablate_tuned@layer": {"test": test}, "steer_base@layer": {"test": test}}}}


def _evidence(closed, k):
    return {"layer_patch": _patch(closed), "steer": _steer(k),
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
    assert "minimal k = 1" in text and "largest rise in both directions 1.00 at layer 5" in text and "agree" in text
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


def test_mapped_patch_disagreement_names_its_cause_from_the_linear_ceiling():
    def reason(ceiling):
        ev = _evidence([0.0, 0.0, 1.0, 1.0], 1)
        ev["clt"]["headline"].update(mapped_closed=0.52, real_closed=1.0, ceiling_closed=ceiling)
        return verdict("cultural", ev, T)["criteria"]["mapped_patch"]["text"]
    assert "disagree" in reason(0.6) and "not linear in the base state" in reason(0.6)
    assert "under-determined by its training prompts" in reason(0.95)
    ev = _evidence([0.0, 0.0, 1.0, 1.0], 1)  # agreeing, or no ceiling recorded: no cause is claimed
    assert "linear" not in verdict("cultural", ev, T)["criteria"]["mapped_patch"]["text"]
