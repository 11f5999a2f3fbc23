"""dist.strategy: FSDP2 and DeepSpeed ZeRO-2/3 under torchrun (2 CPU processes, gloo) train like one
process at the same global batch (SFT; DPO under ZeRO), really shard, save a plain final/ and
resume exactly; unsupported combinations are refused in one line."""

import math
import shutil

import pytest
import torch

from chatforge.cli import main
from conftest import launch, metrics_of, tiny_run_args, write_jsonl

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


def _args(model_dir, data, out, processes, *extra, strategy=None):
    """A run at the same global batch of 4 whatever the processes; no strategy: plain ddp (one
    process never shards: the reference run, which still prints the bytes it holds)."""
    return tiny_run_args(
        model_dir,
        data,
        out,
        f"train.batch_size={4 // processes}",
        "train.lr=1e-2",
        "peft.dropout=0.0",  # each rank draws its own dropout masks
        f"dist.strategy={strategy or 'ddp'}",
        *extra,
    )


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chats") / "data.jsonl", CHATS)


def _logits(model_dir, adapter: bool):
    from transformers import AutoModelForCausalLM

    if adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model.eval()(torch.arange(3, 20)[None]).logits


def _plan(model_dir, method: str, strategy: str, devices: int):
    from chatforge.plan.memory import estimate
    from chatforge.plan.shapes import load_shape
    from chatforge.plan.strategies import per_device

    method = "full" if method == "none" else method
    e = estimate(load_shape(str(model_dir)), method, "fp32", lora_r=16, lora_targets="attention")
    return per_device(e, strategy, devices=devices)


def _assert_shards(one, two, strategy: str, master: bool | None = None) -> None:
    """Each of the two ranks holds about half the one-process run's Adam state (the engine's own
    local shards; plus DeepSpeed's fp32 master copy of the partition under zero2 or with `master`,
    e.g. offloaded: 3/4 in all) and half its parameters, all of them under zero2."""
    ((params, state),) = one
    assert len(two) == 2
    master = strategy == "zero2" if master is None else master
    share = 0.75 if master else 0.5
    for p, s in two:
        assert (share - 0.1) * state < s < (share + 0.1) * state
        assert p == params if strategy == "zero2" else 0.4 * params < p < 0.6 * params


STRATEGIES = ["fsdp2", "zero2", "zero3"]


@pytest.mark.parametrize("method", ["none", "lora"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_sft_trains_like_one_process_and_saves_plain_final(
    strategy, method, tiny_model_dir, chats, one_process, tmp_path
):
    if strategy != "fsdp2":
        pytest.importorskip("deepspeed")
    extra = ("train.max_steps=3", f"peft.method={method}")
    one, plain = one_process("sft", lambda out: _args(tiny_model_dir, chats, out, 1, *extra))
    two = launch("sft", 2, _args(tiny_model_dir, chats, tmp_path, 2, *extra, strategy=strategy))
    a, b = metrics_of(plain), metrics_of(tmp_path)
    assert len(a) == len(b) == 3
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-4)
    assert [m["grad_norm"] for m in b] == pytest.approx([m["grad_norm"] for m in a], rel=1e-3)
    _assert_shards(one, two, strategy)
    # the planner's shares per device say the same (fp32): fsdp2's shards; ZeRO's weights, and
    # zero2's fp32 master + Adam partition (zero3 steps the parameter partition in place, 4/N less
    # than DeepSpeed's own count, which the planner follows)
    plan = _plan(tiny_model_dir, method, strategy, devices=2)
    for p, s in two:
        assert plan.device["weights"] == pytest.approx(p, rel=0.03)
        want = plan.device["optimizer"] * (2 / 3 if strategy == "zero3" else 1)
        assert want == pytest.approx(s, rel=0.03)
    if method == "lora":  # a plain peft adapter dir, not the whole model
        names = {p.name for p in (tmp_path / "final").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert "model.safetensors" not in names
    # final/ is a plain transformers / peft dir gathered from the shards; partitioned fp32 sums
    # reduce in another order than one process's (a few 1e-6 apart under ZeRO)
    got = _logits(tmp_path / "final", adapter=method == "lora")
    want = _logits(plain / "final", adapter=method == "lora")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 if strategy == "fsdp2" else 1e-4)
    assert not torch.allclose(got, _logits(tiny_model_dir, adapter=False), atol=1e-3)


@pytest.mark.parametrize(
    ("strategy", "offload", "held"),
    [
        ("fsdp2", "all", "parameters and optimizer"),
        ("zero2", "optimizer", "optimizer"),
        ("zero3", "all", "parameters and optimizer"),
    ],
)
def test_offload_trains_like_one_process(
    strategy, offload, held, tiny_model_dir, chats, one_process, tmp_path
):
    """dist.offload: the engine keeps the shards in host memory (read from its own state, printed
    by each rank), and the steps are those of one process."""
    if strategy != "fsdp2":
        pytest.importorskip("deepspeed")
    extra = ("train.max_steps=3", "peft.method=none")
    one, plain = one_process("sft", lambda out: _args(tiny_model_dir, chats, out, 1, *extra))
    host: list[str] = []
    args = _args(tiny_model_dir, chats, tmp_path, 2, *extra, f"dist.offload={offload}", strategy=strategy)
    two = launch("sft", 2, args, host)
    assert host == [held, held]
    a, b = metrics_of(plain), metrics_of(tmp_path)
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-4)
    _assert_shards(one, two, strategy, master=strategy != "fsdp2")  # ZeRO-Offload's master: on the host


PAIRS = [
    {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": "no"}
    for a in range(1, 5)
    for b in range(1, 5)
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "data.jsonl", PAIRS)


@pytest.mark.parametrize(
    ("strategy", "method", "precompute"),
    [
        ("fsdp2", "none", False),
        ("fsdp2", "lora", False),
        ("zero2", "none", False),
        ("zero3", "none", False),
        ("zero2", "lora", False),
        ("zero3", "lora", False),
        ("zero3", "none", True),
    ],
)
def test_sharded_dpo_trains_like_one_process(
    strategy, method, precompute, tiny_model_dir, pairs, one_process, tmp_path
):
    """The reference runs inside the sharded step: the adapter switched off on the sharded model
    (the engine's own under ZeRO) for LoRA, a whole frozen copy per rank for full fine-tuning; or
    once before the first step on the engine's model (dpo.precompute_ref=true)."""
    if strategy != "fsdp2":
        pytest.importorskip("deepspeed")
    extra = ("train.max_steps=3", f"peft.method={method}", f"dpo.precompute_ref={str(precompute).lower()}")
    one, plain = one_process("dpo", lambda out: _args(tiny_model_dir, pairs, out, 1, *extra))
    two = launch("dpo", 2, _args(tiny_model_dir, pairs, tmp_path, 2, *extra, strategy=strategy))
    a, b = metrics_of(plain), metrics_of(tmp_path)
    assert len(a) == len(b) == 3
    assert a[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy = reference at step 1
    assert a[2]["loss"] < a[0]["loss"] - 1e-3
    for key in ("loss", "rewards/margin", "rewards/chosen", "rewards/accuracy", "grad_norm"):
        assert [m[key] for m in b] == pytest.approx([m[key] for m in a], rel=1e-4, abs=1e-6), key
    _assert_shards(one, two, strategy)
    got = _logits(tmp_path / "final", adapter=method == "lora")
    want = _logits(plain / "final", adapter=method == "lora")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3", "zero2"])
def test_resume_from_a_sharded_checkpoint_is_exact(strategy, tiny_model_dir, chats, tmp_path, capsys):
    if strategy != "fsdp2":
        pytest.importorskip("deepspeed")
    extra = ("peft.method=none", "train.max_steps=4", "train.save_every=2", "train.keep_last=5")
    launch("sft", 2, _args(tiny_model_dir, chats, tmp_path / "full", 2, *extra, strategy=strategy))
    ckpt = tmp_path / "full" / "checkpoints" / "step-2"
    assert {p.name for p in ckpt.glob("optimizer-*.pt")} == {"optimizer-0.pt", "optimizer-1.pt"}
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = ("train.resume=true",)
    launch("sft", 2, _args(tiny_model_dir, chats, tmp_path / "part", 2, *extra, *resumed, strategy=strategy))
    want = {m["step"]: m for m in metrics_of(tmp_path / "full")}
    got = {m["step"]: m for m in metrics_of(tmp_path / "part")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6), step
    got, want = (_logits(tmp_path / run / "final", adapter=False) for run in ("part", "full"))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # the per-rank optimizer files need the same number of processes (the same config, in one)
    shutil.rmtree(tmp_path / "part" / "final")
    one = _args(tiny_model_dir, chats, tmp_path / "part", 2, *extra, *resumed, strategy=strategy)
    assert main(["sft", *one]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "a checkpoint of 2 processes" in err[-1] and "resume it with 2 processes" in err[-1]


@pytest.mark.parametrize(
    ("stage", "overrides", "says"),
    [
        (
            "ppo",
            ["dist.strategy=fsdp2", "ppo.reward_model=rm", "peft.method=none"],
            "with peft.method=none is not supported for the ppo stage yet: use peft.method=lora",
        ),
        (
            "ppo",
            ["dist.strategy=fsdp2", "ppo.reward_model=rm", "ppo.layout=separate"],
            "dist.strategy=fsdp2 runs PPO's lean layout only",
        ),
        (
            "grpo",
            ["dist.strategy=fsdp2", "peft.method=none"],
            "with peft.method=none is not supported for the grpo stage yet: use peft.method=lora",
        ),
        (
            "ppo",
            ["dist.strategy=zero3", "ppo.reward_model=rm"],
            "dist.strategy=zero3 is not supported for the ppo stage yet",
        ),
        (
            "grpo",
            ["dist.strategy=zero2", "peft.method=none"],
            "dist.strategy=zero2 with peft.method=none is not supported for the grpo stage yet",
        ),
        ("rm", ["dist.strategy=zero2"], "use dist.strategy=fsdp2 or ddp"),
        (
            "sft",
            ["dist.strategy=zero3", "peft.method=prompt"],
            "with peft.method=prompt is not supported yet",
        ),
        (
            "sft",
            ["dist.strategy=zero2", "train.grad_accum=2", "peft.method=none"],
            "with train.grad_accum=2 is not supported",
        ),
        ("sft", ["dist.offload=optimizer"], "dist.offload=optimizer needs a sharded strategy"),
        ("sft", ["dist.strategy=fsdp2", "dist.offload=optimizer"], "with fsdp2 (torch's fully_shard"),
        ("sft", ["dist.strategy=zero2", "dist.offload=all", "peft.method=none"], "use dist.strategy=zero3"),
        ("grpo", ["dist.strategy=zero3", "dist.offload=optimizer"], "not supported for the grpo stage yet"),
    ],
)
def test_unsupported_combinations_are_refused_in_one_line(stage, overrides, says, tmp_path, capsys):
    assert main([stage, f"train.output_dir={tmp_path}", "data.train=[x.jsonl]", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
