"""dist.strategy side by side: `chatforge bench` in 1 process and under torchrun with 2 (ddp, fsdp2,
fsdp2 with the gathered weights kept from forward to backward, zero2, zero3).

    flock /tmp/cf-core0.lock flock /tmp/cf-core1.lock \\
        .venv/bin/python benchmarks/bench_strategies.py --preset 256m --preset mini

Each run is a fresh `chatforge bench` (random weights, full fine-tuning SFT, fp32, one thread per
process): the 1-process run on one core, the 2-process runs on two (`taskset -c 0,1`), back to
back. Reports tokens/s over all processes, achieved TFLOP/s, MFU against this CPU's fp32 estimate,
and per process peak RSS and the parameter + optimizer-state bytes held (local shards), then the
goal ratios of fsdp2 against ddp at 2 processes. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import command_line, machine, write_section

from chatforge.bench import strategy_label

# (strategy, processes, extra flags); one process never shards: auto = none. ddp must stay second.
RUNS = [
    ("auto", 1, []),
    ("ddp", 2, []),
    ("fsdp2", 2, []),
    ("fsdp2", 2, ["--keep-gathered"]),
    ("zero2", 2, []),
    ("zero3", 2, []),
]
GIB = 2**30


def bench(preset: str, strategy: str, processes: int, extra: list[str], args) -> dict:
    out = Path(tempfile.mkdtemp()) / "bench.json"
    flags = [*extra, "--preset", preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    flags += ["--steps", str(args.steps), "--warmup", "1", "--strategy", strategy, "--json", str(out)]
    if processes == 1:
        cmd = [
            "taskset",
            "-c",
            args.cores.split(",")[-1],
            sys.executable,
            "-m",
            "chatforge.cli",
            "bench",
            *flags,
        ]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["taskset", "-c", args.cores, sys.executable, "-m", "torch.distributed.run"]
        cmd += [
            f"--nproc_per_node={processes}",
            f"--master_port={port}",
            "-m",
            "chatforge.cli",
            "bench",
            *flags,
        ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(out.read_text())


def held(r: dict) -> float:
    """Largest parameter + optimizer-state bytes of one process, GiB."""
    return max(k["param_bytes"] + k["optim_bytes"] for k in r["ranks"]) / GIB


def table(preset: str, results: list[dict]) -> str:
    r0 = results[0]
    lines = [
        f"### {preset}: {r0['params'] / 1e6:.1f}M parameters, batch {r0['batch']} x {r0['seq_len']} "
        f"tokens per process, {r0['steps']} timed steps",
        "",
        "| strategy | processes | tokens/s | TFLOP/s | MFU | step (s) | params + optimizer per process (GiB) | peak RSS per process (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = max(k["peak_bytes"] for k in r["ranks"]) / GIB
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(
            f"| {strategy_label(r)} | {r['processes']} | {r['tokens_per_s']:.1f} | {r['tflops']:.4f} | {mfu} | "
            f"{r['step_s']:.2f} | {held(r):.3f} | {peak:.2f} |"
        )
    ddp = results[1]
    lines.append("")
    for r in results[2:]:
        lines.append(
            f"- {strategy_label(r)} / ddp at 2 processes: {held(r) / held(ddp):.2f}x the parameter + optimizer bytes "
            f"per process at {r['tokens_per_s'] / ddp['tokens_per_s']:.2f}x the tokens/s; peak RSS "
            f"{peak_rss(r) / peak_rss(ddp):.2f}x."
        )
    lines.append("- Goal (fsdp2, zero3): <= 0.6x the bytes at >= 0.7x the tokens/s.")
    return "\n".join(lines)


def peak_rss(r: dict) -> int:
    return max(k["peak_bytes"] for k in r["ranks"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", action="append", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--cores", default="0,1", help="cores of the 2-process runs; the 1-process run takes the last"
    )
    p.add_argument("--dry", action="store_true", help="print, do not write docs/benchmarks.md")
    p.add_argument("--section", default="strategies", help="the docs/benchmarks.md section to (re)write")
    args = p.parse_args()
    sections = []
    for preset in args.preset:
        results = [bench(preset, strategy, n, extra, args) for strategy, n, extra in RUNS]
        sections.append(table(preset, results))
        print(sections[-1], flush=True)
    body = "\n\n".join(
        [
            f"## dist.strategy: ddp vs fsdp2 vs DeepSpeed ZeRO (chatforge bench, batch {args.batch} x {args.seq_len})",
            f"Command: `{command_line()}` on {machine()}, alone on the machine (both cores).",
            "Full fine-tuning SFT of a random-weight preset in fp32 (AdamW), one thread per process: "
            "the 1-process run on one core, the 2-process runs on two. tokens/s counts all processes; "
            "TFLOP/s counts 6N + 12 x layers x hidden x seq_len per token; MFU is against this CPU's "
            "fp32 estimate (64 FLOPs per cycle per core with AVX-512, 32 with AVX2; flags and clock from /proc/cpuinfo) times the processes. "
            "'kept gathered': fsdp2 with `dist.reshard_after_forward=false` (each layer gathered once "
            "per step instead of twice; the whole weights held between forward and backward).",
            *sections,
        ]
    )
    if not args.dry:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
