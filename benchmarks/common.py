"""Shared pieces of the benchmarks: synthetic chat data, child-process runs, result tables.

Each side of a comparison runs in its own Python process so its peak resident memory
(`ru_maxrss` of that child) is its own. Timings skip the first steps (allocation, warm-up).
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_PY = os.environ.get("BENCH_PYTHON", str(ROOT / ".venv-bench" / "bin" / "python"))


def chat_records(n: int, seed: int = 0, max_turns: int = 6) -> list[dict]:
    """Multi-turn chats of varied length built from the built-in task data (1 to max_turns turns)."""
    from chatforge.data.tasks import make_task_data

    pool = make_task_data("mixed", seed=seed, sizes={"sft": 4 * n, "preference": 0, "rl": 0, "eval": 0})[
        "sft"
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = rng.randint(1, max_turns)
        msgs = [m for rec in rng.sample(pool, turns) for m in rec["messages"]]
        out.append({"messages": msgs})
    return out


def preference_records(n: int, seed: int = 0) -> list[dict]:
    from chatforge.data.tasks import make_task_data

    return make_task_data("mixed", seed=seed, sizes={"sft": 0, "preference": n, "rl": 0, "eval": 0})[
        "preference"
    ]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_child(code: str, python: str = BENCH_PY, malloc: str = "chatforge") -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON line last.

    malloc="chatforge" runs the child on the malloc the `chatforge` command would pick here
    (`chatforge.allocator`: jemalloc or mimalloc when installed, CHATFORGE_MALLOC to choose);
    "system" on the environment's own (glibc's unless LD_PRELOAD says otherwise). Adds
    peak_rss_gib (the child's maximum resident set size), start_rss_gib: its resident size once
    torch, transformers and peft are imported, before the code runs (the interpreter and libraries
    every side pays; peak - start is what the run itself added), and the malloc it ran on."""
    from chatforge import allocator

    env = dict(os.environ)
    if malloc == "chatforge":
        env = allocator.restart_env(env) or env
    wrapper = (
        "import resource as _r, torch, transformers, peft\n"
        + "from chatforge.allocator import in_use as _in_use\n"
        + "print('START', _r.getrusage(_r.RUSAGE_SELF).ru_maxrss)\n"
        + code
        + "\nprint('PEAK', _r.getrusage(_r.RUSAGE_SELF).ru_maxrss)\n"
        + "print('MALLOC', _in_use())\n"
    )
    t0 = time.time()
    proc = subprocess.run([python, "-c", wrapper], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    lines = proc.stdout.strip().splitlines()
    kib = {key: int(next(ln for ln in lines if ln.startswith(key)).split()[1]) for key in ("START", "PEAK")}
    result = json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))
    result["peak_rss_gib"] = round(kib["PEAK"] / 2**20, 2)
    result["start_rss_gib"] = round(kib["START"] / 2**20, 2)
    result["malloc"] = next(ln for ln in lines if ln.startswith("MALLOC")).split()[1]
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def add_malloc_option(parser) -> None:
    parser.add_argument(
        "--peer-malloc",
        choices=["system", "chatforge"],
        default="system",
        help="the peer's malloc: the environment's own (default: how its users run it) or chatforge's",
    )


def machine() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the `## name` section of docs/benchmarks.md."""
    path = ROOT / "docs" / "benchmarks.md"
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nNumbers measured on the machines named in each section.\n"
    )
    start_marker = f"<!-- {name} -->"
    end_marker = f"<!-- /{name} -->"
    block = f"{start_marker}\n{body.strip()}\n{end_marker}"
    if start_marker in text:
        head, rest = text.split(start_marker, 1)
        tail = rest.split(end_marker, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def resolved_dtype(name: str) -> str:
    """'auto' -> the dtype chatforge itself picks on this machine ('bfloat16' or 'float32')."""
    import torch

    from chatforge.models.load import resolve_dtype

    return str(resolve_dtype(name, torch.device("cpu"), full_finetune=False)).removeprefix("torch.")


def threads() -> str:
    """How many torch threads a child runs with here, in words."""
    import torch

    n = torch.get_num_threads()
    return "one thread" if n == 1 else f"{n} threads"
