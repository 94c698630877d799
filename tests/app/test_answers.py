"""Answer extraction on tricky strings (no model needed)."""

from __future__ import annotations

import time

import pytest

from fastadapt.app.answers import (
    clean_generation,
    commonsense_family,
    extract_choice,
    extract_commonsense,
    extract_number,
    numbers_equal,
    score,
)

# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 18.", 18.0),
        ("$1,000,000", 1_000_000.0),
        ("He paid $5.00 in total.", 5.0),
        ("The total is 1,234.56 dollars", 1234.56),
        ("12,345,678 people", 12_345_678.0),
        ("The temperature fell to -15 degrees.", -15.0),
        ("x = -3.5", -3.5),
        ("(-7)", -7.0),
        ("\u22124 with a Unicode minus", -4.0),
        ("10-3=7", 7.0),  # binary minus: the last number is 7
        ("She has 10-3", 3.0),  # not -3
        ("First 5, then 3,4 and finally 2,5", 5.0),  # "2,5" is not two thousand five
        ("so 3/4 of the cake", 0.75),
        ("She needs 1 1/2 cups.", 1.5),
        ("The answer is 2/3.", pytest.approx(2 / 3)),
        ("12/0 is undefined", None),
        ("It costs Rs.500", 500.0),
        ("Only .5 of it", 0.5),
        ("Interest is 50% this year", 50.0),
        ("Natalia sold 48/2 = 24 clips.\nThe answer is 72.", 72.0),
        ("#### 1,080", 1080.0),
        ("no digits here", None),
        ("", None),
        ("3.", 3.0),
        ("Step 1: 5 apples.\nStep 2: 7 apples.", 7.0),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_number_rejects_non_str():
    with pytest.raises(TypeError, match="text must be a str"):
        extract_number(12)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pred", "label", "equal"),
    [
        (18.0, "18", True),
        (18.0, "18.0", True),
        (576.0, "576.0", True),
        (0.667, "0.6666666666666666", True),  # within 1e-3
        (0.66, "0.6666666666666666", False),
        (1080.0, "1,080", True),
        (None, "5", False),
        ("1,234", 1234, True),
        (-15.0, "-15.0", True),
        (float("nan"), "1", False),
    ],
)
def test_numbers_equal(pred, label, equal):
    assert numbers_equal(pred, label) is equal


def test_numbers_equal_bad_label():
    with pytest.raises(ValueError, match="label must be a number"):
        numbers_equal(1.0, "B")
    with pytest.raises(ValueError, match="tol must be >= 0"):
        numbers_equal(1.0, "1", tol=-1)


# --------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A bakery sold 45 cakes. Half were chocolate. The answer is (B).", "B"),
        ("Answer: e", "E"),
        ("Answer: (C)", "C"),
        ("answer: A) 23.65", "A"),
        ("so the answer is a ) 38", "A"),  # MathQA's option style
        ("The answer is (C). Wait, I made an error. The answer is D.", "D"),  # the last statement
        ("The correct option is d", "D"),
        ("Option C is correct because 5 > 3.", "C"),
        ("The answer is **B**", "B"),
        ("Let me think.\n(D)\n", "D"),  # a lone letter on its own line
        ("C", "C"),
        ("b )", "B"),
        ("After simplifying, it must be E.", "E"),  # a letter ending the text
        ("The value is 35.62, which is (C) 35.62", "C"),
        ("(B) 1000 since (B) is the only even one", "B"),
        # never the article "A"
        ("A train leaves the station at 5 pm and travels at 60 km/h.", None),
        ("A man buys a car. A dealer sells it.", None),
        ("The answer is a bit more than 20.", None),
        ("The answer is A train of thought is needed", None),
        ("We compute the total. A", None),  # "A" right after a sentence end: a cut-off article
        ("We compute the total.  A", None),
        ("The total is 12, so it is  C .", "C"),
        # echoed option lists name several letters: no answer
        ("Answer Choices: (A) 23.65 (B) 1000 (C) 35.62 (D) 2.65 (E) 1023.65", None),
        ("The options: A ) 38 , B ) 27.675 , C ) 30", None),
        ("", None),
        # LLM-Adapters took the first capital A-E: here that would be the article "A"
        ("A farmer has 5 cows. The answer is (E).", "E"),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_options():
    assert extract_choice("The answer is e", options="abcde") == "e"  # returned as given
    assert extract_choice("The answer is E", options="ABCD") is None  # E is not an option
    assert extract_choice("The answer is (D)", options="ABCD") == "D"
    with pytest.raises(ValueError, match="options must be"):
        extract_choice("x", options="")
    with pytest.raises(ValueError, match="must not repeat"):
        extract_choice("x", options="AaB")


# --------------------------------------------------------------------------------------------
# commonsense
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("the correct answer is true", "truefalse", "true"),
        ("False. It is not true that...", "true|false", "false"),  # the FIRST label
        ("That is untrue", "truefalse", None),  # whole words only
        ("the correct answer is solution2", "solution", "solution2"),
        ("solution1 looks wrong; the answer is solution2", "solution1", "solution1"),
        ("the correct answer is answer3", "answer", "answer3"),
        ("answer12 is not a label", "answer", None),
        ("Ending4 is the best continuation", "ending", "ending4"),
        ("the correct answer is option1", "option2", "option1"),
        ("the correct answer is answer1", "solution", None),  # other family
    ],
)
def test_extract_commonsense(text, kind, expected):
    assert extract_commonsense(text, kind) == expected


def test_commonsense_family():
    assert commonsense_family("answer5") == "answer"
    assert commonsense_family("TRUE") == "truefalse"
    assert commonsense_family("ending") == "ending"
    with pytest.raises(ValueError, match="commonsense label family"):
        commonsense_family("answer9")


# --------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------


def test_clean_generation_cuts_invented_examples():
    text = "She makes 18 dollars.\n\n### Instruction:\nA new question with 99 apples\n\n### Response:\n99"
    assert clean_generation(text) == "She makes 18 dollars."
    assert clean_generation("  just 5  ") == "just 5"


def test_score_dispatch():
    number = {"kind": "number", "answer": "18.0"}
    assert score(number, "16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.") == (18.0, True)
    assert score(number, "The answer is 18.\n### Instruction:\nHow many? 40") == (18.0, True)
    assert score(number, "I don't know") == (None, False)
    choice = {"kind": "choice", "answer": "B"}
    assert score(choice, "A bakery sold... The answer is (B).") == ("B", True)
    assert score(choice, "Answer: b") == ("B", True)
    assert score(choice, "A bakery sold bread.") == (None, False)
    mathqa = {"kind": "choice", "answer": "E", "options": "ABCDE"}
    assert score(mathqa, "Answer: e") == ("E", True)
    cs = {"kind": "commonsense", "answer": "solution2"}
    assert score(cs, "the correct answer is solution2") == ("solution2", True)
    assert score(cs, "the correct answer is solution1") == ("solution1", False)
    boolq = {"kind": "commonsense", "answer": "false"}
    assert score(boolq, "the correct answer is False") == ("false", True)


def test_score_bad_record():
    with pytest.raises(KeyError, match="'kind'"):
        score({"answer": "1"}, "1")
    with pytest.raises(ValueError, match="record\\['kind'\\] must be"):
        score({"kind": "regex", "answer": "1"}, "1")


@pytest.mark.parametrize(
    "text",
    [
        " " * 5000 + "x",  # once took minutes (nested whitespace runs backtracking)
        " " * 5000 + "(x",
        "answer" + " " * 5000 + "is" + " " * 5000,
        "A" + " " * 5000 + ".",
        " 1" * 5000,
        "(" + " " * 5000,
    ],
)
def test_extractors_are_linear_on_pathological_whitespace(text):
    start = time.perf_counter()
    extract_choice(text)
    extract_number(text)
    extract_commonsense(text, "answer")
    clean_generation(text)
    assert time.perf_counter() - start < 2.0
