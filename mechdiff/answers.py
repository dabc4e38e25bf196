"""Reference-answer extraction and model-answer parsing.

Two directions:

* **references** (strict): :func:`extract_gsm8k`, :func:`extract_boxed` and :func:`extract_letter` turn
  a source's answer field into a short canonical string. When nothing can be extracted they raise
  :class:`AnswerError` (a ``ValueError``) whose message names the record, so a malformed source row
  is found at data-preparation time rather than silently scored as wrong.
* **generations** (lenient): :func:`parse_model_answer` and :func:`parse_model_letter` read a model's
  free text and return ``None`` when it holds no answer.

Numbers are compared through :func:`normalise_number`, which gives one spelling per value
(``"1,234.50"`` -> ``"1234.5"``, ``"-0"`` -> ``"0"``, ``"$18"`` -> ``"18"``).
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation

from mechdiff.errors import MechdiffError

LETTERS = string.ascii_uppercase

_NUMBER = re.compile(r"(?<![\w.])(?<![\w.][-\u2212])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_CUE = re.compile(
    r"(?:answer|жауа\w*|option|нұсқа\w*)\W{0,6}(?:is|:|—|-)?\W{0,3}\(?([A-Z])\)?(?![A-Za-z])",
    re.IGNORECASE)


class AnswerError(MechdiffError, ValueError):
    """A reference answer cannot be extracted; the message names the record and what was wrong."""


def _where(record: object) -> str:
    return f" (record {record})" if record is not None else ""


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else "..." + text[-n:])


def normalise_number(s: str) -> str:
    """One canonical spelling of a number; non-numbers come back stripped but otherwise unchanged.

    Parameters
    ----------
    s : str
        A number as written (commas, ``$``, ``%``, a trailing period, a unicode minus are tolerated).

    Returns
    -------
    str
        E.g. ``"1,234"`` -> ``"1234"``, ``"3.50"`` -> ``"3.5"``, ``"-0.0"`` -> ``"0"``; ``"\\frac{1}{2}"``
        is returned as is.
    """
    raw = str(s).strip()
    t = raw.replace("\u2212", "-").replace(",", "").replace("$", "").replace("%", "").strip()
    t = t.rstrip(".").lstrip("+").strip()
    try:
        d = Decimal(t)
    except InvalidOperation:
        return raw
    if not d.is_finite():
        return raw
    if d == 0:
        return "0"
    out = format(d.normalize(), "f")
    return out.rstrip("0").rstrip(".") if "." in out else out


def extract_gsm8k(solution: str, record: object = None) -> str:
    """The final answer of a GSM8K solution: the text after the last ``####``, normalised.

    Parameters
    ----------
    solution : str
        GSM8K ``answer`` field (reasoning, then ``#### 42``).
    record : object, optional
        How to name the record in an error message (e.g. ``"gsm8k id 'gsm8k-12'"``).

    Raises
    ------
    AnswerError
        No ``####`` marker, or nothing after it.
    """
    if not isinstance(solution, str) or "####" not in solution:
        raise AnswerError(f"cannot extract a GSM8K answer{_where(record)}: no '####' marker in "
                          f"{_snippet(solution)}; is answer_format right for this source?")
    final = solution.rsplit("####", 1)[1].strip()
    if not final:
        raise AnswerError(f"cannot extract a GSM8K answer{_where(record)}: nothing after '####'")
    return normalise_number(final.split("\n")[0].strip())


def _braced(text: str, start: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]`` (nested braces allowed), or None.

    Escaped braces (``\\{``, ``\\}``) do not count.
    """
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def _boxed_content(text: str, end: int) -> str | None:
    """What follows one ``\\boxed`` / ``\\fbox`` ending at ``end``: ``{...}`` or one bare token."""
    rest = text[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _braced(text, end + len(rest) - len(stripped))
    if rest[:1].isspace():
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    return None


def extract_boxed(solution: str, record: object = None) -> str:
    """The content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in a solution.

    Nested braces are kept: ``\\boxed{\\frac{1}{2}}`` -> ``"\\frac{1}{2}"``. Numeric contents are
    normalised with :func:`normalise_number`.

    Raises
    ------
    AnswerError
        No ``\\boxed``/``\\fbox``, unbalanced braces, or an empty box.
    """
    text = solution if isinstance(solution, str) else ""
    matches = list(_BOXED.finditer(text))
    if not matches:
        raise AnswerError(f"cannot extract a boxed answer{_where(record)}: no \\boxed{{...}} in "
                          f"{_snippet(solution)}; is answer_format right for this source?")
    content = _boxed_content(text, matches[-1].end())
    if content is None or not content.strip():
        raise AnswerError(f"cannot extract a boxed answer{_where(record)}: the last \\boxed is empty or "
                          f"has unbalanced braces near {_snippet(text[matches[-1].start():][:80])}")
    return normalise_number(content.strip())


def extract_letter(value: object, n_choices: int = 4, record: object = None) -> str:
    """A multiple-choice reference as a letter: ``"B"``, ``"b"``, ``"(B)"``, ``"B."`` or an index ``1``.

    Parameters
    ----------
    value : str or int
        A letter, or a 0-based option index (an ``int`` or a string of digits).
    n_choices : int
        Number of options; the letter must be among the first ``n_choices``.
    record : object, optional
        How to name the record in an error message.

    Raises
    ------
    AnswerError
        Not a letter or index, or out of range.
    """
    allowed = LETTERS[:n_choices]
    idx = None
    if isinstance(value, bool):
        idx = None
    elif isinstance(value, int):
        idx = value
    elif isinstance(value, float) and value.is_integer():
        idx = int(value)
    elif isinstance(value, str):
        v = value.strip().strip("().:").strip()
        if v.isdigit():
            idx = int(v)
        elif len(v) == 1 and v.upper() in allowed:
            return v.upper()
    if idx is not None and 0 <= idx < n_choices:
        return allowed[idx]
    raise AnswerError(f"cannot read a multiple-choice answer{_where(record)}: {value!r} is neither a "
                      f"letter in {allowed} nor a 0-based index below {n_choices}")


def parse_model_answer(text: str) -> str | None:
    """The numeric answer in a generated text, normalised; ``None`` when it holds no number.

    An explicit final-answer marker wins (``#### 42``, then the last ``\\boxed{42}``); otherwise the
    first number in the text. Negatives (``-3``, ``\u22123``), decimals and thousands commas are read.
    """
    if not isinstance(text, str):
        return None
    if "####" in text:
        m = _NUMBER.search(text.rsplit("####", 1)[1])
        if m:
            return normalise_number(m.group(0))
    if _BOXED.search(text):
        try:
            return extract_boxed(text)
        except AnswerError:
            pass
    m = _NUMBER.search(text)
    return normalise_number(m.group(0)) if m else None


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
