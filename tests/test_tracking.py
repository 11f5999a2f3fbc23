"""train.report_to: the trainer's metrics reach TensorBoard, MLflow (or nothing), read back from disk."""

import json

import pytest

from chatforge import tracking
from chatforge.config import load_config
from chatforge.errors import ConfigError
from chatforge.models.logprobs import LogprobModel
from chatforge.models.tiny import tiny_model
from chatforge.train.common import start_run
from chatforge.train.loop import Trainer
from chatforge.train.schedule import steps_for
from test_loop import collate, items, loss_fn, units_fn


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files directly in `logdir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train(out, tokenizer, *overrides):
    """Three logged steps of the shared loop, started like a stage (so the run has a config)."""
    cfg = load_config(
        None,
        [
            f"train.output_dir={out}",
            "train.max_steps=3",
            "train.lr=1e-2",
            "train.progress=false",
            "train.mixed_precision=none",
            *overrides,
        ],
    )
    start_run(cfg, "sft")
    trainer = Trainer(
        LogprobModel(tiny_model("llama", tokenizer, seed=1)), cfg.train, steps_for(16, cfg.train)
    )
    trainer.fit(items(), collate, loss_fn, units_fn)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_by_default_gets_every_logged_metric(tmp_path, tokenizer):
    rows = train(tmp_path / "run", tokenizer)
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert [s for s, _ in scalars["tokens_per_s"]] == [1, 2, 3] and "lr" in scalars


def test_none_writes_only_metrics_jsonl(tmp_path, tokenizer):
    rows = train(tmp_path / "run", tokenizer, "train.report_to=none")
    assert len(rows) == 3 and not (tmp_path / "run" / "tensorboard").exists()


def test_mlflow_run_holds_the_metrics_and_the_config(tmp_path, tokenizer, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow's local file store, no server
    rows = train(tmp_path / "demo" / "sft", tokenizer, "train.report_to=[mlflow]", "train.project=chat")
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("chat").experiment_id])
    assert run.info.run_name == "demo/sft" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert run.data.params["train.lr"] == "0.01" and run.data.params["stage"] == "sft"
    assert not (tmp_path / "demo" / "sft" / "tensorboard").exists()


def test_wandb_offline_run_records_every_logged_value(tmp_path, tokenizer, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: the run stays on disk
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = train(tmp_path / "demo" / "sft", tokenizer, "train.report_to=[wandb]")
    (log,) = (tmp_path / "demo" / "sft" / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's own record file (protobuf; its reader is internal to wandb): every value logged, as JSON
    data = log.read_bytes()
    for r in rows:
        for key in ("loss", "grad_norm", "lr"):
            assert json.dumps(r[key]).encode() in data, (r["step"], key)


def test_a_missing_tracker_package_fails_at_start_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "wandb", ("chatforge_no_such_module", "'chatforge[wandb]'"))
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.report_to=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"wandb needs .* pip install 'chatforge\[wandb\]'") as err:
        start_run(cfg, "sft")
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["[tensorboard, comet]", "[none, mlflow]"])
def test_unknown_or_contradictory_trackers_are_refused(value):
    with pytest.raises(ConfigError, match="train.report_to must be a list of tensorboard, wandb"):
        load_config(None, [f"train.report_to={value}"])
