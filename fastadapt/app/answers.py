"""Answer extraction and scoring for the LLM-Adapters evaluation sets.

Three kinds of label (``record["kind"]``, see :func:`fastadapt.app.data.load_eval_set`):

- ``"number"`` (AddSub, MultiArith, SingleEq, GSM8K, SVAMP, MAWPS): the LAST number in the
  generation, after thousands separators are removed, equal to the label within 1e-3.
- ``"choice"`` (AQuA, MathQA): an option letter. An explicit statement ("The answer is (B)",
  "Answer: e") wins; the last one when there are several. Failing that, a lone letter (a line
  holding only "C" or "(C)", a letter ending the text, or one unambiguous "(C)"). An article
  "A"/"a" in running text ("A train leaves...") is never an answer.
- ``"commonsense"`` (BoolQ, PIQA, SIQA, ARC, OBQA, HellaSwag, WinoGrande in LLM-Adapters'
  format): the FIRST label of the set's family (``true|false``, ``solutionN``, ``answerN``,
  ``endingN``, ``optionN``), as LLM-Adapters scored them.

Where this differs from LLM-Adapters' scripts (on purpose):

- commas are removed only between digit groups ("1,234" -> 1234); LLM-Adapters removed every
  comma, so "3,4" became 34;
- a minus sign counts only when it is not a binary minus ("10-3" is 10 and 3, not 10 and -3);
- fractions count as their value ("3/4" -> 0.75, "1 1/2" -> 1.5), since several labels are
  fractions written as decimals (AddSub's "0.6666666666666666");
- AQuA: LLM-Adapters took the first capital A-E, so the article "A" scored as option A;
- :func:`score` first cuts the generation at a new Alpaca section ("### Instruction:" ...),
  because base models often go on to invent another question whose numbers would be read.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "COMMONSENSE_LABELS",
    "clean_generation",
    "commonsense_family",
    "extract_choice",
    "extract_commonsense",
    "extract_number",
    "numbers_equal",
    "score",
]

# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------

# "1,234,567" -> "1234567": a comma between a digit and exactly three digits (not four).
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A "-" is a sign only when it does not follow a word character or a closing bracket, so
# "10-3" reads as 10 and 3. ".5" needs no letter before it ("Rs.500" is 500). Optional
# mixed-number or fraction tail: "1 1/2", "3/4".
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>-))?"
    r"(?P<int>\d+(?:\.\d+)?|(?<![^\W\d_])\.\d+)"
    r"(?:(?P<mixed>[ \t]+\d+/\d+)|/(?P<den>\d+(?:\.\d+)?))?"
    r"(?!\d)"
)
# U+2212 minus, en dash, figure dash used as minus signs by some tokenizers/models.
_MINUS_LIKE = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2012": "-"})


def _strip_thousands(text: str) -> str:
    return _THOUSANDS.sub("", text)


def _number_values(text: str) -> list[float]:
    """Every number in ``text``, in order, as floats (fractions evaluated)."""
    text = _strip_thousands(text.translate(_MINUS_LIKE))
    values: list[float] = []
    for m in _NUMBER.finditer(text):
        try:
            value = float(m.group("int"))
            if m.group("mixed"):
                num, den = m.group("mixed").strip().split("/")
                if float(den) == 0:
                    continue
                # "1 1/2" is a mixed number only when the fraction is proper.
                frac = float(num) / float(den)
                value = value + frac if frac < 1 else frac
            elif m.group("den") is not None:
                den = float(m.group("den"))
                if den == 0:
                    continue
                value = value / den
        except ValueError:  # pragma: no cover - the regex only admits valid floats
            continue
        if m.group("sign"):
            value = -value
        if math.isfinite(value):
            values.append(value)
    return values


def extract_number(text: str) -> float | None:
    """The last number in ``text``, or ``None`` when there is none.

    Thousands separators are removed first ("$1,000,000" -> 1000000.0), a leading minus counts
    ("-15" -> -15.0, but "10-3" ends in 3.0), decimals and a trailing sentence period are fine
    ("The answer is 18." -> 18.0), currency and percent signs are ignored ("$5.00" -> 5.0,
    "50%" -> 50.0), and fractions are evaluated ("3/4" -> 0.75, "1 1/2" -> 1.5; a zero
    denominator is skipped).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    values = _number_values(text)
    return values[-1] if values else None


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        s = _strip_thousands(value.strip().translate(_MINUS_LIKE)).lstrip("$").rstrip(".%")
        try:
            return float(s)
        except ValueError:
            values = _number_values(s)
            return values[0] if len(values) == 1 else None
    return None


def numbers_equal(pred: float | str | None, label: float | str, tol: float = 1e-3) -> bool:
    """``|pred - label| <= tol``; strings are parsed ("1,080", "576.0", "3/4"); ``None`` is False."""
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    label_f = _to_float(label)
    if label_f is None:
        raise ValueError(f"label must be a number or a numeric string, got {label!r}")
    pred_f = _to_float(pred)
    if pred_f is None or not math.isfinite(pred_f):
        return False
    return abs(pred_f - label_f) <= tol


# --------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------


def _check_options(options: str) -> str:
    if not isinstance(options, str) or not options or not options.isalpha():
        raise ValueError(f"options must be a non-empty string of letters such as 'ABCDE', got {options!r}")
    if len(set(options.upper())) != len(options):
        raise ValueError(f"options must not repeat a letter (case-insensitively), got {options!r}")
    return options


def _letter(cls: str, tag: str) -> str:
    # A letter counts when it is bracketed or bolded, or is followed by a closing bracket,
    # punctuation or the end: "(B)", "[B]", "**B**", "B)", "b )", "B.", "C" at the end.
    # "The answer is a bit..." / "answer is A train" are not answers.
    return (
        rf"(?:\(\s?(?P<{tag}p>[{cls}])\s?\)"
        rf"|\[\s?(?P<{tag}b>[{cls}])\s?\]"
        rf"|\*\*\s?\(?(?P<{tag}s>[{cls}])\)?\s?\*\*"
        rf"|(?P<{tag}l>[{cls}])(?=[ \t]{{0,3}}(?:\)|$|[.,;:!?'\"\]\n])))"
    )


@functools.lru_cache(maxsize=16)
def _choice_patterns(
    options: str,
) -> tuple[tuple[re.Pattern[str], ...], re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    cls = re.escape(options.upper() + options.lower())
    flags = re.IGNORECASE | re.MULTILINE
    # Bounded whitespace: unbounded \s* runs side by side backtrack quadratically.
    connector = r"(?:\s{0,3}(?:is|would\s+be|should\s+be|will\s+be|must\s+be|=|:|-)){0,2}\s{0,3}:?\s{0,3}"
    statements = (
        # "The answer is (B)", "Answer: e", "answer choice C", "the correct option is D".
        re.compile(
            rf"(?:\banswer\b(?:\s+(?:choice|option))?|\b(?:correct|right|best|final)\s+(?:option|choice)\b)"
            rf"{connector}(?:(?:option|choice)\s?)?{_letter(cls, 's')}",
            flags,
        ),
        # "Option C is correct", "(C) is the right answer".
        re.compile(
            rf"(?:\b(?:option|choice)\s?)?(?:\(\s?(?P<xp>[{cls}])\s?\)|\b(?P<xl>[{cls}])\b)"
            rf"\s+is\s+(?:the\s+)?(?:correct|right|best)\b",
            flags,
        ),
    )
    # A line holding nothing but the letter: "C", "(C)", "c )", "**C**", "C." (matched against
    # stripped lines: whitespace runs around optional parts backtrack badly in one regex).
    alone_line = re.compile(rf"(?:\*\*)?\(?\s?(?P<l>[{cls}])\s?\)?(?:\*\*)?[.!]?")
    # A letter ending the (right-stripped) text: "... so it is C" / "... (D)". Upper-case only
    # unless bracketed, so a closing "...a" is not option a; see extract_choice for "A".
    at_end = re.compile(rf"(?:^|\s)(?:\(\s?(?P<p>[{cls}])\s?\)|(?P<l>[{re.escape(options.upper())}])\)?)\Z")
    paren = re.compile(rf"\(\s?(?P<p>[{cls}])\s?\)")
    return statements, alone_line, at_end, paren


def _letter_of(m: re.Match[str], options: str) -> str:
    for got in m.groupdict().values():
        if got:
            for opt in options:
                if opt.upper() == got.upper():
                    return opt
    raise AssertionError("a choice pattern matched without a letter")  # pragma: no cover


def extract_choice(text: str, options: str = "ABCDE") -> str | None:
    """The option letter a generation picks, as written in ``options``; ``None`` if unsure.

    Order of preference:

    1. the LAST answer statement: "The answer is (B)", "answer: e", "Answer: (C)", "the
       correct option is D", "answer is a )" (MathQA's option style), "Option C is correct";
    2. a line holding only a letter ("C", "(C)", "c )"), the last such line;
    3. a letter ending the text ("... so it is C.", "... (D)"), upper-case unless bracketed,
       and not right after a sentence end (that "A" would be an article cut off mid-sentence);
    4. bracketed letters "(C)" anywhere, when they all name the same option (an echoed
       option list "(A) 5 (B) 6 ..." names several and gives ``None``).

    Matching is case-insensitive for statements and brackets (MathQA's options are a-e), but
    a bare letter in running text never counts: "A train leaves at 5" has no answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    options = _check_options(options)
    statements, alone_line, at_end, paren = _choice_patterns(options)
    found = [m for pattern in statements for m in pattern.finditer(text)]
    if found:
        return _letter_of(max(found, key=lambda m: m.start()), options)
    for line in reversed(text.splitlines()):
        m = alone_line.fullmatch(line.strip())
        if m:
            return _letter_of(m, options)
    tail = text.rstrip()
    if tail[-1:] in (".", "!"):
        tail = tail[:-1].rstrip()
    m = at_end.search(tail)
    if m and (m.group("p") or tail[: m.start("l")].rstrip()[-1:] not in (".", "!", "?")):
        return _letter_of(m, options)
    letters = {_letter_of(m, options) for m in paren.finditer(text)}
    if len(letters) == 1:
        return letters.pop()
    return None


# --------------------------------------------------------------------------------------------
# commonsense
# --------------------------------------------------------------------------------------------

#: Label family -> the labels LLM-Adapters' commonsense sets use.
COMMONSENSE_LABELS: dict[str, tuple[str, ...]] = {
    "truefalse": ("true", "false"),  # BoolQ
    "solution": ("solution1", "solution2"),  # PIQA
    "answer": ("answer1", "answer2", "answer3", "answer4", "answer5"),  # SIQA, ARC, OBQA
    "ending": ("ending1", "ending2", "ending3", "ending4"),  # HellaSwag
    "option": ("option1", "option2"),  # WinoGrande
}
_FAMILY_ALIASES = {
    "true|false": "truefalse",
    "boolean": "truefalse",
    "bool": "truefalse",
    "boolq": "truefalse",
}


def commonsense_family(kind_or_label: str) -> str:
    """The label family of a family name or of one label.

    ``"solution2"`` -> ``"solution"``, ``"true"`` -> ``"truefalse"``, ``"true|false"`` ->
    ``"truefalse"``, ``"ending"`` -> ``"ending"``.
    """
    if not isinstance(kind_or_label, str):
        raise TypeError(f"kind must be a str, got {type(kind_or_label).__name__}")
    key = kind_or_label.strip().lower()
    key = _FAMILY_ALIASES.get(key, key)
    if key in COMMONSENSE_LABELS:
        return key
    for family, labels in COMMONSENSE_LABELS.items():
        if key in labels:
            return family
    raise ValueError(
        f"kind must be a commonsense label family {sorted(COMMONSENSE_LABELS)} or one of their "
        f"labels (e.g. 'solution1', 'true'), got {kind_or_label!r}"
    )


def extract_commonsense(text: str, kind: str) -> str | None:
    """The FIRST label of ``kind``'s family in ``text`` (lower-case), or ``None``.

    ``kind`` is a family (``"truefalse"``/``"true|false"``, ``"solution"``, ``"answer"``,
    ``"ending"``, ``"option"``) or any label of one (``"answer3"``). Labels match as whole
    words, case-insensitively: "the correct answer is answer2" -> ``"answer2"``;
    "answer12" and "untrue" match nothing.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    labels = COMMONSENSE_LABELS[commonsense_family(kind)]
    m = re.search(r"\b(" + "|".join(labels) + r")\b", text, re.IGNORECASE)
    return m.group(1).lower() if m else None


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------

# Alpaca section headers a model may start after its answer (a new made-up example).
_NEXT_SECTION = re.compile(
    r"(?:^|\n)[ \t]*(?:###\s*(?:Instruction|Input|Response)\s*:|Below is an instruction that describes)",
    re.IGNORECASE,
)


def clean_generation(text: str) -> str:
    """``text`` up to the first new Alpaca section ("### Instruction:" ...), stripped."""
    if not isinstance(text, str):
        raise TypeError(f"generation must be a str, got {type(text).__name__}")
    m = _NEXT_SECTION.search(text)
    return (text[: m.start()] if m else text).strip()


def score(record: Mapping[str, Any], generation: str) -> tuple[float | str | None, bool]:
    """``(prediction, correct)`` for one generation against ``record["answer"]``.

    Dispatches on ``record["kind"]``: ``"number"`` -> :func:`extract_number` and
    :func:`numbers_equal`; ``"choice"`` -> :func:`extract_choice` (options ``record.get(
    "options", "ABCDE")``, compared case-insensitively); ``"commonsense"`` ->
    :func:`extract_commonsense` with the family of the record's answer. The generation is
    passed through :func:`clean_generation` first. A missing prediction is never correct.
    """
    for key in ("kind", "answer"):
        if key not in record:
            raise KeyError(f"record must have a {key!r} field, got fields {sorted(record)}")
    kind = record["kind"]
    answer = record["answer"]
    text = clean_generation(generation)
    if kind == "number":
        pred_n = extract_number(text)
        return pred_n, numbers_equal(pred_n, answer)
    if kind == "choice":
        pred_c = extract_choice(text, record.get("options", "ABCDE"))
        return pred_c, pred_c is not None and pred_c.upper() == str(answer).strip().upper()
    if kind == "commonsense":
        pred_s = extract_commonsense(text, str(answer))
        return pred_s, pred_s is not None and pred_s == str(answer).strip().lower()
    raise ValueError(f"record['kind'] must be 'number', 'choice' or 'commonsense', got {kind!r}")
