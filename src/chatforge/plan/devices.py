"""Known accelerators: memory and dense 16-bit peak, for "what fits where" and MFU.

`DEVICES` holds each device's nominal memory (GiB as sold: 80 for an 80 GB H100) and its dense
(no sparsity) bf16 tensor-core peak in TFLOP/s from the vendor's data sheet (fp16 for T4 and V100,
which have no bf16). `find(name)` matches a name as torch reports it
(`torch.cuda.get_device_name()`, e.g. "NVIDIA H100 80GB HBM3") to a row. A CPU has no row: its
peak depends on cores, clock and vector width, see `cpu_peak_tflops`.

    >>> find("NVIDIA A100-SXM4-80GB").name, find("NVIDIA H100 80GB HBM3").peak_tflops
    ('a100-80', 989.0)
    >>> find("Intel Xeon") is None
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16 (fp16 where the device has no bf16)
    match: tuple[str, ...]  # lower-case pieces that must all be in torch's device name


DEVICES = (
    Device("t4", 16, 65.0, ("t4",)),
    Device("v100", 32, 125.0, ("v100",)),
    Device("a10", 24, 125.0, ("a10",)),
    Device("l4", 24, 121.0, ("l4",)),
    Device("l40s", 48, 362.0, ("l40s",)),
    Device("a100-40", 40, 312.0, ("a100", "40gb")),
    Device("a100-80", 80, 312.0, ("a100", "80gb")),
    Device("h100", 80, 989.0, ("h100",)),
    Device("h200", 141, 989.0, ("h200",)),
    Device("b200", 180, 2250.0, ("b200",)),
)


def find(torch_name: str) -> Device | None:
    """The row whose match pieces all occur in `torch_name` (case-insensitive); the most specific
    (most pieces) wins, so "A100-SXM4-40GB" is a100-40 and "A10" stays a10."""
    lower = torch_name.lower()
    hits = [d for d in DEVICES if all(piece in lower for piece in d.match)]
    hits = [d for d in hits if not (d.name == "a10" and "a100" in lower)]
    return max(hits, key=lambda d: len(d.match), default=None)


def cpu_peak_tflops(threads: int, flags: str | None = None, ghz: float | None = None) -> float | None:
    """fp32 peak of `threads` x86 cores: FLOPs per cycle (two FMA units: 64 with AVX-512, 32 with
    AVX2) x clock. `flags` and `ghz` default to this machine's /proc/cpuinfo; None if unreadable.

    >>> cpu_peak_tflops(2, "fpu avx2 avx512f", 2.0)
    0.256
    """
    if flags is None or ghz is None:
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
        except OSError:
            return None
        lines = info.splitlines()
        flags = flags or next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "")
        mhz = [float(ln.split(":", 1)[1]) for ln in lines if ln.startswith("cpu MHz")]
        ghz = ghz or (max(mhz) / 1000 if mhz else None)
    if not ghz:
        return None
    words = set(flags.split())
    per_cycle = 64 if "avx512f" in words else 32 if "avx2" in words else 8
    return round(threads * per_cycle * ghz / 1000, 3)


def cpu_threads() -> int:
    """Threads torch computes with here: OMP_NUM_THREADS, else the cores this process may use."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))
