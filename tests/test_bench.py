"""`chatforge bench`: a random-weight preset trained a few steps; what it reports adds up."""

import json
import os
import socket
import subprocess
import sys

import pytest

from chatforge.bench import flops_per_token
from chatforge.cli import main
from chatforge.plan.shapes import load_shape

TINY = ["--preset", "tiny", "--vocab", "512", "--seq-len", "16", "--batch", "2", "--steps", "2"]


def test_bench_one_process_reports_consistent_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--peak-tflops", "0.1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    n = load_shape("tiny", vocab_size=512).n_params
    assert (r["params"], r["trained"], r["processes"], r["strategy"]) == (n, n, 1, "none")
    # tied embeddings: every parameter is in a matmul (the LM head), all trained: 6N + attention
    assert r["flops_per_token"] == flops_per_token(n, n, 2, 64, 16) == 6 * n + 12 * 2 * 64 * 16
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_s"])
    assert r["tflops"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops"] / 0.1)
    (rank,) = r["ranks"]
    assert rank["param_bytes"] == 4 * n and rank["optim_bytes"] == 8 * n  # fp32 weights, Adam m and v
    assert rank["peak_bytes"] > rank["param_bytes"] + rank["optim_bytes"]
    assert "tokens/s" in printed and "MFU" in printed and "peak MiB" in printed


def test_bench_two_processes_fsdp2_shards(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += ["-m", "chatforge.cli", "bench", *TINY, "--strategy", "fsdp2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    r = json.loads(out.read_text())
    n = load_shape("tiny", vocab_size=512).n_params
    assert (r["strategy"], r["processes"]) == ("fsdp2", 2)
    assert r["tokens_per_s"] == pytest.approx(2 * 2 * 16 / r["step_s"])  # both processes' tokens
    for rank in r["ranks"]:
        assert 0.45 * 4 * n < rank["param_bytes"] < 0.55 * 4 * n
        assert 0.45 * 8 * n < rank["optim_bytes"] < 0.55 * 8 * n


def test_bench_help_and_refusals(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "random weights" in text and "torchrun" in text and "--peak-tflops" in text
    assert main(["bench", "--preset", "huge"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(["bench", "--steps", "0"]) == 2
