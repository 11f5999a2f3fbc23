"""The scaling study runner on a tiny grid: runs, skips finished ones, resumes interrupted ones,
writes the fit and the plot; a bad grid is a one-line error before any run starts. With `jobs: 2`
(worker processes) every run ends exactly as with `jobs: 1`, and a failing run is a one-line error."""

from __future__ import annotations

import json

import pytest

from chatforge.errors import ConfigError
from chatforge.study.grid import load_study, study_from_dict
from chatforge.study.runner import run_study

TEXT = "\n".join(
    f"def add_{i}(a, b):\n    '''Return the sum of a and b, number {i}.'''\n    return a + b\n"
    for i in range(150)
)


@pytest.fixture
def study(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)

    def make(**changes):
        raw = dict(
            data=[str(corpus)],
            budgets=["2e8", "4e8"],  # strings, as YAML reads 2e8
            sizes=["32x1", "32x2"],
            output_dir=str(tmp_path / "study"),
            vocab_size=300,
            seq_len=32,
            batch_size=4,
            eval_fraction=0.1,
            lr=1e-2,
            bootstrap=3,
            predict=[1e10],
        )
        return study_from_dict({**raw, **changes})

    return make


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*") if p.is_file()}


def test_tiny_grid_runs_fits_plots_then_skips_finished_runs(study, tmp_path, capsys):
    from chatforge.cli import main

    cfg = study(check_budget="8e8", check_size="32x1")
    analysis = run_study(cfg)
    out = tmp_path / "study"
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["c2e08-32x1", "c2e08-32x2", "c4e08-32x1", "c4e08-32x2", "check-c8e08-32x1"]
    assert len(analysis["runs"]) == 4  # the check run stays out of the fit
    check = json.loads((out / "scaling.json").read_text())["check"]
    assert check["size"] == "32x1" and check["predicted_loss"] > 0 and check["measured_loss"] > 0
    for name in runs:
        result = json.loads((out / "runs" / name / "result.json").read_text())
        assert result["eval_loss"] > 0 and result["steps"] >= 1
        assert 0.9 < result["flops"] / result["budget"] < 1.1
        assert (out / "runs" / name / "final" / "config.json").is_file()
    saved = json.loads((out / "scaling.json").read_text())
    assert set(saved["law"]) >= {"E", "A", "B", "alpha", "beta"}
    assert saved["uncertainty"]["alpha"]["n"] == 3 and "1e+10" in "".join(saved["predictions"])
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Approach 3" in report and "underdetermined" in report and "c4e08-32x2" in report
    assert analysis["approach2"]["note"].startswith("no approach-2 frontier")  # 2 sizes per budget
    before = _mtimes(out)
    capsys.readouterr()

    run_study(cfg)
    log = capsys.readouterr().out
    assert "training" not in log and "resuming" not in log
    assert _mtimes(out) == before  # no run was touched
    assert json.loads((out / "scaling.json").read_text())["law"] == saved["law"]
    # refit what is on disk, with another bootstrap size
    assert main(["scaling", "fit", str(out), "--bootstrap", "2"]) == 0
    refit = json.loads((out / "scaling.json").read_text())
    assert refit["n_bootstrap"] == 2 and refit["check"]["measured_loss"] == check["measured_loss"]
    assert _mtimes(out) == before


def test_interrupted_run_resumes_from_its_checkpoint(study, tmp_path, monkeypatch, capsys):
    import torch

    from chatforge.train.loop import Trainer

    threads = torch.get_num_threads()
    cfg = study(budgets=["2e8"], bootstrap=0, predict=[], threads=1)
    real_step = Trainer.train_step
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg)
    run_dir = tmp_path / "study" / "runs" / "c2e08-32x1"
    assert (run_dir / "checkpoints" / "step-3").is_dir() and not (run_dir / "result.json").exists()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    run_study(cfg)
    log = capsys.readouterr().out
    assert "resuming c2e08-32x1" in log and "resumed from step 3" in log
    assert json.loads((run_dir / "result.json").read_text())["eval_loss"] > 0
    assert torch.get_num_threads() == 1  # `threads: 1` held for the runs
    torch.set_num_threads(threads)


def test_bad_grid_is_one_line_error_before_any_run(study, tmp_path, capsys):
    out = tmp_path / "study"
    for changes, match in (
        ({"budgets": ["1e3"]}, "budget 1e\\+03 FLOPs is too small for size 32x1"),
        ({"sizes": ["32x1", "huge"]}, "unknown size 'huge'"),
        ({"check_budget": 1e5}, "too small"),
        ({"data": [str(tmp_path / "nope.txt")]}, "no such file"),
        ({"budgets": ["2e8"], "sizes": ["32x1"]}, "at least 2 runs"),
        ({"jobs": 0}, "jobs must be 1 or more runs at a time \\(got 0\\)"),
        ({"jobs": -2}, "jobs must be 1 or more"),
    ):
        with pytest.raises(ConfigError, match=match) as e:
            run_study(study(**changes))
        assert "\n" not in str(e.value)
        assert not out.exists()
    with pytest.raises(ConfigError, match="unknown key 'budget'"):
        study_from_dict({"budget": [1e9]})
    with pytest.raises(ConfigError, match="sizes is empty"):
        study_from_dict({"data": ["x"], "budgets": [1e9]})

    from chatforge.cli import main

    (tmp_path / "study.yaml").write_text(
        f"data: [{tmp_path / 'corpus.txt'}]\nbudgets: [1e3]\nsizes: [tiny]\n"
    )
    assert load_study(tmp_path / "study.yaml").budgets == [1e3]
    assert main(["scaling", "study", str(tmp_path / "study.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: budget 1e+03 FLOPs is too small") and err.count("\n") == 1
    assert main(["scaling", "study", str(tmp_path / "study.yaml"), "--dry-run"]) == 2
    assert not (tmp_path / "runs").exists() and not out.exists()


def _finals(out):
    """run name -> (held-out loss, last training loss, steps) of every finished run in `out`."""
    return {
        p.parent.name: (r["eval_loss"], r["train_loss"], r["steps"])
        for p in out.glob("runs/*/result.json")
        for r in [json.loads(p.read_text())]
    }


def test_jobs_2_gives_every_run_the_losses_of_jobs_1_and_skips_finished_runs(study, tmp_path, capsys):
    import multiprocessing

    import torch

    threads = torch.get_num_threads()
    same = dict(bootstrap=0, predict=[], threads=1, check_budget="8e8", check_size="32x1")
    one = run_study(study(**same, output_dir=str(tmp_path / "one")))
    capsys.readouterr()
    two = run_study(study(**same, jobs=2, output_dir=str(tmp_path / "two")))
    log = capsys.readouterr().out
    finals = _finals(tmp_path / "two")
    assert len(finals) == 5 and finals == _finals(tmp_path / "one")
    # the check run trained beside the grid, yet the fit saw the four grid runs only
    assert len(two["runs"]) == 4 and two["law"] == one["law"]
    assert two["check"]["predicted_loss"] == one["check"]["predicted_loss"]
    assert two["check"]["trained_beside_grid"] and not one["check"]["trained_beside_grid"]
    assert "trained beside the grid runs" in (tmp_path / "two" / "report.md").read_text()
    for name in finals:  # every line of a run's output carries its name
        assert f"[{name}] chatforge scaling: training {name}:" in log
        assert f"[{name}] chatforge: done:" in log
    # the check run started first, but its lines (its loss among them) show only after the fit
    lines = log.splitlines()
    check_lines = [i for i, x in enumerate(lines) if x.startswith("[check-")]
    grid_lines = [i for i, x in enumerate(lines) if x.startswith("[c") and i not in check_lines]
    assert max(grid_lines) < min(check_lines)
    assert not multiprocessing.active_children()
    before = _mtimes(tmp_path / "two")

    run_study(study(**same, jobs=2, output_dir=str(tmp_path / "two")))
    log = capsys.readouterr().out
    assert "training" not in log and "resuming" not in log and "[" not in log  # no worker started
    assert _mtimes(tmp_path / "two") == before
    torch.set_num_threads(threads)


def test_failing_run_under_jobs_2_is_one_line_error_and_stops_the_workers(study, tmp_path, capfd):
    import multiprocessing

    from chatforge.errors import ChatforgeError

    cfg = study(bootstrap=0, predict=[], threads=1, jobs=2)
    bad = tmp_path / "study" / "runs" / "c4e08-32x2"  # the second-longest run: it starts at once
    bad.parent.mkdir(parents=True)
    bad.write_text("not a folder")
    with pytest.raises(ChatforgeError, match="c4e08-32x2 is a file, not a folder") as e:
        run_study(cfg)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    captured = capfd.readouterr()  # the workers' own stderr too
    assert "Traceback" not in captured.out + captured.err and "Warning" not in captured.err
    assert not multiprocessing.active_children()  # the other worker was stopped, not left running
    assert not (tmp_path / "study" / "scaling.json").exists()


def test_a_stop_signal_that_lands_in_a_finaliser_still_interrupts_the_worker():
    """Python swallows an exception raised in `__del__`: the worker's handler sends it again."""
    import os
    import signal
    import time

    from chatforge.study.workers import _interrupt_once

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs here, inside the finaliser
                pass

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        with pytest.raises(KeyboardInterrupt):
            obj = Finalised()
            del obj
            end = time.monotonic() + 5.0
            while time.monotonic() < end:
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # later stops are ignored
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def test_runs_start_longest_first_one_core_per_worker():
    from chatforge.study.grid import longest_first, plan_run
    from chatforge.study.workers import worker_cores

    grid = [plan_run(s, c, 300, 128, "grid") for c in (2e8, 4e8) for s in ("32x1", "32x2")]
    check = plan_run("32x1", 1.6e9, 300, 128, "check")
    order = [r.name for r in longest_first([*grid, check])]
    assert order == ["check-c1.6e09-32x1", "c4e08-32x1", "c4e08-32x2", "c2e08-32x1", "c2e08-32x2"]
    assert [worker_cores(i, 1, [0, 1]) for i in range(2)] == [{0}, {1}]


def test_dry_run_prints_the_grid_and_writes_nothing(study, tmp_path, capsys):
    run_study(study(), dry_run=True)
    out = capsys.readouterr().out
    assert "c4e08-32x2" in out and "4 runs" in out
    assert not (tmp_path / "study").exists()


def test_pretrain_logs_held_out_loss_with_eval_fraction(tiny_model_dir, tmp_path):
    from chatforge.config import load_config
    from chatforge.train import pretrain

    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = load_config(
        None,
        [
            "pretrain.preset=32x1",
            f"pretrain.tokenizer={tiny_model_dir}",
            f"data.train=[{tmp_path / 'corpus.txt'}]",
            "data.max_length=32",
            "data.eval_fraction=0.2",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "train.progress=false",
            "train.mixed_precision=none",
        ],
    )
    pretrain.run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["eval/loss"] > 0
