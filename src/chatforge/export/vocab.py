"""The tokenizer part of a GGUF file: tokens by id, their kinds, merges, and the pre-tokenizer name.

llama.cpp re-implements each tokenizer it supports and picks the text-splitting rule by name
(`tokenizer.ggml.pre`), so the name must describe what the tokenizer actually does. Supported:
byte-level BPE (`tokenizer.ggml.model = gpt2`) whose pre-tokenizer is one of

    ByteLevel (GPT-2 regex)                       -> "gpt-2"   (chatforge's tiny tokenizer, the default model as converted)
    Digits(individual) + ByteLevel (GPT-2 regex)  -> "smollm"  (SmolLM / SmolLM2 as published)
    Split(Qwen2 regex) + ByteLevel(no regex)      -> "qwen2"   (Qwen2 / Qwen2.5)

Anything else (sentencepiece, WordPiece, other split rules) is refused in one line rather than
written with a rule that would tokenise differently in llama.cpp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from chatforge.errors import ChatforgeError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values


@dataclass
class GGUFVocab:
    """`tokens[i]` is token id i (byte-level spelling), `types[i]` its gguf.TokenType value,
    `merges` the BPE merges as "left right" strings, `pre` llama.cpp's pre-tokenizer name."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def _byte_level(p: dict, use_regex: bool) -> bool:
    return p.get("type") == "ByteLevel" and p.get("use_regex", True) == use_regex


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer` entry, or None when it has none.

    >>> pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    'gpt-2'
    >>> pre_tokenizer_name({"type": "Whitespace"}) is None
    True
    """
    if not pre or pre.get("add_prefix_space"):
        return None
    if _byte_level(pre, use_regex=True):
        return "gpt-2"
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not parts or len(parts) != 2 or parts[1].get("add_prefix_space"):
        return None
    first, second = parts
    if first.get("type") == "Digits" and first.get("individual_digits") and _byte_level(second, True):
        return "smollm"
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    regex = (first.get("pattern") or {}).get("Regex")
    if first.get("type") == "Split" and regex == QWEN2_SPLIT and _byte_level(second, use_regex=False):
        return "qwen2"
    return None


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """The vocabulary of a fast byte-level BPE tokenizer, padded with unused tokens to the model's
    `vocab_size` (embedding rows), so llama.cpp's token count matches the weights."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        kind = model.get("type", "?")
        raise ChatforgeError(
            f"tokenizer: only byte-level BPE tokenizers (GPT-2, SmolLM, Qwen2 style) can be exported, this one is {kind}"
        )
    normalizer = spec.get("normalizer")
    if (
        normalizer and normalizer.get("type") != "NFC"
    ):  # Qwen2's NFC: llama.cpp's own converter ignores it too
        raise ChatforgeError(
            f"tokenizer: a {normalizer.get('type')} normalizer is not supported by export-gguf"
        )
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise ChatforgeError(
            "tokenizer: its pre-tokenizer is not one llama.cpp knows by name here "
            "(supported: GPT-2 byte-level, SmolLM digits + byte-level, Qwen2 split)"
        )
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise ChatforgeError(
            f"tokenizer: token id {max(by_id)} is beyond the model's {vocab_size} embedding rows"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(token)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFVocab(tokens, types, merges, pre)
