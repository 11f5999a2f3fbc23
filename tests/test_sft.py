"""SFT end to end on tiny models: learning, artifacts, architectures, packing, kill + resume, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.config import load_config
from chatforge.models.tiny import TINY_ARCHITECTURES, save_tiny
from chatforge.train import sft
from conftest import one_and_two_processes, tiny_run_args

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": str(a + b)},
        ]
    }
    for a in range(1, 5)
    for b in range(1, 5)
]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_sft(model_dir, data, out, *overrides):
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train=[{data}]",
            f"train.output_dir={out}",
            "train.progress=false",
            "train.warmup_ratio=0",
            "model.dtype=float32",
            "train.mixed_precision=none",
            *overrides,
        ],
    )
    return sft.run(cfg)


def test_lora_sft_learns_and_saves_a_peft_adapter(tiny_model_dir, jsonl, tmp_path):
    data = jsonl(CHATS)
    final = run_sft(
        tiny_model_dir,
        data,
        tmp_path / "run",
        "peft.method=lora",
        "train.lr=2e-2",
        "train.scheduler=constant",
        "train.max_steps=30",
        "train.batch_size=8",
        "peft.r=8",
    )
    logged = metrics(tmp_path / "run")
    first, last = logged[0]["loss"], logged[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(logged[0])
    assert (tmp_path / "run" / "config.yaml").is_file()
    from peft import PeftModel

    from chatforge.models.load import load_model

    model = PeftModel.from_pretrained(load_model(tiny_model_dir, device=torch.device("cpu")), final)
    assert model.peft_config["default"].r == 8


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHITECTURES if a != "llama"])
def test_every_architecture_trains(arch, jsonl, tmp_path):
    model_dir = save_tiny(tmp_path / arch, arch)
    final = run_sft(model_dir, jsonl(CHATS), tmp_path / "run", "peft.method=lora", "train.max_steps=2")
    assert (Path(final) / "adapter_config.json").is_file()


def test_full_finetune_with_packing_and_eval(tiny_model_dir, jsonl, tmp_path):
    final = run_sft(
        tiny_model_dir,
        jsonl(CHATS),
        tmp_path / "run",
        "peft.method=none",
        "data.packing=true",
        "data.max_length=64",
        "train.max_steps=3",
        "train.batch_size=1",
        "data.eval_fraction=0.25",
    )
    assert (Path(final) / "config.json").is_file()
    last = metrics(tmp_path / "run")[-1]
    assert "eval/loss" in last and last["eval/ppl"] == pytest.approx(
        2.718281828 ** last["eval/loss"], rel=1e-4
    )


def test_bad_record_fails_before_training_with_file_and_line(tiny_model_dir, jsonl, tmp_path, capsys):
    bad = jsonl([CHATS[0], {"messages": [{"role": "bot", "content": "hi"}]}])
    code = main(
        ["sft", f"model.path={tiny_model_dir}", f"data.train=[{bad}]", f"train.output_dir={tmp_path / 'run'}"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:2:" in err and "role" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_key_fails_before_loading(capsys):
    assert main(["sft", "train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def _cli(*args, env=None):
    cmd = [sys.executable, "-m", "chatforge.cli", "sft", *args]
    return subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _args(model_dir, data, out, *extra):
    common = ("train.batch_size=2", "train.max_steps=8", "train.lr=1e-2", "peft.dropout=0.1")
    return tiny_run_args(model_dir, data, out, *common, *extra)


def test_resume_after_kill_equals_uninterrupted(tiny_model_dir, jsonl, tmp_path):
    data = jsonl(CHATS)
    ref = _cli(*_args(tiny_model_dir, data, tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]

    out = tmp_path / "killed"
    # keep_last large so the step-4 checkpoint is still there however far the run got before the kill
    proc = _cli(*_args(tiny_model_dir, data, out, "train.save_every=2", "train.keep_last=10"))
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-4").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for later in (out / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > 4:
            import shutil

            shutil.rmtree(later)  # make the resume point step 4 whatever the timing was
    resumed = _cli(*_args(tiny_model_dir, data, out, "train.save_every=2", "train.resume=true"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    want = {m["step"]: m["loss"] for m in metrics(tmp_path / "ref")}
    got = {m["step"]: m["loss"] for m in metrics(out)}
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_two_process_ddp_matches_one_process(tiny_model_dir, jsonl, tmp_path):
    data = jsonl(CHATS)
    # dropout off: each rank draws its own masks, so only a deterministic model can match exactly
    common = ["train.max_steps=3", "peft.method=lora", "train.lr=1e-2", "peft.dropout=0.0"]

    def args(out, processes):  # the same global batch of 4
        return _args(tiny_model_dir, data, out, f"train.batch_size={4 // processes}", *common)

    a, b = one_and_two_processes("sft", args, tmp_path)
    assert len(a) == len(b) == 3
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-5)
