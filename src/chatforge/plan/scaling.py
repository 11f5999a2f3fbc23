"""Compute planning: Chinchilla token budgets, training FLOPs, time and cost, and pretraining presets.

Hoffmann et al. (2022) found that a compute-optimal model sees about 20 tokens per parameter, and
training costs about C = 6 * N * D FLOPs (N parameters, D tokens: 2 for the forward pass, 4 for the
backward). Together they give N = sqrt(C / 120) and D = 20 * N for a budget C.

    >>> chinchilla_tokens(111_000_000)
    2220000000
    >>> compute_optimal(1.2e20)
    (1000000000, 20000000000)
    >>> round(training_time(training_flops(1e9, 2e10), tflops=989, mfu=0.4), 1)  # hours on one H100
    84.3

`PRESETS` are shapes for pretraining from scratch, as LLaMA-style config kwargs. The three larger ones
follow Cerebras-GPT (Dey et al., 2023), but chatforge builds every preset as a LLaMA-style model
(RoPE instead of learned positions, RMSNorm, SwiGLU, tied embeddings). To keep the feed-forward
weights close to Cerebras' two-matrix GELU MLP of width `ffn`, the three-matrix SwiGLU gets
`intermediate_size = 2/3 * ffn` rounded to a multiple of 64; with no position table and a different
vocabulary the totals differ slightly from Cerebras' GPT-2-style ones. Parameters (tied embeddings):

    preset  layers  hidden  heads(kv)  intermediate   vocab 512   vocab 49152 (SmolLM2 tokenizer)
    tiny         2      64     4(2)           128       106,816      3,219,776
    micro        6     128     4(2)           512     1,541,760      7,767,680
    mini         8     384     6(2)          1024    12,786,048     31,463,808
    111m        10     768    12(12)         2048    71,188,224    108,543,744   (Cerebras 111M)
    256m        14    1088    17(17)         2880   198,482,752    251,403,072   (Cerebras 256M)
    590m        18    1536    12(12)         4096   510,451,200    585,162,240   (Cerebras 590M)

Between and below the presets, a width/depth dial names a shape as `WIDTHxDEPTH` (`96x3`: hidden size
96, 3 layers): heads of 16 dimensions below width 64 and 32 from there, half as many KV heads, and
a SwiGLU width of 8/3 * hidden rounded to a multiple of 16 (LLaMA's ratio). Scaling-law studies use
it to space sizes evenly (`chatforge scaling study`, chatforge.plan.law for the fit).

    >>> model_shape("96x3")["intermediate_size"], model_shape("96x3")["num_attention_heads"]
    (256, 3)
"""

from __future__ import annotations

import math
import re

TOKENS_PER_PARAM = 20

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "micro": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "mini": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
    ),
    "111m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
    "256m": dict(
        hidden_size=1088,
        intermediate_size=2880,
        num_hidden_layers=14,
        num_attention_heads=17,
        num_key_value_heads=17,
    ),
    "590m": dict(
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=18,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
}

# The published Cerebras-GPT shapes the larger presets follow (GPT-2 style, vocab 50257, 2048 positions).
CEREBRAS_GPT = {
    "111m": dict(n_layer=10, d_model=768, n_head=12, d_ffn=3072),
    "256m": dict(n_layer=14, d_model=1088, n_head=17, d_ffn=4352),
    "590m": dict(n_layer=18, d_model=1536, n_head=12, d_ffn=6144),
}


def dial_shape(width: int, depth: int) -> dict[str, int]:
    """LLaMA config kwargs of a model `width` wide and `depth` layers deep (see the module docstring)."""
    head_dim = 16 if width < 64 else 32
    if width < 16 or width % head_dim or depth < 1:
        raise ValueError(
            f"size {width}x{depth}: the width must be a multiple of {head_dim} (16 below 64, 32 from 64) "
            "and the depth at least 1"
        )
    heads = width // head_dim
    return dict(
        hidden_size=width,
        intermediate_size=max(16, round(8 * width / 3 / 16) * 16),
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
    )


def model_shape(size: str) -> dict[str, int]:
    """LLaMA config kwargs for a size: a preset name (`tiny`, `111m`, ...) or `WIDTHxDEPTH` (`96x3`)."""
    if size in PRESETS:
        return dict(PRESETS[size])
    m = re.fullmatch(r"(\d+)x(\d+)", size.strip())
    if m is None:
        raise ValueError(
            f"unknown size {size!r}: name a preset ({', '.join(PRESETS)}) or WIDTHxDEPTH like 96x3"
        )
    return dial_shape(int(m[1]), int(m[2]))


def preset_config(name: str, vocab_size: int = 49152, **overrides) -> dict:
    """A full LLaMA config dict for preset or `WIDTHxDEPTH` size `name` (for `transformers.LlamaConfig(**d)`).

    >>> preset_config("tiny", vocab_size=512)["hidden_size"]
    64
    """
    if name not in PRESETS and "x" not in name:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} (or WIDTHxDEPTH like 96x3)")
    base = dict(
        model_type="llama",
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    return {**base, **model_shape(name), **overrides}


def chinchilla_tokens(n_params: float, tokens_per_param: float = TOKENS_PER_PARAM) -> int:
    """Compute-optimal training tokens for a model of `n_params` parameters."""
    return round(n_params * tokens_per_param)


def training_flops(n_params: float, n_tokens: float) -> float:
    """Training FLOPs, 6 * N * D (forward 2ND, backward 4ND; attention FLOPs ignored)."""
    return 6.0 * n_params * n_tokens


def compute_optimal(flops_budget: float) -> tuple[int, int]:
    """`(n_params, n_tokens)` that spend `flops_budget` compute-optimally: N = sqrt(C/120), D = 20N."""
    if flops_budget <= 0:
        raise ValueError(f"flops_budget must be > 0, got {flops_budget}")
    n = math.sqrt(flops_budget / (6 * TOKENS_PER_PARAM))
    return round(n), round(TOKENS_PER_PARAM * n)


def training_time(flops: float, tflops: float, mfu: float = 0.4, n_devices: int = 1) -> float:
    """Wall-clock hours to spend `flops` on `n_devices` of `tflops` peak TFLOP/s at utilisation `mfu`.

    `mfu` (model FLOPs utilisation) is the share of peak that training reaches: 0.3-0.5 is typical for
    well-tuned GPU runs, far less for small models or CPUs.
    """
    if tflops <= 0 or not 0 < mfu <= 1 or n_devices < 1:
        raise ValueError("need tflops > 0, 0 < mfu <= 1 and n_devices >= 1")
    return flops / (tflops * 1e12 * mfu * n_devices) / 3600.0


def cost(hours: float, price_per_hour: float, n_devices: int = 1) -> float:
    """Cost of `hours` of wall-clock time on `n_devices`, each at `price_per_hour`."""
    return hours * price_per_hour * n_devices
