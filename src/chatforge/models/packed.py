"""bf16 linear layers on a CPU with their weights laid out once for oneDNN, for decoding.

A bf16 `F.linear` on a CPU hands its weight to oneDNN, which reorders it into its blocked layout on
every call: for a decode step, where each weight is used for a handful of rows, that reorder is
much of the cost. `packed_linears(lm)` reorders each `nn.Linear` weight once
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing pass does for a compiled CPU
model) and computes with it (`torch.ops.mkldnn._linear_pointwise`): the same kernel, the same bits
(tested), a decode step of SmolLM2-135M ~1.4x faster on an AVX-512 bf16 EPYC (docs/benchmarks.md).
torch has no public switch for this outside `torch.compile`, whose compile time on 2 cores
(minutes) would cost more than a rollout saves; hence these few lines.

It costs one more copy of the packed weights while active (270 MB for a 135M model in bf16).
float32 is left alone: its packed kernel is faster too but rounds differently from `F.linear`, so
greedy tokens could differ from transformers'. Layers that are not a plain `nn.Linear` (4-bit,
GPT-2's Conv1D), layers already wrapped, sharded weights (DTensor, empty ZeRO-3 partitions), a
forward that needs gradients and an input of another dtype run as before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch


@functools.cache
def can_pack() -> bool:
    """Whether this torch and CPU run oneDNN's packed bf16 linear (AVX-512 at least)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and bool(ops._is_mkldnn_bf16_supported())
    )


def _packable(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (
        type(module) is torch.nn.Linear
        and "forward" not in module.__dict__  # already wrapped (e.g. accelerate's device hooks)
        and type(w.data) is torch.Tensor
        and w.dtype == torch.bfloat16
        and w.device.type == "cpu"
        and w.dim() == 2
        and w.numel() > 0
    )


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != packed.dtype or (
        torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)
    ):
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


def pack_linears(lm: torch.nn.Module) -> Callable[[], None]:
    """Make every packable linear layer of `lm` compute with a packed copy of its weight; returns
    the function that undoes it (the weights must not change in between)."""
    if not can_pack():
        return lambda: None
    patched = []
    with torch.no_grad():
        for module in lm.modules():
            if _packable(module):
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
                module.forward = functools.partial(_packed_forward, module, packed)
                patched.append(module)

    def undo() -> None:
        for module in patched:
            del module.forward
        patched.clear()

    return undo


@contextlib.contextmanager
def packed_linears(lm: torch.nn.Module):
    """`pack_linears` for the duration of a `with` block (e.g. one generate call). Nested inside
    another, it packs nothing more: the layers are already wrapped."""
    undo = pack_linears(lm)
    try:
        yield
    finally:
        undo()
