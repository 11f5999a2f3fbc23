"""Attention of one new token per row (a decoding step) as two small matrix products on a CPU.

torch's CPU kernel behind `scaled_dot_product_attention` is a flash kernel tiled for long queries:
with one query token per row it spends ~0.8 ms a layer in bf16 on what is a (B, heads, 1, T) product
(SmolLM2-135M, 8 rows, T ~110, one thread: a third of a decoding step, 1.1 s of a 48-token batch).
The same attention as `q @ k.T`, a float32 softmax and `@ v`, the query heads of one key/value head
grouped (no copy of the cache per head), takes ~0.16 ms. The math is attention's own, in float32
from the bf16 inputs as the flash kernel computes it; only the rounding of the sums differs.

`decode_attention(lm)` switches a transformers model that takes its attention from
`AttentionInterface` and runs `sdpa` to this function while active. Prefill (several query
tokens), GPU tensors, dropout and the features it does not cover (soft-capping, position biases,
attention sinks) go to transformers' `sdpa_attention_forward` unchanged; so does every model
that does not pick its attention by name (their `config._attn_implementation` is left alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

NAME = "chatforge_decode"
_UNCOVERED = ("softcap", "position_bias", "s_aux", "sinks")


def one_token_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query (B, H, q, D), key/value (B, KV, T, D),
    attention_mask bool (True = attend) or additive, broadcastable to (B, H, q, T); returns
    ((B, q, H, Dv), None) as `sdpa_attention_forward` does."""
    b, heads, q_len, dim = query.shape
    if (
        q_len != 1
        or query.device.type != "cpu"
        or dropout
        or any(kwargs.get(k) is not None for k in _UNCOVERED)
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.float().view(b, kv_heads, group, dim)  # a key/value head's query heads side by side
    scores = torch.matmul(q, key.float().transpose(-1, -2))
    scores.mul_(dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask
        if mask.shape[1] == heads and group > 1:
            mask = mask.reshape(mask.shape[0], kv_heads, group, mask.shape[-1])
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    out = torch.matmul(torch.softmax(scores, -1), value.float()).to(query.dtype)
    return out.view(b, 1, heads, value.shape[-1]), None


def applies(lm) -> bool:
    """Whether `lm` picks its attention by name and runs `sdpa` (what this module replaces)."""
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    config = getattr(inner, "config", None)
    return (
        getattr(inner, "_supports_attention_backend", False)
        and getattr(config, "_attn_implementation", None) == "sdpa"
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, one_token_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa takes (bool, True = attend)


def use_decode_attention(lm) -> Callable[[], None]:
    """Make a model that `applies` compute its decoding steps' attention with
    `one_token_attention`; returns the function that undoes it (other models are untouched)."""
    if not applies(lm):
        return lambda: None
    _register()
    config = (lm.get_base_model() if hasattr(lm, "get_base_model") else lm).config
    config._attn_implementation_internal = NAME

    def undo() -> None:
        config._attn_implementation_internal = "sdpa"

    return undo


@contextlib.contextmanager
def decode_attention(lm):
    """`use_decode_attention` for the duration of a `with` block (nested, it changes nothing)."""
    undo = use_decode_attention(lm)
    try:
        yield
    finally:
        undo()
