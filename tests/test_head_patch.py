"""Per-head ablation and swap at the o_proj input: GQA-correct against a reference that zeroes the head
inside a copied attention forward, prefix reuse equal to the full forward, exact no-ops and nulls."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from mechdiff import head_patch as hp
from mechdiff.rendering import pad_batch
from tests.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops on a shared, loaded box


ROWS = [([1, 5, 9, 11, 3, 7], [4, 6, 8]), ([1, 8, 4], [10]), ([1, 6, 6, 10, 12, 13, 14, 20], [21, 22])]
LAYER = 1


def _padded(rows):
    return pad_batch([p + c for p, c in rows], 0, "right")


def _zeroed_attention_forward(head: int):
    """A copy of LlamaAttention.forward (eager math) that zeroes query head ``head`` before o_proj."""
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **_kwargs):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, E)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        scores = (q @ k.transpose(2, 3)) * self.scaling  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            causal = causal & attention_mask
        elif attention_mask is not None:
            scores = scores + attention_mask
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores.float(), -1).to(q.dtype) @ v  # (B, H, T, E)
        out[:, head] = 0.0
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

    return forward


def _reference_logprob(model, rows, head):
    attn = model.model.layers[LAYER].self_attn
    original = attn.forward
    attn.forward = types.MethodType(_zeroed_attention_forward(head), attn)
    try:
        return hp.head_sweep_full(model, rows, 0, LAYER, [hp.HeadSetting("none")])[0]
    finally:
        attn.forward = original


def test_zero_head_by_o_proj_slice_equals_zeroing_inside_a_copied_gqa_attention():
    model = tiny_llama(heads=4, kv_heads=2)  # GQA: 2 query heads share each KV head
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    settings = [hp.HeadSetting("zero", (h,)) for h in range(4)]
    got = hp.head_sweep(model, ROWS, 0, LAYER, settings)
    for h in range(4):
        ref = _reference_logprob(model, ROWS, h)
        np.testing.assert_allclose(got[h].numpy(), ref.numpy(), atol=1e-5)
    # every head matters differently: the slices are not mixed up
    assert len({round(float(x), 4) for x in got.sum(1)}) == 4


def test_prefix_reuse_equals_the_full_forward_for_every_kind():
    model, other = tiny_llama(seed=0), tiny_llama(seed=7)
    ids, mask = _padded(ROWS)
    source = hp.o_proj_inputs(other, ids, mask, LAYER)
    mean = hp.head_means(hp.o_proj_inputs(model, ids, mask, LAYER), mask, 4)
    settings = hp.single_head_settings(4, ["zero", "mean", "swap"]) + [hp.HeadSetting("swap", (0, 2))]
    fast = hp.head_sweep(model, ROWS, 0, LAYER, settings, mean, source, max_rows=7)  # several chunks
    slow = hp.head_sweep_full(model, ROWS, 0, LAYER, settings, mean, source)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    # the prefix/suffix split itself reproduces the model's logits at every position
    logits = hp.run_from(model, hp.prefix_states(model, ids, mask, LAYER), mask, LAYER)
    full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


def test_swap_moves_exactly_the_attention_of_the_other_model():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():  # b differs from a only in layer LAYER's q/k/v: swapping all heads recovers b
        for name in ("q_proj", "k_proj", "v_proj"):
            w = getattr(b.model.layers[LAYER].self_attn, name).weight
            w.add_(0.5 * torch.randn_like(w))
    ids, mask = _padded(ROWS)
    source = hp.o_proj_inputs(b, ids, mask, LAYER)
    got = hp.head_sweep(a, ROWS, 0, LAYER, [hp.HeadSetting("none"), hp.HeadSetting("swap", (0, 1, 2, 3))],
                        source=source)
    ref_b = hp.head_sweep(b, ROWS, 0, LAYER, [hp.HeadSetting("none")])[0]
    torch.testing.assert_close(got[1], ref_b, atol=1e-5, rtol=0)
    assert (got[0] - ref_b).abs().max() > 1e-3
    own = hp.o_proj_inputs(a, ids, mask, LAYER)
    noop = hp.head_sweep(a, ROWS, 0, LAYER, hp.single_head_settings(4, ["swap"]), source=own)
    torch.testing.assert_close(noop[1:], noop[:1].expand(4, -1), atol=0, rtol=0)


def test_null_pair_has_no_head_effect_and_summary_flags_none():
    model = tiny_llama(seed=0)
    ids, mask = _padded(ROWS)
    settings = hp.single_head_settings(4, ["zero", "mean", "swap"])
    mean = hp.head_means(hp.o_proj_inputs(model, ids, mask, LAYER), mask, 4)
    src = hp.o_proj_inputs(model, ids, mask, LAYER)
    lp_t = hp.head_sweep(model, ROWS, 0, LAYER, settings, mean, src).numpy()
    lp_b = hp.head_sweep(model, ROWS, 0, LAYER, settings, mean, src).numpy()
    table = hp.summarise_heads(lp_t, lp_b, settings, np.arange(3), z=2.0, n_boot=50, seed=0)
    assert (table.loc[table["kind"] == "swap", "delta_tuned"].abs() == 0).all()
    assert (table["churn"].dropna().abs() == 0).all() and table["churn"].notna().sum() == 8
    assert not table["above_noise"].any()
    assert table["fraction_closed"].isna().all()


def test_top_heads_are_confirmed_only_against_random_sets_and_with_a_real_share_of_the_gap():
    clean = np.zeros(10)
    lp = np.stack([clean, clean - 2.0] + [clean - 0.1 * i for i in range(5)])  # top set, then 5 random sets
    ok = hp.confirm_top(lp, np.arange(10), gap=4.0, min_fraction=0.1)
    assert ok["confirmed"] and ok["top_fraction_closed"] == 0.5 and ok["percentile_abs"] == 1.0
    assert not hp.confirm_top(lp, np.arange(10), gap=40.0, min_fraction=0.1)["confirmed"]  # 5% of the gap
    assert not hp.confirm_top(lp, np.arange(10), gap=0.0, min_fraction=0.1)["confirmed"]  # no gap (null pair)
    lp[3] = clean - 3.0  # a random set does better
    assert not hp.confirm_top(lp, np.arange(10), gap=4.0, min_fraction=0.1)["beats_random"]


def test_random_head_sets_are_seeded_and_avoid_the_top_heads():
    a = hp.random_head_sets(8, 2, 5, seed=3, exclude=[0, 1])
    assert a == hp.random_head_sets(8, 2, 5, seed=3, exclude=[0, 1])
    assert all(len(s) == 2 and not {0, 1} & set(s) for s in a)


def test_cumulative_sets_and_fractions_known_answer():
    assert hp.cumulative_sizes(4) == [1, 2, 4] and hp.cumulative_sizes(32) == [1, 2, 4, 8, 16, 32]
    settings, meta = hp.cumulative_settings("zero", {"patching": [2, 0, 1, 3]}, 4, n_random=3, seed=0)
    assert settings[0] == hp.HeadSetting("none") and settings[1].heads == (0, 1, 2, 3)
    top = {m["m"]: s.heads for s, m in zip(settings, meta) if m["order"] == "patching"}
    assert top == {1: (2,), 2: (0, 2), 4: (0, 1, 2, 3)}
    # head h carries effect -(h + 1) nats on every prompt; the layer's effect is the sum, -10
    lp = np.array([[0.0, 0.0]] + [[-sum(h + 1 for h in s.heads)] * 2 for s in settings[1:]])
    table = hp.cumulative_table(lp, np.arange(2), meta).set_index(["order", "m"])
    assert table.loc[("patching", 1), "fraction_of_layer"] == pytest.approx(0.3)
    assert table.loc[("patching", 2), "fraction_of_layer"] == pytest.approx(0.4)
    assert table.loc[("patching", 4), "fraction_of_layer"] == pytest.approx(1.0)
    assert table.loc[("random", 4), "fraction_q05"] == pytest.approx(1.0)  # every 4-set is the whole layer


def test_cumulative_sweep_of_a_real_model_recovers_the_whole_layer_at_m_equal_heads():
    model = tiny_llama(seed=5)
    rows = ROWS
    settings, meta = hp.cumulative_settings("zero", {"patching": [3, 1, 0, 2]}, 4, n_random=2, seed=0)
    ids, mask = _padded(rows)
    means = hp.head_means(hp.o_proj_inputs(model, ids, mask, LAYER), mask, 4)
    lp = hp.head_sweep(model, rows, 0, LAYER, settings, means, None, 512).numpy()
    table = hp.cumulative_table(lp, np.arange(len(rows)), meta).set_index(["order", "m"])
    assert table.loc[("patching", 4), "fraction_of_layer"] == pytest.approx(1.0, abs=1e-5)
    assert table.loc[("patching", 4), "layer_effect"] != 0.0
