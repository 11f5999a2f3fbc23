"""The shared trainer: micro-batch invariance, exact resume, atomic checkpoints, schedules."""

import json

import pytest
import torch

from chatforge.config import TrainConfig
from chatforge.errors import ChatforgeError
from chatforge.models.logprobs import LogprobModel
from chatforge.models.tiny import tiny_model
from chatforge.train.loop import Trainer
from chatforge.train.schedule import epoch_order, steps_for


def items(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + i % 5
        ids = torch.randint(5, 400, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def collate(batch):
    width = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), width), 3)
    labels = torch.full((len(batch), width), -100)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for r, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[r, :n] = torch.tensor(x["input_ids"])
        labels[r, :n] = torch.tensor(x["labels"])
        attn[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def loss_fn(model, batch, normalizer):
    mask = batch["labels"] != -100
    logps, _ = model(batch["input_ids"], batch["attention_mask"], None, mask)
    nll = -(logps * mask[:, 1:]).sum()
    return nll / (normalizer or mask[:, 1:].sum()), {"nll": nll.detach() / mask[:, 1:].sum()}


def units_fn(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def make_trainer(tmp_path, tokenizer, **kw):
    defaults = dict(
        output_dir=str(tmp_path),
        lr=1e-2,
        warmup_ratio=0.0,
        progress=False,
        mixed_precision="none",
        max_grad_norm=0.0,
    )
    cfg = TrainConfig(**{**defaults, **kw})
    model = LogprobModel(tiny_model("llama", tokenizer, seed=1))
    return Trainer(model, cfg, steps_for(16, cfg)), cfg


def read_metrics(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_a_loss_in_parts_is_backwarded_part_by_part(tmp_path, tokenizer):
    # a loss_fn may yield (loss, metrics) parts: each is backwarded before the next part's forward
    # runs, and the step equals the one on the summed loss
    data = items(4)
    a, _ = make_trainer(tmp_path / "a", tokenizer)
    b, _ = make_trainer(tmp_path / "b", tokenizer)
    grads, seen = {}, []
    for name, t in (("a", a), ("b", b)):
        t.optimizer.step = lambda t=t, name=name: grads.setdefault(
            name, {n: p.grad.clone() for n, p in t.model.named_parameters()}
        )

    def halves(model, batch, normalizer):
        for rows in (slice(0, 2), slice(2, 4)):
            seen.append(any(p.grad is not None for p in model.parameters()))
            loss, metrics = loss_fn(model, {k: v[rows] for k, v in batch.items()}, normalizer)
            yield loss, {f"nll{rows.start}": metrics["nll"]}

    ma = a.train_step([collate(data)], loss_fn, units_fn)
    mb = b.train_step([collate(data)], halves, units_fn)
    assert seen == [False, True]  # the first half's backward ran before the second half's forward
    assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-5) and {"nll0", "nll2"} <= set(mb)
    for n, g in grads["a"].items():
        # float32 sums in another order: ~1e-7 apart on gradients of ~0.6
        torch.testing.assert_close(grads["b"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_grad_accumulation_equals_big_batch(tmp_path, tokenizer):
    data = items(8)
    a, _ = make_trainer(tmp_path / "a", tokenizer, batch_size=4, grad_accum=1)
    b, _ = make_trainer(tmp_path / "b", tokenizer, batch_size=1, grad_accum=4)
    grads = {}
    for name, t in (("a", a), ("b", b)):  # capture the gradients the optimizer would apply
        t.optimizer.step = lambda t=t, name=name: grads.setdefault(
            name, {n: p.grad.clone() for n, p in t.model.named_parameters()}
        )
    ma = a.train_step([collate(data[:4])], loss_fn, units_fn)
    mb = b.train_step([collate([x]) for x in data[:4]], loss_fn, units_fn)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    assert ma["nll"] == pytest.approx(mb["nll"], rel=1e-5) and ma["nll"] == pytest.approx(
        ma["loss"], rel=1e-5
    )
    for n, g in grads["a"].items():
        torch.testing.assert_close(g, grads["b"][n], atol=1e-6, rtol=1e-4, msg=n)


def test_loss_goes_down_and_every_parameter_changes(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=12)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit(items(), collate, loss_fn, units_fn)
    logged = read_metrics(tmp_path)
    assert logged[-1]["loss"] < logged[0]["loss"] * 0.8
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(logged[0])
    for n, p in trainer.model.named_parameters():
        assert not torch.equal(before[n], p), f"{n} did not change"
    assert (tmp_path / "checkpoints" / "step-12" / "trainable.safetensors").is_file()
    assert (tmp_path / "tensorboard").is_dir()


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, tokenizer):
    kw = dict(batch_size=2, grad_accum=2, max_steps=6, save_every=2, keep_last=2)
    full, _ = make_trainer(tmp_path / "full", tokenizer, **kw)
    full.fit(items(), collate, loss_fn, units_fn)

    def stop_at_3(trainer, metrics):
        if trainer.step == 3:
            raise KeyboardInterrupt

    part, _ = make_trainer(tmp_path / "part", tokenizer, **kw)
    with pytest.raises(KeyboardInterrupt):
        part.fit(items(), collate, loss_fn, units_fn, on_step=stop_at_3)
    assert (tmp_path / "part" / "checkpoints" / "step-3").is_dir()

    resumed, _ = make_trainer(tmp_path / "part", tokenizer, resume=True, **kw)
    resumed.fit(items(), collate, loss_fn, units_fn)
    want = {m["step"]: m for m in read_metrics(tmp_path / "full")}
    got = {m["step"]: m for m in read_metrics(tmp_path / "part")}
    for step in (4, 5, 6):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6, abs=1e-7)
        assert got[step]["lr"] == pytest.approx(want[step]["lr"])
    kept = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert kept == ["step-4", "step-6"]  # keep_last=2, no temp dirs left behind


def test_epoch_order_is_a_deterministic_permutation():
    a = epoch_order(10, 1, 0)
    assert sorted(a) == list(range(10))
    assert a == epoch_order(10, 1, 0)
    assert a != epoch_order(10, 1, 1)


def test_too_little_data_is_a_clear_error():
    from chatforge.errors import ChatforgeError

    with pytest.raises(ChatforgeError, match="fewer than one global batch"):
        steps_for(3, TrainConfig(batch_size=4))


def test_a_fresh_run_in_a_used_dir_is_refused_unless_told_to_overwrite(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=3)
    trainer.fit(items(), collate, loss_fn, units_fn)
    with pytest.raises(ChatforgeError, match="train.overwrite=true"):
        make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=2)
    trainer, _ = make_trainer(tmp_path, tokenizer, batch_size=4, max_steps=2, overwrite=True)
    trainer.fit(items(), collate, loss_fn, units_fn)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    assert [p.name for p in trainer.checkpoints()] == ["step-2"]  # the other run's step-3 is gone


def test_one_process_can_run_stages_with_different_precision(tmp_path, tokenizer):
    """A pipeline runs its stages in one process; accelerate's process-wide precision must not stick."""
    bf16, _ = make_trainer(tmp_path / "a", tokenizer, mixed_precision="bf16")
    assert bf16.acc.mixed_precision == "bf16"
    plain, _ = make_trainer(tmp_path / "b", tokenizer, mixed_precision="none")
    assert plain.acc.mixed_precision == "no"
