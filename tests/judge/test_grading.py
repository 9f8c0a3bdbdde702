"""Parsing the judge's replies: every shape a real judge writes, and what is not a verdict."""

from __future__ import annotations

import pytest

from flipcheck.judge.grading import (
    GRADER_VERSION,
    combine_orders,
    pair_prompt,
    parse_pair,
    parse_score,
    single_prompt,
)


@pytest.mark.parametrize("reply, score", [
    ("The answer is correct and clear. Rating: [[7]]", 7.0),
    ("Rating: [[ 9 ]]", 9.0),
    ("[[8/10]]", 8.0),
    ("On a scale where 1 is poor and 10 is great... Rating: [[6]]", 6.0),
    ("Rating: [[3]]\nOn reflection: Rating: [[4]]", 4.0),  # the last bracketed rating counts
    ('{"score": 5, "reason": "ok"}', 5.0),
    ('Here is my grade: {"Rating": "8"}', 8.0),
    ("Score: 7", 7.0),
    ("score:7.5", 7.5),
    ("I give it a rating of 3.", 3.0),
    ("Overall score is **9**", 9.0),
    ("7/10", 7.0),
    ("This deserves 6 out of 10.", 6.0),
    ("10", 10.0),
    ("  **4**. ", 4.0),
    ("Rating: 10/10", 10.0),
    ("Rating: [6]", 6.0),
])
def test_score_shapes(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply", [
    None, "", "The answer is fine.", "Rating: [[11]]", "Rating: [[0]]", "12/10", "I cannot rate this.",
    '{"score": "high"}', "There are 3 problems and 2 typos.",
])
def test_no_score(reply):
    assert parse_score(reply) is None


@pytest.mark.parametrize("reply, verdict", [
    ("A is more thorough. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equally good: [[C]]", "tie"),
    ("[[tie]]", "tie"),
    ('{"winner": "B", "reason": "..."}', "B"),
    ("Final verdict: A", "A"),
    ("My verdict: **Assistant B**", "B"),
    ("The better one is A.", "A"),
    ("B", "B"),
    (" c ", "tie"),
    ("[C]", "tie"),
    ("I pick [B] here.", "B"),
    ("Hmm [[A]] ... no, on reflection [[B]]", "B"),  # the last one counts
])
def test_pair_shapes(reply, verdict):
    assert parse_pair(reply) == verdict


@pytest.mark.parametrize("reply", [None, "", "Both have merits.", "My verdict is a tough one to give.", "[[D]]", "Assistant A wrote more text than B did."])
def test_no_pair_verdict(reply):
    assert parse_pair(reply) is None


@pytest.mark.parametrize("first, second, outcome", [
    ("A", "B", "loss"),  # the parent wins in both orders
    ("B", "A", "win"),  # the child wins in both orders
    ("A", "A", "tie"),  # position bias: whoever is shown first wins -> a tie
    ("B", "B", "tie"),
    ("tie", "tie", "tie"),
    ("B", "tie", "tie"),  # the orders disagree
    (None, "A", None),
    ("A", None, None),
])
def test_both_orders(first, second, outcome):
    assert combine_orders(first, second) == outcome


def test_prompts_hold_the_conversation_the_reference_and_end_where_the_verdict_goes():
    turns, answers = ["What is 2+2?", "And 3+3?"], ["4", "6"]
    first = single_prompt(turns, answers, 0, ["4", "6"])
    assert "User: What is 2+2?" in first and "Assistant: 4" in first and "And 3+3?" not in first
    assert "[Reference]" in first and first.rstrip().endswith("Your rating:")
    second = single_prompt(turns, answers, 1)
    assert "And 3+3?" in second and "Assistant: 6" in second and "[Reference]" not in second
    pair = pair_prompt(turns, ["4", "6"], ["5", "7"])
    assert pair.index("Assistant: 4") < pair.index("[Assistant B]") < pair.index("Assistant: 5")
    assert pair.rstrip().endswith("Your verdict?") and GRADER_VERSION
