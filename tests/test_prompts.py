"""Prompt datasets for RL: formats, FILE:LINE errors, long prompts counted, step batches for resume."""

import pytest

from chatforge.data.prompts import (
    TOO_LONG,
    build_prompt_examples,
    prompt_budget,
    prompts_for_step,
    require_answers,
)
from chatforge.data.templates import tokenize_prompt
from chatforge.errors import ConfigError, DataError


def test_prompt_and_messages_records(tokenizer, jsonl):
    path = jsonl(
        [
            {"prompt": "2+3?", "answer": 5, "task": "add"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Capital of France?"},
                ]
            },
        ]
    )
    items, report = build_prompt_examples([path], tokenizer, 100)
    assert [it.text for it in items] == ["2+3?", "Capital of France?"]
    assert [it.answer for it in items] == ["5", None]
    assert items[0].meta == {"task": "add"}
    assert items[0].where.endswith("data.jsonl:1") and items[1].where.endswith("data.jsonl:2")
    assert items[1].ids == tokenize_prompt(tokenizer, items[1].messages)
    assert tokenizer.decode(items[0].ids).endswith("<|im_start|>assistant\n")
    assert report.records == 2 and report.examples == 2


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "hi"}, "data.jsonl:2: needs a prompt (or messages) field"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "data.jsonl:2: messages must end with a user turn",
        ),
        ({"prompt": "hi", "answer": [1]}, "data.jsonl:2: answer must be a string or a number"),
        ({"prompt": ""}, "data.jsonl:2: prompt"),
        ("{not json", "data.jsonl:2:"),
    ],
)
def test_bad_records_name_file_and_line(tokenizer, jsonl, record, message):
    path = jsonl([{"prompt": "fine"}, record])
    with pytest.raises(DataError) as e:
        build_prompt_examples(path, tokenizer, 100)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_long_prompts_are_skipped_and_counted_not_cut(tokenizer, jsonl):
    path = jsonl([{"prompt": "hi"}, {"prompt": "hello world " * 40}])
    items, report = build_prompt_examples(path, tokenizer, 20)
    assert [it.text for it in items] == ["hi"]
    assert report.skipped[TOO_LONG] == 1
    assert "skipped 1" in report.summary()
    with pytest.raises(DataError, match="no prompts left.*raise data.max_length"):
        build_prompt_examples(path, tokenizer, 3)


def test_budget_and_missing_answers(tokenizer, jsonl):
    assert prompt_budget(64, 16) == 48
    with pytest.raises(ConfigError, match="raise data.max_length"):
        prompt_budget(16, 16)
    items, _ = build_prompt_examples(jsonl([{"prompt": "a", "answer": "1"}, {"prompt": "b"}]), tokenizer, 50)
    with pytest.raises(DataError, match=r"data.jsonl:2: answer is missing; exact_match needs"):
        require_answers(items, "exact_match")


def test_step_batches_cover_each_pass_and_repeat_by_seed():
    items = list(range(10))
    first_pass = [x for s in range(5) for x in prompts_for_step(items, s, 2, seed=1)]
    assert sorted(first_pass) == items
    assert prompts_for_step(items, 7, 2, seed=1) == prompts_for_step(items, 7, 2, seed=1)
    assert [prompts_for_step(items, s, 2, 1) for s in range(5, 10)] != [
        prompts_for_step(items, s, 2, 1) for s in range(5)
    ]
    with pytest.raises(ConfigError, match="only 10 prompts"):
        prompts_for_step(items, 0, 11, 1)
