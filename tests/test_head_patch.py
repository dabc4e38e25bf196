"""Per-head ablation and swap at the o_proj input: GQA-correct against a reference that zeroes the head
inside a copied attention forward, prefix reuse equal to the full forward, exact no-ops and nulls; which
heads are above noise (Benjamini-Hochberg over heads x kinds), and no head named when none is."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from mechdiff.data.rendering import pad_batch
from mechdiff.rq3 import head_patch as hp
from mechdiff.rq3 import head_stats as hs
from mechdiff.rq3 import head_sweep as hw
from tests.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops on a shared, loaded box


ROWS = [([1, 5, 9, 11, 3, 7], [4, 6, 8]), ([1, 8, 4], [10]), ([1, 6, 6, 10, 12, 13, 14, 20], [21, 22])]
LAYER = 1


def _padded(rows):
    return pad_batch([p + c for p, c in rows], 0, "right")


def _zeroed_attention_forward(head: int):
    """A copy of LlamaAttention.forward (eager math) that zeroes query head ``head`` before o_proj, after the
    BOS (position 0 is never written)."""
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
        out[:, head, 1:] = 0.0
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

    return forward


def _reference_logprob(model, rows, head):
    attn = model.model.layers[LAYER].self_attn
    original = attn.forward
    attn.forward = types.MethodType(_zeroed_attention_forward(head), attn)
    try:
        return hw.head_sweep_full(model, rows, 0, LAYER, [hw.HeadSetting("none")])[0]
    finally:
        attn.forward = original


def test_zero_head_by_o_proj_slice_equals_zeroing_inside_a_copied_gqa_attention():
    model = tiny_llama(heads=4, kv_heads=2)  # GQA: 2 query heads share each KV head
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    settings = [hw.HeadSetting("zero", (h,)) for h in range(4)]
    got = hw.head_sweep(model, ROWS, 0, LAYER, settings)
    for h in range(4):
        ref = _reference_logprob(model, ROWS, h)
        np.testing.assert_allclose(got[h].numpy(), ref.numpy(), atol=1e-5)
    # every head matters differently: the slices are not mixed up
    assert len({round(float(x), 4) for x in got.sum(1)}) == 4


def test_prefix_reuse_equals_the_full_forward_for_every_kind():
    model, other = tiny_llama(seed=0), tiny_llama(seed=7)
    ids, mask = _padded(ROWS)
    source = hw.o_proj_inputs(other, ids, mask, LAYER)
    mean = hw.head_means(hw.o_proj_inputs(model, ids, mask, LAYER), mask, 4)
    settings = hw.single_head_settings(4, ["zero", "mean", "swap"]) + [hw.HeadSetting("swap", (0, 2))]
    fast = hw.head_sweep(model, ROWS, 0, LAYER, settings, mean, source, max_rows=7)  # several chunks
    slow = hw.head_sweep_full(model, ROWS, 0, LAYER, settings, mean, source)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    assert (fast[1:] - fast[0]).abs().max() > 1e-3  # the settings move the scores: the comparison is not vacuous


def test_swap_moves_exactly_the_attention_of_the_other_model():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():  # b differs from a only in layer LAYER's q/k: swapping all heads recovers b (at the
        for name in ("q_proj", "k_proj"):  # BOS, which is never written, a head attends to itself alone: equal)
            w = getattr(b.model.layers[LAYER].self_attn, name).weight
            w.add_(0.5 * torch.randn_like(w))
    ids, mask = _padded(ROWS)
    source = hw.o_proj_inputs(b, ids, mask, LAYER)
    got = hw.head_sweep(a, ROWS, 0, LAYER, [hw.HeadSetting("none"), hw.HeadSetting("swap", (0, 1, 2, 3))],
                        source=source)
    ref_b = hw.head_sweep(b, ROWS, 0, LAYER, [hw.HeadSetting("none")])[0]
    torch.testing.assert_close(got[1], ref_b, atol=1e-5, rtol=0)
    assert (got[0] - ref_b).abs().max() > 1e-3
    own = hw.o_proj_inputs(a, ids, mask, LAYER)
    noop = hw.head_sweep(a, ROWS, 0, LAYER, hw.single_head_settings(4, ["swap"]), source=own)
    torch.testing.assert_close(noop[1:], noop[:1].expand(4, -1), atol=0, rtol=0)


def test_null_pair_has_no_head_effect_and_summary_flags_none():
    model = tiny_llama(seed=0)
    ids, mask = _padded(ROWS)
    settings = hw.single_head_settings(4, ["zero", "mean", "swap"])
    mean = hw.head_means(hw.o_proj_inputs(model, ids, mask, LAYER), mask, 4)
    src = hw.o_proj_inputs(model, ids, mask, LAYER)
    lp_t = hw.head_sweep(model, ROWS, 0, LAYER, settings, mean, src).numpy()
    lp_b = hw.head_sweep(model, ROWS, 0, LAYER, settings, mean, src).numpy()
    table = hs.flag_above_noise(hs.summarise_heads(lp_t, lp_b, settings, np.arange(3), n_boot=50, seed=0), 0.05)
    assert (table.loc[table["kind"] == "swap", "delta_tuned"].abs() == 0).all()
    assert (table["churn"].dropna().abs() == 0).all() and table["churn"].notna().sum() == 8
    assert not table["above_noise"].any() and (table["p_value"] == 1.0).all()
    assert table["fraction_closed"].isna().all()


def test_top_heads_are_confirmed_only_against_random_sets_and_with_a_real_share_of_the_gap():
    clean = np.zeros(10)
    lp = np.stack([clean, clean - 2.0] + [clean - 0.1 * i for i in range(5)])  # top set, then 5 random sets
    ok = hs.confirm_top(lp, np.arange(10), gap=4.0, min_fraction=0.1)
    assert ok["confirmed"] and ok["top_fraction_closed"] == 0.5 and ok["percentile_abs"] == 1.0
    assert not hs.confirm_top(lp, np.arange(10), gap=40.0, min_fraction=0.1)["confirmed"]  # 5% of the gap
    assert not hs.confirm_top(lp, np.arange(10), gap=0.0, min_fraction=0.1)["confirmed"]  # no gap (null pair)
    lp[3] = clean - 3.0  # a random set does better
    assert not hs.confirm_top(lp, np.arange(10), gap=4.0, min_fraction=0.1)["beats_random"]


def test_random_head_sets_are_seeded_and_avoid_the_top_heads():
    a = hw.random_head_sets(8, 2, 5, seed=3, exclude=[0, 1])
    assert a == hw.random_head_sets(8, 2, 5, seed=3, exclude=[0, 1])
    assert all(len(s) == 2 and not {0, 1} & set(s) for s in a)


def test_cumulative_sets_and_fractions_known_answer():
    assert hp.cumulative_sizes(4) == [1, 2, 4] and hp.cumulative_sizes(32) == [1, 2, 4, 8, 16, 32]
    settings, meta = hp.cumulative_settings("zero", {"patching": [2, 0, 1, 3]}, 4, n_random=3, seed=0)
    assert settings[0] == hw.HeadSetting("none") and settings[1].heads == (0, 1, 2, 3)
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
    means = hw.head_means(hw.o_proj_inputs(model, ids, mask, LAYER), mask, 4)
    lp = hw.head_sweep(model, rows, 0, LAYER, settings, means, None, 512).numpy()
    table = hp.cumulative_table(lp, np.arange(len(rows)), meta).set_index(["order", "m"])
    assert table.loc[("patching", 4), "fraction_of_layer"] == pytest.approx(1.0, abs=1e-5)
    assert table.loc[("patching", 4), "layer_effect"] != 0.0


# --------------------------------------------------------------------------------------------------
# above noise: p-values, Benjamini-Hochberg over heads x kinds, and no head named when none is above noise


def _bh_by_hand(p: np.ndarray, alpha: float) -> set[int]:
    """The BH step-up set: the k smallest p-values, k the largest i with p_(i) <= i * alpha / m."""
    order = np.argsort(p, kind="stable")
    m = len(p)
    ks = [i for i in range(1, m + 1) if p[order[i - 1]] <= i * alpha / m]
    return set(order[:max(ks)].tolist()) if ks else set()


def test_bh_qvalues_reject_exactly_the_step_up_set():
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 (m = 4): q = min over the tail of p * 4 / rank
    q = hs.bh_qvalues(np.array([0.01, 0.04, 0.03, 0.005]))
    np.testing.assert_allclose(q, [0.02, 0.04, 0.04, 0.02])
    rng = np.random.default_rng(0)
    for m in (1, 5, 40, 200):
        for _ in range(20):  # mixtures of signals and nulls, with ties
            p = np.concatenate([rng.uniform(0, 1e-3, rng.integers(0, m + 1)), rng.uniform(size=m)])[:m]
            p[rng.integers(0, m, m // 5)] = p[0]
            q = hs.bh_qvalues(p)
            assert np.all((q >= p * (1 - 1e-12)) & (q <= 1))  # q_(m) = p_(m) * m / m up to rounding
            for alpha in (0.01, 0.05, 0.2):
                assert set(np.flatnonzero(q <= alpha).tolist()) == _bh_by_hand(p, alpha)
    # NaN p-values are not tested and do not count in m
    np.testing.assert_allclose(hs.bh_qvalues(np.array([np.nan, 0.01, 0.04, np.nan, 0.03, 0.005])),
                               [np.nan, 0.02, 0.04, np.nan, 0.04, 0.02])
    assert np.isnan(hs.bh_qvalues(np.array([np.nan]))).all()


def test_t_test_p_values_match_the_closed_forms_of_one_and_two_degrees_of_freedom():
    rng = np.random.default_rng(0)
    two, three = rng.normal(0.3, 1.0, (50, 2)), rng.normal(0.3, 1.0, (50, 3))
    t2 = two.mean(1) / (two.std(1, ddof=1) / np.sqrt(2))
    t3 = three.mean(1) / (three.std(1, ddof=1) / np.sqrt(3))
    # Student's t, two-sided: 1 df (Cauchy) p = 1 - 2 atan|t| / pi; 2 df p = 1 - |t| / sqrt(2 + t^2)
    np.testing.assert_allclose(hs.t_test_p_values(two), 1 - 2 * np.arctan(np.abs(t2)) / np.pi, rtol=1e-9)
    np.testing.assert_allclose(hs.t_test_p_values(three), 1 - np.abs(t3) / np.sqrt(2 + t3 ** 2), rtol=1e-9)
    # many prompts: the normal's 5% point
    row = rng.standard_normal(100_000)
    row = (row - row.mean()) / row.std(ddof=1) + 1.959963985 / np.sqrt(len(row))  # t = 1.96 exactly
    assert hs.t_test_p_values(row[None])[0] == pytest.approx(0.05, abs=1e-4)
    # no spread: an exactly-null edit is p = 1, a constant shift p = 0; NaN or a single prompt is untested
    p = hs.t_test_p_values(np.array([[0.0, 0.0, 0.0], [0.7, 0.7, 0.7], [0.1, np.nan, 0.2]]))
    assert p[0] == 1.0 and p[1] == 0.0 and np.isnan(p[2])
    assert np.isnan(hs.t_test_p_values(np.ones((1, 1)))).all()


def _planted_lp(effects, noise: float, n_prompts: int, seed: int):
    """Log-probs (S, N) of the clean run then one row per (kind, head) of zero and swap: tuned rows move by
    the head's effect (``effects`` (H,) nats, or kind -> (H,)) plus per-prompt noise (sd ``noise``), the
    base's rows never move (so churn = the tuned change)."""
    effects = effects if isinstance(effects, dict) else {"zero": effects, "swap": effects}
    rng = np.random.default_rng(seed)
    settings = hw.single_head_settings(len(effects["zero"]), ["zero", "swap"])
    clean = rng.normal(-5.0, 1.0, n_prompts)
    lp_t = np.stack([clean] + [clean + effects[s.kind][s.heads[0]] + noise * rng.standard_normal(n_prompts)
                               for s in settings[1:]])
    lp_b = np.stack([clean] * len(settings))
    return lp_t, lp_b, settings


def test_all_zero_effects_flag_nothing_and_name_no_heads():
    lp_t, lp_b, settings = _planted_lp(np.zeros(8), noise=0.0, n_prompts=16, seed=0)
    table = hs.flag_above_noise(hs.summarise_heads(lp_t, lp_b, settings, np.arange(16), 50, 0), 0.05)
    assert (table["effect"] == 0).all() and not table["above_noise"].any()
    for kind in ("zero", "swap"):
        assert hs.heads_above_noise(table, kind) == []
    noise = hs.noise_summary(table, ["zero", "swap"], 0.05, " at layer 3 on test")
    assert noise["swap"] == {"n_above_noise": 0, "n_heads": 8, "heads": [],
                             "text": "no head above noise (BH q <= 0.05) for swap at layer 3 on test"}


def test_a_planted_strong_head_is_flagged_and_ranked_first_among_null_heads():
    effects = np.zeros(8)
    effects[5] = -2.0  # nats: 16 noise SEs (0.5 / sqrt(16)) at 16 prompts
    lp_t, lp_b, settings = _planted_lp(effects, noise=0.5, n_prompts=16, seed=1)
    table = hs.flag_above_noise(hs.summarise_heads(lp_t, lp_b, settings, np.arange(16), 200, 0), 0.05)
    for kind in ("zero", "swap"):
        assert hs.heads_above_noise(table, kind)[:1] == [5]
    noise = hs.noise_summary(table, ["zero", "swap"], 0.05)
    assert noise["zero"]["n_above_noise"] >= 1 and noise["zero"]["text"].startswith(
        f"{noise['zero']['n_above_noise']} of 8 heads above noise (BH q <= 0.05) for zero: 5")


def test_all_null_heads_are_flagged_at_about_the_fdr_over_many_draws():
    # complete null: BH keeps P(any head flagged) at or below the level (FDR = FWER here); 300 seeded draws of
    # 2 kinds x 8 heads with noise on 16 prompts (a normal tail on the bootstrap SE flags 17% of them); the
    # binomial SE of the share at 5% is 1.3 points
    draws = 300
    hits = 0
    for seed in range(draws):
        lp_t, lp_b, settings = _planted_lp(np.zeros(8), noise=0.5, n_prompts=16, seed=seed)
        table = hs.flag_above_noise(hs.summarise_heads(lp_t, lp_b, settings, np.arange(16), 20, seed), 0.05)
        hits += bool(table["above_noise"].any())
    assert hits / draws <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / draws)


def test_the_correction_covers_every_head_kind_and_layer_of_a_split():
    # one head at p = 0.01 (|effect| = 2.6 SE: above the old uncorrected 2-SE floor) is above noise alone,
    # not among 99 null heads of the same split; the other split is its own family
    def rows(split, n_null):
        null = [{"split": split, "kind": "zero", "head": h, "layer": 3, "effect": 0.0, "p_value": 1.0}
                for h in range(n_null)]
        return [{"split": split, "kind": "swap", "head": 0, "layer": 1, "effect": 1.0, "p_value": 0.01}] + null
    table = hs.flag_above_noise(pd.DataFrame(rows("dev", 0) + rows("test", 99)), 0.05, family=("split",))
    first = table.groupby("split")["above_noise"].first()
    assert first["dev"] and not first["test"]
    assert table.loc[(table["split"] == "test") & (table["head"] == 0) & (table["kind"] == "swap"),
                     "q_value"].item() == pytest.approx(1.0)


def test_the_report_says_no_head_is_above_noise_instead_of_naming_ties():
    from mechdiff.report.document import head_patch_text
    # swap cannot see an o_proj edit (all effects exactly 0); zero ablation finds heads 2 and 0
    effects = {"zero": np.array([-0.5, 0.0, -1.0, 0.0]), "swap": np.zeros(4)}
    lp_t, lp_b, settings = _planted_lp(effects, noise=0.0, n_prompts=8, seed=0)
    table = hs.flag_above_noise(hs.summarise_heads(lp_t, lp_b, settings, np.arange(8), 50, 0), 0.05)
    noise = hs.noise_summary(table, ["zero", "swap"], 0.05, " at layer 5 on test")
    assert noise["zero"]["heads"] == [2, 0] and noise["swap"]["heads"] == []
    none_on_dev = "no head above noise (BH q <= 0.05) for swap at layer 5 on dev"
    metrics = {"noise_rule": "above noise: BH", "per_layer": {"5": {
        "above_noise": noise, "confirm_top": {"kind": "swap", "top_heads": [], "confirmed": False, "text": none_on_dev}}}}
    text = head_patch_text(metrics)
    assert "no head above noise (BH q <= 0.05) for swap at layer 5 on test" in text
    assert "2 of 4 heads above noise (BH q <= 0.05) for zero at layer 5 on test: 2, 0" in text
    assert "top swap heads" not in text and text.endswith(".")
    named = head_patch_text({"per_layer": {"5": {"above_noise": noise, "confirm_top": {
        "kind": "swap", "top_heads": [1, 3], "confirmed": True}}}})
    assert "top swap heads at layer 5 (above noise on dev) 1, 3: confirmed" in named
    assert head_patch_text({"per_layer": {"5": {"confirm_top": {}}}}) is None  # results before the summary


def test_no_edit_writes_the_bos_and_mean_ablation_takes_its_means_from_dev_prompts_only():
    """The hook leaves position 0 of every row as it is for every kind (and edits the heads after it), so
    the states at BOS are identical with and without the edit; the mean comes from the ``use`` prompts alone
    (changing the others' states leaves it unchanged) and skips their BOS."""
    g = torch.Generator().manual_seed(0)
    S, N, T, H, E = 4, 3, 5, 4, 2
    settings = [hw.HeadSetting("none"), hw.HeadSetting("zero", (1,)), hw.HeadSetting("mean", (0, 2)),
                hw.HeadSetting("swap", (3,))]
    x = torch.randn(S * N, T, H * E, generator=g)
    mean, source = torch.randn(H, E, generator=g), torch.randn(N, T, H * E, generator=g)
    out = hw.edit_o_proj_in_pre_hook(settings, N, H, mean, source)(None, (x,))[0]
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)
    changed = (out != x).reshape(S, N, T, H, E).any(-1).any(1)  # (S, T, H): what each setting wrote
    for s, st_ in enumerate(settings):
        written = set(torch.nonzero(changed[s, 1:].any(0)).flatten().tolist())
        assert not changed[s, 0].any() and written == set(st_.heads)
    model = tiny_llama(seed=0)
    ids, mask = _padded(ROWS)
    o_in = hw.o_proj_inputs(model, ids, mask, LAYER)
    dev = [True, False, True]
    m = hw.head_means(o_in, mask, 4, use=dev)
    other = o_in.clone()
    other[1] += 5.0  # a test prompt's states
    other[:, 0] += 7.0  # every BOS
    torch.testing.assert_close(hw.head_means(other, mask, 4, use=dev), m, rtol=0, atol=0)
    sel = mask.bool().clone()
    sel[:, 0], sel[1] = False, False
    torch.testing.assert_close(m, o_in[sel].double().mean(0).reshape(4, -1).to(o_in.dtype))
    assert (hw.head_means(other, mask, 4) - m).abs().min() > 0.5  # without ``use`` the test prompt counts
