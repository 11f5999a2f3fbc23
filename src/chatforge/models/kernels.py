"""bf16 kernels for decoding on a CPU with AVX512-BF16: a small C file (`kernels.c`).

At a decoding step the work per call is small and the libraries torch calls are built for large
ones. Kernels of our own replace them where they run:

- `linear`: oneDNN's bf16 kernel (what `F.linear` and `models.packed` call) reads SmolLM2-135M's
  weights at 8-17 GB/s at a step's few rows on 2 cores, where the machine streams 32 GB/s. The
  kernel holds 16 output columns per 512-bit register, takes one VDPBF16PS per pair of inputs and
  runs every row of the batch against a block of the weight while it is in cache: 1.2-1.8x
  oneDNN's speed on the layers of a decoding step, about the same at prefill sizes;
- `attention`: torch's CPU flash kernel spends ~160 us a layer on one query token against ~100
  cached ones (its setup, not the arithmetic); the kernel does the few thousand multiply-adds
  directly, each (row, key/value head) a task.

None copies a library's order of operations: their float32 sums run in a fixed order of their own
(`emulate_linear` and `emulate_attention` restate the first two). ~1 linear output in 20,000
differs by one bf16 step from `F.linear`'s; about a third of the attention's outputs differ by one
step from torch's flash kernel's, whose outputs are the further from a float64 reference (tested).
So a greedy token can differ from transformers' at a near tie, as transformers' own does between
batch shapes (docs/benchmarks.md counts both). In exchange a row's linear and attention outputs
never depend on the other rows of its batch, the thread count or the split of the work.
`decode_step` also runs each layer's norms, residual adds, rotary embedding and SiLU gate here
(`add_rms_norm`, `rotary`, `silu_mul`: one call each where torch takes ~30 small operations a
layer), rounding as torch's bf16 operations do. No library we can install has faster ones:
oneDNN's and torch's are the ones replaced, MKL has no bf16 GEMV, and torch.compile's kernels cost
minutes of compile time on 2 cores.

The file is compiled with the system C compiler on first use (under a second) into
`~/.cache/chatforge` and loaded with ctypes into torch's OpenMP thread pool. Where the CPU lacks
AVX512-BF16, no compiler works, or `CHATFORGE_KERNELS=0`, `library()` is None and callers use
torch's own.
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

SOURCE = Path(__file__).with_name("kernels.c")
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
    path = _cache_dir() / f"kernels-{key}.so"
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
    if os.environ.get("CHATFORGE_KERNELS", "1") == "0" or "avx512_bf16" not in _cpu_flags():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))  # torch is loaded: its libgomp serves the kernel
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        message = f"chatforge: bf16 decoding kernels not built ({e}; {detail.decode()[-300:]}); using oneDNN"
        warnings.warn(message, stacklevel=2)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.chatforge_linear_bf16.argtypes = [p, i, i, i, p, i, p, p, i, i]
    lib.chatforge_linear_bf16.restype = None
    lib.chatforge_pack_bf16.argtypes = [p, i, i, i, p, i]
    lib.chatforge_pack_bf16.restype = None
    long, f = ctypes.c_long, ctypes.c_float
    lib.chatforge_attention_bf16.argtypes = [
        p,
        long,
        long,
        p,
        p,
        *[long] * 6,
        p,
        long,
        p,
        i,
        i,
        i,
        i,
        i,
        f,
        p,
        i,
    ]
    lib.chatforge_attention_bf16.restype = None
    lib.chatforge_add_rms_norm_bf16.argtypes = [p, i, i, long, p, long, p, f, p]
    lib.chatforge_silu_mul_bf16.argtypes = [p, i, i, long, p]
    lib.chatforge_rotary_bf16.argtypes = [p, i, i, i, long, long, p, p]
    for name in ("chatforge_add_rms_norm_bf16", "chatforge_silu_mul_bf16", "chatforge_rotary_bf16"):
        getattr(lib, name).restype = None
    return lib


def fits(weight: torch.Tensor) -> bool:
    """Whether `linear` takes this (N, K) weight: bf16 on the CPU, N a multiple of 16, K even."""
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


def emulate_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear`'s arithmetic in torch float32 operations, for tests: per output, float32 sums
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


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None, scale: float
) -> torch.Tensor | None:
    """One query token's attention: query (B, H, 1, D), key and value (B, KV, T, D) bf16 on the CPU
    (H a multiple of KV, D of 16, the last dimension contiguous), `keep` None or bool broadcastable
    as (B, 1, 1, T), True = attend. Returns (B, 1, H, D) bf16, or None where the kernel does not
    take these inputs (then use torch's)."""
    b, heads, q_len, d = query.shape
    kv, t = key.shape[1], key.shape[2]
    tensors = (query, key, value)
    if (
        q_len != 1
        or d % 16
        or heads % kv
        or any(x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.stride(-1) != 1 for x in tensors)
        or value.shape[-1] != d
    ):
        return None
    if keep is not None:
        if keep.dtype != torch.bool or keep.dim() != 4 or keep.shape[1] != 1 or keep.shape[2] != 1:
            return None
        keep = keep.expand(b, 1, 1, t)
        if keep.stride(-1) != 1:
            keep = keep.contiguous()
    out = torch.empty(b, 1, heads, d, dtype=torch.bfloat16)
    work = torch.empty(b * heads * ((t + 15) // 16 * 16), dtype=torch.float32)
    library().chatforge_attention_bf16(
        query.data_ptr(), query.stride(0), query.stride(1),
        key.data_ptr(), value.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        None if keep is None else keep.data_ptr(), 0 if keep is None else keep.stride(0),
        out.data_ptr(), b, heads, kv, t, d, scale, work.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def emulate_attention(query, key, value, keep, scale: float) -> torch.Tensor:
    """`attention`'s result in torch float32 operations (its sums in torch's order, so equal to
    the kernel's up to float32 rounding), for tests."""
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, 1)
    v = value.float().repeat_interleave(group, 1)
    scores = query.float() @ k.transpose(-1, -2) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return (torch.softmax(scores, -1) @ v).bfloat16().transpose(1, 2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last) with the last dimension contiguous (a view where it can be)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`h += y` (when y is given, in place, in bf16), then `LlamaRMSNorm(h)` with this weight: bf16
    (..., n), n a multiple of 16, h contiguous. Returns the normed h."""
    rows = h.view(-1, h.shape[-1])
    out = torch.empty_like(h)
    y2 = None if y is None else _rows(y)
    library().chatforge_add_rms_norm_bf16(
        rows.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0),
        None if y2 is None else y2.data_ptr(), 0 if y2 is None else y2.stride(0),
        weight.data_ptr(), eps, out.data_ptr(),
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate | up (..., 2n) bf16, n a multiple of 16 -> silu(gate) * up (..., n), as a Llama MLP."""
    rows = _rows(gate_up)
    n = rows.shape[1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=torch.bfloat16)
    library().chatforge_silu_mul_bf16(rows.data_ptr(), rows.shape[0], n, rows.stride(0), out.data_ptr())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x (rows, 1, heads, D) bf16 in place by cos and sin (rows, 1, D) bf16, as transformers'
    `apply_rotary_pos_emb` (D a multiple of 32, x's last dimension contiguous)."""
    cos, sin = cos.reshape(x.shape[0], -1).contiguous(), sin.reshape(x.shape[0], -1).contiguous()
    library().chatforge_rotary_bf16(
        x.data_ptr(),
        x.shape[0],
        x.shape[2],
        x.shape[3],
        x.stride(0),
        x.stride(2),
        cos.data_ptr(),
        sin.data_ptr(),
    )
