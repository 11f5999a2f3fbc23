"""Record kinds and their validation: pure functions from a raw record to what a stage trains on.

Each normaliser takes `(record, where)` and returns a clean value or raises `DataError` with a
one-line message `WHERE: FIELD what is wrong`, naming the field (`messages[2].role`), so a user can
fix their file without reading a traceback.

    record                                              normaliser       stage
    {"messages": [{"role", "content"}, ...]}            to_messages      sft
    {"prompt": str|messages, "completion": ...}         to_messages      sft
    {"conversations": [{"from", "value"}, ...]}         to_messages      sft (ShareGPT)
    {"instruction", "input"?, "output", "system"?}      to_messages      sft (Alpaca)
    {"prompt"?, "chosen", "rejected", "margin"?}        to_preference    reward model, dpo
    {"prompt": str|messages, "answer"?} / {"messages"}  to_prompt        ppo, grpo
    {"text": str}                                       to_text          pretrain

A message is `{"role": "system"|"user"|"assistant", "content": str}`; content may also be a list
of text parts `[{"type": "text", "text": str}]`, which is joined. Other message keys are dropped.

    >>> to_messages({"prompt": "2+3?", "completion": "5"}, "x.jsonl:1")
    [{'role': 'user', 'content': '2+3?'}, {'role': 'assistant', 'content': '5'}]
    >>> to_messages({"messages": [{"role": "bot", "content": "hi"}]}, "x.jsonl:7")
    Traceback (most recent call last):
    ...
    chatforge.errors.DataError: x.jsonl:7: messages[0].role must be one of system, user, assistant (got 'bot')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from chatforge.errors import DataError

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> roles.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}

Message = dict  # {"role": str, "content": str}


@dataclass
class PreferenceExample:
    """A prompt and two responses, `chosen` preferred over `rejected`.

    `prompt` ends where the responses start (usually on a user turn); `chosen` and `rejected` are
    the response turns only (starting with an assistant turn). `margin` is an optional preference
    strength some reward-model losses use.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None


@dataclass
class PromptExample:
    """A prompt for RL (ends on a user turn), with an optional reference answer for rule rewards.

    `meta` keeps the record's other fields (task name, test cases...) for reward functions.
    """

    prompt: list[Message]
    answer: str | None = None
    meta: dict = field(default_factory=dict)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    return {str: "a string", list: "a list", dict: "an object", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _content(value, where: str, name: str) -> str:
    if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if len(texts) != len(value) or not all(isinstance(t, str) for t in texts):
            raise DataError(
                f"{where}: {name} must be a string or a list of text parts (found a non-text part)"
            )
        value = "".join(texts)
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a non-empty string (got {_kind(value)})")
    if not value.strip():
        raise DataError(f"{where}: {name} must be a non-empty string (got {_short(value)})")
    return value


def check_messages(value, where: str, name: str = "messages") -> list[Message]:
    """Validate a list of chat messages and return clean `{role, content}` copies.

    Checks roles, non-empty contents and that a system message comes only first; says nothing
    about which role the list must start or end with (the callers know).

    >>> check_messages([{"role": "user", "content": "hi", "id": 3}], "f:1")
    [{'role': 'user', 'content': 'hi'}]
    >>> check_messages([{"role": "user", "content": ""}], "f:1", "prompt")
    Traceback (most recent call last):
    ...
    chatforge.errors.DataError: f:1: prompt[0].content must be a non-empty string (got '')
    """
    if not isinstance(value, list):
        raise DataError(f"{where}: {name} must be a list of {{role, content}} messages (got {_kind(value)})")
    if not value:
        raise DataError(f"{where}: {name} is empty")
    out = []
    for i, m in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {at} must be an object with role and content (got {_kind(m)})")
        if "role" not in m:
            raise DataError(f"{where}: {at}.role is missing")
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"{where}: {at}.role must be one of {', '.join(ROLES)} (got {_short(role)})")
        if role == "system" and i > 0:
            raise DataError(f"{where}: {at}.role is 'system', but a system message may only come first")
        if "content" not in m:
            raise DataError(f"{where}: {at}.content is missing")
        out.append({"role": role, "content": _content(m["content"], where, f"{at}.content")})
    return out


def _turns(value, where: str, name: str, role: str) -> list[Message]:
    """A string becomes one `role` turn; a list is checked as messages."""
    if isinstance(value, str):
        return [{"role": role, "content": _content(value, where, name)}]
    if isinstance(value, list):
        return check_messages(value, where, name)
    raise DataError(f"{where}: {name} must be a string or a list of messages (got {_kind(value)})")


def _require(record, where: str, *names: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(record)}")
    for n in names:
        if n not in record or record[n] is None:
            raise DataError(f"{where}: {n} is missing")


def _sharegpt(value, where: str) -> list:
    if not isinstance(value, list):
        raise DataError(
            f"{where}: conversations must be a list of {{from, value}} turns (got {_kind(value)})"
        )
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] must be an object with from and value")
        speaker = turn["from"]
        if speaker not in _SHAREGPT_ROLES:
            raise DataError(
                f"{where}: conversations[{i}].from must be one of {', '.join(_SHAREGPT_ROLES)} (got {_short(speaker)})"
            )
        out.append({"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return out


def _alpaca(record: dict, where: str) -> list:
    """Alpaca's instruction (+ optional input, appended after a blank line) and output.

    >>> [m["role"] for m in _alpaca({"instruction": "Say it.", "input": "cat", "output": "cat"}, "f:1")]
    ['user', 'assistant']
    """
    _require(record, where, "instruction", "output")
    user = _content(record["instruction"], where, "instruction")
    if record.get("input") not in (None, ""):
        user += "\n\n" + _content(record["input"], where, "input")
    system = record.get("system")
    head = [{"role": "system", "content": _content(system, where, "system")}] if system else []
    return [
        *head,
        {"role": "user", "content": user},
        {"role": "assistant", "content": _content(record["output"], where, "output")},
    ]


def to_messages(record: dict, where: str) -> list[Message]:
    """A supervised chat example: messages with at least one assistant turn to train on.

    >>> to_messages({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ...              "completion": "Hello"}, "f:1")[-1]
    {'role': 'assistant', 'content': 'Hello'}
    >>> to_messages({"messages": [{"role": "user", "content": "Hi"}]}, "f:2")
    Traceback (most recent call last):
    ...
    chatforge.errors.DataError: f:2: messages has no assistant message to train on
    """
    _require(record, where)
    if "messages" in record:
        _require(record, where, "messages")
        msgs, name = check_messages(record["messages"], where, "messages"), "messages"
    elif "conversations" in record:
        msgs = check_messages(_sharegpt(record["conversations"], where), where, "conversations")
        name = "conversations"
    elif "prompt" in record or "completion" in record:
        _require(record, where, "prompt", "completion")
        prompt = _turns(record["prompt"], where, "prompt", "user")
        completion = _turns(record["completion"], where, "completion", "assistant")
        if any(m["role"] == "system" for m in completion):
            raise DataError(f"{where}: completion must not contain a system message")
        msgs, name = prompt + completion, "completion"
    elif "instruction" in record or "output" in record:
        msgs, name = _alpaca(record, where), "output"
    else:
        raise DataError(
            f"{where}: needs a messages field (or prompt and completion, or instruction and output); "
            f"found {_fields(record)}"
        )
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: {name} has no assistant message to train on")
    return msgs


def _fields(record: dict) -> str:
    return ", ".join(sorted(record)) if record else "no fields"


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def to_preference(record: dict, where: str) -> PreferenceExample:
    """A preference pair. The prompt is a `prompt` field, or the turns `chosen` and `rejected` share.

    >>> ex = to_preference({"prompt": "2+3?", "chosen": "5", "rejected": "6", "margin": 2}, "f:1")
    >>> ex.prompt, ex.chosen[0]["content"], ex.rejected[0]["content"], ex.margin
    ([{'role': 'user', 'content': '2+3?'}], '5', '6', 2.0)
    >>> u = {"role": "user", "content": "2+3?"}
    >>> ex = to_preference({"chosen": [u, {"role": "assistant", "content": "5"}],
    ...                     "rejected": [u, {"role": "assistant", "content": "6"}]}, "f:2")
    >>> ex.prompt == [u], ex.chosen
    (True, [{'role': 'assistant', 'content': '5'}])
    """
    _require(record, where, "chosen", "rejected")
    chosen = _turns(record["chosen"], where, "chosen", "assistant")
    rejected = _turns(record["rejected"], where, "rejected", "assistant")
    if record.get("prompt") is not None:
        prompt = _turns(record["prompt"], where, "prompt", "user")
    else:
        if isinstance(record["chosen"], str):
            raise DataError(f"{where}: prompt is missing (string chosen/rejected need a prompt field)")
        n = _common_prefix(chosen, rejected)
        # The shared turns are the prompt only up to the last one before an assistant reply differs.
        while n > 0 and chosen[n - 1]["role"] == "assistant" and n in (len(chosen), len(rejected)):
            n -= 1
        if n == 0:
            raise DataError(f"{where}: prompt is missing (no prompt field and no shared leading turns)")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: prompt must end with a user turn (got 'assistant')")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise DataError(f"{where}: {name} has no response after the shared prompt turns")
        if turns[0]["role"] != "assistant":
            raise DataError(f"{where}: {name} must start with an assistant turn (got {turns[0]['role']!r})")
        if any(m["role"] == "system" for m in turns):
            raise DataError(f"{where}: {name} must not contain a system message")
    margin = record.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise DataError(f"{where}: margin must be a finite number (got {_short(margin)})")
        margin = float(margin)
    return PreferenceExample(prompt, chosen, rejected, margin)


def to_prompt(record: dict, where: str) -> PromptExample:
    """An RL prompt ending on a user turn, with an optional reference `answer` (kept as a string).

    >>> to_prompt({"prompt": "2+3?", "answer": 5, "task": "add"}, "f:1")
    PromptExample(prompt=[{'role': 'user', 'content': '2+3?'}], answer='5', meta={'task': 'add'})
    """
    _require(record, where)
    if record.get("prompt") is not None:
        prompt, name = _turns(record["prompt"], where, "prompt", "user"), "prompt"
    elif record.get("messages") is not None:
        prompt, name = check_messages(record["messages"], where, "messages"), "messages"
    else:
        raise DataError(f"{where}: needs a prompt (or messages) field; found {_fields(record)}")
    if prompt[-1]["role"] != "user":
        raise DataError(
            f"{where}: {name} must end with a user turn (got {prompt[-1]['role']!r}); "
            "put a reference answer in an answer field"
        )
    answer = record.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: answer must be a string or a number (got {_kind(answer)})")
        answer = str(answer)
    meta = {k: v for k, v in record.items() if k not in ("prompt", "messages", "answer")}
    return PromptExample(prompt, answer, meta)


def to_text(record: dict, where: str) -> str:
    """Raw text for pretraining.

    >>> to_text({"text": "Once upon a time"}, "f:1")
    'Once upon a time'
    """
    _require(record, where, "text")
    return _content(record["text"], where, "text")
