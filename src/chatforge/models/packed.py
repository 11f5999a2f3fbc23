"""bf16 linear layers on a CPU with their weights laid out once for decoding.

A bf16 `F.linear` on a CPU hands its weight to oneDNN, which reorders it into its blocked layout on
every call: for a decode step, where each weight is used for a handful of rows, that reorder is
much of the cost. `packed_linears(lm)` lays each `nn.Linear` weight out once per call of generate
and computes with it:

- on a CPU with AVX512-BF16, with `models.kernels`'s kernel (1.2-1.8x oneDNN's speed at a decoding
  step's few rows; float32 sums in a fixed order, so ~1 output in 20,000 differs from `F.linear`'s
  by one bf16 step, and a row's outputs do not depend on its batch);
- else with oneDNN's own packed layout (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's
  freezing pass does for a compiled CPU model, and `_linear_pointwise`): the same kernel as
  `F.linear`, the same bits (tested), a decode step of SmolLM2-135M ~1.4x faster than unpacked.

Layers that read one input (q, k, v; gate, up) are packed as one matrix and computed in one call
(`_OneProduct`): 4-5% more tokens/s at 8 rows, each column the same sum as in its own layer.
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

from chatforge.models import kernels


@functools.cache
def can_pack() -> bool:
    """Whether this torch and CPU run oneDNN's packed bf16 linear (AVX-512 at least)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and bool(ops._is_mkldnn_bf16_supported())
    )


def _layout(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> x . weight^T + bias` on the weight laid out once: `models.kernels`'s kernel where it
    runs and takes the shape, else oneDNN's packed layout."""
    if kernels.library() is not None and kernels.fits(weight):
        return functools.partial(kernels.linear, packed=kernels.pack(weight, bias))
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


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


def _unpacked(module: torch.nn.Linear, x: torch.Tensor) -> bool:
    """Whether this call runs as plain `F.linear`: an input of another dtype, or a forward that
    needs gradients."""
    return x.dtype != torch.bfloat16 or (
        torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)
    )


def _packed_forward(module: torch.nn.Linear, run: Callable, x: torch.Tensor) -> torch.Tensor:
    if _unpacked(module, x):
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return run(x)


# sibling layers that read the same input: packed as one matrix, computed in one product
_SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _OneProduct:
    """Layers that read the same input (an attention's q, k, v; an MLP's gate and up) computed as
    one product with their weights stacked: at a decoding step's few rows the call, not the bytes,
    is much of a small matrix's cost (q, k, v of SmolLM2 at 8 rows: 81 -> 45 us). Each output column
    is the same sum as in its own layer (the same bits, tested). The first layer called with an
    input computes every layer's columns; each other layer called with that same tensor takes its
    own, else it computes the whole product for its input."""

    def __init__(self, modules: list[torch.nn.Linear]):
        weight = torch.cat([m.weight.detach() for m in modules])
        bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
        self.run = _layout(weight, bias)
        self.sizes = [m.out_features for m in modules]
        self.input, self.outputs = None, None

    def forward(self, index: int, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if _unpacked(module, x):
            return torch.nn.functional.linear(x, module.weight, module.bias)
        if self.input is not x:
            out = self.run(x)
            self.input, self.outputs = x, out.split(self.sizes, -1)
        result = self.outputs[index]
        if index == len(self.sizes) - 1:
            self.input, self.outputs = None, None
        return result


def _siblings(parent: torch.nn.Module) -> list[list[torch.nn.Linear]]:
    groups = []
    for names in _SHARED_INPUT:
        modules = [getattr(parent, n, None) for n in names]
        if all(isinstance(m, torch.nn.Module) and _packable(m) for m in modules) and (
            len({m.in_features for m in modules}) == 1 and len({m.bias is None for m in modules}) == 1
        ):
            groups.append(modules)
    return groups


def pack_linears(lm: torch.nn.Module) -> Callable[[], None]:
    """Make every packable linear layer of `lm` compute with a packed copy of its weight (layers
    that read the same input: one packed matrix); returns the function that undoes it (the weights
    must not change in between)."""
    if not can_pack():
        return lambda: None
    patched = []
    with torch.no_grad():
        for parent in lm.modules():
            for group in _siblings(parent):
                product = _OneProduct(group)
                for index, module in enumerate(group):
                    module.forward = functools.partial(product.forward, index, module)
                    patched.append(module)
        for module in lm.modules():
            if _packable(module):
                run = _layout(module.weight.detach(), None if module.bias is None else module.bias.detach())
                module.forward = functools.partial(_packed_forward, module, run)
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
