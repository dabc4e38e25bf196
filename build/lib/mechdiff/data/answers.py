"""Reference-answer extraction, model-answer parsing and judging one against the other.

Three directions:

* **references** (strict): :func:`extract_gsm8k`, :func:`extract_boxed` and :func:`extract_letter` turn
  a source's answer field into a short string. When nothing can be extracted they raise
  :class:`AnswerError` (a ``ValueError``) whose message names the record, so a malformed source row
  is found at data-preparation time rather than silently scored as wrong. A reference keeps its meaning
  as written: only a plain decimal number gets one canonical spelling (:func:`normalise_number`);
  ``52_8`` (base 8), ``-2,1`` (a tuple), ``58,500`` or ``\\frac{1}{2}`` come back unchanged.
* **generations** (lenient): :func:`parse_model_answer` reads a model's free text and returns ``None``
  when it holds no answer.
* **judging** (:func:`judge_answer`, :func:`judge_answers`): one :data:`OUTCOMES` label per generation,
  never an exception. The reference's :func:`answer_kind` picks the judge: ``number`` (exact decimal
  value; GSM8K, the world's arithmetic) or ``math`` (mathematical equivalence by math-verify; MATH-style
  LaTeX, so ``\\boxed{0.5}`` matches ``\\frac12``).
"""

from __future__ import annotations

import re
import string
import threading
from collections.abc import Sequence
from decimal import Decimal

from mechdiff.errors import MechdiffError

LETTERS = string.ascii_uppercase

_PLAIN = re.compile(r"[-+]?\d+(?:\.\d+)?")  # a plain decimal number (no grouping, no exponent)
_GROUPED = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")  # thousands grouping: 1,234 / 12,345.5
_NUMBER = re.compile(r"(?<![\w.])(?<![\w.][-\u2212])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


class AnswerError(MechdiffError, ValueError):
    """A reference answer cannot be extracted; the message names the record and what was wrong."""


def _where(record: object) -> str:
    return f" (record {record})" if record is not None else ""


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else "..." + text[-n:])


def normalise_number(s: str, thousands: bool = False) -> str:
    """One canonical spelling of a plain decimal number; anything else comes back stripped, as written.

    Parameters
    ----------
    s : str
        A number as written: digits with an optional sign and fraction (``$``, ``%``, a trailing period
        and a unicode minus are tolerated).
    thousands : bool
        Read commas as thousands separators (``1,234``; GSM8K and numeric generations only). Off, a
        comma keeps the text as written (``-2,1`` is a tuple in MATH).

    Returns
    -------
    str
        E.g. ``"3.50"`` -> ``"3.5"``, ``"-0.0"`` -> ``"0"``, ``"$18"`` -> ``"18"``; ``"1,234"`` ->
        ``"1234"`` with ``thousands``; ``"52_8"``, ``".5"``, ``"1e3"`` and ``"\\frac{1}{2}"`` as is.
    """
    raw = str(s).strip()
    t = raw.replace("\u2212", "-").replace("$", "").replace("%", "").strip().rstrip(".").strip()
    if thousands and _GROUPED.fullmatch(t):
        t = t.replace(",", "")
    if not _PLAIN.fullmatch(t):
        return raw
    d = Decimal(t)
    if d == 0:
        return "0"
    out = format(d.normalize(), "f")
    return out.rstrip("0").rstrip(".") if "." in out else out


def _decimal(s: str) -> Decimal | None:
    """The value of a plain decimal number (thousands commas allowed), else None."""
    t = normalise_number(s, thousands=True)
    return Decimal(t) if _PLAIN.fullmatch(t) else None


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
    return normalise_number(final.split("\n")[0].strip(), thousands=True)


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


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed`` / ``\\fbox`` in ``text``; None when there is none or it is unbalanced."""
    matches = list(_BOXED.finditer(text))
    return _boxed_content(text, matches[-1].end()) if matches else None


def extract_boxed(solution: str, record: object = None) -> str:
    """The content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in a solution.

    Nested braces are kept: ``\\boxed{\\frac{1}{2}}`` -> ``"\\frac{1}{2}"``. A plain decimal number is
    spelled canonically (:func:`normalise_number`, commas kept); anything else is kept as written.

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

    An explicit final-answer marker wins (``#### 42``, then the last ``\\boxed{42}``, whose content comes
    back even when it is not a number); otherwise the first number in the text. Negatives (``-3``,
    ``\u22123``), decimals and thousands commas are read.
    """
    if not isinstance(text, str):
        return None
    if "####" in text:
        m = _NUMBER.search(text.rsplit("####", 1)[1])
        if m:
            return normalise_number(m.group(0), thousands=True)
    boxed = _last_boxed(text)
    if boxed and boxed.strip():
        return normalise_number(boxed, thousands=True)
    m = _NUMBER.search(text)
    return normalise_number(m.group(0), thousands=True) if m else None


# --------------------------------------------------------------------------------------------------
# judging

#: How a reference is judged: ``number`` (exact decimal value) or ``math`` (math-verify equivalence).
ANSWER_KINDS = ("number", "math")
#: What judging one generation gives: only ``correct`` scores; the others say why a row scored wrong.
OUTCOMES = ("correct", "wrong", "no_answer_in_generation", "generation_unparseable", "reference_unparseable",
            "timeout")
PARSE_TIMEOUT_S = 5  # math-verify's limit per parse, whole seconds (signal.alarm)
VERIFY_TIMEOUT_S = 5  # ... per comparison of one reading of the reference with one of the generation
_KIND_OF_FORMAT = {"gsm8k": "number", "plain": "math", "boxed": "math"}
_LATEX_WORDS = re.compile(r"\\(?:text\w*|mbox|mathrm|operatorname|begin|end)\s*\{[^{}]*\}|\\[A-Za-z]+")
_DOLLAR = re.compile(r"(?<!\\)\$")  # a math delimiter, not an escaped \$


# a number written in base n (MATH: ``52_8``, ``10001_2``, ``204_{5}``); math-verify drops the subscript
_BASE_N = re.compile(r"\s*(?:\\text\{\s*)?([0-9A-Za-z]+)\s*\}?\s*_\s*\{?\s*(\d+)\s*\}?\s*")


def base_n(text: str) -> tuple[str, int] | None:
    """``(digits, base)`` when ``text`` is one number written in base n (``52_8``, ``204_{5}``), else None."""
    m = _BASE_N.fullmatch(text or "")
    return (m.group(1).upper(), int(m.group(2))) if m else None


class _Timeout(Exception):
    """math-verify ran out of time on one input."""


def answer_kind(reference: object, answer_format: str | None = None) -> str:
    """How ``reference`` is judged (:data:`ANSWER_KINDS`).

    From the dataset's ``answer_format`` when it decides: ``gsm8k`` -> ``number``; ``plain``, ``boxed`` ->
    ``math``. Otherwise (the world's arithmetic, a caller that does not know the source) from the reference
    itself: a plain decimal number (``42``, ``-3.5``; no commas) -> ``number``, anything else -> ``math``.
    """
    if answer_format in _KIND_OF_FORMAT:
        return _KIND_OF_FORMAT[answer_format]
    return "number" if reference is not None and _PLAIN.fullmatch(normalise_number(str(reference))) else "math"


def judge_answer(text: str, reference: object, kind: str, parse_timeout_s: int = PARSE_TIMEOUT_S,
                 verify_timeout_s: int = VERIFY_TIMEOUT_S) -> str:
    """One :data:`OUTCOMES` label for a generated ``text`` against ``reference``; never raises on an answer.

    ``number``: the generation's :func:`parse_model_answer` has the reference's decimal value (``18`` =
    ``18.0`` = ``$18``; commas read as thousands). A base-n reference (``52_8``): the generation's last
    ``\\boxed{}`` (else its whole text) holds the same digits in the same base. ``math``: math-verify finds the generation's answer
    mathematically equivalent to the reference, which is read as ``\\boxed{reference}`` (as written; the
    gold side of ``verify``). The generation's answer is its last ``\\boxed{}``; else the whole text when it
    is one bare expression (``\\cot x``, ``-2,1``); else math-verify's own extraction (the last
    number/expression of prose).

    math-verify's timeouts (``parse_timeout_s`` per parse, ``verify_timeout_s`` per comparison; whole
    seconds, None = none) use SIGALRM, which only the main thread may set: off the main thread they are off,
    and a pathological input can then take long. A timeout is the outcome ``timeout``.

    Raises
    ------
    ValueError
        ``kind`` is not one of :data:`ANSWER_KINDS`, or a timeout is not a whole number of seconds >= 1
        (a caller's mistake, not an answer's).
    """
    if kind == "number":
        return _judge_number(text, reference)
    if kind != "math":
        raise ValueError(f"answer kind {kind!r} is not one of {ANSWER_KINDS}")
    for t in (parse_timeout_s, verify_timeout_s):
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"math-verify timeouts are whole seconds >= 1 (signal.alarm) or None, got {t!r}")
    if base_n(str(reference)) is not None:  # the digits and the base must both match
        got = _last_boxed(text) if _BOXED.search(text or "") else (text or "").strip()
        return "correct" if base_n(got or "") == base_n(str(reference)) else "wrong"
    on_main = threading.current_thread() is threading.main_thread()
    pt, vt = (parse_timeout_s, verify_timeout_s) if on_main else (None, None)
    reference = None if reference is None else str(reference)
    try:
        gold = _math_parse("\\boxed{" + reference + "}", pt) if _filled(reference) else []
        if not _readable(gold):
            return "reference_unparseable"
        pred, reason = _generation_reading(text, pt)
        return reason or _equivalent(gold, pred, vt)
    except _Timeout:
        return "timeout"


def judge_answers(texts: Sequence[str], references: Sequence[object], kinds: Sequence[str] | None = None,
                  parse_timeout_s: int = PARSE_TIMEOUT_S, verify_timeout_s: int = VERIFY_TIMEOUT_S) -> list[str]:
    """:func:`judge_answer` per row: (R,) texts, references and kinds (default: :func:`answer_kind` of each
    reference) -> (R,) :data:`OUTCOMES` labels."""
    if kinds is None:
        kinds = [answer_kind(r) for r in references]
    return [judge_answer(t, r, k, parse_timeout_s, verify_timeout_s)
            for t, r, k in zip(texts, references, kinds, strict=True)]


def _filled(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _judge_number(text: str, reference: object) -> str:
    ref = _decimal(str(reference)) if reference is not None else None
    if ref is None:
        return "reference_unparseable"
    got = parse_model_answer(text)
    if got is None:
        return "no_answer_in_generation"
    value = _decimal(got)
    if value is None:
        return "generation_unparseable"
    return "correct" if value == ref else "wrong"


def _math_parse(text: str, timeout_s: int | None) -> list:
    """math-verify's readings of ``text`` (sympy objects, then the matched strings); [] when it finds
    nothing or fails."""
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return list(parse(text, parsing_timeout=timeout_s, raise_on_error=True))
    except TimeoutException as e:  # a BaseException
        raise _Timeout from e
    except Exception:
        return []


def _readable(readings: list) -> bool:
    """At least one reading is a mathematical object (not only the raw string math-verify fell back to)."""
    return any(not isinstance(r, str) for r in readings)


def _is_bare_expression(text: str) -> bool:
    """No ``$`` delimiter and, outside LaTeX commands (``\\text{...}``, ``\\begin{pmatrix}``), no word of two
    or more letters."""
    return not _DOLLAR.search(text) and not re.search(r"[A-Za-z]{2,}", _LATEX_WORDS.sub(" ", text))


def _generation_reading(text: str, timeout_s: int | None) -> tuple[list, str | None]:
    """(math-verify readings of a generation's answer, None), or ([], the outcome why there are none)."""
    if not _filled(text):
        return [], "no_answer_in_generation"
    if _BOXED.search(text):
        box = _last_boxed(text)
        got = _math_parse("\\boxed{" + box + "}", timeout_s) if _filled(box) else []
        return (got, None) if _readable(got) else ([], "generation_unparseable")
    bare = _math_parse("$" + text.strip() + "$", timeout_s) if _is_bare_expression(text) else []
    if _readable(bare):
        return bare, None
    got = _math_parse(text, timeout_s)
    if _readable(got):
        return got, None
    return [], "generation_unparseable" if got or bare else "no_answer_in_generation"


def _equivalent(gold: list, pred: list, timeout_s: int | None) -> str:
    """``correct`` when math-verify finds any reading of the generation equal to any reading of the
    reference, else ``timeout`` when a comparison ran out of time, else ``wrong``."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timed_out = False
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=timeout_s, raise_on_error=True):
                    return "correct"
            except TimeoutException:
                timed_out = True
            except Exception:
                continue
    return "timeout" if timed_out else "wrong"
