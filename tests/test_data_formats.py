"""Record normalisers: accepted shapes, and one-line errors that name the place and the field."""

from __future__ import annotations

import pytest

from chatforge.data.formats import PreferenceExample, to_messages, to_preference, to_prompt, to_text
from chatforge.errors import DataError

W = "data.jsonl:7"
U = {"role": "user", "content": "2+3?"}
A5 = {"role": "assistant", "content": "5"}
A6 = {"role": "assistant", "content": "6"}
S = {"role": "system", "content": "Be brief."}


def err(fn, record) -> str:
    with pytest.raises(DataError) as info:
        fn(record, W)
    msg = str(info.value)
    assert msg.startswith(f"{W}: ") and "\n" not in msg
    return msg


# -- to_messages ---------------------------------------------------------------------------------


def test_messages_pass_through_clean():
    rec = {"messages": [S, U, {**A5, "weight": 1}]}
    assert to_messages(rec, W) == [S, U, A5]


def test_prompt_completion_strings_and_lists():
    assert to_messages({"prompt": "2+3?", "completion": "5"}, W) == [U, A5]
    assert to_messages({"prompt": [S, U], "completion": [A5]}, W) == [S, U, A5]


def test_sharegpt_conversations():
    rec = {"conversations": [{"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "5"}]}
    assert to_messages(rec, W) == [U, A5]


def test_alpaca_records():
    assert to_messages({"instruction": "2+3?", "output": "5"}, W) == [U, A5]
    rec = {"instruction": "Add.", "input": "2+3", "output": "5", "system": "Be brief."}
    assert to_messages(rec, W) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add.\n\n2+3"},
        A5,
    ]


def test_content_text_parts_are_joined():
    rec = {"messages": [U, {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]}
    assert to_messages(rec, W)[1] == A5


@pytest.mark.parametrize(
    "record, expected",
    [
        (
            {"messages": [U, {"role": "bot", "content": "5"}]},
            "messages[1].role must be one of system, user, assistant (got 'bot')",
        ),
        (
            {"messages": [U, {"role": "assistant", "content": ""}]},
            "messages[1].content must be a non-empty string (got '')",
        ),
        (
            {"messages": [U, {"role": "assistant", "content": "  "}]},
            "messages[1].content must be a non-empty string",
        ),
        (
            {"messages": [U, {"role": "assistant", "content": 5}]},
            "messages[1].content must be a non-empty string (got int)",
        ),
        ({"messages": [U, {"role": "assistant"}]}, "messages[1].content is missing"),
        ({"messages": [U, {"content": "5"}]}, "messages[1].role is missing"),
        ({"messages": [U, "5"]}, "messages[1] must be an object"),
        ({"messages": [U, A5, S]}, "messages[2].role is 'system', but a system message may only come first"),
        ({"messages": [S, U]}, "messages has no assistant message to train on"),
        ({"messages": []}, "messages is empty"),
        ({"messages": "hi"}, "messages must be a list of {role, content} messages (got a string)"),
        ({"prompt": "2+3?"}, "completion is missing"),
        ({"completion": "5"}, "prompt is missing"),
        ({"prompt": "2+3?", "completion": ""}, "completion must be a non-empty string"),
        ({"prompt": "2+3?", "completion": [U]}, "completion has no assistant message"),
        ({"prompt": 3, "completion": "5"}, "prompt must be a string or a list of messages (got int)"),
        (
            {"text": "hi"},
            "needs a messages field (or prompt and completion, or instruction and output); found text",
        ),
        ({"instruction": "2+3?"}, "output is missing"),
        ({"instruction": "2+3?", "output": ""}, "output must be a non-empty string"),
        ({"instruction": "Add.", "input": 5, "output": "5"}, "input must be a non-empty string (got int)"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from must be one of"),
    ],
)
def test_messages_errors_name_the_field(record, expected):
    assert expected in err(to_messages, record)


# -- to_preference -------------------------------------------------------------------------------


def test_preference_strings():
    ex = to_preference({"prompt": "2+3?", "chosen": "5", "rejected": "6"}, W)
    assert ex == PreferenceExample([U], [A5], [A6], None)


def test_preference_explicit_conversational_prompt():
    ex = to_preference({"prompt": [S, U], "chosen": [A5], "rejected": [A6], "margin": 1}, W)
    assert ex == PreferenceExample([S, U], [A5], [A6], 1.0)


def test_preference_implicit_prompt_is_the_shared_prefix():
    u2 = {"role": "user", "content": "and 4+4?"}
    a8 = {"role": "assistant", "content": "8"}
    a9 = {"role": "assistant", "content": "9"}
    ex = to_preference({"chosen": [S, U, A5, u2, a8], "rejected": [S, U, A5, u2, a9]}, W)
    assert (ex.prompt, ex.chosen, ex.rejected) == ([S, U, A5, u2], [a8], [a9])


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "2+3?", "rejected": "6"}, "chosen is missing"),
        ({"prompt": "2+3?", "chosen": "5"}, "rejected is missing"),
        ({"prompt": "2+3?", "chosen": "", "rejected": "6"}, "chosen must be a non-empty string"),
        ({"prompt": "", "chosen": "5", "rejected": "6"}, "prompt must be a non-empty string"),
        ({"prompt": "2+3?", "chosen": "5", "rejected": "5"}, "chosen and rejected are identical"),
        ({"chosen": "5", "rejected": "6"}, "prompt is missing"),
        (
            {"chosen": [A5], "rejected": [A6]},
            "prompt is missing (no prompt field and no shared leading turns)",
        ),
        ({"chosen": [U, A5], "rejected": [U, A5]}, "chosen and rejected are identical"),
        ({"prompt": "2+3?", "chosen": [U, A5], "rejected": [A6]}, "chosen must start with an assistant turn"),
        (
            {"prompt": "q", "chosen": "5", "rejected": "6", "margin": "big"},
            "margin must be a finite number (got 'big')",
        ),
        (
            {"prompt": "q", "chosen": [{"role": "assistant", "content": None}], "rejected": "6"},
            "chosen[0].content",
        ),
    ],
)
def test_preference_errors_name_the_field(record, expected):
    assert expected in err(to_preference, record)


# -- to_prompt / to_text -------------------------------------------------------------------------


def test_prompt_forms():
    assert to_prompt({"prompt": "2+3?"}, W).prompt == [U]
    ex = to_prompt({"messages": [S, U], "answer": 5, "task": "add"}, W)
    assert (ex.prompt, ex.answer, ex.meta) == ([S, U], "5", {"task": "add"})


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": [U, A5]}, "messages must end with a user turn (got 'assistant')"),
        ({"prompt": "q", "answer": [1]}, "answer must be a string or a number (got a list)"),
        ({"question": "q"}, "needs a prompt (or messages) field; found question"),
        ({"prompt": [{"role": "user", "content": ""}]}, "prompt[0].content must be a non-empty string"),
    ],
)
def test_prompt_errors_name_the_field(record, expected):
    assert expected in err(to_prompt, record)


def test_text():
    assert to_text({"text": "abc"}, W) == "abc"
    assert "text is missing" in err(to_text, {"content": "abc"})
    assert "text must be a non-empty string (got int)" in err(to_text, {"text": 3})
