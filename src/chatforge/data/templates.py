"""Chat templates: render conversations with the model's own template and label exactly what to learn.

SFT trains on the tokens of each assistant reply plus the end-of-turn token that closes it (so the
model learns to stop), and on nothing of the system or user turns, nor of the assistant header the
template writes before a reply. The labels come from character spans, not from guessing token
patterns:

1. render the whole conversation once with `apply_chat_template(tokenize=False)`;
2. for assistant message i, `messages[:i]` rendered with the generation prompt ends where the reply
   starts, and `messages[:i + 1]` ends where its turn ends; the span stops right after the
   template's end-of-turn marker (`end_of_turn`: the special token a probe reply is closed with,
   such as `<|im_end|>` or `<|eot_id|>`), so separators after it (ChatML's newline) are left out;
   with no such token, the span stops before trailing whitespace;
3. tokenise the full text once with offsets and label the tokens that start inside a reply span.

Templates are checked to render these prefixes as string prefixes of the full render. Some do not
(Qwen3 drops earlier turns' reasoning; some add text only at the very end, and no template can
render an empty conversation, which is the prefix of a conversation that opens with an assistant
turn): then each reply is found by searching its content in the full render, in message order, and
the end-of-turn marker is labelled when it follows the content. A reply the template rewrote so
that its content no longer appears is then not labelled at all (and build_sft_examples counts an
example with nothing to learn).

Labels are not shifted: `labels[i]` is the target for token i, and the model code shifts.
The template text already holds any BOS, so the text is tokenised with `add_special_tokens=False`.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass

from chatforge.errors import DataError

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """Token ids with per-token targets (`IGNORE_INDEX` where nothing is learnt), cut to max_length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_trainable(self) -> int:
        """Targets the model can learn: `labels[0]` has nothing before it to predict it from."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


class PromptTooLong(DataError):
    """The prompt fills `max_length` by itself: the caller skips the example and counts it."""

    reason = "prompt leaves no room for a response"


def ensure_chat_template(tokenizer) -> bool:
    """Give `tokenizer` a ChatML template when it has none; returns True when it set one.

    A base model's tokenizer often has no template. ChatML (`<|im_start|>role\\n...<|im_end|>`) is
    the fallback. Its turns must end on a token the model can emit and generation stops at, so when
    `<|im_end|>` is not a token of the vocabulary the fallback closes turns with the tokenizer's EOS
    instead (with no EOS either, `<|im_end|>` stays plain text); `<|im_start|>` is then plain text,
    which is fine for a header. No tokens are added, so the model's embeddings never need resizing.
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    from chatforge.models.tiny import CHATML_TEMPLATE

    template = CHATML_TEMPLATE
    if not _is_single_token(tokenizer, "<|im_end|>") and tokenizer.eos_token:
        template = template.replace("<|im_end|>", tokenizer.eos_token)
    tokenizer.chat_template = template
    return True


def _is_single_token(tokenizer, text: str) -> bool:
    ids = tokenizer.convert_tokens_to_ids(text)
    return ids is not None and ids != tokenizer.unk_token_id


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (a string, whatever transformers version)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer, text: str, offsets: bool = False):
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)


_PROBE = "chatforge-probe-7f3a"
_MARKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _assistant_header(tokenizer) -> str:
    user = [{"role": "user", "content": "hi"}]
    head, plain = render(tokenizer, user, add_generation_prompt=True), render(tokenizer, user)
    return head[len(plain) :] if head.startswith(plain) else ""


def _end_marker(tokenizer) -> tuple[str, int | None]:
    """(text that closes an assistant turn, up to and including its special token; that token's id).

    Found by rendering a probe reply: the first special token after it, when only whitespace comes
    before it and it is not part of the assistant header (then it would open the next turn rather
    than close this one). ("", None) when the template closes turns with no special token.
    """
    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}
    try:
        text = render(tokenizer, [user, reply, {"role": "user", "content": "ok"}])
    except Exception:  # a template that insists on ending with an assistant turn
        text = render(tokenizer, [user, reply])
    at = text.find(_PROBE)
    if at < 0:
        return "", None
    after = text[at + len(_PROBE) :]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    enc = _encode(tokenizer, after, offsets=True)
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tid in special:
            if after[:s].strip() or after[s:e] in _assistant_header(tokenizer):
                break
            return after[:e], tid
    return "", None


def end_of_turn(tokenizer) -> str:
    """The text the template writes right after an assistant reply to close the turn ('' if none).

    >>> from chatforge.models.tiny import tiny_tokenizer
    >>> end_of_turn(tiny_tokenizer())
    '<|im_end|>'
    """
    template = tokenizer.chat_template
    try:
        cached = _MARKERS.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        return _end_marker(tokenizer)[0]
    if cached is None or cached[0] != template:
        cached = (template, _end_marker(tokenizer)[0])
        _MARKERS[tokenizer] = cached
    return cached[1]


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS and the template's end-of-turn token.

    For generation: a template may close turns with a token that is not the tokenizer's EOS
    (`<|im_end|>` under an `<|endoftext|>` EOS).

    >>> from chatforge.models.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    True
    """
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    _, marker_id = _end_marker(tokenizer)
    if marker_id is not None and marker_id not in ids:
        ids.append(marker_id)
    return ids


def _find_content(text: str, content: str, start: int, end: int | None = None) -> tuple[int, int]:
    """[a, b) of `content` in text[start:end] (templates may strip it), or (-1, -1)."""
    for c in (content, content.strip()):
        at = text.find(c, start, len(text) if end is None else end)
        if at >= 0:
            return at, at + len(c)
    return -1, -1


def _close(text: str, after: int, end: int, marker: str) -> int:
    """Where a reply span ends: after its end-of-turn marker, or before trailing whitespace."""
    rest = text[after:end]
    if marker and rest.startswith(marker):
        return after + len(marker)
    if marker and rest.lstrip().startswith(marker.lstrip()):
        return after + len(rest) - len(rest.lstrip()) + len(marker.lstrip())
    return after + len(rest.rstrip())


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(full render, character spans `[start, end)` of each assistant reply and its end-of-turn).

    >>> from chatforge.models.tiny import tiny_tokenizer
    >>> msgs = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    >>> text, spans = assistant_spans(tiny_tokenizer(), msgs)
    >>> [text[a:b] for a, b in spans]
    ['5<|im_end|>']
    """
    full = render(tokenizer, messages)
    marker = end_of_turn(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            return full, _search_spans(full, messages, marker)
        try:
            head = render(tokenizer, messages[:i], add_generation_prompt=True)
            turn = render(tokenizer, messages[: i + 1])
        except Exception:  # a template that rejects partial conversations (e.g. alternation checks)
            return full, _search_spans(full, messages, marker)
        if not (full.startswith(head) and full.startswith(turn) and len(head) <= len(turn)):
            return full, _search_spans(full, messages, marker)
        _, after = _find_content(full, m["content"], len(head), len(turn))
        if after < 0:  # the template rewrote the content: the whole turn, less trailing whitespace
            spans.append((len(head), len(head) + len(full[len(head) : len(turn)].rstrip())))
        else:
            spans.append((len(head), _close(full, after, len(turn), marker)))
    return full, spans


def _search_spans(full: str, messages: list[dict], marker: str) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for m in messages:
        at, after = _find_content(full, m["content"], cursor)
        if at < 0:
            continue  # the template rewrote this message; nothing of it can be labelled safely
        cursor = after
        if m["role"] == "assistant":
            cursor = _close(full, after, len(full), marker) if marker else after
            spans.append((at, cursor))
    return spans


def tokenize_chat(
    tokenizer, messages: list[dict], max_length: int, assistant_only: bool = True
) -> TokenizedExample:
    """Token ids and labels for a conversation, cut to `max_length` (the beginning is kept).

    With `assistant_only=False` every token is a target.

    >>> from chatforge.models.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> ex = tokenize_chat(tok, [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}], 64)
    >>> tok.decode([t for t in ex.labels if t != IGNORE_INDEX]), ex.truncated
    ('5<|im_end|>', False)
    """
    if assistant_only:
        text, spans = assistant_spans(tokenizer, messages)
    else:
        text, spans = render(tokenizer, messages), []
    enc = _encode(tokenizer, text, offsets=assistant_only)
    ids = list(enc["input_ids"])
    if assistant_only:
        starts = [a for a, _ in spans]
        labels = [IGNORE_INDEX] * len(ids)
        for k, (s, _e) in enumerate(enc["offset_mapping"]):
            j = bisect.bisect_right(starts, s) - 1
            if j >= 0 and s < spans[j][1]:
                labels[k] = ids[k]
    else:
        labels = list(ids)
    truncated = len(ids) > max_length
    return TokenizedExample(ids[:max_length], labels[:max_length], truncated)


def tokenize_prompt(tokenizer, prompt_messages: list[dict]) -> list[int]:
    """Token ids of the prompt with the generation prompt (the assistant header) appended.

    >>> from chatforge.models.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> tok.decode(tokenize_prompt(tok, [{"role": "user", "content": "hi"}]))
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    return list(
        _encode(tokenizer, render(tokenizer, prompt_messages, add_generation_prompt=True))["input_ids"]
    )


def tokenize_prompt_response(
    tokenizer, prompt_messages: list[dict], response_messages: list[dict], max_length: int
) -> tuple[list[int], int, bool]:
    """(prompt + response ids, index of the first response token, truncated).

    The prompt is tokenised exactly as `tokenize_prompt` does (what generation starts from) and the
    response is the rest of the render: the reply through its end-of-turn token, trailing
    whitespace dropped. A response that does not fit is cut; a prompt that leaves no room for one
    raises `PromptTooLong`, which the caller counts and skips.

    >>> from chatforge.models.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> ids, start, cut = tokenize_prompt_response(
    ...     tok, [{"role": "user", "content": "2+3?"}], [{"role": "assistant", "content": "5"}], 64)
    >>> tok.decode(ids[start:]), cut
    ('5<|im_end|>', False)
    """
    head = render(tokenizer, prompt_messages, add_generation_prompt=True)
    full = render(tokenizer, prompt_messages + response_messages)
    marker = end_of_turn(tokenizer)
    if full.startswith(head):
        _, after = _find_content(full, response_messages[-1]["content"], len(head))
        stop = _close(full, after, len(full), marker) if after >= 0 else len(full.rstrip())
        response = full[len(head) : stop]
    else:
        # The template renders the prompt differently once a reply follows: take the reply text itself.
        response = "".join(m["content"] for m in response_messages) + marker
    prompt_ids = list(_encode(tokenizer, head)["input_ids"])
    if len(prompt_ids) >= max_length:
        raise PromptTooLong(
            f"{PromptTooLong.reason} ({len(prompt_ids)} prompt tokens, max_length {max_length})"
        )
    response_ids = list(_encode(tokenizer, response)["input_ids"])
    ids = prompt_ids + response_ids
    return ids[:max_length], len(prompt_ids), len(ids) > max_length
