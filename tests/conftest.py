"""Shared fixtures: an offline tokenizer and tiny random models saved to disk."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from chatforge.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaMA-shaped model + tokenizer on disk, loadable by `from_pretrained`."""
    from chatforge.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def torch_kernels(monkeypatch):
    """Decoding on torch's own kernels: `models.kernels` switched off (as on a CPU without
    AVX512-BF16), so packed linear layers run oneDNN and one token's attention torch's flash kernel."""
    from chatforge.models import kernels

    monkeypatch.setenv("CHATFORGE_KERNELS", "0")
    kernels.library.cache_clear()
    yield
    monkeypatch.undo()
    kernels.library.cache_clear()


@pytest.fixture
def jsonl(tmp_path):
    """`jsonl(records, name="data.jsonl")` writes records (dicts or raw lines) and returns the path."""

    def _write(records, name="data.jsonl"):
        return write_jsonl(tmp_path / name, records)

    return _write


# A rule reward for RL tests: the response contains the character "7" (a few byte-level tokens of the
# tiny vocabulary), so a tiny random model can learn to raise it in a few steps.
SEVEN_REWARD = (
    "def has_seven(prompts, responses, answers):\n    return [float('7' in r) for r in responses]\n"
)


@pytest.fixture
def reward_file(tmp_path):
    """`PATH:has_seven`, a reward-function file for `ppo.reward_functions` / `grpo.reward_functions`."""
    path = tmp_path / "rewards.py"
    path.write_text(SEVEN_REWARD)
    return f"{path}:has_seven"


def metrics_of(out) -> list[dict]:
    from pathlib import Path

    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def one_and_two_processes(stage: str, args, tmp_path) -> tuple[list[dict], list[dict]]:
    """Run `chatforge STAGE` once in one process and once as two CPU processes under torchrun;
    `args(out, processes)` gives the command-line overrides. Returns both runs' metrics rows."""
    import socket
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the two cores
    cli = ["-m", "chatforge.cli", stage]
    one = subprocess.run([sys.executable, *cli, *args(tmp_path / "one", 1)], capture_output=True, env=env)
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
    ]
    two = subprocess.run(
        [*launcher, *cli, *args(tmp_path / "two", 2)], capture_output=True, env=env, timeout=600
    )
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    return metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")


def launch(stage: str, processes: int, args: list[str], host: list | None = None) -> list[tuple[int, int]]:
    """Run `chatforge STAGE` in 1 process or under torchrun; returns each rank's (parameter,
    optimizer-state) bytes as the Trainer printed them after its first step. `host`, a list, gets
    each rank's "offloaded to host: ..." words from the same lines ("" when nothing is)."""
    import re
    import socket
    import subprocess
    import sys

    holds = re.compile(r"rank (\d+)/(\d+) holds (\d+) parameter bytes and (\d+) optimizer-state bytes")
    cmd = [sys.executable]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cmd, "-m", "chatforge.cli", stage, *args], capture_output=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    found = sorted(holds.findall(done.stdout.decode()))
    if host is not None:
        offloaded = re.compile(
            r"rank (\d+)/\d+ holds \d+ parameter bytes and \d+ optimizer-state bytes(?:, offloaded to host: ((?:parameters and )?optimizer))?"
        )
        host += [words for _, words in sorted(offloaded.findall(done.stdout.decode()))]
    return [(int(p), int(s)) for _, _, p, s in found]


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """`one_process(stage, args)`, `args(out)` the overrides of a run into `out`: the plain
    one-process run (no dist.strategy) that the 2-process runs of every strategy are compared with,
    launched once per distinct (stage, overrides) in the session. Returns (launch's bytes, out)."""
    runs = {}

    def run(stage: str, args):
        key = (stage, *args("OUT"))
        if key not in runs:
            out = tmp_path_factory.mktemp(f"one-{stage}") / "run"
            runs[key] = launch(stage, 1, args(out)), out
        return runs[key]

    return run


def reward_that_raises(folder, error: str = "RuntimeError('disk full')") -> str:
    """A `file.py:has_seven` reward spec whose third call raises `error` (a crash mid-run)."""
    from pathlib import Path

    path = Path(folder) / "crash" / "rewards.py"
    path.parent.mkdir(parents=True)
    path.write_text(
        "calls = 0\n"
        "def has_seven(prompts, responses, answers):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls == 3:\n"
        f"        raise {error}\n"
        "    return [float('7' in r) for r in responses]\n"
    )
    return f"{path}:has_seven"


def tiny_run_args(model_dir, data, out, *extra) -> list[str]:
    """Config overrides every quick CPU training run in the tests shares (fp32, no progress bars)."""
    return [
        f"model.path={model_dir}",
        f"data.train=[{data}]",
        f"train.output_dir={out}",
        "train.progress=false",
        "model.dtype=float32",
        "train.mixed_precision=none",
        *extra,
    ]


def check_resume_is_exact(run, tmp_path, keys=("loss",)) -> None:
    """`run(out, *overrides)` trains 6 steps with checkpoints at 3 and 6; a copy of that run as if
    killed after step 3 (later checkpoint and final/ gone, later metrics stale) resumes to the same
    metrics for steps 4-6."""
    import shutil

    import pytest

    args = ("train.max_steps=6", "train.save_every=3", "train.keep_last=5", "train.lr=1e-2")
    run(tmp_path / "full", *args)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-6")
    shutil.rmtree(tmp_path / "part" / "final")
    run(tmp_path / "part", *args, "train.resume=true")
    want = {m["step"]: m for m in metrics_of(tmp_path / "full")}
    got = {m["step"]: m for m in metrics_of(tmp_path / "part")}
    assert sorted(got) == list(range(1, 7))
    for step in (4, 5, 6):
        for key in keys:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), (step, key)
