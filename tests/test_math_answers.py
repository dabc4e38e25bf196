"""MATH-style answers: references kept as written, judged by math-verify equivalence; GSM8K by exact value;
an answer that cannot be judged scores wrong under a named outcome, never an exception.

The real-file tests read the published MATH-500 and GSM8K test sets from ../shared/real (skipped when that
folder is absent) through the project's own extraction path (:func:`mechdiff.data.prompt_rows.normalise_files`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechdiff.data.answers import OUTCOMES, answer_kind, judge_answer, judge_answers
from mechdiff.params.config import DatasetSpec
from tests.prompt_sources import normalise

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
MATH500 = REAL / "data" / "math" / "math500_test.jsonl"
GSM8K = REAL / "data" / "gsm8k" / "test.jsonl"


def _real(path: Path) -> list[dict]:
    if not path.exists():
        pytest.skip(f"{path} not found: the published test sets live in {REAL} (outside the repository)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _spec(answer_format: str, text: str, answer: str) -> DatasetSpec:
    return DatasetSpec(kind="file", task="math", path="unused.jsonl", language="en",
                       fields={"text": text, "answer": answer}, answer_format=answer_format)


@pytest.fixture(scope="module")
def math500() -> list[dict]:
    return _real(MATH500)


@pytest.fixture(scope="module")
def math500_refs(math500) -> list[str]:
    """The references as prepare_data stores them for ``answer_format: plain``."""
    return normalise(math500, _spec("plain", "problem", "answer"), "math500")["answer"].tolist()


# --------------------------------------------------------------------------------------------------
# references survive extraction


def test_math500_references_come_out_of_extraction_as_written(math500, math500_refs):
    written = [r["answer"] for r in math500]
    assert math500_refs == written  # plain: base-n 52_8, tuple -2,1, 58,500, .35625 unchanged
    boxed = normalise(math500, _spec("boxed", "problem", "solution"), "math500")["answer"].tolist()
    assert boxed == written  # the last \boxed{} of each solution is its answer


def test_gsm8k_references_are_exact_numbers():
    rows = _real(GSM8K)
    refs = normalise(rows, _spec("gsm8k", "question", "answer"), "gsm8k")["answer"].tolist()
    after = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    assert [Decimal(r) for r in refs] == [Decimal(a.replace(",", "")) for a in after]  # commas: thousands
    assert {answer_kind(r, "gsm8k") for r in refs} == {"number"}
    assert {answer_kind(r) for r in refs} == {"number"}  # a plain number implies the exact judge too
    gens = [f"Step by step ... #### {a}" for a in after]  # the reference as GSM8K writes it, commas and all
    assert set(judge_answers(gens, refs, ["number"] * len(refs))) == {"correct"}
    grouped = [f"So she pays ${int(r):,} in total." for r in refs]
    assert set(judge_answers(grouped, refs, ["number"] * len(refs))) == {"correct"}
    off = [f"The answer is {Decimal(r) + 1}." for r in refs]
    assert set(judge_answers(off, refs, ["number"] * len(refs))) == {"wrong"}


# --------------------------------------------------------------------------------------------------
# judging MATH-500 by mathematical equivalence


def test_every_math500_reference_is_a_known_answer(math500_refs):
    """Each reference, boxed at the end of a generation or as the bare generation, is judged correct;
    a clearly different answer is judged wrong."""
    kinds = [answer_kind(r, "plain") for r in math500_refs]
    assert set(kinds) == {"math"}
    t0 = time.perf_counter()
    boxed = judge_answers([f"Step 1: 3 + 4 = 7, so the answer is \\boxed{{{r}}}." for r in math500_refs],
                          math500_refs, kinds)
    took = time.perf_counter() - t0
    assert [r for r, o in zip(math500_refs, boxed) if o != "correct"] == []
    bare = judge_answers([f" {r}" for r in math500_refs], math500_refs, kinds)
    assert [r for r, o in zip(math500_refs, bare) if o != "correct"] == []
    other = judge_answers(["so the answer is \\boxed{123456789}."] * len(math500_refs), math500_refs, kinds)
    assert set(other) == {"wrong"}
    print(f"math-verify judged {len(math500_refs)} MATH-500 generations in {took:.2f} s", file=sys.stderr)


@pytest.mark.parametrize("generation, reference, outcome", [
    (r"\boxed{52_8}", "52_8", "correct"),
    (r"\boxed{528}", "52_8", "wrong"),  # base 8, not the digits run together
    (r"\boxed{-2,1}", "-2,1", "correct"),
    (r"\boxed{-21}", "-2,1", "wrong"),  # a tuple, not a thousands-grouped number
    (r"so \boxed{0.5}", r"\frac{1}{2}", "correct"),
    (r"so \boxed{\dfrac12}", r"\frac{1}{2}", "correct"),
    (r"so \boxed{0.5}", r"\frac12", "correct"),
    (r"so \boxed{\frac{1}{2}}", "0.5", "correct"),
    (r"so \boxed{\frac{1}{3}}", r"\frac{1}{2}", "wrong"),
    (r"\boxed{2} at first, then \boxed{\cot x}", r"\cot x", "correct"),  # the last box is the answer
    (r"\cot x", r"\cot x", "correct"),  # a bare expression is read whole
    ("We get 10 and then 5, so the answer is $5$.", "5", "correct"),
])
def test_math_equivalence(generation, reference, outcome):
    assert judge_answer(generation, reference, "math") == outcome


@pytest.mark.parametrize("generation, reference, outcome", [
    ("The answer is 1,234 dollars.", "1234", "correct"),
    ("#### 18.0", "18", "correct"),
    ("It is 3.5 litres.", "3", "wrong"),  # not the first integer any more
    ("528", "52_8", "reference_unparseable"),  # a base-n reference is no decimal number
])
def test_exact_numbers(generation, reference, outcome):
    assert judge_answer(generation, reference, "number") == outcome


def test_answer_kind_from_format_or_reference():
    assert answer_kind("5", "plain") == "math" and answer_kind("5", "boxed") == "math"
    assert answer_kind(r"\frac{1}{2}", "gsm8k") == "number"  # the format decides; judged it is unparseable
    assert answer_kind("5") == answer_kind("-3.25") == "number"
    assert answer_kind("52_8") == answer_kind("-2,1") == answer_kind("1,234") == answer_kind(r"\cot x") == "math"


# --------------------------------------------------------------------------------------------------
# what cannot be judged is named, never raised


@pytest.mark.parametrize("generation, reference, kind, outcome", [
    (r"\boxed{1}", "", "math", "reference_unparseable"),
    (r"\boxed{1}", None, "math", "reference_unparseable"),
    (r"\boxed{1}", "@@@", "math", "reference_unparseable"),
    ("1", "abc", "number", "reference_unparseable"),
    ("1", None, "number", "reference_unparseable"),
    ("", r"\cot x", "math", "no_answer_in_generation"),
    (None, r"\cot x", "math", "no_answer_in_generation"),
    ("I do not know.", r"\cot x", "math", "no_answer_in_generation"),
    ("no number here", "5", "number", "no_answer_in_generation"),
    (r"so \boxed{", r"\cot x", "math", "generation_unparseable"),
    (r"so \boxed{}", r"\cot x", "math", "generation_unparseable"),
    (r"so \boxed{@@@}", r"\cot x", "math", "generation_unparseable"),
    (r"so \boxed{x}", "5", "number", "generation_unparseable"),
])
def test_unjudgeable_rows_are_named(generation, reference, kind, outcome):
    assert judge_answer(generation, reference, kind) == outcome
    assert outcome in OUTCOMES


def test_unknown_kind_or_timeout_is_a_caller_error():
    with pytest.raises(ValueError, match="answer kind 'letter'"):
        judge_answer("B", "B", "letter")
    with pytest.raises(ValueError, match="whole seconds"):
        judge_answer(r"\boxed{1}", "1", "math", parse_timeout_s=0.5)


def _sleeps(*args, **kwargs):
    time.sleep(30)  # interrupted by math-verify's alarm after its timeout


def test_math_verify_timeouts_are_an_outcome(monkeypatch):
    import math_verify.grader
    import math_verify.parser

    with monkeypatch.context() as m:
        m.setattr(math_verify.parser, "extract_target_from_pred", _sleeps)
        assert judge_answer(r"\boxed{1}", r"\frac{1}{2}", "math", parse_timeout_s=1) == "timeout"
    with monkeypatch.context() as m:
        m.setattr(math_verify.grader, "sympy_expr_eq", _sleeps)
        assert judge_answer(r"\boxed{1}", r"\frac{1}{2}", "math", verify_timeout_s=1) == "timeout"


def test_judging_off_the_main_thread_runs_without_signals():
    got: list = []
    worker = threading.Thread(target=lambda: got.append(judge_answers(
        [r"\boxed{0.5}", r"\boxed{528}", "\\boxed{"], [r"\frac12", "52_8", "1"], ["math"] * 3)))
    worker.start()
    worker.join(60)
    assert got == [["correct", "wrong", "generation_unparseable"]]


# --------------------------------------------------------------------------------------------------
# the behaviour measurement on MATH-style prompts

# MATH-500-like rows (answers as the published file writes them), one reference no judge can read, and a
# GSM8K row: judged by math-verify, by math-verify, ..., by exact value.
_ROWS = [("What is $\\cos x / \\sin x$?", r"\cot x", "math"), ("Write 42 in base 8.", "52_8", "math"),
         ("Solve $x^2 + x - 2 = 0$.", "-2,1", "math"), ("Who ran farthest?", r"\text{Evelyn}", "math"),
         ("Compute $28/6$.", r"\frac{14}{3}", "math"), ("Where is $f > 0$?", "(3,4]", "math"),
         ("Project it.", r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", "math"),
         ("Garbled row.", "@@@", "math"), ("How many apples?", "10", "math"),
         ("She buys 1,234 pens. How many?", "1234", "gsm8k")]


def _math_frame(tok) -> pd.DataFrame:
    def ids(text):
        return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]

    return pd.DataFrame([{"id": f"m{i}", "text": f"Problem: {q}\nAnswer:", "task": "math", "target": False,
                          "answer": a, "language": "en", "source": src, "base_input_ids": ids(f"Problem: {q}\nAnswer:"),
                          "tuned_input_ids": ids(f"Problem: {q}\nAnswer:")} for i, (q, a, src) in enumerate(_ROWS)])


@pytest.mark.usefixtures("one_torch_thread")
def test_behaviour_on_math_prompts_counts_every_row_once():
    from mechdiff.rq1 import behaviour as bg
    from tests.tiny import tiny_llama
    from tests.tokenizers_fixture import base_tokenizer

    tok = base_tokenizer()
    model = tiny_llama(vocab=len(tok), seed=5)
    sets = bg.prompt_sets(_math_frame(tok), answer_formats={"math": "plain", "gsm8k": "gsm8k"})
    assert sets.sizes()["math"] == len(_ROWS)
    assert sets.math["answer_kind"].tolist() == ["math"] * (len(_ROWS) - 1) + ["number"]
    m = bg.measure_model(model, tok, sets, "base_input_ids", batch_size=4)
    counts = bg.math_outcome_counts(m)
    assert list(counts) == list(OUTCOMES) and sum(counts.values()) == len(_ROWS)
    assert counts["reference_unparseable"] == 1  # the garbled reference, whatever the model says
    assert np.array_equal(m["math_correct"], m["math_outcome"] == "correct")
    same = bg.measure_model(model, tok, sets, "tuned_input_ids", batch_size=3)
    assert bg.math_outcome_counts(same) == counts  # the same model on the same prompts
    table = bg.gap_table(m, same, n_boot=20).set_index("measure")
    assert table.loc["math_acc", "n"] == len(_ROWS) and table.loc["math_acc", "delta"] == 0.0


@pytest.mark.usefixtures("one_torch_thread")
def test_behaviour_judges_known_generations_of_math_prompts(monkeypatch):
    """A model that boxes each reference: every row is correct but the one whose reference no judge reads."""
    from mechdiff.rq1 import behaviour as bg
    from tests.tiny import tiny_llama
    from tests.tokenizers_fixture import base_tokenizer

    tok = base_tokenizer()
    sets = bg.prompt_sets(_math_frame(tok), answer_formats={"math": "plain", "gsm8k": "gsm8k"})
    answers = sets.math["answer"].tolist()
    monkeypatch.setattr(bg.measures, "decode_texts", lambda _tok, gen: [f"so \\boxed{{{a}}}" for a in answers])
    m = bg.measure_model(tiny_llama(vocab=len(tok), seed=5), tok, sets, "base_input_ids", batch_size=4)
    assert bg.math_outcome_counts(m) == {**dict.fromkeys(OUTCOMES, 0), "correct": len(_ROWS) - 1,
                                         "reference_unparseable": 1}


def test_behaviour_stage_on_math_prompts_reports_outcomes(tmp_path, monkeypatch, capsys):
    """The stage itself on a tiny on-disk pair whose prompts are MATH-style: no traceback, and
    behaviour.json counts every math prompt under one outcome per model."""
    import yaml

    import stages.behaviour as stage
    from tests.small_project import build
    from tests.tokenizers_fixture import base_tokenizer, extended_tokenizer

    params_path = build(tmp_path)
    params = yaml.safe_load(params_path.read_text())
    params["pairs"]["small"]["datasets"] = {
        "math": {"kind": "file", "task": "math", "path": "unused.jsonl", "language": "en",
                 "fields": {"text": "problem", "answer": "answer"}, "answer_format": "plain"},
        "gsm8k": {"kind": "file", "task": "math", "path": "unused.jsonl", "language": "en",
                  "fields": {"text": "problem", "answer": "answer"}, "answer_format": "gsm8k"}}
    params["behaviour"]["n_bootstrap"] = 20
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    frame = _math_frame(base_tokenizer())
    tt = extended_tokenizer()
    frame["tuned_input_ids"] = [[tt.bos_token_id] + tt(t, add_special_tokens=False)["input_ids"] for t in frame["text"]]
    frame["group"], frame["split"], frame["choices"], frame["topic"] = frame["id"], "test", None, None
    (tmp_path / "filtered").mkdir()
    frame.to_parquet(tmp_path / "filtered" / "prompts.parquet", index=False)
    import torch
    from safetensors.torch import save_file

    from mechdiff.fairness.vocab import compare_vocabularies

    vocab = compare_vocabularies(base_tokenizer(), tt)
    save_file({"base_ids": torch.as_tensor(vocab.base_ids), "tuned_ids": torch.as_tensor(vocab.tuned_ids)},
              str(tmp_path / "filtered" / "id_map.safetensors"))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["behaviour", "--pair", "small", "--filtered", str(tmp_path / "filtered"),
                                      "--table", str(out / "b.csv"), "--metrics", str(out / "b.json"),
                                      "--fig", str(out / "b.png"), "--params", str(params_path)])
    stage.main()
    metrics = json.loads((out / "b.json").read_text())
    assert metrics["measures"]["math_acc"]["n"] == len(_ROWS)
    for side in ("base", "tuned"):
        counts = metrics["math_outcomes"][side]
        assert set(counts) == set(OUTCOMES) and sum(counts.values()) == len(_ROWS)
        assert counts["reference_unparseable"] == 1
    assert "math outcomes base" in capsys.readouterr().out
    mass = metrics["masked_mass"]["en"]  # what the shared-id mask removes, per model, a probability
    assert set(mass) == {"base", "tuned"} and all(0.0 <= v <= 1.0 for v in mass.values())


@pytest.mark.parametrize("gen, outcome", [(r"so \boxed{52_8}", "correct"), (r"\boxed{52_{8}}", "correct"),
                                          ("52_8", "correct"), (r"\boxed{52}", "wrong"), (r"\boxed{528}", "wrong"),
                                          (r"\boxed{42}", "wrong"), (r"\boxed{52_9}", "wrong")])
def test_a_base_n_answer_needs_its_digits_and_its_base(gen, outcome):
    assert judge_answer(gen, "52_8", "math") == outcome


def test_every_base_n_reference_of_math500_is_judged_on_digits_and_base():
    from mechdiff.data.answers import base_n

    refs = [r["answer"] for r in _real(REAL / "data" / "math" / "math500_test.jsonl") if base_n(r["answer"])]
    assert len(refs) >= 5  # the README's 52_8, 40_9, 2516_8, 204_5, 4343_6
    for ref in refs:
        digits, base = base_n(ref)
        assert judge_answer(rf"\boxed{{{ref}}}", ref, "math") == "correct"
        assert judge_answer(rf"\boxed{{{digits}}}", ref, "math") == "wrong"
        assert judge_answer(rf"\boxed{{{digits}_{{{base + 1}}}}}", ref, "math") == "wrong"
