"""JSON mode (`response_format: {"type": "json_object"}`): sampling that can only write a JSON object.

`advance(state, text)` is a character-level JSON recogniser on an immutable state: the state after
`text`, or None when no JSON object begins that way. `choose` picks the next token among those that
keep the text a valid prefix: candidates are tried in the order of their Gumbel-perturbed scores (the
plain scores when greedy), so the first valid one is an exact sample from the model's distribution
restricted to valid tokens. The reply ends as soon as the object closes (finish_reason "stop"); at
`max_tokens` it may be cut (finish_reason "length"), as OpenAI's JSON mode is.

    >>> s = advance(START, '{"a": [1, 2.5e3, true], "b": {}')
    >>> s is not None and not complete(s), complete(advance(s, "}")), advance(s, "]")
    (True, True, None)
"""

from __future__ import annotations

import re

# state: (stack of open containers, mode, text of the number or literal being read)
START = ("", "top", "")
_WS = " \t\n\r"
_NUMBER_PREFIX = re.compile(r"-?((0|[1-9]\d*)(\.\d*)?|(0|[1-9]\d*)(\.\d+)?[eE][+-]?\d*)?")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_LITERALS = ("true", "false", "null")


def complete(state) -> bool:
    """Whether the text so far is a whole JSON object."""
    return state[1] == "done"


def _after_value(stack: str):
    return (stack, "done", "") if not stack else (stack, "after", "")


def _step(state, c: str):
    stack, mode, buf = state
    if mode == "number":
        if c in "0123456789+-.eE" and _NUMBER_PREFIX.fullmatch(buf + c):
            return stack, "number", buf + c
        return _step(_after_value(stack), c) if _NUMBER.fullmatch(buf) else None
    if mode == "literal":
        if any(w.startswith(buf + c) for w in _LITERALS):
            return (stack, "literal", buf + c) if buf + c not in _LITERALS else _after_value(stack)
        return None
    if mode in ("string", "key"):
        if c == "\\":
            return stack, mode + "-esc", ""
        if c == '"':
            return (stack, "colon", "") if mode == "key" else _after_value(stack)
        return None if ord(c) < 0x20 else state
    if mode.endswith("-esc"):
        base = mode[: -len("-esc")]
        if buf == "" and c in '"\\/bfnrt':
            return stack, base, ""
        if (buf == "" and c == "u") or (buf.startswith("u") and c in "0123456789abcdefABCDEF"):
            return (stack, mode, buf + c) if len(buf) < 4 else (stack, base, "")
        return None
    if c in _WS:
        return state
    if mode == "done":
        return None
    if mode == "top":
        return ("{", "key-or-end", "") if c == "{" else None
    if mode == "key-or-end" and c == "}":
        return _after_value(stack[:-1])
    if mode in ("key-or-end", "key-next"):
        return (stack, "key", "") if c == '"' else None
    if mode == "colon":
        return (stack, "value", "") if c == ":" else None
    if mode == "after":
        closer = "}" if stack[-1] == "{" else "]"
        if c == closer:
            return _after_value(stack[:-1])
        if c == ",":
            return (stack, "key-next", "") if stack[-1] == "{" else (stack, "value", "")
        return None
    # mode is "value" or "value-or-end"
    if mode == "value-or-end" and c == "]":
        return _after_value(stack[:-1])
    if c == "{":
        return stack + "{", "key-or-end", ""
    if c == "[":
        return stack + "[", "value-or-end", ""
    if c == '"':
        return stack, "string", ""
    if c == "-" or c.isdigit():
        return stack, "number", c
    if c in "tfn":
        return stack, "literal", c
    return None


def advance(state, text: str):
    """The state after `text`, or None if the text cannot continue a JSON object."""
    for c in text:
        if state is None:
            return None
        state = _step(state, c)
    return state


def choose(keys, state, stop_ids: set[int], token_text) -> tuple[int | None, object]:
    """(token id, new state): the best-keyed token that keeps the text a valid prefix. `keys` (V,) are
    the perturbed scores (-inf where top-p cut: tried last); `token_text(id)` a token's text. End-of-turn
    tokens never fit (the reply ends when the object closes). (None, state) when nothing fits."""
    import torch

    for tid in torch.argsort(keys, descending=True).tolist():
        text = "" if tid in stop_ids else token_text(tid)
        if text and "\ufffd" not in text and (new := advance(state, text)) is not None:
            return tid, new
    return None, state
