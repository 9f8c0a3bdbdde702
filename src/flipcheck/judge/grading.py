"""The grading prompts (flipcheck's own text, versioned) and parsing of the judge's replies.

Single-answer grading rates the assistant's last reply of a conversation from 1 to 10; pairwise
comparison shows two assistants' whole conversations and asks for A, B or a tie (C). Both follow
the protocol of Zheng et al. 2023 (MT-Bench, "Judging LLM-as-a-judge"), in this project's words.

:data:`GRADER_VERSION` is part of every cached verdict's key: change any text below and bump it,
so no verdict given to an older prompt is reused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

GRADER_VERSION = "flipcheck-judge-1"

_SINGLE = """You are grading one reply of an AI assistant. Read the conversation below and rate the \
assistant's LAST reply on helpfulness, correctness, relevance, depth and clarity.{reference}
First write one or two sentences of reasoning. Then give your rating on its own line, exactly in \
this form: "Rating: [[N]]", where N is a whole number from 1 (useless) to 10 (excellent).

[Conversation]
{conversation}
[End of conversation]

Your rating:"""

_PAIR = """You are comparing two AI assistants, A and B, who each answered the same user in the \
conversation below. Decide whose replies are better overall: more helpful, correct, relevant, \
detailed and clear. Neither the order in which they are shown nor the length of their replies may \
sway you.{reference}
First write one or two sentences of reasoning. Then give your verdict on its own line: "[[A]]" if \
A is better, "[[B]]" if B is better, "[[C]]" if they are equally good.

[Assistant A]
{a}
[End of Assistant A]

[Assistant B]
{b}
[End of Assistant B]

Your verdict?"""

_REFERENCE = "\nA reference answer is given for comparison; judge correctness against it.\n\n[Reference]\n{text}\n[End of reference]\n"


def _conversation(turns: Sequence[str], answers: Sequence[str]) -> str:
    parts = []
    for q, a in zip(turns, answers, strict=True):
        parts.append(f"User: {q}\n\nAssistant: {a}")
    return "\n\n".join(parts)


def _reference(ref: Sequence[str] | None, upto: int) -> str:
    if not ref:
        return ""
    refs = [r for r in list(ref)[:upto] if r]
    if not refs:
        return ""
    text = "\n\n".join(f"(turn {i + 1}) {r}" for i, r in enumerate(list(ref)[:upto]) if r) if upto > 1 else refs[0]
    return _REFERENCE.format(text=text)


def single_prompt(turns: Sequence[str], answers: Sequence[str], turn: int, reference: Sequence[str] | None = None) -> str:
    """The grading prompt for the assistant's reply to user turn `turn` (0-based), with the turns before it."""
    k = turn + 1
    return _SINGLE.format(reference=_reference(reference, k), conversation=_conversation(turns[:k], answers[:k]))


def pair_prompt(turns: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
                reference: Sequence[str] | None = None) -> str:
    """The pairwise prompt: assistant A's and B's whole conversations."""
    return _PAIR.format(reference=_reference(reference, len(turns)), a=_conversation(turns, answers_a),
                        b=_conversation(turns, answers_b))


# -- parsing -------------------------------------------------------------------------------------------

_NUM = r"(\d+(?:\.\d+)?)"
_SCORE_PATTERNS = (
    re.compile(r"\[\[\s*" + _NUM + r"\s*(?:/\s*10\s*)?\]\]"),  # Rating: [[7]]  /  [[7/10]]
    re.compile(r"[\"']?(?:score|rating|grade)[\"']?\s*:\s*[\"'\[]?\s*" + _NUM, re.I),  # Score: 7, rating: "7", Rating: [7]
    re.compile(r"(?:score|rating|grade)\s*(?:is|of|=)?\s*\**\s*" + _NUM, re.I),  # rating of 7, score is **7**
    re.compile(_NUM + r"\s*(?:/|out of)\s*10\b", re.I),  # 7/10, 7 out of 10
    re.compile(r"^\s*\**\s*" + _NUM + r"\s*\**\s*\.?\s*$"),  # the whole reply is a number
)


def parse_score(reply: str | None) -> float | None:
    """The 1-10 rating in a judge's reply, or None when there is none.

    Tried in order, the first pattern that matches decides, and its LAST match counts (a judge
    that restates the scale before rating, "1 is poor ... Rating: [[7]]", is read right):
    ``[[7]]``; ``"score": 7`` / ``Score: 7`` / ``rating: 7``; ``rating of 7``; ``7/10`` or
    ``7 out of 10``; a reply that is only a number. A value outside 1..10 is not a rating (None).
    """
    if not reply:
        return None
    text = str(reply)
    obj = _json_object(text)
    if obj is not None:
        for key in ("score", "rating", "grade"):
            v = obj.get(key)
            if isinstance(v, int | float | str) and not isinstance(v, bool):
                try:
                    return _in_range(float(v))
                except ValueError:
                    pass
    for pat in _SCORE_PATTERNS:
        found = pat.findall(text)
        if found:
            return _in_range(float(found[-1]))
    return None


def _in_range(v: float) -> float | None:
    return v if 1.0 <= v <= 10.0 else None


def _json_object(text: str) -> dict | None:
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except ValueError:
        return None
    return {str(k).lower(): v for k, v in obj.items()} if isinstance(obj, dict) else None


_PAIR_PATTERNS = (
    re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I),  # [[A]] / [[B]] / [[C]] / [[tie]]
    re.compile(r"\[\s*([ABC])\s*\]"),  # [A] (small judges drop a bracket)
    re.compile(r"(?:verdict|winner|better(?: one| answer| assistant| response)?)\s*(?:is)?\s*[:=]?\s*\**\s*[\"']?(?:assistant\s+)?((?-i:[ABC])|tie)\b[\"']?", re.I),
    re.compile(r"^\s*\**\s*(?:assistant\s+)?(A|B|C|tie)\s*\**\s*\.?\s*$", re.I),  # the whole reply
)


def parse_pair(reply: str | None) -> str | None:
    """'A', 'B' or 'tie' from a pairwise reply, or None when there is no verdict.

    ``[[A]]``, ``[[B]]``, ``[[C]]`` (a tie) and ``[[tie]]`` first (the last one in the reply
    counts); then ``[A]``; then ``{"winner": "A"}``, ``Verdict: B``, ``winner is A``; then a
    reply that is only "A", "B", "C" or "tie".
    """
    if not reply:
        return None
    text = str(reply)
    obj = _json_object(text)
    if obj is not None:
        for key in ("winner", "verdict", "better"):
            v = obj.get(key)
            if isinstance(v, str) and v.strip().upper() in ("A", "B", "C", "TIE"):
                return _pair_value(v)
    for pat in _PAIR_PATTERNS:
        found = pat.findall(text)
        if found:
            return _pair_value(found[-1])
    return None


def _pair_value(v: str) -> str:
    v = v.strip().upper()
    return "tie" if v in ("C", "TIE") else v


def combine_orders(first: str | None, second: str | None) -> str | None:
    """Parent-vs-child outcome from two orders: `first` with the parent as A, `second` with the child as A.

    'win' / 'loss' are the CHILD's; both orders must agree, and an inconsistent pair (each side
    wins when shown first, or second) is a tie, which cancels position bias. None when either
    reply had no verdict.
    """
    if first is None or second is None:
        return None
    child_1 = {"A": "loss", "B": "win", "tie": "tie"}[first]
    child_2 = {"A": "win", "B": "loss", "tie": "tie"}[second]
    return child_1 if child_1 == child_2 else "tie"
