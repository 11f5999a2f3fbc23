"""A decoding step's attention in bf16 on a CPU through the fast side of torch's flash kernel.

torch's CPU flash kernel (behind `scaled_dot_product_attention`) is slow in bf16 when a head has
a single query row, which is every decoding step: with grouped key/value heads (transformers'
`enable_gqa=True` when there is no padding mask) ~0.7-1.0 ms a layer for SmolLM2-135M's 8 rows
x ~110 cached tokens on 2 cores, a third of the step; without grouping (GPT-2, OPT) ~0.5 ms. The
same kernel given two or more query rows takes ~0.1-0.2 ms. So `one_token_attention` hands it
several rows: the query heads that share a key/value head as the rows of that head (what
transformers itself does when there is a padding mask), or, without grouping, the query row twice
(the copy's answer is dropped). The kernel and its arithmetic are the ones transformers calls:
outputs equal `sdpa_attention_forward`'s bit for bit but for rare last-bit roundings (in a decoding
step of SmolLM2-135M, 1 to 4 of a layer's 4,608 outputs, in up to 3 of its 30 layers, differ by one
bf16 step), so a sampled answer can go its own way where a draw falls on a token boundary.

`decode_attention(lm)` switches a transformers model that takes its attention from
`AttentionInterface` and runs `sdpa` to this function while active. Everything else goes to
`sdpa_attention_forward` unchanged: prefill (several query tokens), float32 (fast with one row),
GPU tensors, dropout and the features it does not cover (soft-capping, position biases, attention
sinks); models that do not pick their attention by name are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from chatforge.models import base_model, kernels

NAME = "chatforge_decode"
_UNCOVERED = ("softcap", "position_bias", "s_aux", "sinks")


def one_token_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query (B, H, q, D), key/value (B, KV, T, D),
    attention_mask bool (True = attend) or additive, broadcastable to (B, H, q, T); returns
    ((B, q, H, Dv), None) as `sdpa_attention_forward` does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, _ = query.shape
    if (
        q_len != 1
        or query.dtype not in (torch.bfloat16, torch.float16)
        or query.device.type != "cpu"
        or dropout
        or any(kwargs.get(k) is not None for k in _UNCOVERED)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kernels.library() is not None:  # AVX512-BF16: the decoding kernel, ~10x faster still
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = kernels.attention(query, key, value, attention_mask, scale)
        if out is not None:
            return out, None
    kv_heads = key.shape[1]
    group = heads // kv_heads
    mask = attention_mask
    if group > 1:  # (B, KV, group, D): a key/value head's query heads as its query rows
        rows = query.reshape(b, kv_heads, group, query.shape[-1])
        if mask is not None and mask.shape[1] == heads:
            mask = mask.reshape(mask.shape[0], kv_heads, group, mask.shape[-1])
    else:  # the query row twice; the kernel computes each row alone, the copy is dropped
        rows = torch.cat([query, query], 2)
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scaling)
    if group == 1:
        out = out[:, :, :1]
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def applies(lm) -> bool:
    """Whether `lm` picks its attention by name and runs `sdpa` (what this module replaces)."""
    inner = base_model(lm)
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
    config = base_model(lm).config
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
