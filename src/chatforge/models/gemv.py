"""bf16 linear layers for decoding on a CPU with AVX512-BF16: a small C kernel (`gemv.c`).

At a decoding step's few rows a linear layer only has to read its weight once, but oneDNN's bf16
kernel (what `F.linear` and `models.packed` call) reads SmolLM2-135M's weights at 8-17 GB/s on 2
cores where the machine streams 32 GB/s. `gemv.c` does the obvious thing instead: 16 output
columns per 512-bit register, one VDPBF16PS per pair of inputs, every row of the batch against a
block of the weight while it is in cache; 1.2-1.8x oneDNN's speed on the layers of a decoding step
(docs/benchmarks.md), about the same at prefill sizes. It is written here because no library we
can install ships a faster one: oneDNN is the kernel being replaced, MKL has no bf16 GEMV, and
torch's compiled kernels cost minutes of compile time on 2 cores.

Its sums are float32 in a fixed order (k pairs in turn, as `emulate` restates), rounded once to
bf16: the same arithmetic as oneDNN's but not its order, so ~1 in 20,000 outputs differs from
`F.linear`'s by one bf16 step (a greedy token can differ at a near tie, as between transformers'
own batch shapes). In exchange a row's outputs never depend on the other rows of its batch, the
thread count or the split of the work.

The kernel is compiled with the system C compiler on first use (under a second) into
`~/.cache/chatforge` and loaded with ctypes into torch's OpenMP thread pool. Where the CPU lacks
AVX512-BF16, no compiler works, or `CHATFORGE_GEMV=0`, `library()` is None and callers use
oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
BLOCK = 16  # output columns per register: N must be a multiple


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "chatforge"


def _build(compiler: str) -> Path:
    """The compiled kernel, built once per source, flags and compiler (an atomic rename, so that
    processes building at once do not read a half-written file)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"gemv-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], check=True, capture_output=True)
            os.replace(out, path)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot run here (then use oneDNN)."""
    if os.environ.get("CHATFORGE_GEMV", "1") == "0" or "avx512_bf16" not in _cpu_flags():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))  # torch is loaded: its libgomp serves the kernel
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        message = f"chatforge: bf16 decoding kernel not built ({e}; {detail.decode()[-300:]}); using oneDNN"
        warnings.warn(message, stacklevel=2)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.chatforge_linear_bf16.argtypes = [p, i, i, i, p, i, p, p, i, i]
    lib.chatforge_linear_bf16.restype = None
    lib.chatforge_pack_bf16.argtypes = [p, i, i, i, p, i]
    lib.chatforge_pack_bf16.restype = None
    return lib


def fits(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this (N, K) weight: bf16 on the CPU, N a multiple of 16, K even."""
    n, k = weight.shape
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and n % BLOCK == 0 and k % 2 == 0


@dataclass
class Packed:
    """A linear layer's weight in the kernel's layout, and its bias in float32."""

    weight: torch.Tensor  # (N / 16, K / 2, 16, 2) bf16
    bias: torch.Tensor | None  # (N,) float32
    out_features: int
    in_features: int


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Packed:
    """`weight` (N, K), which `fits`, laid out for `linear` (one pass over it)."""
    n, k = weight.shape
    w = weight.detach()
    if w.stride(1) != 1:
        w = w.contiguous()
    out = torch.empty(n // BLOCK, k // 2, BLOCK, 2, dtype=torch.bfloat16)
    library().chatforge_pack_bf16(w.data_ptr(), n, k, w.stride(0), out.data_ptr(), torch.get_num_threads())
    b = None if bias is None else bias.detach().float().contiguous()
    return Packed(out, b, n, k)


def linear(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """x (..., K) bf16 -> (..., N) bf16: `F.linear(x, weight, bias)` up to the rounding noted above."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, packed.in_features)
    if rows.stride(-1) != 1 or rows.data_ptr() % 4:  # the kernel reads two inputs as one 32-bit word
        rows = rows.contiguous()
    y = torch.empty(rows.shape[0], packed.out_features, dtype=torch.bfloat16)
    if rows.shape[0]:
        bias = 0 if packed.bias is None else packed.bias.data_ptr()
        library().chatforge_linear_bf16(
            rows.data_ptr(), rows.shape[0], rows.stride(0), packed.in_features, packed.weight.data_ptr(),
            packed.out_features, bias or None, y.data_ptr(), packed.out_features, torch.get_num_threads(),
        )  # fmt: skip
    return y.view(*lead, packed.out_features)


def emulate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's arithmetic in torch float32 operations, for tests: per output, float32 sums
    over k pairs in turn (each pair's odd product, then its even one: how VDPBF16PS adds them), the
    bias, one rounding to bf16. Slow (two operations per input column)."""
    xf, wf = x.float().reshape(-1, x.shape[-1]), weight.float()
    acc = torch.zeros(xf.shape[0], wf.shape[0])
    for k in range(0, xf.shape[1], 2):
        acc = acc + xf[:, k + 1, None] * wf[None, :, k + 1]
        acc = acc + xf[:, k, None] * wf[None, :, k]
    if bias is not None:
        acc = acc + bias.float()
    return acc.bfloat16().view(*x.shape[:-1], weight.shape[0])
