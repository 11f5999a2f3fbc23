"""Nothing lost, nothing run that should not be: one test per way a run used to lose work.

Checkpoint order across a digit boundary, no pickle on resume, run identity, divergence, the
output dir untouched by a run that fails early, atomic final/, torn metrics, a full disk, and
SIGKILLs at several moments (one inside a checkpoint write) that resume to the uninterrupted run.
"""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.train import checkpoint as ck
from conftest import tiny_run_args
from test_loop import collate, items, loss_fn, make_trainer, units_fn


def fit(tmp_path, tokenizer, **kw):
    trainer, _ = make_trainer(tmp_path, tokenizer, **kw)
    trainer.fit(items(), collate, loss_fn, units_fn)
    return trainer


def test_pruning_keeps_the_newest_checkpoints_across_a_digit_boundary(tmp_path, tokenizer):
    trainer = fit(tmp_path, tokenizer, batch_size=1, max_steps=12, save_every=2, keep_last=2)
    assert [p.name for p in trainer.checkpoints()] == ["step-10", "step-12"]


def test_resume_refuses_a_pickle_that_would_run_code(tmp_path, tokenizer):
    fit(tmp_path, tokenizer, batch_size=4, max_steps=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "checkpoints" / "step-2" / "optimizer.pt", "wb") as f:
        pickle.dump({"state": Payload()}, f)
    trainer, _ = make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=4, resume=True)
    with pytest.raises(ChatforgeError, match="refusing to unpickle"):
        trainer.resume()
    assert not marker.exists()


def test_checkpoint_files_load_without_pickle(tmp_path, tokenizer):
    fit(tmp_path, tokenizer, batch_size=4, max_steps=2)
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):
        torch.load(tmp_path / "checkpoints" / "step-2" / name, weights_only=True)


def run_sft(model_dir, data, out, *extra, check=True):
    from chatforge.config import load_config
    from chatforge.train import sft

    return sft.run(load_config(None, tiny_run_args(model_dir, data, out, "train.batch_size=2", *extra)))


def sft_data(jsonl, n=8):
    return jsonl([{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(n)])


def test_resume_refuses_another_runs_checkpoint_naming_the_keys(tmp_path, tiny_model_dir, jsonl):
    data, out = sft_data(jsonl), tmp_path / "run"
    run_sft(tiny_model_dir, data, out, "train.max_steps=2", "train.lr=1e-3")
    before = (out / "config.yaml").read_text()
    with pytest.raises(ChatforgeError, match=r"train\.lr \(checkpoint 0\.001, now 0\.002\)"):
        run_sft(tiny_model_dir, data, out, "train.max_steps=2", "train.lr=2e-3", "train.resume=true")
    assert (out / "config.yaml").read_text() == before


def test_a_fresh_run_over_another_runs_checkpoints_is_refused(tmp_path, tiny_model_dir, jsonl):
    data, out = sft_data(jsonl), tmp_path / "run"
    run_sft(tiny_model_dir, data, out, "train.max_steps=2")
    final = (out / "final" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ChatforgeError, match="train.overwrite=true"):
        run_sft(tiny_model_dir, data, out, "train.max_steps=2", "train.seed=7")
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == final
    run_sft(tiny_model_dir, data, out, "train.max_steps=2", "train.seed=7", "train.overwrite=true")
    assert (out / "final" / "adapter_model.safetensors").read_bytes() != final
    state = json.loads((out / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["identity"]["train.seed"] == 7


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=4, save_every=1)
    calls = []

    def diverges_at_step_3(model, batch, normalizer):
        calls.append(1)
        loss, metrics = loss_fn(model, batch, normalizer)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    with pytest.raises(ChatforgeError, match=r"step 3: training diverged \(loss nan\)"):
        trainer.fit(items(), collate, diverges_at_step_3, units_fn)
    assert [p.name for p in trainer.checkpoints()] == ["step-1", "step-2"]
    weights = trainer.acc.unwrap_model(trainer.model).named_parameters()
    assert all(torch.isfinite(p).all() for _, p in weights)  # the optimizer never stepped on NaN


def test_nan_weights_never_reach_final(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(ChatforgeError, match="NaN or inf"):
        trainer.save_final(lambda tmp: tmp.mkdir())
    assert not (tmp_path / "final").exists()


def test_a_run_that_fails_on_its_data_leaves_the_dir_alone_and_loads_no_model(
    tmp_path, tiny_model_dir, jsonl, monkeypatch
):
    from chatforge.train import common

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("the earlier run's config\n")
    (out / "stage").write_text("dpo\n")
    loaded = []
    monkeypatch.setattr(common, "build_policy", lambda *a, **k: loaded.append(1) / 0)
    bad = jsonl(['{"prompt": "q", "completion": "a"}', '{"prompt": "q",'], name="bad.jsonl")
    with pytest.raises(ChatforgeError, match=r"bad\.jsonl:2: invalid JSON"):
        run_sft(tiny_model_dir, bad, out)
    assert (out / "config.yaml").read_text() == "the earlier run's config\n"
    assert (out / "stage").read_text() == "dpo\n" and not loaded


def test_final_is_replaced_without_a_moment_with_none(tmp_path):
    final, new = tmp_path / "final", tmp_path / ".tmp-final"
    final.mkdir()
    (final / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    ck.replace_dir(new, final)
    assert (final / "w").read_text() == "new" and not (tmp_path / ".old-final").exists()
    # a kill between the two renames leaves the old version aside: it is put back
    final.rename(tmp_path / ".old-final")
    ck.recover_dir(final)
    assert (final / "w").read_text() == "new"


def test_resume_drops_a_torn_metrics_line(tmp_path, tokenizer, capsys):
    fit(tmp_path, tokenizer, batch_size=4, max_steps=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the process died mid-write
    trainer, _ = make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=3, resume=True)
    trainer.fit(items(), collate, loss_fn, units_fn)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "dropped 1 unreadable line" in capsys.readouterr().out


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . file write failed"),
    ],
    ids=["oserror", "torch-save"],
)
def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, tokenizer, monkeypatch, failure):
    trainer, _ = make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=4, save_every=2)
    monkeypatch.setattr(ck, "_free_bytes", lambda path: 0 if isinstance(failure, RuntimeError) else 1 << 40)
    real = ck.save_plain

    def save(obj, path):
        if "step-4" in str(path):
            raise failure
        real(obj, path)

    monkeypatch.setattr(ck, "save_plain", save)
    with pytest.raises(ChatforgeError, match="the disk is full"):
        trainer.fit(items(), collate, loss_fn, units_fn)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]  # no temp dir left behind
    monkeypatch.setattr(ck, "save_plain", real)
    again, _ = make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=4, save_every=2, resume=True)
    assert again.resume()["step"] == 2


# ---- bad inputs: one line each, before anything is written --------------------------------------


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "chatforge.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    return line


@pytest.mark.parametrize("suffix", [".csv", ".json", ".txt"])
def test_a_bad_utf8_byte_is_named_by_line(tmp_path, suffix):
    from chatforge.data.sources import read_records

    body = {
        ".csv": b'prompt,completion\nq,ok\n"caf\xe9",x\n',
        ".json": b'[{"prompt": "q"},\n{"prompt": "caf\xe9"}]',
    }
    path = tmp_path / f"d{suffix}"
    path.write_bytes(body.get(suffix, b"line one\ncaf\xe9\n"))
    with pytest.raises(ChatforgeError, match=rf"d\{suffix}:[23]: not valid UTF-8"):
        list(read_records(path))


def test_json_errors_read_naturally(tmp_path):
    from chatforge.data.sources import read_records

    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "open')
    with pytest.raises(ChatforgeError) as e:
        list(read_records(path))
    assert str(e.value) == f"{path}:1: invalid JSON (Unterminated string at column 13)"


@pytest.mark.parametrize(
    "override, says",
    [
        ("train.log_every=0", "train.log_every must be a positive integer"),
        ("train.keep_last=0", "train.keep_last must be at least 1"),
        ("train.device=bogus", "train.device must be"),
        ("train.lr=inf", "train.lr must be a finite number"),
        ("ppo.kl_coef=nan", "ppo.kl_coef must be a finite number"),
    ],
)
def test_bad_config_values_are_refused_by_key(override, says):
    from chatforge.config import load_config

    with pytest.raises(ChatforgeError, match=says):
        load_config(None, [override])


def test_unknown_target_modules_list_the_real_ones(tmp_path, tiny_model_dir, jsonl):
    with pytest.raises(ChatforgeError, match=r"peft.target_modules: no module named 'nosuch'.*q_proj"):
        run_sft(tiny_model_dir, sft_data(jsonl), tmp_path / "run", "peft.target_modules=[nosuch]")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_bad_model_paths_are_one_line(tmp_path, tiny_model_dir):
    import shutil

    from chatforge.models.load import load_model, load_tokenizer

    with pytest.raises(ChatforgeError, match="not a local folder"):
        load_tokenizer("nosuch-org/nosuch-model")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ChatforgeError, match=f"model.path: {broken}"):
        load_model(str(broken))


def test_output_dirs_that_cannot_be_written_are_refused_before_loading(tmp_path):
    from chatforge.config import load_config
    from chatforge.train.common import start_run

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ChatforgeError, match="is a file, not a folder"):
        start_run(load_config(None, [f"train.output_dir={afile}/run"]), "sft")


def test_a_reward_module_that_raises_on_import_is_one_line(tmp_path, monkeypatch):
    from chatforge.rl.rewards import resolve

    (tmp_path / "badreward.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ChatforgeError, match="importing badreward failed: RuntimeError"):
        resolve("badreward:score")
    with pytest.raises(ChatforgeError, match="importing .*badreward.py failed"):
        resolve(f"{tmp_path}/badreward.py:score")


def test_the_gguf_cache_is_keyed_on_content(tmp_path, monkeypatch):
    from chatforge.models import load

    made = []
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(load, "convert_gguf", lambda src, out: made.append(out) or out)
    for name, body in (("a", b"GGUF" + b"\0" * 60), ("b", b"GGUF" + b"\1" * 60)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.gguf").write_bytes(body)  # same name, same size, other bytes
        load.resolve_model_path(str(tmp_path / name / "m.gguf"))
    assert len(set(made)) == 2


def test_cli_gives_one_line_for_a_hub_id_offline(tmp_path, jsonl):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CHATFORGE_MALLOC": "system"}
    data = sft_data(jsonl)
    line = one_line_error(
        cli(
            "sft",
            "model.path=nosuch-org/nosuch-model",
            f"data.train=[{data}]",
            f"train.output_dir={tmp_path}/o",
            env=env,
        )
    )
    assert "nosuch-org/nosuch-model" in line
    assert not (tmp_path / "o").exists()


# ---- crash safety: SIGKILL at several moments, then resume --------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{tests!r}]
    from chatforge.models.tiny import tiny_tokenizer
    from chatforge.train import checkpoint as ck
    from test_loop import collate, items, loss_fn, make_trainer, units_fn

    out, kill_at, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    real = ck.save_plain

    def save(obj, path):
        real(obj, path)
        if kill_at == "write" and ".tmp-step-10" in str(path) and path.name == "optimizer.pt":
            os.kill(os.getpid(), signal.SIGKILL)  # inside the write of checkpoint 10

    ck.save_plain = save

    def on_step(trainer, metrics):
        if kill_at.isdigit() and trainer.step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    from pathlib import Path
    trainer, _ = make_trainer(Path(out), tiny_tokenizer(), batch_size=1, max_steps=14, save_every=2,
                              keep_last=2, resume=resume)
    trainer.fit(items(), collate, loss_fn, units_fn, on_step=on_step)
    """
)


def test_sigkill_at_any_moment_resumes_to_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def child(out, kill_at, resume):
        return subprocess.run(
            [sys.executable, str(script), str(out), kill_at, resume],
            env=env,
            capture_output=True,
            timeout=300,
        )

    assert child(tmp_path / "full", "never", "0").returncode == 0
    want = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    for kill_at in ("write", "11", "5"):
        out = tmp_path / f"kill-{kill_at}"
        killed = child(out, kill_at, "0")
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        done = child(out, "never", "1")
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        got = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(g)["step"] for g in got] == list(range(1, 15))
        for a, b in zip(got, want):
            ra, rb = json.loads(a), json.loads(b)
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), (kill_at, ra["step"])
        mine = load_file(str(out / "checkpoints" / "step-14" / "trainable.safetensors"))
        theirs = load_file(str(tmp_path / "full" / "checkpoints" / "step-14" / "trainable.safetensors"))
        for name, t in theirs.items():
            torch.testing.assert_close(mine[name], t, rtol=1e-5, atol=1e-6)
