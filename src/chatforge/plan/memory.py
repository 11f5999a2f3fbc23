"""Memory planner: will this model, method and batch fit on this device, and where do the bytes go?

An estimate from the model's shape alone, before loading anything. It sums:

- weights: every copy of the base model the stage holds, plus adapters. QLoRA stores the decoder
  linears in NF4 and keeps embeddings and norms in bf16. NF4 with double quantisation costs 4 bits
  per weight, plus an 8-bit absmax per block of 64 weights, plus one fp32 scale per 256 such blocks:
  4 + 8/64 + 32/(64*256) = 4.127 bits = `NF4_BYTES` = 0.51587 bytes per parameter;
- gradients and optimizer states of the trainable parameters (AdamW keeps two states in the
  parameter's dtype, as torch does; adapters are fp32, as peft casts them by default);
- activations, per decoder layer from Korthikanti et al. (2022), "Reducing Activation Recomputation
  in Large Transformer Models": s*b*h*(34 + 5*a*s/h) bytes in 16-bit (s sequence length, b batch,
  h hidden size, a heads). The 5*a*s^2*b part holds the attention scores, which SDPA / FlashAttention
  never store, so it is left out unless `flash_attention=False`. fp32 compute doubles it. Gradient
  checkpointing keeps only each layer's input (2*s*b*h bytes) plus one layer recomputed in backward;
- logits: one fp32 copy of (tokens, vocab), b*s*V*4 bytes, or `logits_chunk` tokens at a time when
  log-probs are computed in chunks (chatforge's `models/logprobs.py` does);
- the KV cache of generation (PPO, GRPO, inference): 2 * layers * b * s * kv_heads * head_dim values.

Stages: `sft`; `reward` (chosen and rejected, a score head instead of logits); `dpo` (chosen and
rejected; the reference is the base with adapters off, or a frozen copy in full fine-tuning); `ppo`
with the lean layout (one frozen base + actor, critic and reward adapters) or the classic four-model
layout (actor, critic, reference and reward, each a full model); `grpo` (policy + reference, no
critic); `inference`. Actor and critic are assumed to run backward one after the other.

The result is an estimate: allocator fragmentation, CUDA context and framework buffers are not
counted, which is why `fits` keeps a share of the device free.

    >>> from chatforge.plan.shapes import DEFAULT_MODEL_CONFIG, ModelShape
    >>> shape = ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG)  # SmolLM2-135M
    >>> shape.n_params
    134515008
    >>> est = estimate(shape, method="lora", batch=4, seq_len=256)
    >>> round(est.total_gib, 2), fits(est, device_gib=8)
    (1.07, True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from chatforge.plan.shapes import ModelShape, load_shape

GIB = 2**30
NF4_BYTES = 0.5 + 8 / 64 / 8 + 32 / (64 * 256) / 8
# int8 (LLM.int8) also stores one fp32 scale per output row: 4/in_features bytes per weight, ignored.
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": NF4_BYTES}
QUANTIZED = ("int8", "nf4")
METHODS = ("full", "lora", "qlora")
STAGES = ("sft", "reward", "dpo", "ppo", "grpo", "inference")
PPO_LAYOUTS = ("lean", "four")
# name -> (states per parameter, bytes per state; None: the trainable parameter's dtype, as torch keeps them)
OPTIMIZERS: dict[str, tuple[int, float | None]] = {
    "adamw": (2, None),
    "adamw_8bit": (2, 1.0),
    "sgd": (0, None),
}

# Estimates -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What a stage holds: copies of the base, trained models, frozen adapters, sequences per step."""

    base_copies: int
    trained: int
    frozen_adapters: int = 0
    seq_factor: int = 1
    logits: bool = True
    kv_cache: bool = False
    backward: bool = True


def _layout(stage: str, adapters: bool, ppo_layout: str) -> _Layout:
    if stage == "sft":
        return _Layout(1, 1)
    if stage == "reward":
        return _Layout(1, 1, seq_factor=2, logits=False)
    if stage == "dpo":  # adapters: the reference is the base with adapters disabled
        return _Layout(1 if adapters else 2, 1, seq_factor=2)
    if stage == "ppo":
        if ppo_layout == "lean":  # one base: actor, critic (trained) and reward (frozen) adapters
            return _Layout(1, 2, frozen_adapters=1, kv_cache=True)
        return _Layout(4, 2, kv_cache=True)  # actor, critic, reference, reward
    if stage == "grpo":
        return _Layout(1 if adapters else 2, 1, kv_cache=True)
    return _Layout(1, 0, kv_cache=True, backward=False)  # inference


@dataclass(frozen=True)
class Estimate:
    """Bytes per component (`breakdown`) for one configuration, with what it assumed (`notes`)."""

    shape: ModelShape
    method: str
    stage: str
    weight_dtype: str
    batch: int
    seq_len: int
    trainable_params: int
    breakdown: dict[str, int]
    notes: tuple[str, ...] = field(default=())
    optimizer: str = "adamw"

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def _activation_bytes(shape: ModelShape, b: int, s: int, act_bytes: int, flash: bool, ckpt: bool) -> int:
    """Korthikanti et al. activations of `b` sequences of `s` tokens, scaled from 16-bit to `act_bytes`."""
    h, a = shape.hidden, shape.n_heads
    per_layer = 34 * s * b * h + (0 if flash else 5 * a * s * s * b)
    per_layer = per_layer * act_bytes // 2
    if ckpt:
        return shape.n_layers * s * b * h * act_bytes + per_layer
    return shape.n_layers * per_layer


def estimate(
    shape: ModelShape,
    method: str = "lora",
    weight_dtype: str | None = None,
    optimizer: str = "adamw",
    lora_r: int = 16,
    lora_targets: str | Iterable[str] = "all-linear",
    lora_params: int | None = None,
    batch: int = 1,
    seq_len: int = 512,
    grad_checkpointing: bool = False,
    stage: str = "sft",
    ppo_layout: str | None = None,
    flash_attention: bool = True,
    logits_chunk: int | None = None,
    master_weights: bool = False,
) -> Estimate:
    """Estimate peak training (or inference) memory; see the module docstring for the formulas.

    `weight_dtype` defaults to nf4 for qlora and bf16 otherwise; int8/nf4 are for adapter methods.
    `lora_params` overrides the count from `lora_r` and `lora_targets`. `batch` counts sequences
    (prompts for DPO/reward, which hold two sequences each; completions for PPO/GRPO) of `seq_len`
    tokens. `ppo_layout` is "lean" (default with adapters) or "four" (the only choice for full).
    `master_weights` adds an fp32 copy of 16-bit weights and fp32 optimizer states (mixed precision
    as DeepSpeed does it); by default training is pure-dtype, as torch does it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    weight_dtype = weight_dtype or ("nf4" if method == "qlora" else "bf16")
    if weight_dtype not in BYTES_PER_PARAM:
        raise ValueError(f"weight_dtype must be one of {', '.join(BYTES_PER_PARAM)}, got {weight_dtype!r}")
    adapters = method != "full"
    if not adapters and weight_dtype in QUANTIZED and stage != "inference":
        raise ValueError(f"full fine-tuning cannot train {weight_dtype} weights; use method=qlora")
    ppo_layout = ppo_layout or ("lean" if adapters else "four")
    if ppo_layout not in PPO_LAYOUTS:
        raise ValueError(f"ppo_layout must be one of {', '.join(PPO_LAYOUTS)}, got {ppo_layout!r}")
    if stage == "ppo" and ppo_layout == "lean" and not adapters:
        raise ValueError(
            "the lean PPO layout shares one base between adapters; use method=lora or ppo_layout=four"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if batch < 1 or seq_len < 1:
        raise ValueError("batch and seq_len must be >= 1")

    layout = _layout(stage, adapters, ppo_layout)
    notes = []
    w = BYTES_PER_PARAM[weight_dtype]
    if weight_dtype in QUANTIZED:  # embeddings and norms stay in bf16
        quantized = shape.n_params - shape.embedding_params
        base_bytes = quantized * w + shape.embedding_params * 2
        notes.append(f"decoder linears in {weight_dtype} ({w:.4f} bytes/param), embeddings in bf16")
    else:
        base_bytes = shape.n_params * w
    act_bytes = 4 if weight_dtype == "fp32" else 2

    adapter = 0
    if adapters:
        adapter = lora_params if lora_params is not None else shape.lora_params(lora_r, lora_targets)
    per_model = adapter if adapters else shape.n_params
    trainable = per_model * layout.trained
    train_bytes = 4.0 if adapters else w  # peft keeps adapters in fp32 by default
    # Inference serves one unmerged adapter; training holds the trained and the frozen ones.
    n_adapters = max(layout.trained + layout.frozen_adapters, 1) if adapters else 0
    weights = base_bytes * layout.base_copies + adapter * 4.0 * n_adapters
    n_states, state_bytes = OPTIMIZERS[optimizer]
    master = 0.0
    if master_weights and not adapters and w < 4:
        master = trainable * 4.0
        state_bytes = state_bytes or 4.0
        notes.append("fp32 master weights and optimizer states (mixed precision)")
    optim_bytes = n_states * (state_bytes or train_bytes)

    seqs = batch * layout.seq_factor
    if layout.backward:
        activations = _activation_bytes(shape, seqs, seq_len, act_bytes, flash_attention, grad_checkpointing)
    else:  # no-grad prefill frees each layer's activations before the next
        activations = (
            _activation_bytes(shape, seqs, seq_len, act_bytes, flash_attention, False) // shape.n_layers
        )
    if not layout.logits:
        logits = 0
    elif not layout.backward:
        logits = seqs * shape.vocab * 4  # generation keeps only the last position's logits
    else:
        tokens = seqs * seq_len
        logits = min(tokens, logits_chunk or tokens) * shape.vocab * 4
    kv = (
        2 * shape.n_layers * seqs * seq_len * shape.n_kv_heads * shape.head_dim * act_bytes
        if layout.kv_cache
        else 0
    )
    if stage == "ppo" and ppo_layout == "lean":
        notes.append("lean layout: one frozen base with actor, critic and reward adapters")
    elif stage == "ppo":
        notes.append("four-model layout: actor, critic, reference and reward")
    if stage in ("ppo", "grpo"):
        notes.append("KV cache of the rollout counted alongside training memory (a conservative peak)")

    breakdown = {
        "weights": round(weights),
        "gradients": round(trainable * train_bytes),
        "optimizer": round(trainable * optim_bytes + master),
        "activations": round(activations),
        "logits": round(logits),
        "kv_cache": round(kv),
    }
    return Estimate(
        shape, method, stage, weight_dtype, batch, seq_len, trainable, breakdown, tuple(notes), optimizer
    )


def fits(estimate: Estimate, device_gib: float, reserve: float = 0.1) -> bool:
    """Whether the estimate fits in `device_gib`, keeping a `reserve` share free for the CUDA context,
    allocator fragmentation and framework buffers the estimate does not count."""
    return estimate.total <= device_gib * GIB * (1 - reserve)


def short_count(n: int) -> str:
    """`134515008` -> `134.5M`."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_table(estimate: Estimate) -> str:
    """A plain-text table of the breakdown in GiB with each component's share.

    >>> from chatforge.plan.shapes import DEFAULT_MODEL_CONFIG
    >>> print(format_table(estimate(ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG), batch=4, seq_len=256)))
    llama 134.5M params | lora, bf16 weights, sft, batch 4 x 256 tokens, 4.9M trainable
    component         GiB   share
    weights         0.269     25%
    gradients       0.018      2%
    optimizer       0.036      3%
    activations     0.560     52%
    logits          0.188     18%
    kv_cache        0.000      0%
    total           1.071    100%
    """
    e = estimate
    total = max(e.total, 1)
    lines = [
        f"{e.shape.model_type} {short_count(e.shape.n_params)} params | {e.method}, {e.weight_dtype} weights, "
        f"{e.stage}, batch {e.batch} x {e.seq_len} tokens, {short_count(e.trainable_params)} trainable",
        f"{'component':<12}{'GiB':>9}{'share':>8}",
    ]
    for name, value in [*e.breakdown.items(), ("total", e.total)]:
        lines.append(f"{name:<12}{value / GIB:>9.3f}{value / total:>8.0%}")
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def describe(model: ModelShape | dict | str | os.PathLike, device_gib: float | None = None, **kwargs) -> str:
    """`format_table` of `estimate(shape, **kwargs)` plus a fit verdict when `device_gib` is given.

    `model` is a `ModelShape`, a transformers config (object or dict), or anything `load_shape` takes.
    """
    if isinstance(model, ModelShape):
        shape = model
    elif isinstance(model, (str, os.PathLike)):
        shape = load_shape(str(model))
    else:
        shape = ModelShape.from_hf_config(model)
    est = estimate(shape, **kwargs)
    text = format_table(est)
    if device_gib is not None:
        verdict = "fits" if fits(est, device_gib) else "does NOT fit"
        text += f"\n{verdict} in {device_gib:g} GiB (keeping 10% free)"
    return text
