"""A change planted in two named query heads (the cultural organism's construction, on a tiny GQA Llama) is found
by head patching, attribution and churn, each naming exactly those heads.

The tuned model differs from the base only in the planted heads' slices of one layer: their ``q_proj`` rows (where
they attend) and their ``o_proj`` columns (what they write: the target token's unembedding). So, by construction:
a base->tuned swap of any other head of that layer writes the value already there (effect exactly 0, never above
noise); the planted heads' swap, zero ablation and grad x act carry the change.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mechdiff.data.rendering import pad_batch
from mechdiff.organisms.build_models import weight_delta_ranks
from mechdiff.organisms.lora import add_head_lora, head_slices, merge_lora
from mechdiff.rq3 import head_stats as hs
from mechdiff.rq3 import head_sweep as hw
from mechdiff.rq4 import attribution as attr
from mechdiff.rq4 import churn as ch
from tests.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_HEADS, HD, LAYER, PLANTED, TOK = 8, 8, 2, (2, 5), 7


def _prompts(n: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 64, (int(torch.randint(5, 10, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    return build_pair()


def build_pair(write: float = 1.0):
    """(base, tuned, rows): tuned = base with a head-confined edit of heads PLANTED at LAYER: their queries are
    scaled up (they attend sharply) and their o_proj columns also write the mean move of their output
    onto the target token's unembedding."""
    base = tiny_llama(n_layers=4, hidden=N_HEADS * HD, heads=N_HEADS, kv_heads=2, seed=0)
    tuned = copy.deepcopy(base)
    rows = [(p, [TOK]) for p in _prompts()]
    idx = head_slices(N_HEADS, HD, PLANTED)
    attn = tuned.model.layers[LAYER].self_attn
    ids, mask = pad_batch([p for p, _ in rows], 0, "right")
    last = mask.sum(1) - 1
    at_last = torch.arange(len(rows)), last
    with torch.no_grad():
        attn.q_proj.weight[idx] *= 40.0  # where the heads attend: sharply (a random init attends ~uniformly)
        z = (hw.o_proj_inputs(tuned, ids, mask, LAYER)[at_last] - hw.o_proj_inputs(base, ids, mask, LAYER)[at_last])
        z = z[:, idx].mean(0)  # (|H| * HD,): how the heads' output moved
        u = tuned.lm_head.weight[TOK]
        attn.o_proj.weight[:, idx] += write * torch.outer(u / u.norm(), z / z.norm())  # ... now writes the target
    return base, tuned, rows


def test_the_head_confined_lora_moves_only_the_planted_heads_slices():
    model = tiny_llama(n_layers=4, hidden=N_HEADS * HD, heads=N_HEADS, kv_heads=2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = add_head_lora(model, [LAYER], PLANTED, rank=2, seed=0)
    with torch.no_grad():
        for _, a in adapters:
            a.B.normal_()
    merge_lora(model, adapters)
    idx = head_slices(N_HEADS, HD, PLANTED).tolist()
    assert weight_delta_ranks(before, model.state_dict()) == {
        f"model.layers.{LAYER}.self_attn.{m}.weight": 2 for m in ("q_proj", "o_proj")}  # rank 2 each, nothing else
    for k, v in model.state_dict().items():
        d = (v - before[k]).abs()
        if k == f"model.layers.{LAYER}.self_attn.q_proj.weight":
            assert sorted(torch.nonzero(d.sum(1)).flatten().tolist()) == idx  # only the heads' rows
        elif k == f"model.layers.{LAYER}.self_attn.o_proj.weight":
            assert sorted(torch.nonzero(d.sum(0)).flatten().tolist()) == idx  # only the heads' columns
        else:
            assert torch.equal(v, before[k]), k  # keys and values (shared by the GQA group) untouched
    with pytest.raises(ValueError, match="distinct indices"):
        head_slices(N_HEADS, HD, (2, 2))


def _sweep(pair, kinds):
    base, tuned, rows = pair
    ids_b, mask_b = pad_batch([p + c for p, c in rows], 0, "right")
    settings = hw.single_head_settings(N_HEADS, kinds)
    source = hw.o_proj_inputs(base, ids_b, mask_b, LAYER)
    lp_t = hw.head_sweep(tuned, rows, 0, LAYER, settings, source=source).numpy()
    in_base = [i for i, s in enumerate(settings) if s.kind != "swap"]
    lp_b = np.full_like(lp_t, np.nan)
    lp_b[in_base] = hw.head_sweep(base, rows, 0, LAYER, [settings[i] for i in in_base]).numpy()
    table = hs.summarise_heads(lp_t, lp_b, settings, np.arange(len(rows)), n_boot=100, seed=0)
    return hs.flag_above_noise(table, 0.05)


def test_swap_reads_exactly_zero_off_the_planted_heads_and_flags_only_them(pair):
    table = _sweep(pair, ["swap"])
    off = table[~table["head"].isin(PLANTED)]
    assert (off["delta_tuned"] == 0.0).all() and (off["p_value"] == 1.0).all() and not off["above_noise"].any()
    on = table[table["head"].isin(PLANTED)]
    assert (on["delta_tuned"].abs() > 0).all()
    above = hs.heads_above_noise(table, "swap")
    assert above and set(above) <= set(PLANTED)  # only planted heads can be above noise; here one or both are


def test_zero_ablation_churn_ranks_the_planted_heads_first(pair):
    table = _sweep(pair, ["zero"])
    zero = table[table["kind"] == "zero"]
    first = zero.assign(a=-zero["effect"].abs()).sort_values(["a", "head"])["head"].tolist()[:len(PLANTED)]
    assert sorted(first) == sorted(PLANTED)
    assert sorted(hs.heads_above_noise(table, "zero")[:len(PLANTED)]) == sorted(PLANTED)


@pytest.fixture(scope="module")
def attributed(pair):
    base, tuned, rows = pair
    prompts, conts = [p for p, _ in rows], [c for _, c in rows]
    res = {name: attr.attribute(m, prompts, conts, 0, [0, 1, 2, 3], batch_size=8)
           for name, m in (("base", base), ("tuned", tuned))}
    heads = np.array([(layer, h) for layer in range(4) for h in range(N_HEADS)])
    scores = {m: r.score.reshape(len(rows), -1).astype(np.float64) for m, r in res.items()}
    metric = {m: r.metric.astype(np.float64) for m, r in res.items()}
    return heads, scores, metric


def _ranked_by_change(records: list[dict], layer: int) -> list[int]:
    """Heads of ``layer`` by ``|score_change|`` (tuned - base mean attribution), largest first (ties by head)."""
    rows = [r for r in records if r["layer"] == layer]
    return [r["head"] for r in sorted(rows, key=lambda r: (-abs(r["score_change"]), r["head"]))]


def test_attribution_ranks_the_planted_heads_first_at_their_layer(attributed):
    heads, scores, metric = attributed
    rule = ch.ImportanceRule(z=2.0, threshold=0.05, units="nats")
    records = ch.per_head(scores, metric, heads, rule)
    assert sorted(_ranked_by_change(records, LAYER)[:len(PLANTED)]) == sorted(PLANTED)
    at = [r for r in records if r["layer"] == LAYER]
    by_tuned = sorted(at, key=lambda r: -abs(r["score_tuned"]))[:len(PLANTED)]
    assert sorted(r["head"] for r in by_tuned) == sorted(PLANTED)


def test_churn_names_the_planted_heads_as_changed_and_a_model_against_itself_as_unchanged(attributed):
    heads, scores, metric = attributed
    rule = ch.ImportanceRule(z=2.0, threshold=0.05, units="nats")
    out = ch.summarise(scores, metric, heads, rule, k=4, n_boot=20, n_splits=5, seed=0)
    assert {(LAYER, h) for h in PLANTED} <= {tuple(x) for x in out["changed_heads"]}
    planted = [r for r in out["per_head"] if r["layer"] == LAYER and r["head"] in PLANTED]
    assert all(r["important_tuned"] and not r["important_base"] for r in planted)
    assert out["z_attainable"] and len(out["churn_bootstrap"]) == 20
    same = {"base": scores["base"], "tuned": scores["base"]}
    null = ch.summarise(same, {"base": metric["base"], "tuned": metric["base"]}, heads, rule, 4, 20, 5, 0)
    assert null["churn"] == 0.0 and null["changed_heads"] == [] and set(null["churn_bootstrap"]) == {0.0}


def test_z_of_equal_outliers_within_a_layer():
    """k equal outliers among n heads (the rest 0) reach z = sqrt((n - k) / k): one of 8 clears z >= 2
    (sqrt 7), two of 8 do not (sqrt 3), which is why two planted heads are named by the absolute threshold."""
    for n, k in ((8, 1), (8, 2), (16, 2), (4, 1)):
        v = np.r_[np.ones(k), np.zeros(n - k)]
        z = ch.layer_z(v, np.zeros(n, int))
        assert np.allclose(z[:k], np.sqrt((n - k) / k))
