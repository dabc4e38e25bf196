"""The embedded organisms' known answers, checked against a pipeline run's results.

The organisms are built with a ground truth (``ground_truth.json`` of the cultural organism: the planted
layers and rank), so a run of the default pipeline has answers it must recover on any build, whatever
the seed, the thread count or the machine. Every check here follows from how the organisms are built,
never from numbers read off one run:

* ``null``: the null pair is the base model against itself, so every measure reads exactly no change.
* ``cultural``: the planted update sits at layer ``L`` with rank ``r``; the weights below ``L`` are
  bit-identical and the update is switched on by one topic class. So the shared-token states below
  ``L`` are identical (CKA 1, no change directions), patching at or after ``L`` closes the whole gap
  and below it nothing, the state change at ``L`` spans at most ``r`` directions, and the topic class
  carries the largest next-token gap.
* ``cognitive``: every weight of every layer is fine-tuned, so the change spans many directions at
  every scanned layer.
* ``behaviour``: the gaps the organisms are built to have (:func:`mechdiff.organisms.build_models.acceptance`'s
  targets), with intervals that exclude zero.
* ``verdict``: policy-like, rewiring-like and no difference.

Inputs are already parsed (this module reads no files): ``results[pair][file]`` as the report stage
loads them (``behaviour.json``, ``cka.csv``, ``layer_patch.csv`` (primary mode), ``layers.json``,
``change_rank.csv``, ``clt.json``, ``steer.json``), ``truth`` (the cultural ``ground_truth.json``) and
``verdicts`` (``verdict.json``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pandas as pd

from mechdiff.rq1.layer_entry import entry_profile

__all__ = ["BUILD_SENSITIVE", "CHECKS", "check_planted_truth"]

#: the organisms' behaviour targets (organisms.acceptance): refusal on the policy topic, none elsewhere
REFUSAL_TUNED_MIN, REFUSAL_BASE_MAX, FALSE_REFUSAL_MAX = 0.8, 0.1, 0.1
MATH_DELTA_MIN = 0.3  # the cognitive organism gains >= 30 points of arithmetic accuracy
PPL_RATIO_MAX = 1.1  # neither fine-tune damages general text by more than 10% perplexity
#: identical states give debiased CKA 1 and a patch that closes 0 or 1 of the gap; margins for float32
IDENTICAL_CKA_MIN, CLOSED_ALL_MIN, CLOSED_NONE_MAX = 0.99, 0.9, 0.1
NULL_CKA_MIN, NULL_KL_MAX = 0.999, 1e-6  # the report's null thresholds (params `report`)


#: headline numbers (report/headline.json keys) that move across builds of the organisms (organisms seed,
#: thread count, machine) while every check here holds, and why; measured with benchmarks/bench_builds.py
#: (benchmarks/RESULTS.md, sections 10 and 17). Quote them with the build they came from.
BUILD_SENSITIVE = {
    "mapped_patch_closed": "the cultural mapped patch tracks the in-sample linear ceiling, which depends on how "
                           "sharply the planted policy switches on in that build",
    "linear_ceiling_closed": "as the mapped patch",
    "real_patch_closed": "on the cognitive pair, the real patch at the chosen layer depends on where that build's "
                         "distributed change accumulates",
    "entry_max_rise": "on the cognitive pair, a distributed change accumulates differently per build (it stays far "
                      "below the sharp-entry threshold in both directions)",
    "entry_layer": "on the cognitive pair, where the largest of its small rises falls",
    "min_cka_debiased": "on the cognitive pair, how far a full fine-tune moves the states",
    "minimal_k": "on the cultural pair, the smallest k whose steering reaches the target at its alpha (within the "
                 "policy threshold on every recorded build)",
    "churn": "a ratio of few important heads (6-11 of the 64 heads of 8 scanned layers on the seed-0 build) that "
             "sits within its split-half noise floor on both pairs",
    "spearman": "as churn", "jaccard": "as churn",
    "behaviour_delta": "the cultural refusal rate of a rank-8 two-head policy trained for a fixed budget",
    "strict_prompt_retention": "the Kazakh tokens appended to the cultural tokenizer are learned per build",
}


def _primary(ev: Mapping, name: str) -> pd.DataFrame:
    """Rows of a per-mode table (``cka.csv``, ``change_rank.csv``) in the mode that chose the layers, as the
    report reads them (``layer_patch.csv`` arrives already cut to that mode)."""
    frame, mode = ev[name], ev.get("layers.json", {}).get("mode", "strict")
    return frame[frame["mode"] == mode] if "mode" in frame.columns else frame


def _planted_map_layer(clt: Mapping, truth: Mapping) -> str | None:
    """The first planted layer that fit_clt mapped (a chosen layer), or None when none was chosen."""
    return next((str(x) for x in truth["layers"] if str(x) in clt["layers"]), None)


def null_reads_no_change(results, truth, verdicts, policy_max_k):
    ev = results["null"]
    cka = ev["cka.csv"]["cka_debiased"]
    gap = ev["layer_patch.csv"]["gap"]
    deltas = [m["delta"] for m in ev["behaviour.json"]["measures"].values() if m["delta"] is not None]
    ranks = ev["change_rank.csv"]["rank_90"]
    ok = bool((cka >= NULL_CKA_MIN).all() and (gap <= NULL_KL_MAX).all() and deltas
              and all(d == 0.0 for d in deltas) and (ranks == 0).all())
    return ok, f"min CKA {cka.min():.6f}, max gap {gap.max():.3g} nats, deltas {sorted(set(deltas))}"


def cultural_identical_below_the_planted_layer(results, truth, verdicts, policy_max_k):
    first = min(truth["layers"])
    cka = _primary(results["cultural"], "cka.csv").set_index("layer")["cka_debiased"]
    rank = _primary(results["cultural"], "change_rank.csv").set_index("layer")["rank_90"]
    below = [layer for layer in cka.index if layer < first]
    ok = bool(below) and all(cka[x] >= IDENTICAL_CKA_MIN and rank[x] == 0 for x in below)
    return ok, f"planted layer {first}; below it CKA {[round(float(cka[x]), 4) for x in below]}, " \
               f"change directions {[int(rank[x]) for x in below]}"


def cultural_patch_closes_the_gap_from_the_planted_layer(results, truth, verdicts, policy_max_k):
    first = min(truth["layers"])
    prof = entry_profile(results["cultural"]["layer_patch.csv"])
    fwd = dict(zip(prof["layers"], prof["closed"]))  # base->tuned
    ok = all(v <= CLOSED_NONE_MAX for x, v in fwd.items() if x < first) and \
        all(v >= CLOSED_ALL_MIN for x, v in fwd.items() if x >= first)
    return bool(ok), f"planted layer {first}; fraction closed " + ", ".join(f"L{x}: {v:.2f}" for x, v in fwd.items())


def cultural_chosen_layers_include_the_planted_one(results, truth, verdicts, policy_max_k):
    chosen = results["cultural"]["layers.json"]["layers"]
    return bool(set(chosen) & set(truth["layers"])), f"chosen {chosen}, planted {truth['layers']}"


def cultural_change_spans_at_most_the_planted_rank(results, truth, verdicts, policy_max_k):
    """At most the directions the planted edit can write at its layer (``state_rank_bound`` of the ground truth:
    the LoRA rank for an edit of a map writing the residual, plus the planted heads' o_proj columns when their
    queries move; older builds: the rank)."""
    layer, rank = min(truth["layers"]), truth["rank"]
    bound = truth.get("state_rank_bound", rank)
    at = _primary(results["cultural"], "change_rank.csv").set_index("layer").loc[layer]
    return bool(1 <= at["rank_99"] <= bound), f"layer {layer}: {int(at['rank_99'])} directions hold 99% " \
                                              f"of the change (bound by construction {bound}; planted rank {rank})"


def cognitive_change_spans_many_directions(results, truth, verdicts, policy_max_k):
    ranks = _primary(results["cognitive"], "change_rank.csv")["rank_90"]
    return bool((ranks > 2 * truth["rank"]).all()), f"directions holding 90% per layer {ranks.tolist()}"


def cultural_target_prompts_carry_the_gap(results, truth, verdicts, policy_max_k):
    clt = results["cultural"]["clt.json"]
    layer = _planted_map_layer(clt, truth)
    if layer is None:
        return False, f"no planted layer {truth['layers']} among the mapped layers {sorted(clt['layers'])}"
    by = dict(clt["layers"][layer]["patch"]["by_class"])
    target = by.pop("topic:target")
    ok = target["n_prompts"] >= 3 and all(target["gap"] > c["gap"] for c in by.values())
    return bool(ok), f"target gap {target['gap']:.3f} nats over {target['n_prompts']} prompts; others " + \
        ", ".join(f"{k} {c['gap']:.3f}" for k, c in by.items())


def map_beats_identity_where_the_change_is(results, truth, verdicts, policy_max_k):
    clt = results["cultural"]["clt.json"]
    layer = _planted_map_layer(clt, truth)
    if layer is None:
        return False, f"no planted layer {truth['layers']} among the mapped layers {sorted(clt['layers'])}"
    gain = clt["layers"][layer]["gain_over_identity"]["r2_uniform"]
    null = results["null"]["clt.json"]["headline"]
    ok = gain > 0 and null["r2_uniform"] >= NULL_CKA_MIN and null["mapped_closed"] is None
    return bool(ok), f"cultural layer {layer} R2 gain over identity {gain:.3f}; null R2 {null['r2_uniform']:.4f}"


def behaviour_gaps_hold(results, truth, verdicts, policy_max_k):
    cult = results["cultural"]["behaviour.json"]["measures"]
    cog = results["cognitive"]["behaviour.json"]["measures"]
    ref, fr, acc = cult["refusal_rate"], cult["false_refusal"], cog["math_acc"]
    ppl = {p: results[p]["behaviour.json"]["measures"]["ppl_char"] for p in ("cultural", "cognitive")}
    ok = (ref["base"] <= REFUSAL_BASE_MAX and ref["tuned"] >= REFUSAL_TUNED_MIN and ref["delta_lo"] > 0
          and fr["tuned"] <= FALSE_REFUSAL_MAX and acc["delta"] >= MATH_DELTA_MIN and acc["delta_lo"] > 0
          and cog["math_logprob"]["delta_lo"] > 0
          and all(v["tuned"] <= PPL_RATIO_MAX * v["base"] for v in ppl.values()))
    return bool(ok), (f"refusal {ref['base']:.2f} -> {ref['tuned']:.2f} [delta lo {ref['delta_lo']:.2f}], false "
                      f"refusal {fr['tuned']:.2f}; arithmetic +{acc['delta']:.2f} [lo {acc['delta_lo']:.2f}]; "
                      + ", ".join(f"{p} ppl/char x{v['tuned'] / v['base']:.3f}" for p, v in ppl.items()))


def steering_finds_a_low_rank_handle_for_the_cultural_pair_only(results, truth, verdicts, policy_max_k):
    cult, cog = results["cultural"]["steer.json"], results["cognitive"]["steer.json"]
    k = cult["minimal_k"]
    if k is None:
        return False, "no minimal k on the cultural pair"
    handle = cult["per_layer"][str(cult["best_layer"])].get("handle") or {}
    abl = handle.get("ablate_tuned@layer") or {}
    test, rnd = abl.get("test"), abl.get("random_test")
    if not (test and rnd):
        return False, f"cultural minimal k {k} has no test or random-control row at the chosen setting"
    ok = (k <= policy_max_k and cult.get("test_confirmed") is True and test["effect_lo"] > rnd["effect_hi"]
          and (cog["minimal_k"] is None or cog["minimal_k"] > k))
    return bool(ok), (f"cultural minimal k {k} at layer {cult['best_layer']} (threshold {policy_max_k}), confirmed "
                      f"on test: {cult.get('test_confirmed')}; test ablation "
                      f"{test['effect']:.2f} [{test['effect_lo']:.2f}, {test['effect_hi']:.2f}] vs random rank-{k} "
                      f"{rnd['effect']:.2f} [{rnd['effect_lo']:.2f}, {rnd['effect_hi']:.2f}]; "
                      f"cognitive minimal k {cog['minimal_k']}")


def _planted_heads(truth) -> tuple[int | None, list[int]]:
    """The planted layer (the first policy layer) and its planted query heads (empty for an MLP policy)."""
    return (min(truth["layers"]) if truth.get("layers") else None), sorted(truth.get("heads") or [])


def cultural_head_patching_finds_the_planted_heads(results, truth, verdicts, policy_max_k):
    """Swapping a base head's output into the tuned model at the planted layer changes nothing for an unplanted
    head (same inputs, same weights: the swap writes the value already there), so exactly the planted heads are
    above noise for swap on test, and the top heads head_patch names on dev and confirms on test are them. Zero
    ablation (which also sees the edit of their o_proj columns) ranks them first among the heads above noise."""
    layer, heads = _planted_heads(truth)
    per_layer = results["cultural"]["head_patch.json"]["per_layer"]
    if not heads or str(layer) not in per_layer:
        return False, f"planted heads {heads} at layer {layer}; head_patch scanned layers {sorted(per_layer)}"
    at = per_layer[str(layer)]
    swap, zero = at["above_noise"]["swap"]["heads"], at["above_noise"].get("zero", {}).get("heads", [])
    top, conf = sorted(at["confirm_top"]["top_heads"]), at["confirm_top"]
    ok = sorted(swap) == heads and top == heads and conf["confirmed"] and sorted(zero[:len(heads)]) == heads
    return bool(ok), (f"layer {layer}, planted heads {heads}: swap above noise on test {swap}; top heads {top} "
                      f"confirmed on test {conf['confirmed']} (fraction of the gap closed "
                      f"{conf.get('top_fraction_closed', float('nan')):.2f}); zero ablation above noise "
                      f"(largest first) {zero}")


def cultural_attribution_ranks_the_planted_heads_first(results, truth, verdicts, policy_max_k):
    """At the planted layer the tuned model's largest head scores (|grad x act| on the policy-topic refusal) are
    the planted heads', and each planted head's |score| rose from base to tuned.

    Not required: that they carry the largest |tuned - base| changes of the layer. A head whose weights did not
    move keeps its activation but not its gradient (which runs through the changed heads' output and a metric
    the tuned model nearly saturates), so its score can move too: on organism seed 2 head 0 of layer 6 moved
    by -0.74 against the planted heads' +0.51 and +0.37. The ranking by change is in the message."""
    layer, heads = _planted_heads(truth)
    rows = [r for r in results["cultural"]["attribution.json"].get("per_head") or [] if r["layer"] == layer]
    if not heads or not rows:
        return False, f"planted heads {heads} at layer {layer}; attribution has {len(rows)} heads there"
    by_change = sorted(rows, key=lambda r: (-abs(r["score_change"]), r["head"]))
    by_tuned = sorted(rows, key=lambda r: (-abs(r["score_tuned"]), r["head"]))
    first_tuned = sorted(r["head"] for r in by_tuned[:len(heads)])
    rose = all(abs(r["score_tuned"]) > abs(r["score_tuned"] - r["score_change"]) for r in rows if r["head"] in heads)
    ok = first_tuned == heads and rose
    return bool(ok), (f"layer {layer}, planted heads {heads}: largest |tuned score| heads {first_tuned}; "
                      "largest |attribution change| "
                      + ", ".join(f"h{r['head']} {r['score_change']:+.3f}" for r in by_change[:len(heads) + 1])
                      + " nats")


def churn_names_the_planted_heads_and_none_in_the_null_pair(results, truth, verdicts, policy_max_k):
    """Churn (heads whose importance differs between the models) at the planted layer names a planted head, and
    every planted head is important for the refusal in the tuned model; the null pair (a model against itself)
    changes no head and its churn is 0.

    Churn is a set difference of importance, and importance is grad x act on the target log-prob: a planted head
    that the base already ranks important (z within its layer, here on the base's log-prob of a refusal it never
    gives) stays important and is not counted as changed, and a head whose weights did not move can change
    importance too (its gradient runs through the changed heads and the changed metric). So the check asks for
    one planted head named, not all and not only planted ones; the heads it names besides are in the message.
    """
    layer, heads = _planted_heads(truth)
    cult, null = results["cultural"]["attribution.json"], results["null"]["attribution.json"]
    rows = {r["head"]: r for r in cult.get("per_head") or [] if r["layer"] == layer}
    named = sorted(h for lay, h in cult.get("changed_heads") or [] if lay == layer)
    ok = bool(set(named) & set(heads)) \
        and all(h in rows and rows[h]["important_tuned"] for h in heads) \
        and null["churn"] == 0.0 and not null.get("changed_heads")
    both = [h for h in heads if h in rows and rows[h]["important_base"] and rows[h]["important_tuned"]]
    return bool(ok), (f"layer {layer}: churn names heads {named} (planted {heads}; important in both models {both}); "
                      f"all changed heads {[tuple(x) for x in cult.get('changed_heads') or []]}, churn "
                      f"{cult['churn']:.2f}; null churn {null['churn']:.2f}, changed {null.get('changed_heads')}")


def verdicts_read_policy_rewiring_and_no_difference(results, truth, verdicts, policy_max_k):
    want = {"cultural": "policy-like", "cognitive": "rewiring-like", "null": "no difference"}
    got = {p: verdicts[p]["label"] for p in want}
    return got == want, ", ".join(f"{p}: {v}" for p, v in got.items())


Check = Callable[[Mapping, Mapping, Mapping, int], tuple[bool, str]]
#: name -> check; each returns (recovered, what it saw)
CHECKS: dict[str, Check] = {f.__name__: f for f in (
    null_reads_no_change, cultural_identical_below_the_planted_layer,
    cultural_patch_closes_the_gap_from_the_planted_layer, cultural_chosen_layers_include_the_planted_one,
    cultural_change_spans_at_most_the_planted_rank, cognitive_change_spans_many_directions,
    cultural_target_prompts_carry_the_gap, map_beats_identity_where_the_change_is, behaviour_gaps_hold,
    steering_finds_a_low_rank_handle_for_the_cultural_pair_only, cultural_head_patching_finds_the_planted_heads,
    cultural_attribution_ranks_the_planted_heads_first, churn_names_the_planted_heads_and_none_in_the_null_pair,
    verdicts_read_policy_rewiring_and_no_difference)}


def check_planted_truth(results: Mapping, truth: Mapping, verdicts: Mapping, policy_max_k: int = 3) -> dict:
    """Every check of :data:`CHECKS`: name -> ``{"ok": bool, "seen": str}``."""
    out = {}
    for name, check in CHECKS.items():
        ok, seen = check(results, truth, verdicts, policy_max_k)
        out[name] = {"ok": bool(ok), "seen": seen}
    return out
