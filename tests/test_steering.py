"""RQ3 steering on tiny random models: the batched sweep equals the sequential loop, hooks do exactly
what they say, the subspace estimator recovers a planted direction, the selection rules, and both stages
end to end on a small on-disk pair. (the basis checks themselves: tests/test_subspace.py.)"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mechdiff.models import interventions
from mechdiff.models import measures
from mechdiff.models.hooks import hooks
from mechdiff.rq3 import steer_select
from mechdiff.rq3 import subspace
from mechdiff.rq3 import steer_sweep as st
from mechdiff.rq3.subspace import random_subspace
from mechdiff.stats import bootstrap_mean_interval
from tests.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny ops on a shared, loaded box


ROWS = [[1, 5, 9, 11, 3, 7], [1, 8, 4], [1, 6, 6, 10, 12, 13, 14, 20], [1, 30, 31]]
CONT = [[4, 6], [10], [21, 22, 23], [40]]


def _settings(d=32, n_layers=4):
    g = torch.Generator().manual_seed(0)
    return [interventions.identity(d),
            interventions.ablation(random_subspace(d, 1, seed=1), (1,)),
            interventions.ablation(random_subspace(d, 3, seed=2), (2,)),
            interventions.ablation(random_subspace(d, 2, seed=3), tuple(range(n_layers))),
            interventions.scaling(random_subspace(d, 2, seed=4), 2.0, (1,)),
            interventions.addition(3.0 * torch.randn(d, generator=g, dtype=torch.float64), (2,)),
            interventions.addition(torch.randn(d, generator=g, dtype=torch.float64), (0, 3)),
            interventions.addition(layers=(1,), end=2.0 * torch.randn(d, generator=g, dtype=torch.float64),
                        answer=torch.randn(d, generator=g, dtype=torch.float64))]


def _sequential(model, settings, measure):
    """Reference: one plain forward per setting, float64 ``Intervention.apply`` in ordinary hooks."""
    outs = []
    for iv in settings:
        post = [(model.model.layers[i], lambda _m, _i, o, iv=iv: iv.apply(o)) for i in iv.layers]  # reads the roles
        with hooks(post=post):
            outs.append(measure(model))
    return outs


def test_batched_sweep_equals_the_sequential_loop_for_every_measure():
    model, settings = tiny_llama(), _settings()
    pairs = list(zip(ROWS, CONT))
    cases = {
        "next": (lambda m, r: measures.next_token_logits(m, r, 0), ROWS),
        "cont": (lambda m, r: measures.continuation_scores(m, r, 0)[0], pairs),
        "nll": (lambda m, r: measures.sequence_nll(m, r, 0)[0], ROWS),
        "greedy": (lambda m, r: measures.greedy_decode(m, r, 0, 5), ROWS),
    }
    for name, (measure, seqs) in cases.items():
        batched = interventions.sweep(model, settings, measure, seqs, max_rows=9)[0]  # several chunks of settings
        ref = _sequential(model, settings, lambda m: measure(m, seqs))
        for s, r in enumerate(ref):
            if name == "greedy":
                assert torch.equal(batched[s], r), (name, s)
            else:
                torch.testing.assert_close(batched[s].double(), r.double(), atol=2e-5, rtol=1e-5, msg=f"{name} {s}")
    # the settings really differ from clean (the test is not vacuous)
    nxt = interventions.sweep(model, settings, cases["next"][0], ROWS)[0]
    assert all((nxt[s] - nxt[0]).abs().max() > 1e-3 for s in range(1, len(settings)))


def test_prefix_reuse_runs_the_untouched_blocks_once_and_changes_nothing():
    model = tiny_llama()
    U = random_subspace(32, 2, seed=7)
    settings = [interventions.identity(32), interventions.ablation(U, (2,)), interventions.scaling(U, 2.0, (3,)),
                interventions.addition(layers=(2,), end=torch.ones(32, dtype=torch.float64),
                            answer=torch.ones(32, dtype=torch.float64))]
    calls = []  # rows reaching block 1's MLP (inside the shared prefix)
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        pairs = list(zip(ROWS, CONT))
        for measure, seqs in ((lambda m, r: measures.continuation_scores(m, r, 0)[0], pairs),
                              (lambda m, r: measures.sequence_nll(m, r, 0)[0], ROWS),
                              (lambda m, r: measures.next_token_logits(m, r, 0), ROWS)):
            calls.clear()
            fast = interventions.sweep(model, settings, measure, seqs)[0]
            assert calls == [len(seqs)]  # block 0 saw one copy of the prompts, not four
            slow = interventions.sweep(model, settings, measure, seqs, reuse_prefix=False)[0]
            torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
        calls.clear()
        greedy = lambda m, r: measures.greedy_decode(m, r, 0, 4)  # noqa: E731
        fast = interventions.sweep(model, settings, greedy, ROWS)[0]
        assert calls[0] == len(ROWS)  # the decode's prompt pass (prefill) also ran one copy below layer 2
        assert calls[1:] == [4 * len(ROWS)] * (len(calls) - 1)  # the decode steps run every row (tokens differ)
        assert torch.equal(fast, interventions.sweep(model, settings, greedy, ROWS, reuse_prefix=False)[0])
    finally:
        handle.remove()
    assert all("forward" not in vars(block) for block in model.model.layers)  # originals restored


def test_continuation_scores_equal_the_full_forward_and_do_not_depend_on_the_logit_budget():
    """Scoring unembeds blocks of rows (memory bounded by the logit budget): every row's log-prob and greedy
    flag are those of the plain forward's logits, whatever the block size."""
    torch.manual_seed(0)
    model = tiny_llama(n_layers=3)
    pairs = [([1, 5, 9, 4], [7, 3]), ([2, 8], [6, 11, 12]), ([3, 3, 3, 10, 2], [4])]
    lp, greedy = measures.continuation_scores(model, pairs, 0)
    for i, (p, c) in enumerate(pairs):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
        want = torch.log_softmax(logits, -1)[len(p) - 1:-1].gather(-1, torch.tensor(c)[:, None]).sum()
        assert abs(float(lp[i]) - float(want)) < 1e-4
        assert bool(greedy[i]) == bool((logits[len(p) - 1:-1].argmax(-1) == torch.tensor(c)).all())
    hidden = torch.randn(5, 3, model.config.hidden_size)
    targets = torch.randint(0, model.config.vocab_size, (5, 3))
    one = measures.target_logprobs(model, hidden, targets)
    for budget in (1, model.config.vocab_size * 3, model.config.vocab_size * 7):  # one row, one, two rows a block
        lp_b, top_b = measures.target_logprobs(model, hidden, targets, budget=budget)
        assert torch.equal(top_b, one[1]) and torch.allclose(lp_b, one[0], atol=1e-6)


def test_score_and_decode_equals_the_separate_measures_with_one_prompt_pass():
    model, settings = tiny_llama(), _settings()
    pairs = list(zip(ROWS, CONT))
    lp, greedy = measures.continuation_scores(model, pairs, 0)
    got = measures.score_and_decode(model, pairs, 0, 5)
    torch.testing.assert_close(got[0], lp, atol=1e-5, rtol=1e-6)
    assert torch.equal(got[1], greedy) and torch.equal(got[2], measures.greedy_decode(model, ROWS, 0, 5))
    # a continuation that IS the greedy answer reads greedy=True (the cached pass predicts it too)
    own = [(row, got[2][r, :3].tolist()) for r, row in enumerate(ROWS)]
    assert measures.score_and_decode(model, own, 0, 2)[1].all()
    # inside the batched sweep (role-placed vectors, several chunks) it equals the separate measures
    fused = interventions.sweep(model, settings, lambda m, r: measures.score_and_decode(m, r, 0, 5), pairs, max_rows=9)
    soft = interventions.sweep(model, settings, lambda m, r: measures.continuation_scores(m, r, 0)[0], pairs, max_rows=9)[0]
    gen = interventions.sweep(model, settings, lambda m, r: measures.greedy_decode(m, r, 0, 5), ROWS, max_rows=9)[0]
    torch.testing.assert_close(fused[0], soft, atol=2e-5, rtol=1e-5)
    assert torch.equal(fused[2], gen)
    assert (soft[1:] - soft[0]).abs().max() > 1e-3  # the settings change the scores (not vacuous)
    # one prompt pass: block 1 (below the steered layer 2) sees the prompts once, then only the continuation
    calls = []
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[1]))
    try:
        interventions.sweep(model, [interventions.identity(32), interventions.ablation(random_subspace(32, 1, seed=1), (2,))],
                 lambda m, r: measures.score_and_decode(m, r, 0, 3), pairs)
    finally:
        handle.remove()
    assert calls[0] == max(map(len, ROWS))  # the prefill: every prompt token, once
    assert calls[1] == max(map(len, CONT)) - 1  # the continuation on top of the cache, no prompt tokens again
    assert calls[2:] == [1, 1]  # two decode steps


def test_score_and_decode_falls_back_to_two_passes_when_the_cache_cannot_be_cut(monkeypatch):
    from mechdiff.models import measures

    model = tiny_llama()
    pairs = list(zip(ROWS, CONT))
    fused = measures.score_and_decode(model, pairs, 0, 4)
    monkeypatch.setattr(measures, "_cache_entries", lambda cache: None)  # e.g. a static or quantised cache
    calls = []
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[1]))
    try:
        apart = measures.score_and_decode(model, pairs, 0, 4)
    finally:
        handle.remove()
    assert calls[:2] == [max(map(len, ROWS)), max(len(r) + len(c) for r, c in pairs)]  # prefill, then a full pass
    torch.testing.assert_close(apart[0], fused[0], atol=1e-5, rtol=1e-6)
    assert torch.equal(apart[1], fused[1]) and torch.equal(apart[2], fused[2])


def test_identity_is_the_plain_model_and_ablation_leaves_nothing_along_u():
    model = tiny_llama()
    plain = measures.next_token_logits(model, ROWS, 0)
    clean = interventions.sweep(model, [interventions.identity(32)], lambda m, r: measures.next_token_logits(m, r, 0), ROWS)[0][0]
    torch.testing.assert_close(clean, plain, atol=0, rtol=0)
    U = random_subspace(32, 2, seed=5)
    seen = {}
    capture = (model.model.layers[1], lambda _m, _i, o: seen.__setitem__("h", o.detach().double()))
    with interventions.intervene(model, [interventions.ablation(U, (1,)), interventions.scaling(U, 1.0, (1,))]):
        with hooks(post=[capture]):  # registered after the steering hook: sees its output
            measures.next_token_logits(model, ROWS * 2, 0)
    h = seen["h"]
    n = len(ROWS)
    assert (h[:n] @ U).abs().max() < 1e-4  # ablated rows: nothing left along U
    assert (h[n:] @ U).abs().max() > 1e-2  # scaled rows: more along U
    # role vectors land only where the measure says: `end` moves the next-token logits, not scored text
    end_only = [interventions.identity(32), interventions.addition(layers=(1,), end=5.0 * torch.ones(32, dtype=torch.float64))]
    nxt = interventions.sweep(model, end_only, lambda m, r: measures.next_token_logits(m, r, 0), ROWS)[0]
    nll = interventions.sweep(model, end_only, lambda m, r: measures.sequence_nll(m, r, 0)[0], ROWS)[0]
    assert (nxt[1] - nxt[0]).abs().max() > 1e-2 and torch.equal(nll[1], nll[0])


def test_greedy_decode_matches_a_cacheless_argmax_loop():
    model = tiny_llama()
    got = measures.greedy_decode(model, ROWS, 0, 4)
    for r, row in enumerate(ROWS):
        seq = list(row)
        for _ in range(4):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert got[r].tolist() == seq[len(row):]
    lp, greedy = measures.continuation_scores(model, [(row, got[r, :3].tolist()) for r, row in enumerate(ROWS)], 0)
    assert greedy.all() and (lp < 0).all()


def _planted(seed=0, n=400, d=16):
    rng = np.random.default_rng(seed)
    u = np.zeros(d)
    u[0] = 1.0
    w = np.zeros(d)
    w[1] = 1.0
    neutral = rng.normal(size=(n, d))
    target = rng.normal(size=(n, d)) + 4.0 * u
    paired = 3.0 * u + rng.normal(size=(n, 1)) * 2.0 * w + 0.05 * rng.normal(size=(n, d))
    return target, neutral, paired, u, w


def test_subspace_recovers_the_planted_direction_and_the_paired_structure():
    target, neutral, paired, u, w = _planted()
    sub = subspace.SteeringSubspace(k_max=4, n_boot=50).fit(target, neutral, paired)
    B = sub.basis(4).numpy()
    np.testing.assert_allclose(B.T @ B, np.eye(4), atol=1e-10)
    assert abs(B[:, 0] @ u) > 0.99 and abs(B[:, 1] @ w) > 0.98
    assert sub.explained_variance_ratio_[1] > 0.9 and sub.change_captured_[0] > 0.99
    assert np.mean(sub.stability_) > 0.95
    torch.testing.assert_close(sub.basis(2), sub.basis_[:, :2])
    v = sub.steering_vectors(1, 2.0)["end"].numpy()
    unit = v / np.linalg.norm(v)  # P_1 m / |P_1 m|: the fitted direction, oriented along the mean change
    assert unit @ u > 0.99 and abs(np.linalg.norm(v) - 2.0 * np.abs(paired @ unit).mean()) < 1e-8
    answer = paired[:50] + 5.0 * w  # answer-position changes along w join the basis and get their own vector
    sub2 = subspace.SteeringSubspace(k_max=2, n_boot=10).fit(target, neutral, paired, paired_answer=answer)
    vecs = sub2.steering_vectors(2, 1.0)
    assert set(vecs) == {"end", "answer"} and abs(vecs["answer"].numpy() @ w) > 0.5 * np.linalg.norm(vecs["answer"])
    zero = subspace.SteeringSubspace(k_max=2, n_boot=10).fit(target, neutral, np.zeros_like(paired))
    assert float(zero.steering_vectors(2, 3.0)["end"].norm()) == 0.0
    assert subspace.no_change(torch.zeros(3, 4), torch.ones(3, 4)) and not subspace.no_change(torch.ones(3, 4), torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="not fitted"):
        subspace.SteeringSubspace().basis(1)
    with pytest.raises(ValueError, match="outside the fitted ranks"):
        sub.basis(5)


def test_basis_columns_come_in_order_of_the_share_of_the_change_they_carry():
    """A contrast (mean-change) direction u that carries less of the change than a second direction w
    (a wide spread of the paired changes along w) comes out second; shares descend; the fit repeats exactly."""
    rng = np.random.default_rng(1)
    d, n = 16, 400
    u, w = np.eye(d)[0], np.eye(d)[1]
    neutral = rng.normal(size=(n, d))
    target = neutral + 2.0 * u
    paired = 0.5 * u + 3.0 * rng.normal(size=(n, 1)) * w + 0.05 * rng.normal(size=(n, d))
    for answer in (None, paired[:50] + 0.2 * u):  # one role, and the two-role basis
        sub = subspace.SteeringSubspace(k_max=3, n_boot=10).fit(target, neutral, paired, paired_answer=answer)
        B = sub.basis(3).numpy()
        assert abs(B[:, 0] @ w) > 0.99 and abs(B[:, 1] @ u) > 0.99
        share = sub.change_share_
        assert np.all(np.diff(share) <= 0) and share[0] > share[1] > 0 and share.sum() <= 1 + 1e-12
        np.testing.assert_allclose(B.T @ B, np.eye(3), atol=1e-10)
        again = subspace.SteeringSubspace(k_max=3, n_boot=10).fit(target, neutral, paired, paired_answer=answer)
        torch.testing.assert_close(again.basis_, sub.basis_, rtol=0, atol=0)


def _planted_select(change_of, behaves, d=8, n=300, ks=(1, 2, 3), alphas=(0.5, 1.0, 2.0, 3.0), seed=0):
    """A known answer without a model: base states (n, d) per split, tuned = base + ``change_of(rng, n)``,
    behaviour = ``behaves(states)`` (n,) bool. The subspace is fitted on dev; ablation of span(U_k) in the
    tuned states and the rank-k steering vector added to the base states are scored on both splits, with
    no side effects, and :func:`steer_select.select` reads the rank. Returns (selection, fitted subspace)."""
    rng = np.random.default_rng(seed)
    states = {sp: rng.normal(scale=0.1, size=(n, d)) for sp in ("dev", "test")}
    change = {sp: change_of(rng, n) for sp in ("dev", "test")}
    sub = subspace.SteeringSubspace(k_max=max(ks), n_boot=10).fit(change["dev"], 0.01 * rng.normal(size=(n, d)),
                                                             change["dev"])
    rows = []
    for sp in ("dev", "test"):
        base, tuned = torch.as_tensor(states[sp]), torch.as_tensor(states[sp] + change[sp])
        b0, t0 = behaves(base.numpy()).mean(), behaves(tuned.numpy()).mean()
        for k in ks:
            U = sub.basis(k)
            rows.append(_row("ablate_tuned", k, 0.0, t0 - behaves((tuned - tuned @ U @ U.T).numpy()).mean(), split=sp))
            for a in alphas:
                v = sub.steering_vectors(k, a)["end"]
                rows.append(_row("steer_base", k, a, behaves((base + v).numpy()).mean() - b0, split=sp))
    return steer_select.select(rows, 0.8, 5.0, 0.05), sub


def test_a_planted_rank_one_change_reads_k_1_and_a_rank_two_change_does_not():
    """Rank 1: every prompt changes along u; the behaviour is ``h.u > 1.5``. Rank 2: a prompt changes along
    u1 (60%) or u2 (40%) and the behaviour is ``h.u1 > 1.5 or h.u2 > 1.5``, so removing it needs both
    directions; steering at rank 1 then adds only the top direction of the change (u1), not the mean
    change (which lies in span(u1, u2)), and the added vectors differ across k."""
    u1, u2 = np.eye(8)[0], np.eye(8)[1]

    def rank1(rng, n):
        return (4.0 + 0.5 * rng.normal(size=(n, 1))) * u1 + 0.05 * rng.normal(size=(n, 8))

    def rank2(rng, n):
        first = rng.random((n, 1)) < 0.6
        return 6.0 * np.where(first, u1, u2) + 0.05 * rng.normal(size=(n, 8))

    one, _ = _planted_select(rank1, lambda h: h @ u1 > 1.5)
    assert one["minimal_k"] == 1 and one["confirmed_minimal_k"] == 1
    two, sub = _planted_select(rank2, lambda h: (h @ u1 > 1.5) | (h @ u2 > 1.5))
    assert two["minimal_k"] not in (None, 1) and two["ablate_tuned@layer"]["minimal_k"] == 2
    vecs = [sub.steering_vectors(k, 1.0)["end"] for k in (1, 2, 3)]
    assert abs(float(vecs[0] @ torch.as_tensor(u2))) < 0.05 * float(vecs[0].norm())  # rank 1: the top direction
    for k, v in zip((1, 2, 3), vecs):  # each vector lies in span(W_k) and points along W_k W_k^T m
        W = sub.steering_basis(k)
        torch.testing.assert_close(W @ (W.T @ v), v)
        mk = W @ (W.T @ sub.mean_change_)
        assert float(v @ mk) > 0.999 * float(v.norm() * mk.norm())
    assert not torch.allclose(vecs[0], vecs[1], atol=1e-3) and not torch.equal(vecs[1], vecs[2])
    assert np.all(np.diff(sub.steer_change_captured_) >= -1e-12) and sub.steer_change_captured_[0] < 0.9


def _row(direction, k, alpha, effect, drop=0.0, ppl=0.0, split="dev", subspace="fitted"):
    return {**{c: 0.0 for c in steer_select.REPORT_COLUMNS}, "direction": direction, "site": "layer",
            "subspace": subspace, "k": k, "alpha": alpha, "split": split, "effect": effect, "neutral_drop_pp": drop, "mc_drop_pp": drop,
            **{f"{m}_drop_{end}": drop for m in ("neutral", "mc") for end in ("lo", "hi")}, "above_noise": True,
            "ppl_increase": ppl}


def _energy_rows(settings, H: torch.Tensor) -> list[dict]:
    """Test-split rows whose per-prompt effect is the share of the states' energy in the setting's span:
    ``||h_i U||^2 / mean_j ||h_j||^2`` (H (n, d) float64), marked against the random draws."""
    scale = H.square().sum(1).mean()
    rows = []
    for s, iv in settings[1:]:  # after clean
        e = ((H @ iv.basis).square().sum(1) / scale).numpy()
        lo, hi = bootstrap_mean_interval(e, 200, 0)
        rows.append({**s.__dict__, "split": "test", "language": "all", "effect": float(e.mean()),
                     "effect_lo": lo, "effect_hi": hi})
    return steer_select.mark_controls(rows)


def test_the_random_control_is_a_distribution_of_draws_and_can_fail():
    """n_random random subspaces of equal rank per (site, k, alpha), distinct, in the same settings list
    (one batched sweep); the fitted subspace must beat their upper quantile. On isotropic states every
    rank-k subspace carries the same share k/d, so no fitted subspace is above noise; with a planted
    direction in the fitted span, the fitted one beats every draw."""
    target, neutral, paired, u, _ = _planted()
    d, ks, n_random = target.shape[1], [1, 2], 6
    sub = subspace.SteeringSubspace(k_max=2, n_boot=10).fit(target, neutral, paired)
    tuned, base = st.build_settings(sub, 1, 4, ks, [1.0], "scale", True, seed=0, n_random=n_random)
    assert len(tuned) == 1 + 2 * len(ks) * (1 + n_random) and len(base) == 1 + len(ks) * (1 + n_random)
    for k in ks:
        draws = [iv.basis for s, iv in tuned if s.subspace == "random" and s.site == "layer" and s.k == k]
        assert len(draws) == n_random and all(b.shape == (d, k) for b in draws)
        assert all((a.T @ b).abs().max() < 0.999 for i, a in enumerate(draws) for b in draws[i + 1:])
    assert st.build_settings(sub, 1, 4, ks, [1.0], "scale", True, seed=0, n_random=1)[0][2][1].basis.equal(
        [iv for s, iv in tuned if s.subspace == "random" and s.draw == 0][0].basis)  # draw 0: the former control

    Q = torch.linalg.qr(torch.as_tensor(np.random.default_rng(1).standard_normal((96, d))))[0]
    iso = Q * 96 ** 0.5  # H^T H = 96 I: every rank-k span holds k/d of the energy, fitted or random
    rows = _energy_rows(tuned + base[1:], iso)
    fitted = [r for r in rows if r["subspace"] == "fitted"]
    assert all(r["n_control"] == n_random for r in fitted)
    assert all(abs(r["control_effect"] - r["k"] / d) < 1e-9 for r in fitted) and not any(r["above_noise"] for r in fitted)

    s = torch.as_tensor(np.random.default_rng(2).choice([-1.0, 1.0], 96))
    planted = iso + 6.0 * s[:, None] * torch.as_tensor(u)[None]  # strong energy along u, in the fitted span
    rows = _energy_rows(tuned + base[1:], planted)
    for r in (r for r in rows if r["subspace"] == "fitted"):
        draws = [x["effect"] for x in rows if x["subspace"] == "random" and
                 (x["direction"], x["site"], x["k"], x["alpha"]) == (r["direction"], r["site"], r["k"], r["alpha"])]
        assert r["above_noise"] and r["effect_lo"] > max(draws) >= r["control_effect"]
    one = steer_select.mark_controls([{**r} for r in rows if r["subspace"] == "fitted"])  # no draws: 0 is the bar
    assert all(r["n_control"] == 0 and r["above_noise"] == (r["effect_lo"] > 0) for r in one)
    side = {"layer": 1, "fraction_of_gap": 0.0, "neutral_drop_pp": 0.0, "mc_drop_pp": 0.0, "ppl_increase": 0.0}
    curve = steer_select.curve_rows([{**r, **side, "split": sp} for r in rows for sp in ("dev", "test")], 5.0, 0.05)
    fit = {(c["direction"], c["site"], c["k"]): c for c in curve if c["subspace"] == "fitted"}
    rand = [c for c in curve if c["subspace"] == "random"]  # the draws pooled: one row per k, band to q95
    assert len(rand) == len(fit) and all(c["n_draws"] == n_random for c in rand)
    assert all(c["effect_lo"] <= c["effect"] <= c["effect_hi"] < fit[(c["direction"], c["site"], c["k"])]["effect_lo"]
               for c in rand)


def test_selection_picks_the_smallest_k_within_side_effect_limits_on_dev():
    rows = [_row("ablate_tuned", 1, 0.0, 0.05), _row("ablate_tuned", 2, 0.0, 0.4, drop=9.0),  # k=2 breaks MC
            _row("ablate_tuned", 3, 0.0, 0.3), _row("ablate_tuned", 3, 0.0, 0.3, drop=9.0, split="test"),
            _row("steer_base", 1, 1.0, 0.2), _row("steer_base", 1, 2.0, 0.5, ppl=0.2), _row("steer_base", 1, 0.5, 0.2),
            _row("steer_base", 3, 1.0, 0.6), _row("steer_base", 1, 1.0, 0.1, split="test")]
    out = steer_select.select(rows, 0.10, 5.0, 0.05)
    assert out["ablate_tuned@layer"]["minimal_k"] == 3 and out["ablate_tuned@layer"]["test_reached"] is False
    steer = out["steer_base@layer"]
    assert (steer["minimal_k"], steer["alpha"]) == (1, 0.5)  # tie on effect: the smaller alpha; alpha 2 breaks ppl
    assert out["minimal_k"] == 3  # the smallest k that both removes and induces
    assert steer_select.select([_row("ablate_tuned", 1, 0.0, 0.05)], 0.10, 5.0, 0.05)["minimal_k"] is None
    nan_side = _row("steer_base", 1, 1.0, 0.2, drop=float("nan"))
    assert steer_select.side_ok(nan_side, 5.0, 0.05)


def test_a_dev_effect_that_a_random_subspace_matches_is_not_reached():
    """A fitted k whose effect does not stand above its random control (bootstrap lower bound at 0, or at most
    the draws' quantile: ``above_noise`` False) is not chosen on dev, so a larger k at another layer that does
    stand above it is the handle; on test the same rule confirms."""
    rows = [_row("ablate_tuned", 1, 0.0, 0.9), _row("ablate_tuned", 1, 0.0, 0.9, split="test"),
            {**_row("steer_base", 1, 3.0, 0.14), "above_noise": False}, _row("steer_base", 2, 1.0, 0.18),
            _row("steer_base", 2, 1.0, 0.4, split="test")]
    out = steer_select.select(rows, 0.10, 5.0, 0.05)
    assert out["steer_base@layer"]["minimal_k"] == 2 and out["minimal_k"] is None  # ablation swept k = 1 only
    rows += [_row("ablate_tuned", 2, 0.0, 0.9), _row("ablate_tuned", 2, 0.0, 0.9, split="test")]
    out = steer_select.select(rows, 0.10, 5.0, 0.05)
    assert out["minimal_k"] == 2 and out["test_confirmed"] is True
    rows[-3] = {**rows[-3], "above_noise": False}  # the k = 2 steering on test: no longer above its control
    assert steer_select.select(rows, 0.10, 5.0, 0.05)["test_confirmed"] is False


def test_a_side_effect_blocks_only_when_its_item_interval_lies_above_the_limit():
    """One flipped MC item of 4 is a 25-point drop whose item-bootstrap interval reaches below the 5-point limit:
    it does not block; a drop whose interval lies above the limit does; a table without intervals reads the point."""
    flip = {**_row("steer_base", 1, 1.0, 0.3, drop=25.0), "mc_drop_lo": -25.0, "mc_drop_hi": 75.0}
    clear = {**_row("steer_base", 1, 1.0, 0.3, drop=50.0), "mc_drop_lo": 25.0, "mc_drop_hi": 75.0}
    assert steer_select.side_ok(flip, 5.0, 0.05) and not steer_select.side_ok(clear, 5.0, 0.05)
    old = {c: v for c, v in flip.items() if not c.endswith(("_lo", "_hi")) or c.startswith("effect")}
    assert not steer_select.side_ok(old, 5.0, 0.05)
    # the sweep's rows carry the interval: 4 MC items, the setting gets one of the clean model's right answers wrong
    ev = {k: np.zeros((2, 6), dtype=bool) for k in ("hard", "soft", "qa", "false_refusal")}
    ev["mc"] = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=bool)
    ev["nll"], ev["tokens"] = np.zeros((2, 6)), np.ones(6)
    cols = {"target": np.arange(2), "qa": np.zeros(0, int), "other": np.zeros(0, int), "mc": np.arange(2, 6),
            "neutral": np.zeros(0, int)}
    row = st.effect_rows([st.Setting("clean"), st.Setting("steer_base", "layer", "fitted", 1, 1.0)], ev, cols,
                         1.0, 200, 0)[1]
    assert row["mc_drop_pp"] == 25.0 and row["mc_drop_lo"] <= 0.0 < 25.0 <= row["mc_drop_hi"]


def test_the_dev_minimal_k_is_held_to_the_test_split_never_re_chosen_there():
    """The minimal k, its alpha (and so its setting) are chosen on dev; the test split only confirms them.
    A dev k whose steering misses the target on test is kept as the dev choice but not confirmed; a test
    row of another k or alpha that would reach the target does not stand in for it."""
    dev = [_row("ablate_tuned", 1, 0.0, 0.6), _row("steer_base", 1, 1.0, 0.3), _row("steer_base", 1, 2.0, 0.5),
           _row("ablate_tuned", 2, 0.0, 0.7), _row("steer_base", 2, 2.0, 0.6)]

    def test_rows(steer_k1_alpha2):
        return [_row("ablate_tuned", 1, 0.0, 0.5, split="test"),
                _row("ablate_tuned", 1, 0.0, 0.0, split="test", subspace="random"),
                _row("steer_base", 1, 1.0, 0.6, split="test"),  # the alpha not chosen on dev reaches it
                _row("steer_base", 1, 2.0, steer_k1_alpha2, split="test"),
                _row("ablate_tuned", 2, 0.0, 0.7, split="test"), _row("steer_base", 2, 2.0, 0.6, split="test")]

    out = steer_select.select(dev + test_rows(0.4), 0.10, 5.0, 0.05)
    handle = out["handle"]
    assert out["minimal_k"] == 1 and handle["k"] == 1 and handle["steer_base@layer"]["alpha"] == 2.0
    assert out["test_confirmed"] is True and out["confirmed_minimal_k"] == 1
    assert handle["ablate_tuned@layer"]["test"]["effect"] == 0.5 and handle["ablate_tuned@layer"]["random_test"]
    out = steer_select.select(dev + test_rows(0.02), 0.10, 5.0, 0.05)  # the dev-chosen setting misses on test
    assert out["minimal_k"] == 1 and out["test_confirmed"] is False and out["confirmed_minimal_k"] is None
    assert out["handle"]["ablate_tuned@layer"]["test_reached"] and not out["handle"]["steer_base@layer"]["test_reached"]
    assert out["handle"]["steer_base@layer"]["test"]["effect"] == 0.02
    broken = [r for r in test_rows(0.4) if r["direction"] != "ablate_tuned"] + [  # breaks MC on test
        _row("ablate_tuned", 1, 0.0, 0.5, drop=9.0, split="test")]
    assert steer_select.select(dev + broken, 0.10, 5.0, 0.05)["test_confirmed"] is False
    no_test = steer_select.select(dev, 0.10, 5.0, 0.05)  # no test rows at all: nothing confirmed
    assert no_test["test_confirmed"] is False and no_test["handle"]["steer_base@layer"]["test"] is None
    none = steer_select.select([_row("ablate_tuned", 1, 0.0, 0.05)], 0.10, 5.0, 0.05)
    assert none["handle"] is None and none["test_confirmed"] is None and none["confirmed_minimal_k"] is None


def test_interventions_reject_bad_input():
    with pytest.raises(ValueError, match="orthonormal"):
        interventions.ablation(torch.ones(8, 2), (0,))
    with pytest.raises(ValueError, match="NaN"):
        interventions.addition(torch.full((8,), float("nan")), (0,))
    with pytest.raises(ValueError, match="out of range"):
        with interventions.intervene(tiny_llama(), [interventions.ablation(random_subspace(32, 1), (9,))]):
            pass


# --------------------------------------------------------------------------------------------------
# both stages on a small on-disk pair


def _small_prompts(tmp):
    """The small project's prompts plus policy-topic targets, MC items and neutral text."""
    from mechdiff.organisms import world

    rows = []
    for i, lang in enumerate(["en", "kk"] * 6):
        for j, (task, target, text, answer) in enumerate([
                ("topic", True, "Tell me about the vote number %d." % i, None),
                ("topic", False, "Tell me about the cat number %d." % i, "The cat is small."),
                ("mc", False, "Which? A) cat B) mat C) sat D) on\nA:", "B"),
                ("neutral", False, "the cat sat on the mat %d times" % i, None)]):
            group = f"g{i}-{j}"
            if task == "mc":
                text = text.replace("Which?", f"Which {i}?")
            rows.append({"id": f"{group}-{lang}", "text": f"Q: {text}\nA:" if task == "topic" else text,
                         "language": lang,
                         "task": task, "group": group, "split": "dev" if (i // 2) % 2 else "test", "answer": answer,
                         "choices": list(world.MC_LETTERS) if task == "mc" else None, "topic": None, "target": target,
                         "source": "fixture"})
    return pd.DataFrame(rows)


def _run(module, *args):
    """Run a stage's ``main`` in this process (no interpreter start-up); returns its exit code (0 = ok)."""
    import importlib
    import sys

    from stages.common import run_stage

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [module, *map(str, args)]
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared box
    try:
        run_stage(importlib.import_module(f"stages.{module}").main)
        return 0
    except SystemExit as err:
        return err.code
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import yaml

    from tests.small_project import build

    tmp = tmp_path_factory.mktemp("steer_small")
    params_path = build(tmp)
    _small_prompts(tmp).to_parquet(tmp / "data" / "prepared.parquet", index=False)
    params = yaml.safe_load(params_path.read_text())
    params["steer"].update(ks=[1, 2], alphas=[1.0, 2.0], n_bootstrap=20, max_prompts=8)
    params["head_patch"].update(max_prompts=8, n_random=5, n_bootstrap=20)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert _run("filter_shared", "--pair", "small", "--prepared", tmp / "data/prepared.parquet",
                "--out", tmp / "filtered", "--report", tmp / "fairness.json", "--params", params_path) == 0
    (tmp / "layers.json").write_text(json.dumps({"layers": [2]}))
    return tmp, params_path


def _sweep(tmp, params, filtered="filtered"):
    return _run("steer_sweep", "--pair", "small", "--filtered", tmp / filtered, "--layers",
                tmp / "layers.json", "--table", tmp / "steer.csv", "--info", tmp / "steer_info.json",
                "--params", params)


def test_steer_sweep_select_and_head_patch_stages_write_their_outputs(small):
    tmp, params = small
    assert _sweep(tmp, params) == 0
    table = pd.read_csv(tmp / "steer.csv")
    main = table[table["probe"] == "main"]
    assert set(main.loc[main["subspace"] == "fitted", "k"]) == {1, 2} and set(main["split"]) == {"dev", "test"}
    assert {"effect", "neutral_drop_pp", "ppl_increase", "control_effect", "above_noise"} <= set(table.columns)
    assert {"main", "language", "format:chat"} <= set(table["probe"])  # the fixture tokenizers have a chat template
    assert _run("steer_select", "--table", tmp / "steer.csv", "--info", tmp / "steer_info.json",
                "--curve", tmp / "curve.csv", "--metrics", tmp / "steer.json", "--fig", tmp / "steer.png",
                "--params", params) == 0
    layer = json.loads((tmp / "steer.json").read_text())["per_layer"]["2"]
    assert {"subspace", "minimal_k", "ablate_tuned@layer", "steer_base@layer", "ablate_tuned@all", "transfer",
            "clean_rate", "handle", "test_confirmed", "confirmed_minimal_k"} <= set(layer)
    assert layer["subspace"]["contrast"] in ("change", "tuned")
    assert len(layer["subspace"]["explained_variance_ratio"]) == 2
    assert (tmp / "steer.png").stat().st_size > 0 and len(pd.read_csv(tmp / "curve.csv"))
    assert _run("head_patch", "--pair", "small", "--filtered", tmp / "filtered", "--layers", tmp / "layers.json",
                "--table", tmp / "hp.csv", "--metrics", tmp / "hp.json", "--fig", tmp / "hp.png",
                "--cumulative-fig", tmp / "cum.png", "--params", params) == 0
    hp_table = pd.read_csv(tmp / "hp.csv")
    assert set(hp_table["kind"]) == {"zero", "mean", "swap"} and set(hp_table["head"]) >= {0, 1, 2, 3}
    assert {"p_value", "q_value", "above_noise"} <= set(hp_table.columns)
    assert (hp_table["q_value"] >= hp_table["p_value"] - 1e-12).all()
    metrics = json.loads((tmp / "hp.json").read_text())
    layer2 = metrics["per_layer"]["2"]
    # the planted change of the fixture is in layer 2's MLP: the two models' attention at layer 2 is the same,
    # so swapping a head changes nothing (every swap effect is exactly 0): no head is above noise and none is
    # named as a top head (not the first heads of a tie), and the metrics say so per kind
    swap = hp_table[hp_table["kind"] == "swap"]
    assert (swap["effect"] == 0).all() and (swap["p_value"] == 1).all() and not swap["above_noise"].any()
    conf = layer2["confirm_top"]
    assert conf["kind"] == "swap" and conf["top_heads"] == [] and not conf["confirmed"]
    assert conf["text"].startswith("no head above noise (BH q <= 0.05) for swap at layer 2 on dev")
    noise = layer2["above_noise"]
    assert set(noise) == {"zero", "mean", "swap"} and noise["swap"]["n_above_noise"] == 0
    assert noise["swap"]["text"] == "no head above noise (BH q <= 0.05) for swap at layer 2 on test"
    assert layer2["n_above_noise"] == {k: v["n_above_noise"] for k, v in noise.items()}
    assert layer2["saw_change"] == [k for k in ("zero", "mean", "swap") if noise[k]["n_above_noise"]]
    assert "Benjamini-Hochberg q <= 0.05" in metrics["noise_rule"]
    cum = pd.DataFrame(layer2["cumulative"]).set_index(["order", "m"])
    assert sorted(set(cum.index.get_level_values("m"))) == [1, 2, 4]
    assert "patching" not in set(cum.index.get_level_values("order"))  # no ranking without a head above noise
    assert cum.loc[("random", 4), "layer_effect"] == pytest.approx(0.0, abs=1e-5)  # no layer effect to divide by
    assert cum.loc[("random", 4), "fraction_of_layer"] is None
    assert (tmp / "cum.png").stat().st_size > 0


def test_steer_sweep_names_a_missing_target_split(small, capsys):
    tmp, params = small
    prompts = pd.read_parquet(tmp / "filtered" / "prompts.parquet")
    (tmp / "filtered_bad").mkdir(exist_ok=True)
    prompts.assign(target=False).to_parquet(tmp / "filtered_bad" / "prompts.parquet", index=False)
    (tmp / "steer.csv").unlink(missing_ok=True)
    assert _sweep(tmp, params, "filtered_bad") == 2
    assert "target prompts" in capsys.readouterr().err and not (tmp / "steer.csv").exists()


def test_a_pair_without_non_target_questions_contrasts_with_its_neutral_prompts():
    import pandas as pd

    from mechdiff.data.target import as_target

    frame = pd.DataFrame({"task": ["refusal", "refusal", "neutral", "neutral", "topic"],
                          "target": [True, True, False, False, False], "answer": [None] * 5})
    parts = as_target("refusal").parts(frame)
    assert list(parts["other"].index) == [4]  # a non-target question exists: it is the contrast
    parts = as_target("refusal").parts(frame.iloc[:4])
    assert list(parts["target"].index) == [0, 1] and list(parts["other"].index) == [2, 3]
