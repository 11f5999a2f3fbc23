"""The per-strategy planner against DeepSpeed's own ZeRO estimators, and its CLI."""

from __future__ import annotations

import re

import pytest

from chatforge.cli import main
from chatforge.plan.devices import DEVICES, cpu_peak_tflops, find
from chatforge.plan.memory import GIB, estimate
from chatforge.plan.shapes import DEFAULT_MODEL_CONFIG, ModelShape, load_shape
from chatforge.plan.strategies import largest_module_params, per_device

LLAMA2_7B = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)
SHAPES = [
    ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG),
    load_shape("590m"),
    ModelShape.from_hf_config(LLAMA2_7B),
]
ROW = re.compile(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$")


def _printed(fn, capsys, **kwargs) -> dict[str, tuple[float, float]]:
    """DeepSpeed's `*_all_cold` table: options -> (GiB per CPU, GiB per GPU)."""
    fn(**kwargs)
    rows = [ROW.match(line) for line in capsys.readouterr().out.splitlines()]
    return {
        m[3].replace(" ", "").replace("OffloadDeviceEnum.", ""): (float(m[1]), float(m[2])) for m in rows if m
    }


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.n_params // 10**6}M")
@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (2, 1), (8, 1), (4, 2)])
def test_zero2_model_states_agree_with_deepspeed(shape, gpus, nodes, capsys):
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    n, p = gpus * nodes, shape.n_params
    e = estimate(shape, method="full", weight_dtype="bf16")
    table = _printed(
        stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold,
        capsys,
        total_params=p,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
    )
    for offload, key in (("none", "offload_optimizer=none"), ("optimizer", "offload_optimizer=cpu")):
        plan = per_device(e, "zero2", devices=n, offload=offload)
        cpu, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            p, gpus, nodes, cpu_offload=offload != "none", additional_buffer_factor=1.0
        )
        assert plan.model_states == pytest.approx(gpu, abs=2)
        assert plan.model_states / GIB == pytest.approx(table[key][1], abs=0.006)
        if offload != "none" and nodes == 1 and 4 * n <= 16:  # past that it counts each process's load
            assert plan.host_total * gpus == pytest.approx(cpu, abs=8)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.n_params // 10**6}M")
@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (2, 1), (8, 1), (4, 2)])
def test_zero3_model_states_agree_with_deepspeed(shape, gpus, nodes, capsys):
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    n, p, largest = gpus * nodes, shape.n_params, largest_module_params(shape)
    e = estimate(shape, method="full", weight_dtype="bf16")
    table = _printed(
        stage3.estimate_zero3_model_states_mem_needs_all_cold,
        capsys,
        total_params=p,
        largest_layer_params=largest,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
    )
    cases = [("none", False, False), ("optimizer", True, False), ("all", True, True)]
    for offload, opt_cpu, param_cpu in cases:
        plan = per_device(e, "zero3", devices=n, offload=offload)
        cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
            p, largest, gpus, nodes, opt_cpu, param_cpu, zero_init=True, additional_buffer_factor=1.0
        )
        assert plan.model_states == pytest.approx(gpu, abs=3)
        key = f"offload_param={'cpu' if param_cpu else 'none'},offload_optimizer={'cpu' if opt_cpu else 'none'},zero_init=1"
        assert plan.model_states / GIB == pytest.approx(table[key][1], abs=0.006)
        if offload != "none":  # host memory per node, zero.Init partitioning at load
            assert plan.host_total * gpus == pytest.approx(cpu, abs=8)


def test_strategies_shard_what_they_say():
    e = estimate(SHAPES[1], method="full", weight_dtype="bf16", batch=2, seq_len=256)
    one = per_device(e)
    assert one.device == {**e.breakdown, "gathered": 0} and one.host_total == 0
    ddp = per_device(e, "ddp", devices=4)
    assert ddp.device["gradients"] == 2 * e.breakdown["gradients"]  # + DDP's reduce buckets
    fsdp = per_device(e, "fsdp2", devices=4)
    for k in ("weights", "gradients", "optimizer"):
        assert fsdp.device[k] == round(e.breakdown[k] / 4)
    assert fsdp.device["activations"] == e.breakdown["activations"]  # each process's own batch
    off = per_device(e, "fsdp2", devices=4, offload="all")
    assert off.host_total == sum(fsdp.device[k] for k in ("weights", "gradients", "optimizer"))
    assert off.model_states == fsdp.device["gathered"]
    for strategy, offload, says in [
        ("ddp", "optimizer", "needs a sharded strategy"),
        ("fsdp2", "optimizer", "offloads parameters, gradients and optimizer states together"),
        ("zero2", "all", "needs partitioned parameters"),
        ("zero4", "none", "strategy must be one of"),
    ]:
        with pytest.raises(ValueError, match=says):
            per_device(e, strategy, devices=2, offload=offload)


def test_plan_cli_per_strategy(capsys):
    args = ["plan", "590m", "--stage", "sft", "--method", "full", "--strategy", "zero3", "--devices", "8"]
    assert main([*args, "--offload", "optimizer", "--device-gib", "16"]) == 0
    out = capsys.readouterr().out
    assert "zero3 over 8 devices, offload optimizer" in out
    for component in ("weights", "gradients", "optimizer", "activations", "gathered"):
        assert re.search(rf"^{component}\s+[\d.]+\s+[\d.]+$", out, re.M), component
    assert "fits on (GiB, 10% kept free): t4 (16)" in out and "fits in 16 GiB: yes" in out
    assert main(["plan", "590m", "--method", "full", "--strategy", "zero2", "--offload", "all"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: offload=all needs partitioned parameters (zero2 keeps them on every device): "
        "use strategy=zero3 or fsdp2, or offload=optimizer"
    )


def test_known_devices_and_cpu_peak():
    assert find("NVIDIA A100-SXM4-40GB").name == "a100-40"
    assert find("NVIDIA A10G").name == "a10" and find("NVIDIA H200").memory_gib == 141
    assert len({d.name for d in DEVICES}) == len(DEVICES)
    assert cpu_peak_tflops(1, "avx2", 3.0) == 0.096 and cpu_peak_tflops(1, "sse2", 1.0) == 0.008
