"""Assistant-only labels are exactly each reply + its end-of-turn token, under several templates."""

from __future__ import annotations

import itertools

import pytest

from chatforge.data.templates import (
    IGNORE_INDEX,
    PromptTooLong,
    end_of_turn,
    ensure_chat_template,
    stop_token_ids,
    tokenize_chat,
    tokenize_prompt,
    tokenize_prompt_response,
)
from chatforge.models.tiny import CHATML_TEMPLATE, tiny_tokenizer

# SmolLM2-135M-Instruct's template: a default system prompt when the first message is not one.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Writes an end-of-text token after the whole conversation only: renders of prefixes are then not
# string prefixes of the full render, which sends tokenize_chat down its content-search path.
ENDS_WITH_EOT_TEMPLATE = CHATML_TEMPLATE + "{% if not add_generation_prompt %}<|endoftext|>{% endif %}"

CHAT = [
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}] + CHAT


def with_template(template: str):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


def labelled_runs(tok, ex) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs = itertools.groupby(zip(ex.input_ids, ex.labels), key=lambda p: p[1] != IGNORE_INDEX)
    return [tok.decode([i for i, _ in group]) for labelled, group in runs if labelled]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOLLM2_TEMPLATE, ENDS_WITH_EOT_TEMPLATE])
@pytest.mark.parametrize("messages", [CHAT[:2], CHAT, WITH_SYSTEM])
def test_labels_are_exactly_the_replies(template, messages):
    tok = with_template(template)
    ex = tokenize_chat(tok, messages, max_length=512)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert labelled_runs(tok, ex) == replies
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ex.input_ids, ex.labels))
    assert not ex.truncated
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids) == text  # one tokenisation of the full render, nothing lost


def test_smollm2_default_system_prompt_is_in_the_input_not_the_labels():
    tok = with_template(SMOLLM2_TEMPLATE)
    ex = tokenize_chat(tok, CHAT, max_length=512)
    assert "named SmolLM" in tok.decode(ex.input_ids)
    assert "SmolLM" not in "".join(labelled_runs(tok, ex))


def test_train_on_everything():
    tok = tiny_tokenizer()
    ex = tokenize_chat(tok, CHAT, max_length=512, assistant_only=False)
    assert ex.labels == ex.input_ids


def test_truncation_keeps_the_beginning():
    tok = tiny_tokenizer()
    full = tokenize_chat(tok, CHAT, max_length=512)
    assert tok.decode(full.input_ids[-3:]) == "8<|im_end|>\n"
    cut = tokenize_chat(tok, CHAT, max_length=len(full.input_ids) - 2)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 2
    assert (cut.input_ids, cut.labels) == (full.input_ids[:-2], full.labels[:-2])
    # the first reply is whole, the second lost its end-of-turn token
    assert labelled_runs(tok, cut) == ["The answer is 5.<|im_end|>", "8"]


def test_conversation_opening_with_an_assistant_turn():
    tok = with_template(SMOLLM2_TEMPLATE)
    msgs = [{"role": "assistant", "content": "Hello! Ask me anything."}] + CHAT
    ex = tokenize_chat(tok, msgs, max_length=512)
    assert labelled_runs(tok, ex) == [
        "Hello! Ask me anything.<|im_end|>",
        "The answer is 5.<|im_end|>",
        "8<|im_end|>",
    ]


def test_prompt_and_response():
    tok = with_template(SMOLLM2_TEMPLATE)
    prompt = CHAT[:3]
    ids = tokenize_prompt(tok, prompt)
    assert tok.decode(ids).endswith("And 4 + 4?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    full, start, cut = tokenize_prompt_response(tok, prompt, CHAT[3:], max_length=512)
    assert (full[:start], tok.decode(full[start:]), cut) == (ids, "8<|im_end|>", False)
    short, start, cut = tokenize_prompt_response(tok, prompt, CHAT[3:], max_length=len(ids) + 1)
    assert (len(short), start, cut) == (len(ids) + 1, len(ids), True)
    with pytest.raises(PromptTooLong, match="prompt leaves no room for a response"):
        tokenize_prompt_response(tok, prompt, CHAT[3:], max_length=len(ids))


def test_ensure_chat_template_sets_chatml_only_when_missing():
    tok = tiny_tokenizer()
    assert ensure_chat_template(tok) is False
    tok.chat_template = None
    assert ensure_chat_template(tok) is True and tok.chat_template == CHATML_TEMPLATE
    assert end_of_turn(tok) == "<|im_end|>"


def test_fallback_closes_turns_with_eos_when_im_end_is_not_a_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(set("<|>_imstarendus\nhiok.abcdefghjlpqvwxyz!?0123456789 ")))}
    backend = Tokenizer(models.WordLevel({**vocab, "[UNK]": len(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    assert ensure_chat_template(tok) is True
    assert "<|im_end|>" not in tok.chat_template and "</s>" in tok.chat_template
    assert end_of_turn(tok) == "</s>" and stop_token_ids(tok) == [tok.eos_token_id]


def test_stop_tokens_include_an_end_of_turn_that_is_not_eos():
    tok = tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_content_search_path_is_taken_when_prefixes_do_not_render_as_prefixes(monkeypatch):
    import chatforge.data.templates as templates

    calls = []
    search = templates._search_spans
    monkeypatch.setattr(templates, "_search_spans", lambda *a: calls.append(1) or search(*a))
    tok = with_template(ENDS_WITH_EOT_TEMPLATE)
    ex = tokenize_chat(tok, CHAT, max_length=512)
    assert calls and labelled_runs(tok, ex) == ["The answer is 5.<|im_end|>", "8<|im_end|>"]
    calls.clear()
    tokenize_chat(with_template(SMOLLM2_TEMPLATE), CHAT, max_length=512)
    assert not calls
