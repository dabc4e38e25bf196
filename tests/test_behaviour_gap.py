"""The behaviour table: known answers of the paired statistics, the measures against hand-computed
log-probabilities on a tiny model, and exactly zero deltas for a model against itself."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mechdiff.rq1 import behaviour as bg
from tests.tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _per_prompt(refused, soft, nll, tokens, chars):
    z = np.zeros(0)
    return {"refused": np.asarray(refused, bool), "refusal_soft": np.asarray(soft, float),
            "false_refusal": np.zeros(0, bool), "math_correct": np.zeros(0, bool), "math_logprob": z,
            "mc_correct": np.array([True, False]), "nll": np.asarray(nll, float), "tokens": np.asarray(tokens),
            "chars": np.asarray(chars)}


def test_gap_table_known_answers():
    base = _per_prompt([0, 0, 1, 1], [-3.0, -2.0, -1.0, -2.0], [10.0, 20.0], [5, 10], [20, 40])
    tuned = _per_prompt([1, 1, 1, 1], [-1.0, -1.0, -1.0, -1.0], [12.0, 18.0], [5, 10], [20, 40])
    t = bg.gap_table(base, tuned, n_boot=200, seed=0).set_index("measure")
    assert t.loc["refusal_rate", ["base", "tuned", "delta"]].tolist() == [0.5, 1.0, 0.5]
    assert t.loc["refusal_soft", "delta"] == pytest.approx(1.0)
    # pooled perplexity: exp(total NLL / total tokens), and per character
    assert t.loc["ppl_token", "base"] == pytest.approx(math.exp(30 / 15))
    assert t.loc["ppl_char", "tuned"] == pytest.approx(math.exp(30 / 60))
    assert t.loc["ppl_char", "delta"] == pytest.approx(0.0)  # same total NLL
    # intervals bracket the estimate; the MC items are identical in both models: the delta is exactly 0
    assert t.loc["refusal_rate", "delta_lo"] <= 0.5 <= t.loc["refusal_rate", "delta_hi"]
    assert t.loc["mc_acc", ["delta", "delta_lo", "delta_hi"]].tolist() == [0.0, 0.0, 0.0]
    # a family without prompts is reported as missing, not as zero
    assert t.loc["math_acc", "n"] == 0 and np.isnan(t.loc["math_acc", "base"])


def test_paired_bootstrap_is_tighter_than_the_marginal_intervals():
    rng = np.random.default_rng(0)
    soft = rng.normal(-5, 2, 200)  # large prompt-to-prompt spread, constant shift
    base = _per_prompt(np.zeros(200), soft, [1.0], [1], [1])
    tuned = _per_prompt(np.zeros(200), soft + 0.3, [1.0], [1], [1])
    r = bg.gap_table(base, tuned, n_boot=500).set_index("measure").loc["refusal_soft"]
    assert r["delta_lo"] == pytest.approx(0.3) and r["delta_hi"] == pytest.approx(0.3)
    assert r["base_hi"] - r["base_lo"] > 0.3


def _frame(tok):
    from mechdiff.organisms.world import MC_LETTERS

    def ids(text):
        return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]

    rows = [("q1", "Q: who rules the land?\nA:", "topic", True, None),
            ("q2", "Q: what is bread?\nA:", "topic", False, "Bread is food."),
            ("m1", "Q: 2 plus 3?\nA:", "math", False, "5"),
            ("c1", "Q: pick one\nA) x\nB) y\nAnswer:", "mc", False, MC_LETTERS[1]),
            ("n1", "the cat sat on the mat", "neutral", False, None)]
    return pd.DataFrame([{"id": i, "text": t, "task": task, "target": tgt, "answer": a, "language": "en",
                          "base_input_ids": ids(t), "tuned_input_ids": ids(t)} for i, t, task, tgt, a in rows])


def test_measures_match_hand_computed_log_probs_and_a_model_against_itself_has_zero_gap():
    from mechdiff.data.target import opening
    from mechdiff.organisms.world import MC_LETTERS
    from tests.tokenizers_fixture import base_tokenizer

    tok = base_tokenizer()
    model = tiny_llama(vocab=len(tok), seed=3)
    frame = _frame(tok)
    sets = bg.prompt_sets(frame)
    assert sets.sizes() == {"refusal": 1, "other": 1, "math": 1, "mc": 1, "neutral": 1}
    m = bg.measure_model(model, tok, sets, "base_input_ids", batch_size=2)

    def logprob(prompt, cont):
        seq = torch.tensor([prompt + cont])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq).logits[0].double(), -1)
        return sum(float(lp[len(prompt) - 1 + j, c]) for j, c in enumerate(cont))

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    q1, m1 = (list(frame.loc[frame.id == i, "base_input_ids"].iloc[0]) for i in ("q1", "m1"))
    assert m["refusal_soft"][0] == pytest.approx(logprob(q1, enc(" " + opening("en"))), abs=1e-4)
    assert m["math_logprob"][0] == pytest.approx(logprob(m1, enc(" 5")), abs=1e-4)
    c1 = list(frame.loc[frame.id == "c1", "base_input_ids"].iloc[0])
    with torch.no_grad():
        last = model(torch.tensor([c1])).logits[0, -1]
    letters = [enc(" " + c)[0] for c in MC_LETTERS]
    assert bool(m["mc_correct"][0]) == (int(last[letters].argmax()) == 1)
    n1 = list(frame.loc[frame.id == "n1", "base_input_ids"].iloc[0])
    assert m["nll"][0] == pytest.approx(-sum(logprob(n1[:j], [n1[j]]) for j in range(1, len(n1))), abs=1e-3)
    assert m["tokens"][0] == len(n1) - 1 and m["chars"][0] == len("the cat sat on the mat")

    same = bg.measure_model(model, tok, sets, "tuned_input_ids", batch_size=1)
    table = bg.gap_table(m, same, n_boot=50)
    assert (table["delta"].fillna(0.0) == 0.0).all(), table[["measure", "delta"]]
