"""Building examples: validate everything first, then tokenise and count what was cut or skipped."""

from __future__ import annotations

import re

import pytest

from chatforge.data.dataset import build_sft_examples, build_text_examples, load_validated
from chatforge.data.formats import PromptExample, to_preference, to_prompt
from chatforge.data.templates import IGNORE_INDEX
from chatforge.errors import DataError


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_sft_examples_and_report(jsonl, tokenizer):
    path = jsonl([chat("What is 2+3?", "5"), {"prompt": "hello", "completion": "hello world"}])
    examples, report = build_sft_examples(path, tokenizer, max_length=64)
    assert len(examples) == 2 and set(examples[0]) == {"input_ids", "labels"}
    trained = [tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) for ex in examples]
    assert trained == ["5<|im_end|>", "hello world<|im_end|>"]
    assert (report.records, report.examples, report.truncated) == (2, 2, 0)
    assert report.tokens == sum(len(ex["input_ids"]) for ex in examples)
    assert report.summary().startswith("2 records -> 2 examples, ")


def test_sft_counts_truncated_and_skips_examples_left_with_nothing_to_learn(jsonl, tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    path = jsonl(
        [chat("2+3?", "5"), chat(long_prompt, "yes"), chat("hi", "The capital of France is Paris. " * 5)]
    )
    examples, report = build_sft_examples(path, tokenizer, max_length=32)
    assert (report.records, report.examples, report.truncated) == (3, 2, 2)
    assert report.skipped == {"assistant reply cut off by max_length": 1}
    assert all(len(ex["input_ids"]) <= 32 for ex in examples)
    assert (
        "2 truncated to 32 tokens; skipped 1 (assistant reply cut off by max_length: 1)" in report.summary()
    )


def test_sft_nothing_left_is_an_error(jsonl, tokenizer):
    path = jsonl([chat("The quick brown fox jumps over the lazy dog. " * 5, "yes")])
    with pytest.raises(DataError, match="no training examples left: .*raise data.max_length"):
        build_sft_examples(path, tokenizer, max_length=8)


@pytest.mark.parametrize(
    "bad, line, field",
    [
        ('{"messages": [', 2, "invalid JSON"),
        ({"prompt": "2+3?"}, 2, "completion is missing"),
        (
            {"messages": [{"role": "bot", "content": "5"}]},
            2,
            "messages[0].role must be one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            2,
            "messages[1].content must be a non-empty string",
        ),
    ],
)
def test_sft_bad_records_stop_before_tokenising(jsonl, tokenizer, monkeypatch, bad, line, field):
    import chatforge.data.templates as templates

    monkeypatch.setattr(
        templates, "tokenize_chat", lambda *a, **k: pytest.fail("tokenised before validating")
    )
    path = jsonl([chat("2+3?", "5"), bad, chat("q", "a")])
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:{line}: {re.escape(field)}"):
        build_sft_examples(path, tokenizer, max_length=64)


def test_all_bad_records_are_counted_and_the_first_is_shown(jsonl, tokenizer):
    path = jsonl([chat("ok", "ok"), "{bad json", {"text": "x"}, chat("ok", "ok"), {"messages": []}])
    with pytest.raises(DataError) as info:
        build_sft_examples(path, tokenizer, max_length=64)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: invalid JSON") and msg.endswith("(and 2 more bad records)")


def test_missing_file_and_empty_file(jsonl, tokenizer, tmp_path):
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(tmp_path))}/nope\.jsonl: no such file or directory$"
    ):
        build_sft_examples(tmp_path / "nope.jsonl", tokenizer, max_length=64)
    with pytest.raises(DataError, match=r"empty\.jsonl: no records$"):
        build_sft_examples(jsonl([], "empty.jsonl"), tokenizer, max_length=64)


def test_several_files(jsonl, tokenizer):
    a, b = jsonl([chat("a", "b")], "a.jsonl"), jsonl([chat("c", "d"), chat("e", "f")], "b.jsonl")
    examples, report = build_sft_examples([a, b], tokenizer, max_length=64)
    assert report.records == 3 and len(examples) == 3


def test_text_blocks(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("The quick brown fox")
    blocks, report = build_text_examples([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer, block_size=4)
    eos = tokenizer.eos_token_id
    stream = (
        tokenizer("hello world")["input_ids"] + [eos] + tokenizer("The quick brown fox")["input_ids"] + [eos]
    )
    assert [t for b in blocks for t in b["input_ids"]] == stream[: len(stream) - (len(stream) % 4 == 1)]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert all(len(b["input_ids"]) == 4 for b in blocks[:-1])
    assert report.tokens == len(stream) and report.examples == len(blocks) and report.unit == "blocks"


def test_load_validated_for_the_preference_and_prompt_stages(jsonl):
    prefs = jsonl([{"prompt": "2+3?", "chosen": "5", "rejected": "6"}], "prefs.jsonl")
    (pair,) = load_validated(prefs, to_preference)
    assert pair.chosen == [{"role": "assistant", "content": "5"}]
    prompts = jsonl([{"prompt": "2+3?", "answer": "5"}], "prompts.jsonl")
    assert load_validated(prompts, to_prompt, with_where=True) == [
        (f"{prompts}:1", PromptExample([{"role": "user", "content": "2+3?"}], "5", {}))
    ]
    bad = jsonl([{"prompt": "2+3?", "chosen": "5"}], "bad.jsonl")
    with pytest.raises(DataError, match=rf"^{re.escape(bad)}:1: rejected is missing$"):
        load_validated(bad, to_preference)
