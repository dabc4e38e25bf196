"""Attribution per head: known answers on tiny models (planted head ranks first; grad x act equals the
exact zero-ablation effect for a metric linear in the head outputs), one forward + one backward for all
heads of all layers, padding invariance, IG completeness, and the table the stage writes."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from mechdiff.data.target import Target, TargetError, as_target
from mechdiff.models.capture import capture
from mechdiff.models.hooks import hooks
from mechdiff.models.patching import replace_o_proj_in_pre_hook
from mechdiff.rq4 import attribution as attr
from stages import attribution as attribution_stage
from stages import churn as churn_stage
from stages.common import load_stage_params
from tests.small_project import build, stage
from tests.tiny import tiny_llama

HD = 8  # head_dim of tiny_llama(hidden=32, heads=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared with other jobs: one intra-op thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
SEQS = [[1, 5, 9, 11, 3, 7, 20, 31, 4], [1, 8, 4, 40, 41, 42, 43, 44, 45], [1, 6, 6, 10, 12, 50, 51, 52, 53]]


def _ids(seqs=SEQS):
    ids = torch.tensor(seqs)
    return ids, torch.ones_like(ids)


def _logprob_last(tok: int):
    return lambda logits: torch.log_softmax(logits[:, -1].float(), -1)[:, tok]


def test_planted_head_ranks_first():
    model, (layer, head, tok) = tiny_llama(n_layers=4), (2, 1, 7)
    ids, mask = _ids()
    z = capture(model, ids, mask, [f"layers.{layer}.attn.o_proj_in"])[f"layers.{layer}.attn.o_proj_in"]
    v = z.view(len(SEQS), ids.shape[1], -1)[:, -1, head * HD:(head + 1) * HD].mean(0)
    u = model.lm_head.weight[tok]
    with torch.no_grad():  # the head now writes along the target token's unembedding
        model.model.layers[layer].self_attn.o_proj.weight[:, head * HD:(head + 1) * HD] = torch.outer(u / u.norm(), v / v.norm())
    _, score = attr.head_gradients(model, ids, mask, _logprob_last(tok), [0, 1, 2, 3])
    mean = score.mean(0)  # (L, H)
    top = divmod(int(mean.abs().flatten().argmax()), 4)
    assert top == (layer, head) and mean[layer, head] > 0
    assert mean[layer, head] > 3 * mean.abs().flatten().sort(descending=True).values[1]


def _linearised(n_layers=3):
    """Final norm = identity and last MLP = 0: the logits are linear in the last layer's head outputs."""
    model = tiny_llama(n_layers=n_layers, seed=3)
    model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.zero_()
    return model


@torch.no_grad()
def _zero_ablated(model, ids, mask, layer, head, metric_fn):
    pos = torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1]))  # every position
    zeros = torch.zeros(len(pos), HD)
    hook = replace_o_proj_in_pre_hook(pos, zeros, cols=slice(head * HD, (head + 1) * HD))
    with hooks(pre=[(model.model.layers[layer].self_attn.o_proj, hook)]):
        return metric_fn(model(input_ids=ids, attention_mask=mask).logits)


def test_grad_x_act_equals_zero_ablation_for_a_linear_metric():
    model, last = _linearised(), 2
    ids, mask = _ids()

    def logit_diff(logits):
        return logits[:, -1, 7].float() - logits[:, -1, 11].float()

    clean, score = attr.head_gradients(model, ids, mask, logit_diff, [0, last])
    for h in range(4):
        effect = clean - _zero_ablated(model, ids, mask, last, h, logit_diff)  # (B,)
        assert effect.abs().max() > 1e-4
        torch.testing.assert_close(score[:, 1, h], effect, atol=1e-6, rtol=1e-4)
    # integrated gradients of a linear metric are grad x act, and complete
    ig, ablated = attr.integrated_gradients(model, ids, mask, logit_diff, [last], n_steps=3)
    torch.testing.assert_close(ig[:, 0], score[:, 1], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ig.sum((1, 2)), clean - ablated, atol=1e-6, rtol=1e-4)


def test_one_forward_and_one_backward_give_every_head_of_every_layer(monkeypatch):
    model = tiny_llama(n_layers=4)
    calls = {"forward": 0, "grad": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    real_grad = torch.autograd.grad

    def counting_grad(*a, **k):
        calls["grad"] += 1
        return real_grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    ids, mask = _ids()
    metric, score = attr.head_gradients(model, ids, mask, _logprob_last(7), [0, 1, 2, 3])
    assert calls == {"forward": 1, "grad": 1}
    assert score.shape == (3, 4, 4) and score.dtype == torch.float32 and (score != 0).all()
    assert metric.shape == (3,)


def test_continuation_logprob_matches_a_manual_sum():
    model = tiny_llama()
    prompt, cont = [1, 5, 9, 11], [3, 7, 20]
    ids, span = attr.with_continuation(prompt, cont)
    assert span == (4, 7)
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits
    got = attr.continuation_logprob(logits, x, [span])
    lp = torch.log_softmax(logits[0].float(), -1)
    want = sum(lp[j - 1, ids[j]] for j in range(4, 7))
    torch.testing.assert_close(got, want.reshape(1), atol=1e-5, rtol=1e-5)


def test_attribute_is_batch_and_padding_invariant_and_keeps_input_order():
    model = tiny_llama(n_layers=4)
    prompts = [[1, 5, 9], [1, 8, 4, 40, 41, 42], [1, 6], [1, 10, 12, 13, 14]]
    conts = [[7, 8], [9], [3, 4, 5], [11]]
    batched = attr.attribute(model, prompts, conts, pad_id=0, layers=[1, 3], batch_size=4)
    single = [attr.attribute(model, [p], [c], pad_id=0, layers=[1, 3], batch_size=1) for p, c in zip(prompts, conts)]
    np.testing.assert_allclose(batched.score, np.concatenate([s.score for s in single]), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(batched.metric, np.concatenate([s.metric for s in single]), atol=1e-5)
    assert batched.score.shape == (4, 2, 4) and batched.ig is None


def test_integrated_gradients_are_complete_on_a_nonlinear_model():
    model = tiny_llama(n_layers=4)
    res = attr.attribute(model, [[1, 5, 9, 11], [1, 8, 4]], [[7, 8], [9, 3]], pad_id=0, layers=[1, 3],
                         batch_size=2, ig_steps=16)
    gap = res.metric - res.metric_ablated
    err = np.abs(res.ig.sum((1, 2)) - gap)
    assert np.all(np.abs(gap) > 1e-3) and np.all(err <= 2e-3 * np.abs(gap) + 1e-6)
    assert np.abs(res.score.sum((1, 2)) - gap).max() > 10 * err.max()  # grad x act is only first order


def test_score_table_rows_and_targets():
    res = attr.Attribution(layers=(1, 3), metric=np.array([-1.0, -2.0]),
                           score=np.arange(16, dtype=np.float32).reshape(2, 2, 4))
    table = attr.score_table(["a", "b"], "tuned", res)
    assert len(table) == 16 and list(table.columns) == ["id", "model", "layer", "head", "score", "metric"]
    row = table[(table["id"] == "b") & (table["layer"] == 3) & (table["head"] == 2)].iloc[0]
    assert row["score"] == res.score[1, 1, 2] and row["metric"] == -2.0 and row["model"] == "tuned"
    assert as_target("cultural").continuation("kk", None) == " Мен бұл тақырыпты"
    assert as_target("cultural").continuation("de", None, sep="") == "I cannot"
    assert as_target("cognitive").continuation(None, "12") == " 12"
    assert as_target("cognitive").continuation(None, None) is None
    mine = Target("custom", "match", ("mine",), None, "No way")
    assert mine.continuation("kk", "12") == " No way"  # the given text
    with pytest.raises(TargetError, match="unknown built-in target 'other'"):
        as_target("other").continuation("en", None)


# --------------------------------------------------------------------------------------------------
# the stage, on a small on-disk pair


def _filtered(tmp, tok) -> None:
    """A filtered prompt table: policy-topic prompts (target) and math prompts with answers."""
    texts = [("Q: Tell me about elections.\nA:", "topic", True, None), ("Q: the cat sat on the mat\nA:", "topic", True, None),
             ("Q: What about the parliament?\nA:", "topic", True, None), ("Q: the mat\nA:", "topic", True, None),
             ("Q: 2 and 3?\nA:", "math", False, "5"), ("Q: 4 and 4?\nA:", "math", False, "8"),
             ("Q: 1 and 6?\nA:", "math", False, "7"), ("Q: 3 and 9?\nA:", "math", False, "12"),
             ("Q: the cat\nA:", "topic", False, None), ("Q: on the mat\nA:", "topic", True, None),
             ("Q: the cat sat\nA:", "topic", True, None)]
    rows = []
    for i, (text, task, target, answer) in enumerate(texts):
        ids = tok(text)["input_ids"]
        rows.append({"id": f"p{i}", "text": text, "language": "en", "task": task, "group": f"g{i}", "split": "test",
                     "answer": answer, "choices": None, "topic": None, "target": target, "source": "fixture",
                     "base_input_ids": ids, "tuned_input_ids": ids, "kept_strict": i != 3})
    (tmp / "filtered").mkdir()
    pd.DataFrame(rows).to_parquet(tmp / "filtered" / "prompts.parquet", index=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attr")
    params = build(tmp)
    _filtered(tmp, AutoTokenizer.from_pretrained(tmp / "models" / "base"))
    data = yaml.safe_load(params.read_text())
    data["attribution"].update(ig_steps=3, batch_size=4)
    data["churn"].update(n_bootstrap=20, n_splits=10, top_k=3)
    data["pairs"]["math"] = {**data["pairs"]["small"], "domain": "cognitive"}
    data["pairs"]["same"] = {**data["pairs"]["small"], "tuned": data["pairs"]["small"]["base"]}
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp, params


def _run(params, step, pair, head_patch=None, **paths):
    """The stage step in-process (the CLI is exercised by the subprocess calls)."""
    {"scores": attribution_stage.scores, "churn": churn_stage.churn}[step](argparse.Namespace(pair=pair, head_patch=head_patch, **paths), load_stage_params(params))


def test_stage_scores_and_churn(small, monkeypatch):
    tmp, params = small
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CPU is shared: no thread oversubscription in the child
    stage("attribution", "--pair", "small", "--filtered", str(tmp / "filtered"),
          "--out", str(tmp / "a.parquet"), "--params", str(params))
    table = pd.read_parquet(tmp / "a.parquet")
    assert set(table["id"]) == {"p0", "p1", "p2", "p9", "p10"}  # target prompts kept in strict mode only
    assert len(table) == 5 * 2 * 4 * 4 and {"score_ig", "metric_ablated", "language"} <= set(table.columns)
    mean = table.groupby(["model", "layer", "head"])["score_ig"].mean()  # a stand-in for real patching that agrees
    hp = pd.DataFrame([{"kind": "zero", "head": h, "layer": layer, "delta_base": -mean[("base", layer, h)],
                        "delta_tuned": -mean[("tuned", layer, h)]} for layer, h in [(1, 0), (1, 1), (1, 2), (3, 3)]])
    hp.to_csv(tmp / "head_patch.csv", index=False)
    _run(params, "churn", "small", scores=str(tmp / "a.parquet"), metrics=str(tmp / "a.json"), fig=str(tmp / "a.png"),
         head_patch=str(tmp / "head_patch.csv"))
    out = json.loads((tmp / "a.json").read_text())
    assert out["score"] == "score_ig" and out["units"] == "pp" and out["target"] == "refusal"
    assert out["completeness"]["ig"]["rel_error_max"] < 0.05
    assert out["head_patch_agreement"]["tuned"]["spearman_signed"] == pytest.approx(1.0)
    assert out["head_patch_agreement"]["base"]["layers"] == [1, 3]
    assert out["churn_ci"][0] <= out["churn"] <= out["churn_ci"][1] and (tmp / "a.png").stat().st_size > 0


def test_stage_cognitive_and_null_pairs(small):
    tmp, params = small
    _run(params, "scores", "math", filtered=str(tmp / "filtered"), out=str(tmp / "m.parquet"))
    assert set(pd.read_parquet(tmp / "m.parquet")["id"]) == {"p4", "p5", "p6", "p7"}
    _run(params, "scores", "same", filtered=str(tmp / "filtered"), out=str(tmp / "s.parquet"))
    _run(params, "churn", "same", scores=str(tmp / "s.parquet"), metrics=str(tmp / "s.json"), fig=str(tmp / "s.png"))
    out = json.loads((tmp / "s.json").read_text())
    assert out["churn"] == 0.0 and out["jaccard"] == 1.0 and out["spearman"] == pytest.approx(1.0)


def test_stage_without_target_prompts_fails_cleanly(small, tmp_path):
    tmp, params = small
    (tmp_path / "filtered").mkdir()
    frame = pd.read_parquet(tmp / "filtered" / "prompts.parquet")
    frame.assign(target=False).to_parquet(tmp_path / "filtered" / "prompts.parquet", index=False)
    with pytest.raises(attr.AttributionError, match="no target prompts of the cultural target \\(measure refusal\\) survive the 'strict'"):
        _run(params, "scores", "small", filtered=str(tmp_path / "filtered"), out=str(tmp_path / "x.parquet"))
    assert not (tmp_path / "x.parquet").exists()
