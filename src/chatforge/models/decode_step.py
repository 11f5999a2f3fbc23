"""One decoding step of a Llama-shaped transformers model, its layers' glue written out.

At a decoding step of a few rows, a 30-layer transformers forward spends ~15-20% of its time on
Python around the arithmetic: each layer's `forward`, its attention's and MLP's, the kwarg
deprecation wrappers on two of them, the mask builder, the output-capturing machinery. `step_fn(lm)`
gives a function that runs the same step, the same operations in the same order on the model's own
modules (its embeddings, rotary embedding, norms, projections, attention function, activation and
head), with that glue left out: the same bits (tested against the model's forward on Llama and
Qwen2, with and without padding), ~10% less time a step on SmolLM2-135M.

In bf16 on a CPU with AVX512-BF16, `models.kernels` also runs each layer's norms, residual adds,
rotary embedding and SiLU gate (`_KernelGlue`: five calls a layer instead of ~30 small torch
operations; bf16 rounding as torch's, but the norm's float32 mean of squares and silu's exp are
their own, so a rare output differs by one bf16 step).

It covers the decoder layers whose forward it restates (`_LAYERS`: Llama and SmolLM, Qwen2 without
sliding windows) under sdpa-style boolean masks; for anything else `step_fn` returns None and the
caller runs the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from chatforge.models import base_model, kernels

# decoder layers whose forward is Llama's: norm, attention with rotary q/k, residual, norm, gated MLP
_LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer"}
_ATTENTIONS = {"LlamaAttention", "Qwen2Attention"}
_MLPS = {"LlamaMLP", "Qwen2MLP"}


def covers(lm) -> bool:
    """Whether `step_fn` restates `lm`'s decoding step (otherwise run its own forward)."""
    from chatforge.models.attention import NAME

    base = base_model(lm)
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(inner, n) for n in ("embed_tokens", "rotary_emb", "norm")):
        return False
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False  # other attentions take other mask forms
    return hasattr(base, "lm_head") and all(
        type(layer).__name__ in _LAYERS
        and type(layer.self_attn).__name__ in _ATTENTIONS
        and type(layer.mlp).__name__ in _MLPS
        and getattr(layer.self_attn, "sliding_window", None) is None
        for layer in layers
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _side_by_side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a and b joined along the last dimension: a view where b follows a in each row of one buffer
    (q and k out of `models.packed`'s single q, k, v product), else a copy."""
    if (
        a.stride() == b.stride()
        and a.stride(-1) == 1
        and a.shape[:-1] == b.shape[:-1]
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.storage_offset() == a.storage_offset() + a.shape[-1]
    ):
        return a.as_strided((*a.shape[:-1], a.shape[-1] + b.shape[-1]), a.stride(), a.storage_offset())
    return torch.cat([a, b], -1)


_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm"}


def norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm's output with torch's one-call `rms_norm` over the float32 input (the same
    operations as the module's five, the same bits: tested); other norms run their forward."""
    if type(module).__name__ not in _NORMS:
        return module(x)
    normed = torch.nn.functional.rms_norm(x.float(), x.shape[-1:], eps=module.variance_epsilon)
    return module.weight * normed.to(x.dtype)


def step_fn(lm) -> Callable | None:
    """`step(ids (B, 1), positions (B, 1), mask (B, T) 1 on real tokens, cache) -> (B, V) float32
    logits of the next token` for a model `covers` accepts, else None. `cache` holds every layer's
    keys and values up to the new token (a transformers `Cache`, e.g. `rl.engine.buffer_cache`)."""
    if not covers(lm):
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = base_model(lm)
    inner, head = base.model, base.lm_head
    fused = _fused_glue(base)

    def step(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(base.config._attn_implementation, None)
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, 1, 1, head_dim): over (B, 1, heads, head_dim)
        # what transformers' sdpa mask is for one query token: none without padding, else the padding
        keep = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        rows = ids.shape[0]
        glue = _KernelGlue if fused and h.dtype == torch.bfloat16 and h.device.type == "cpu" else _TorchGlue
        layers = inner.layers
        x = glue.add_norm(h, None, layers[0].input_layernorm)
        for index, layer in enumerate(layers):
            attention, mlp = layer.self_attn, layer.mlp
            shape = (rows, 1, -1, attention.head_dim)
            # q's and k's heads side by side, rotated in one pass (each element as transformers does)
            q = attention.q_proj(x)
            heads = q.shape[-1] // attention.head_dim
            qk = glue.rotate(_side_by_side(q, attention.k_proj(x)).view(shape), cos, sin)
            q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
            v = attention.v_proj(x).view(shape).transpose(1, 2)
            k, v = cache.update(k, v, index)
            out, _ = attend(attention, q, k, v, keep, dropout=0.0, scaling=attention.scaling)
            x = glue.add_norm(h, attention.o_proj(out.reshape(rows, 1, -1)), layer.post_attention_layernorm)
            after = layers[index + 1].input_layernorm if index + 1 < len(layers) else inner.norm
            x = glue.add_norm(h, mlp.down_proj(glue.gate(mlp, x)), after)
        return head(x)[:, -1].to(copy=True, dtype=torch.float32)

    return step


class _TorchGlue:
    """A layer's elementwise steps in torch operations, as transformers' Llama layer runs them."""

    @staticmethod
    def add_norm(h: torch.Tensor, y: torch.Tensor | None, module) -> torch.Tensor:
        """`h += y` (the residual, in place), then the norm of h."""
        if y is not None:
            h += y
        return norm(module, h)

    @staticmethod
    def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return (qk * cos) + (_rotate_half(qk) * sin)

    @staticmethod
    def gate(mlp, x: torch.Tensor) -> torch.Tensor:
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


class _KernelGlue:
    """The same steps in `models.kernels` (bf16 on a CPU with AVX512-BF16; `_fused_glue` says when):
    one call each instead of ~30 small torch operations a layer, the residual add fused with the
    norm after it."""

    @staticmethod
    def add_norm(h: torch.Tensor, y: torch.Tensor | None, module) -> torch.Tensor:
        return kernels.add_rms_norm(h, y, module.weight, module.variance_epsilon)

    @staticmethod
    def rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        kernels.rotary(qk, cos[:, :, 0], sin[:, :, 0])  # in place, in the product's own buffer
        return qk

    @staticmethod
    def gate(mlp, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_mul(_side_by_side(mlp.gate_proj(x), mlp.up_proj(x)))


def _fused_glue(base) -> bool:
    """Whether `models.kernels` can run the elementwise steps of this model's layers (bf16 on a CPU
    with AVX512-BF16; SiLU MLPs, Llama norms, sizes the kernels take)."""
    if kernels.library() is None:
        return False
    config = base.config
    layer = base.model.layers[0]
    norms = (base.model.norm, layer.input_layernorm, layer.post_attention_layernorm)
    act = layer.mlp.act_fn
    return (
        all(type(m).__name__ in _NORMS for m in norms)
        and (type(act).__name__ == "SiLUActivation" or isinstance(act, torch.nn.SiLU))
        and config.hidden_size % 16 == 0
        and layer.mlp.gate_proj.out_features % 16 == 0
        and layer.self_attn.head_dim % 32 == 0
    )
