"""A pair's target (mechdiff.data.target, pairs.<pair>.target): built-ins equal the domain rules they replace,
user targets select by dataset, and params mistakes are one clear error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from mechdiff.data.target import BUILTIN, Target, TargetError, as_target, resolve
from mechdiff.models.measures import judge
from mechdiff.params.config import ParamsError, load_params
from mechdiff.params.pair import add_pair, custom_target
from mechdiff.rq4 import attribution as attr
from tests.small_project import ROOT

TEXT = (ROOT / "params.yaml").read_text(encoding="utf-8")


def _frame() -> pd.DataFrame:
    rows = [  # (task, target flag, answer, source, language)
        ("topic", True, None, "world", "en"), ("topic", True, None, "world", "kk"), ("topic", False, "7", "world", "en"),
        ("freeform", False, None, "world", "en"), ("refusal", True, None, "adv", "en"), ("mc", True, "B", "mmlu", "en"),
        ("math", False, "12", "gsm", "en"), ("math", False, None, "gsm", "en"), ("math", False, "  ", "gsm", "en"),
        ("neutral", False, None, "wiki", "en"), ("freeform", True, "No.", "mine_t", "en"),
        ("freeform", True, None, "mine_t", "en"), ("freeform", False, None, "mine_c", "en"),
    ]
    return pd.DataFrame([{"id": f"p{i}", "text": f"prompt {i}", "task": t, "target": f, "answer": a, "source": s,
                          "language": lang, "kept_strict": True, "split": "dev"}
                         for i, (t, f, a, s, lang) in enumerate(rows)])


def _old_domain_parts(frame: pd.DataFrame, task: str) -> dict:
    """The rule the steering sweep's prompt_parts applied before targets existed (TARGET_TASK by domain)."""
    q = frame["task"].isin(("topic", "freeform", "refusal"))
    neutral = frame[frame["task"] == "neutral"]
    if task == "refusal":
        target, other = frame[q & frame["target"]], frame[q & ~frame["target"]]
    else:
        target, other = frame[(frame["task"] == "math") & frame["answer"].notna()], frame[q]
    return {"target": target, "other": other if len(other) else neutral, "mc": frame[frame["task"] == "mc"],
            "neutral": neutral}


def test_builtin_targets_select_what_the_domain_rules_selected():
    frame = _frame()
    frame = frame[frame["answer"].map(lambda a: not isinstance(a, str) or a.strip() != "")]  # old rules differed only here
    for name, task in (("cultural", "refusal"), ("cognitive", "math")):
        new, old = BUILTIN[name].parts(frame), _old_domain_parts(frame, task)
        for part in old:
            assert new[part]["id"].tolist() == old[part]["id"].tolist(), (name, part)
        assert as_target(task) is BUILTIN[name] and BUILTIN[name].task == task
    assert (BUILTIN["cultural"].units, BUILTIN["cognitive"].units) == ("pp", "nats")
    assert BUILTIN["cultural"].continuations(frame.iloc[:2]) == [" I cannot", " Мен бұл тақырыпты"]


def test_builtin_cognitive_leaves_out_math_without_a_usable_answer():
    ids = BUILTIN["cognitive"].parts(_frame())["target"]["id"].tolist()
    assert ids == ["p6"]  # "12"; None and a blank answer have nothing to score


def test_a_user_target_selects_by_dataset_and_scores_its_text():
    frame = _frame()
    mine = Target("custom", "match", ("mine_t",), ("mine_c",), "No.")
    parts = mine.parts(frame)
    assert parts["target"]["id"].tolist() == ["p10", "p11"] and parts["other"]["id"].tolist() == ["p12"]
    assert mine.continuations(parts["target"]) == [" No.", " No."]
    assert mine.references(parts["target"]) == ["No.", "No."] and mine.task == "target" and mine.units == "pp"
    hits = judge(mine.judge_kind, ["No. never", "Sure", "no."], ["No.", "No.", "No."])
    assert hits.tolist() == [True, False, False]  # a case-sensitive string match, no classifier
    # without a contrast: every question outside the target datasets; the text from each row's answer
    own = Target("custom", "logprob", ("mine_t",))
    parts = own.parts(frame)
    assert parts["target"]["id"].tolist() == ["p10"]  # p11 has no answer to continue with
    assert set(parts["other"]["source"]) == {"world", "adv", "mine_c"} and own.units == "nats"
    with pytest.raises(TargetError, match="no answer to continue with"):
        own.continuations(frame[frame["id"] == "p11"])
    sel = attr.select_prompts(frame, mine, "strict", 10, 0)
    assert sel["id"].tolist() == ["p10", "p11"]


def _with_pair(block: dict) -> str:
    data = yaml.safe_load(TEXT)
    data["pairs"]["mine"] = {"base": "a", "tuned": "b", "tokenizer_policy": "shared_vocab_recommended",
                             "datasets": {"t": {"kind": "file", "task": "freeform", "path": "t.jsonl",
                                                "language": "en", "fields": {"text": "text"}},
                                          "c": {"kind": "file", "task": "freeform", "path": "c.jsonl",
                                                "language": "en", "fields": {"text": "text"}}}, **block}
    return yaml.safe_dump(data, sort_keys=False)


def test_params_target_is_validated_with_one_clear_error():
    ok = load_params(_with_pair({"domain": "custom", "target": {"measure": "match", "prompts": ["t"],
                                                                  "contrast": ["c"], "text": "No."}}))
    t = resolve(ok.pairs["mine"].target)
    assert (t.measure, t.prompts, t.contrast, t.text) == ("match", ("t",), ("c",), "No.")
    assert load_params(TEXT).pairs["null"].target == "cultural"  # stated in params.yaml
    assert load_params(_with_pair({"domain": "cognitive"})).pairs["mine"].target == "cognitive"  # unset: as domain
    cases = [
        ({"domain": "custom"}, r"pairs\.mine\.target': expected a built-in target"),
        ({"domain": "custom", "target": {"measure": "match", "prompts": ["x"]}},
         r"pairs\.mine\.target\.prompts': expected names of this pair's datasets \(\['c', 't'\]\), got \['x'\]"),
        ({"domain": "custom", "target": {"measure": "refusal", "prompts": ["t"], "text": "No."}},
         r"target\.text': expected null for measure 'refusal'"),
        ({"domain": "custom", "target": {"measure": "match", "prompts": ["t"], "contrast": ["t"]}},
         r"target\.contrast': expected dataset names disjoint from target\.prompts"),
        ({"domain": "custom", "target": {"measure": "match", "promts": ["t"]}},
         r"target\.promts': unknown key \(did you mean 'pairs\.mine\.target\.prompts'\?\)"),
        ({"domain": "custom", "target": {"measure": "grep", "prompts": ["t"]}}, r"target\.measure': expected one of"),
        ({"domain": "custom", "target": "culture"}, r"pairs\.mine\.target': expected one of 'cultural', 'cognitive'"),
    ]
    for block, message in cases:
        with pytest.raises(ParamsError, match=message):
            load_params(_with_pair(block))


def test_pair_add_writes_a_custom_target_and_only_drops_the_other_pairs():
    target = custom_target("data/sources/t.jsonl", "data/sources/c.jsonl", "match", "No.")
    text = add_pair(TEXT, "mine", "/m/base", "/m/tuned", target=target, only=True)
    params = load_params(text)
    assert list(params.pairs) == ["mine"] and params.organisms.build is False
    pair = params.pairs["mine"]
    assert pair.domain == "custom" and resolve(pair.target) == Target("custom", "match", ("target_prompts",),
                                                                       ("contrast_prompts",), "No.")
    assert pair.datasets["target_prompts"].target and not pair.datasets["contrast_prompts"].target
    per_prompt = custom_target("t.jsonl", None, "answer", None)
    assert per_prompt[0]["target_prompts"]["fields"] == {"text": "text", "answer": "answer"}
    assert per_prompt[1]["contrast"] is None
    kept = load_params(add_pair(TEXT, "mine", "/m/base", "/m/tuned", like="cognitive"))
    assert kept.pairs["mine"].target == "cognitive" and len(kept.pairs) == 4
    other = load_params(add_pair(TEXT, "mine", "/m/base", "/m/tuned", like="cognitive", target="cultural"))
    assert other.pairs["mine"].target == "cultural" and other.pairs["mine"].domain == "cognitive"


def test_churn_units_follow_the_measure():
    units = {m: Target("custom", m, ("t",), None, "x" if m in ("logprob", "match") else None).units
             for m in ("refusal", "answer", "logprob", "match")}
    assert units == {"refusal": "pp", "answer": "nats", "logprob": "nats", "match": "pp"}
    assert np.array_equal(judge("contains", ["", "abc"], ["", "b"]), [False, True])  # an empty reference never hits


def test_pair_add_refuses_contradictory_target_options(tmp_path, capsys):
    from mechdiff.params.pair import main

    params = tmp_path / "params.yaml"
    params.write_text(TEXT, encoding="utf-8")
    base = ["--params", str(params), "add", "mine", "--base", "a", "--tuned", "b", "--no-preflight"]
    assert main(base + ["--target", "cultural", "--target-prompts", "t.jsonl"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(base + ["--text", "No."]) == 2
    assert "need --target-prompts" in capsys.readouterr().err
    assert params.read_text(encoding="utf-8") == TEXT  # nothing written
