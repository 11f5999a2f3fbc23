"""Prompt datasets for the RL stages (PPO, GRPO): validated, tokenised prompts with their answers.

A record is `{"prompt": "..."}` (or a list of messages), or `{"messages": [...]}` ending on a user
turn, with an optional `answer` that rule-based rewards compare against; other fields are kept in
`meta`. Every record is validated before anything is tokenised (`FILE:LINE: field what is wrong`).

    items, report = build_prompt_examples(["prompts.jsonl"], tokenizer, max_prompt_tokens=480)
    batch = prompts_for_step(items, step=3, per_step=4, seed=42)

Policy for long prompts: a prompt with more than `max_prompt_tokens` tokens (the stages pass
`data.max_length - generate.max_new_tokens`, see `prompt_budget`) is skipped and counted in the
`DataReport`, never cut: cutting the start of a chat template corrupts it and cutting the end drops
the question. When no prompt fits, the build fails with the numbers and what to raise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.data.dataset import DataReport, load_validated
from chatforge.data.formats import to_prompt
from chatforge.errors import ConfigError, DataError

TOO_LONG = "prompt longer than data.max_length - generate.max_new_tokens"


@dataclass
class PromptItem:
    """One RL prompt.

    ids: prompt token ids with the assistant header appended (what generation starts from).
    text: the last user turn's content (what reward functions get as `prompts`).
    messages: the whole prompt conversation (system and earlier turns included).
    answer: the record's reference answer as a string, or None. where: `FILE:LINE` of the record.
    meta: the record's other fields.
    """

    ids: list[int]
    text: str
    messages: list[dict]
    answer: str | None = None
    where: str = ""
    meta: dict = field(default_factory=dict)


def prompt_budget(max_length: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed so prompt + response fit `data.max_length`.

    >>> prompt_budget(512, 32)
    480
    """
    budget = max_length - max_new_tokens
    if budget <= 0:
        raise ConfigError(
            f"data.max_length ({max_length}) leaves no room for prompts after generate.max_new_tokens "
            f"({max_new_tokens}): raise data.max_length"
        )
    return budget


def build_prompt_examples(
    paths: str | Path | Iterable[str | Path], tokenizer, max_prompt_tokens: int
) -> tuple[list[PromptItem], DataReport]:
    """Validated, tokenised prompts of `paths` and a report of what was skipped (see module doc)."""
    from chatforge.data.templates import ensure_chat_template, tokenize_prompt

    ensure_chat_template(tokenizer)
    records = load_validated(paths, to_prompt, with_where=True)
    report = DataReport(records=len(records), unit="prompts", max_length=max_prompt_tokens)
    items = []
    for where, ex in records:
        ids = tokenize_prompt(tokenizer, ex.prompt)
        if len(ids) > max_prompt_tokens:
            report.skip(TOO_LONG)
            continue
        items.append(PromptItem(ids, ex.prompt[-1]["content"], ex.prompt, ex.answer, where, ex.meta))
        report.tokens += len(ids)
    report.examples = len(items)
    if not items:
        raise DataError(
            f"no prompts left: {report.summary()}; every prompt has more than {max_prompt_tokens} tokens, "
            "raise data.max_length or lower generate.max_new_tokens"
        )
    return items, report


def require_answers(items: list[PromptItem], why: str) -> None:
    """Fail with `FILE:LINE` of the first prompt without an `answer` (rewards like exact_match need one)."""
    missing = [it for it in items if it.answer is None]
    if missing:
        more = f" (and {len(missing) - 1:,} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{missing[0].where}: answer is missing{more}; {why} needs an answer field per prompt"
        )


def prompts_for_step(items: list, step: int, per_step: int, seed: int) -> list:
    """The `per_step` prompts of RL step `step` (0-based): a fresh shuffle each pass over the data.

    Deterministic in (seed, step), so a resumed run sees the same prompts as an uninterrupted one.
    A pass that does not divide evenly ends early; its last prompts wait for a later pass.

    >>> prompts_for_step(list("abcde"), 0, 2, 0) != prompts_for_step(list("abcde"), 1, 2, 0)
    True
    >>> len(prompts_for_step(list("abc"), 5, 2, 0))
    2
    """
    from chatforge.train.schedule import epoch_order

    if per_step > len(items):
        raise ConfigError(
            f"{per_step} prompts per step but only {len(items)} prompts: add prompts or lower it"
        )
    steps_per_pass = len(items) // per_step
    epoch, pos = divmod(step, steps_per_pass)
    order = epoch_order(len(items), seed, epoch)
    return [items[i] for i in order[pos * per_step : (pos + 1) * per_step]]
