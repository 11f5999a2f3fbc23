"""Checking answers: the exact rule that rule-based rewards and evaluation share (`verify`), and the
number readers behind it (`extract_number`, `final_number`).
"""

from __future__ import annotations

import json
import re

_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_INT = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)")


def extract_number(text: str) -> int | float | None:
    """The last number in `text` (thousands commas allowed), an int when it has no fraction.

    >>> extract_number("Tom has 7 apples, so the answer is 1,200.")
    1200
    >>> extract_number("about -2.5 degrees"), extract_number("none")
    (-2.5, None)
    """
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "")
    return float(s) if "." in s else int(s)


def _normalise(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


_ANSWER_MARK = re.compile(r"\banswer\s*(?:is\b|:|=)", re.IGNORECASE)


def _as_number(s: str) -> int | float:
    s = s.replace(",", "")
    return float(s) if "." in s else int(s)


def final_number(text: str) -> int | float | None:
    """The number a worked answer ends on: the first number after its last "answer is" (or
    "answer:"), else the last number in the text; None without any number.

    >>> final_number("3 x 6 = 18. 18 + 4 = 22. The answer is 22.")
    22
    >>> final_number("The answer is 22 shells, 4 more than 18."), final_number("So 3 + 4 = 7")
    (22, 7)
    >>> final_number("Final answer: **1,200**"), final_number("I do not know.")
    (1200, None)
    """
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        found = _NUMBER.search(text, marks[-1].end())
        if found:
            return _as_number(found.group())
    found = _NUMBER.findall(text)
    return _as_number(found[-1]) if found else None


def verify(task: str, response_text: str, answer: str) -> bool:
    """Exact check of a response; the rule follows the answer's form, `task` must be a known task.

    Light normalisation only: surrounding whitespace and one trailing period are ignored.
    - `arithmetic` with an integer answer: the response's final answer (`final_number`: the number
      after its last "The answer is", else its last number) must equal it, so worked steps
      ("3 x 6 = 18. 18 + 4 = 22. The answer is 22.") and a bare "22" both count;
    - other integer answers: the response must be just that integer (`"7"`, `" 7."`, `"1,000"`), so
      "The answer is 7." fails: those prompts ask for just the number and the demo rewards exact
      answers; use `extract_number` for a lenient score;
    - JSON answers: the response must parse to an equal JSON value (key order and spacing free);
    - anything else: an exact, case-sensitive string match.

    >>> verify("units", " 7.", "7"), verify("units", "The answer is 7.", "7")
    (True, False)
    >>> verify("arithmetic", "3 + 4 = 7. The answer is 7.", "7"), verify("arithmetic", "3 + 4 = 8.", "7")
    (True, False)
    >>> verify("format", '{"color":"blue"}', '{"color": "blue"}'), verify("format", "blue", "BLUE")
    (True, False)
    """
    from chatforge.data.tasks import _task

    _task(task)
    text = _normalise(response_text)
    if _PLAIN_INT.fullmatch(answer):
        want = int(answer.replace(",", ""))
        if task == "arithmetic":
            return final_number(text) == want
        return bool(_PLAIN_INT.fullmatch(text)) and int(text.replace(",", "")) == want
    if answer.startswith("{"):
        try:
            return json.loads(text) == json.loads(answer)
        except ValueError:
            return False
    return text == answer
