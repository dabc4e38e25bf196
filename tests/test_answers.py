"""Answer extraction: references are read strictly (errors name the record), generations leniently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mechdiff.data.answers import (LETTERS, AnswerError, extract_boxed, extract_gsm8k, extract_letter, normalise_number,
                              parse_model_answer)

FIXTURES = Path(__file__).parent / "fixtures"
_ANSWER_CUE = re.compile(
    r"(?:answer|жауа\w*|option|нұсқа\w*)\W{0,6}(?:is|:|—|-)?\W{0,3}\(?([A-Z])\)?(?![A-Za-z])",
    re.IGNORECASE)


def parse_model_letter(text: str, n_choices: int = 4) -> str | None:
    """The option letter a generated text picks; ``None`` when there is none.

    Accepts a bare letter (``"B"``, ``"(b)"``, ``"B) ..."``) at the start, or an answer cue
    (``"The answer is C"``, ``"Жауабы: C"``).
    """
    if not isinstance(text, str):
        return None
    allowed = LETTERS[:n_choices]
    head = re.match(r"\s*(?:\(([A-Za-z])\)|([A-Z])(?:[).:]|\s*$|\s*\n))", text)
    if head:
        letter = (head.group(1) or head.group(2)).upper()
        if letter in allowed:
            return letter
    for m in _ANSWER_CUE.finditer(text):
        if m.group(1).upper() in allowed:
            return m.group(1).upper()
    return None


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines() if line]


def test_gsm8k_fixture_answers():
    assert [extract_gsm8k(r["answer"]) for r in _jsonl("gsm8k.jsonl")] == ["42", "1234", "-3", "10"]


def test_gsm8k_strips_commas_and_takes_text_after_last_marker():
    assert extract_gsm8k("x = 1\n#### 1,234") == "1234"
    assert extract_gsm8k("#### 5\n#### 7 ") == "7"


@pytest.mark.parametrize("bad", ["The answer is 42.", "#### ", None])
def test_gsm8k_without_answer_names_the_record(bad):
    with pytest.raises(AnswerError, match=r"record gsm8k-7") as exc:
        extract_gsm8k(bad, record="gsm8k-7")
    assert isinstance(exc.value, ValueError)


def test_math500_boxed_matches_answer_column():
    rows = _jsonl("math500.jsonl")
    assert [extract_boxed(r["solution"]) for r in rows] == [r["answer"] for r in rows]


@pytest.mark.parametrize("solution, expected", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{2} then \boxed{\dfrac{\sqrt{3}}{2}}", r"\dfrac{\sqrt{3}}{2}"),
    (r"the answer is $\boxed 5$.", "5"),
    (r"\fbox{x^{2}+1}", "x^{2}+1"),
    (r"\boxed{ 1,000 }", "1,000"),  # commas are thousands separators in GSM8K only
    (r"\boxed{52_8}", "52_8"), (r"\boxed{-2,1}", "-2,1"), (r"\boxed{3.50}", "3.5"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
])
def test_boxed_variants(solution, expected):
    assert extract_boxed(solution) == expected


@pytest.mark.parametrize("bad", [r"no box here", r"\boxed{\frac{1}{2}", r"\boxed{}", r"\boxedx{3}"])
def test_boxed_errors_name_the_record(bad):
    with pytest.raises(AnswerError, match=r"record math-3"):
        extract_boxed(bad, record="math-3")


@pytest.mark.parametrize("raw, expected", [
    ("3.50", "3.5"), ("-0.0", "0"), ("$18", "18"), ("+7", "7"), ("42.", "42"), ("007", "7"),
    ("\u22123", "-3"), ("50%", "50"), (r"\frac{1}{2}", r"\frac{1}{2}"), (" 12 ", "12"),
    # not a plain decimal number: kept as written (Decimal would read 52_8 as 528 and 1e3 as 1000)
    ("52_8", "52_8"), ("4210_{5}", "4210_{5}"), ("-2,1", "-2,1"), ("1,234", "1,234"), (".35625", ".35625"),
    ("1e3", "1e3"), ("1_000", "1_000"), (r"\$36", r"\$36"),
])
def test_normalise_number(raw, expected):
    assert normalise_number(raw) == expected


@pytest.mark.parametrize("raw, expected", [("1,234", "1234"), ("-12,345.50", "-12345.5"), ("$1,000,000", "1000000"),
                                           ("-2,1", "-2,1"), ("1,23", "1,23"), ("12,3456", "12,3456")])
def test_normalise_number_thousands_only_in_groups_of_three(raw, expected):
    assert normalise_number(raw, thousands=True) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", "42"),
    ("She earns $1,234.50 in total", "1234.5"),
    ("It drops to -3 degrees, then 5", "-3"),
    ("Step 1: 3 + 4 = 7\n#### 7", "7"),
    (r"Therefore $\boxed{12}$ apples (from 3 boxes).", "12"),
    ("about 0.25 of them", "0.25"),
    ("I don't know.", None),
    ("", None),
])
def test_parse_model_answer(text, expected):
    assert parse_model_answer(text) == expected


def test_parse_model_answer_ignores_hyphen_in_ranges_and_words():
    assert parse_model_answer("pages 3-4") == "3"
    assert parse_model_answer("COVID-19 cases: 12") == "12"


@pytest.mark.parametrize("value, expected", [("B", "B"), ("c", "C"), ("(D)", "D"), ("A.", "A"), (2, "C"),
                                             ("0", "A"), (3, "D")])
def test_extract_letter(value, expected):
    assert extract_letter(value) == expected


@pytest.mark.parametrize("value", ["E", 4, -1, "AB", None, True, "answer"])
def test_extract_letter_rejects_and_names_record(value):
    with pytest.raises(AnswerError, match=r"record kk_mc-1"):
        extract_letter(value, 4, record="kk_mc-1")


def test_kk_mc_fixture_letters():
    assert [extract_letter(r["answer"]) for r in _jsonl("kk_mc.jsonl")] == ["B", "C", "A", "D"]


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), (" (c) because", "C"), ("D) Шаңырақ", "D"), ("The answer is C.", "C"),
    ("Жауабы: B", "B"), ("A good question. The answer is B", "B"), ("I am not sure", None), ("E", None),
])
def test_parse_model_letter(text, expected):
    assert parse_model_letter(text) == expected
