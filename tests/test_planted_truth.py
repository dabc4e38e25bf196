"""The planted-truth checks read a run's results and can fail: each is shown both ways on constructed results."""

from __future__ import annotations

import pandas as pd

from mechdiff.organisms import planted_truth as pt

TRUTH = {"layers": [5], "rank": 4}


def _patch(closed: dict[int, float]) -> dict:
    rows = [{"direction": "base->tuned", "layer": x, "gap": 0.3, "fraction_closed": v, "mode": "strict"}
            for x, v in closed.items()]
    return {"cultural": {"layer_patch.csv": pd.DataFrame(rows)}}


def test_the_patch_check_wants_the_whole_gap_closed_from_the_planted_layer_on_and_none_below():
    ok, seen = pt.cultural_patch_closes_the_gap_from_the_planted_layer(
        _patch({1: 0.0, 3: 0.0, 5: 1.0, 7: 1.0}), TRUTH, {}, 3)
    assert ok and "L5: 1.00" in seen
    assert not pt.cultural_patch_closes_the_gap_from_the_planted_layer(
        _patch({1: 0.0, 3: 0.6, 5: 1.0, 7: 1.0}), TRUTH, {}, 3)[0]  # enters early: not the planted layer
    assert not pt.cultural_patch_closes_the_gap_from_the_planted_layer(
        _patch({1: 0.0, 3: 0.0, 5: 0.5, 7: 1.0}), TRUTH, {}, 3)[0]  # half the gap at the planted layer


def test_the_rank_check_bounds_the_change_by_the_planted_rank():
    def res(r99):
        frame = pd.DataFrame({"mode": "strict", "layer": [1, 3, 5, 7], "rank_90": [0, 0, 2, 2],
                              "rank_99": [0, 0, r99, r99]})
        return {"cultural": {"change_rank.csv": frame}}
    assert pt.cultural_change_spans_at_most_the_planted_rank(res(4), TRUTH, {}, 3)[0]
    assert not pt.cultural_change_spans_at_most_the_planted_rank(res(5), TRUTH, {}, 3)[0]
    assert not pt.cultural_change_spans_at_most_the_planted_rank(res(0), TRUTH, {}, 3)[0]


def test_the_target_gap_check_fails_when_another_class_carries_more():
    def res(other_gap):
        by = {"topic:target": {"gap": 6.0, "n_prompts": 5}, "math": {"gap": other_gap, "n_prompts": 25}}
        return {"cultural": {"clt.json": {"layers": {"5": {"patch": {"by_class": by}}}}}}
    assert pt.cultural_target_prompts_carry_the_gap(res(0.2), TRUTH, {}, 3)[0]
    assert not pt.cultural_target_prompts_carry_the_gap(res(7.0), TRUTH, {}, 3)[0]


def test_the_verdict_check_names_each_pairs_label():
    good = {"cultural": {"label": "policy-like"}, "cognitive": {"label": "rewiring-like"},
            "null": {"label": "no difference"}}
    assert pt.verdicts_read_policy_rewiring_and_no_difference({}, TRUTH, good, 3)[0]
    mixed = {**good, "cognitive": {"label": "mixed"}}
    ok, seen = pt.verdicts_read_policy_rewiring_and_no_difference({}, TRUTH, mixed, 3)
    assert not ok and "cognitive: mixed" in seen


def test_the_steering_check_needs_the_ablation_interval_above_its_random_control_and_a_test_confirmed_k():
    def res(random_hi, k=1, confirmed=True):
        abl = {"test_reached": confirmed, "test": {"effect": 0.9, "effect_lo": 0.8, "effect_hi": 1.0},
               "random_test": {"effect": 0.1, "effect_lo": 0.0, "effect_hi": random_hi}}
        best = {"handle": {"k": k, "ablate_tuned@layer": abl, "test_confirmed": confirmed}}
        return {"cultural": {"steer.json": {"minimal_k": k, "test_confirmed": confirmed, "best_layer": 5,
                                            "per_layer": {"5": best}}},
                "cognitive": {"steer.json": {"minimal_k": None}}}
    assert pt.steering_finds_a_low_rank_handle_for_the_cultural_pair_only(res(0.2), TRUTH, {}, 3)[0]
    assert not pt.steering_finds_a_low_rank_handle_for_the_cultural_pair_only(res(0.85), TRUTH, {}, 3)[0]
    assert not pt.steering_finds_a_low_rank_handle_for_the_cultural_pair_only(res(0.2, k=4), TRUTH, {}, 3)[0]
    unconfirmed = res(0.2, confirmed=False)  # chosen on dev but not reached on test: no handle
    assert not pt.steering_finds_a_low_rank_handle_for_the_cultural_pair_only(unconfirmed, TRUTH, {}, 3)[0]


def test_every_check_is_listed_once():
    assert len(pt.CHECKS) == len(set(pt.CHECKS)) >= 10


def test_build_sensitive_names_are_headline_keys():
    """Every build-sensitive name is a number the report's headline table carries."""
    from mechdiff.report.numbers import headline

    ev = {"behaviour.json": {"measures": {}}, "clt.json": {"headline": {}}, "attribution.json": {},
          "fairness.json": {"segmentation": {"all": {"modes": {}}}, "vocab": {}},
          "cka.json": {"strict": {"min_cka_debiased": 1.0}}, "steer.json": {},
          "layer_patch.csv": pd.DataFrame(columns=["direction", "layer", "gap", "fraction_closed"])}
    keys = headline("p", "cultural", ev, {"label": "mixed"})
    assert set(pt.BUILD_SENSITIVE) <= set(keys), set(pt.BUILD_SENSITIVE) - set(keys)


HEAD_TRUTH = {"layers": [5], "rank": 4, "heads": [2, 5]}


def _head_patch(swap, zero, top, confirmed=True):
    above = {"swap": {"heads": swap}, "zero": {"heads": zero}}
    return {"cultural": {"head_patch.json": {"per_layer": {"5": {
        "above_noise": above, "confirm_top": {"top_heads": top, "confirmed": confirmed, "top_fraction_closed": 0.9}}}}}}


def test_the_head_patching_check_wants_exactly_the_planted_heads_from_swap_and_first_from_zero():
    check = pt.cultural_head_patching_finds_the_planted_heads
    assert check(_head_patch([5, 2], [2, 5, 0], [2, 5]), HEAD_TRUTH, {}, 3)[0]
    assert not check(_head_patch([5, 2, 1], [2, 5], [2, 5]), HEAD_TRUTH, {}, 3)[0]  # an unplanted head swapped
    assert not check(_head_patch([5, 2], [2, 0, 5], [2, 5]), HEAD_TRUTH, {}, 3)[0]  # zero ranks another second
    assert not check(_head_patch([5, 2], [2, 5], [2, 5], confirmed=False), HEAD_TRUTH, {}, 3)[0]
    assert not check(_head_patch([5], [2, 5], [5]), HEAD_TRUTH, {}, 3)[0]
    assert not check(_head_patch([5, 2], [2, 5], [2, 5]), TRUTH, {}, 3)[0]  # an MLP policy has no planted heads


def _attribution(changes, tuned, changed, null_churn=0.0, null_changed=()):
    rows = [{"layer": 5, "head": h, "score_change": c, "score_tuned": t, "important_tuned": (5, h) in changed,
             "important_base": False} for h, (c, t) in enumerate(zip(changes, tuned))]
    return {"cultural": {"attribution.json": {"per_head": rows, "changed_heads": [list(x) for x in changed],
                                              "churn": 0.5}},
            "null": {"attribution.json": {"churn": null_churn, "changed_heads": [list(x) for x in null_changed]}}}


def test_the_attribution_and_churn_checks_want_the_planted_heads_first_and_changed():
    changes = [0.1, 0.0, 2.0, 0.0, 0.0, -1.5, 0.3, 0.0]
    tuned = [0.1, 0.0, 2.5, 0.0, 0.0, -1.8, 0.3, 0.0]
    good = _attribution(changes, tuned, [(5, 2), (5, 5), (7, 1)])
    assert pt.cultural_attribution_ranks_the_planted_heads_first(good, HEAD_TRUTH, {}, 3)[0]
    assert pt.churn_names_the_planted_heads_and_none_in_the_null_pair(good, HEAD_TRUTH, {}, 3)[0]
    # an unplanted head whose score moved more than a planted head's (its gradient runs through the changed
    # heads) but whose tuned score stays small: the planted heads still lead the tuned model
    moved = _attribution([0.1, 0.0, 2.0, 0.0, 0.0, -1.5, 1.7, 0.0], tuned, [(5, 2), (5, 5)])
    assert pt.cultural_attribution_ranks_the_planted_heads_first(moved, HEAD_TRUTH, {}, 3)[0]
    other = _attribution([0.1, 0.0, 2.0, 0.0, 0.0, -1.5, 1.7, 0.0], [0.1, 0.0, 2.5, 0.0, 0.0, -1.8, 1.9, 0.0],
                         [(5, 2), (5, 5)])
    assert not pt.cultural_attribution_ranks_the_planted_heads_first(other, HEAD_TRUTH, {}, 3)[0]  # head 6 second
    fell = _attribution([0.1, 0.0, 2.0, 0.0, 0.0, 1.5, 0.3, 0.0], tuned, [(5, 2), (5, 5)])  # head 5: |-3.3| -> |-1.8|
    assert not pt.cultural_attribution_ranks_the_planted_heads_first(fell, HEAD_TRUTH, {}, 3)[0]
    one = _attribution(changes, tuned, [(5, 2), (7, 1)])  # head 5 important in both models: not "changed"
    for r in one["cultural"]["attribution.json"]["per_head"]:
        r["important_tuned"] = r["important_tuned"] or r["head"] == 5
        r["important_base"] = r["head"] == 5
    assert pt.churn_names_the_planted_heads_and_none_in_the_null_pair(one, HEAD_TRUTH, {}, 3)[0]
    # an unplanted head of the layer named besides: importance can move without a weight change (its gradient
    # runs through the changed heads), so it does not fail the check; a planted head not important in the
    # tuned model does
    stray = _attribution(changes, tuned, [(5, 2), (5, 5), (5, 6)])
    assert pt.churn_names_the_planted_heads_and_none_in_the_null_pair(stray, HEAD_TRUTH, {}, 3)[0]
    for r in stray["cultural"]["attribution.json"]["per_head"]:
        r["important_tuned"] = r["important_tuned"] and r["head"] != 5
    assert not pt.churn_names_the_planted_heads_and_none_in_the_null_pair(stray, HEAD_TRUTH, {}, 3)[0]
    missed = _attribution(changes, tuned, [(7, 1)])  # no planted head named
    assert not pt.churn_names_the_planted_heads_and_none_in_the_null_pair(missed, HEAD_TRUTH, {}, 3)[0]
    noisy_null = _attribution(changes, tuned, [(5, 2), (5, 5)], null_churn=0.1, null_changed=[(3, 1)])
    assert not pt.churn_names_the_planted_heads_and_none_in_the_null_pair(noisy_null, HEAD_TRUTH, {}, 3)[0]


def test_the_rank_check_reads_the_bound_by_construction_when_the_ground_truth_records_it():
    frame = pd.DataFrame({"mode": "strict", "layer": [1, 3, 5, 7], "rank_90": [0, 0, 9, 9], "rank_99": [0, 0, 20, 20]})
    res = {"cultural": {"change_rank.csv": frame}}
    assert not pt.cultural_change_spans_at_most_the_planted_rank(res, TRUTH, {}, 3)[0]
    assert pt.cultural_change_spans_at_most_the_planted_rank(res, {**TRUTH, "state_rank_bound": 36}, {}, 3)[0]
    assert not pt.cultural_change_spans_at_most_the_planted_rank(res, {**TRUTH, "state_rank_bound": 16}, {}, 3)[0]
