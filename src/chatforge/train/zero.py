"""dist.strategy=zero2 / zero3: DeepSpeed ZeRO for the shared Trainer, through `deepspeed.initialize`.

    zero2   every process holds the whole model; gradients and optimizer states are partitioned
    zero3   parameters are partitioned too, each module's gathered only for its forward/backward

Supported (and tested on 2 CPU processes against one) for SFT and DPO, with full fine-tuning or
LoRA (`peft.method=lora`), and for GRPO with LoRA; DPO's reference is the adapter switched off on
the engine's own model, a whole frozen copy per rank (full fine-tuning), or log-probs precomputed
before the first step; GRPO's is the adapter switched off. GRPO's rollout decodes inside
`unsharded(engine)`: the engine's model as it is under zero2, on its parameters gathered once (the
per-module hooks off) under zero3. `dist.offload=optimizer` (ZeRO-Offload) and, under zero3, `all`
keep the partitions in host memory (`ds_config`). Other stages and peft methods and
train.grad_accum > 1 are refused at start-up (chatforge.train.dist.check_supported).

The Trainer's torch AdamW becomes the inner optimizer of DeepSpeed's ZeRO optimizer, which steps it
on this rank's flat fp32 partition; the LR schedule built on it keeps working, since DeepSpeed edits
its param groups in place. One optimizer step is `engine.backward(loss)` for each loss, then
`engine.step()` (clipping by `train.max_grad_norm` inside it). The process group is the one
accelerate created (gloo on CPU, NCCL on GPU); DeepSpeed wraps it. What is saved does not depend on
the strategy: `final/` and the checkpoints' `trainable.safetensors` hold the full weights, gathered
on every rank for the save under zero3 (`gathered`). Each rank also saves its ZeRO partition,
`optimizer-R.pt` (`partition_state`: the fp32 master partition and its Adam state, plain tensors),
and a resume with the same number of processes loads it back through DeepSpeed's own loader
(`load_partition_state`), so the steps after the resume repeat the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def ds_config(
    stage: int, micro_batch: int, max_grad_norm: float, bf16: bool, offload: str = "none", pin: bool = False
) -> dict:
    """The DeepSpeed config of a run: one micro-batch per step (the Trainer accumulates itself).

    `offload`: "optimizer" keeps the fp32 master partition and its Adam states in CPU memory and
    steps them there (ZeRO-Offload); "all" (zero3 only) keeps the parameter partitions there too
    (ZeRO-Infinity's CPU tier). `pin`: page-locked buffers, for a CUDA device.

    >>> ds_config(3, 2, 1.0, False, "all")["zero_optimization"]["offload_param"]
    {'device': 'cpu', 'pin_memory': False}
    """
    zero = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the Trainer's own torch AdamW
        # and it also steps the offloaded partition: DeepSpeedCPUAdam would be faster there, but is
        # a C++ extension JIT-built at first use (~100 s, a compiler needed)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def initialize(
    model: torch.nn.Module,
    optimizer,
    strategy: str,
    micro_batch: int,
    max_grad_norm: float,
    offload: str = "none",
):
    """(engine, ZeRO optimizer) for `model` (already on its device) and its torch `optimizer`."""
    import deepspeed

    stage = int(strategy[-1])
    first = next(model.parameters())
    bf16 = first.dtype == torch.bfloat16
    config = ds_config(stage, micro_batch, max_grad_norm, bf16, offload, pin=first.device.type == "cuda")
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    if stage == 3:
        _register_head(engine.module)
        _step_partition_in_place(zero_optimizer)
    return engine, zero_optimizer


def _step_partition_in_place(zero_optimizer) -> None:
    """ZeRO-3 with fp32 weights: let the optimizer step the parameter partition itself instead of an
    fp32 clone of it, one fewer copy of the partition per rank. DeepSpeed means to (its stage-3
    optimizer aliases the two when dtype and device agree, and its copy back to the parameters is
    then a no-op), but in 0.19.8 its check compares a device name (a str) with a torch.device, which
    never matches, so it clones. The clone's storage is swapped for the partition's; the tensor
    object the inner optimizer and its state are keyed by stays the same."""
    if getattr(zero_optimizer, "offload_optimizer", False):
        return  # the master lives in host memory: a copy by design
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or []
    flats = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None) or []
    for master, flat in zip(masters, flats):
        if flat is None or (master.dtype, master.device) != (flat.dtype, flat.device):
            continue
        if master.data_ptr() != flat.data_ptr() and torch.equal(master, flat):
            master.data = flat.data


def _register_head(model: torch.nn.Module) -> None:
    """chatforge reads the LM head's weight outside the head's own forward (chunked log-probs), so
    ZeRO-3 must gather it for the whole model's forward and backward."""
    import deepspeed

    head = getattr(model, "lm", model).get_output_embeddings()
    if head is not None:
        for p in head.parameters():
            deepspeed.zero.register_external_parameter(model, p)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """All ranks: inside the block every ZeRO-3 parameter holds its full tensor (a no-op for zero2)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield model


@contextlib.contextmanager
def unsharded(engine) -> Iterator[torch.nn.Module]:
    """All ranks: the engine's model on its whole weights for a block of many small forwards with
    no collective inside (an RL rollout, each rank decoding its own prompts); a no-op for zero2.

    Under zero3 every parameter is gathered once (`GatheredParameters`), and DeepSpeed's per-module
    forward hooks are taken off while the block runs: they would release a module's parameters
    after its forward (`release_sub_module` ignores an open `GatheredParameters`), and the next
    forward would all-gather again, a collective every rank must join in the same order. On exit
    the hooks are registered again (`_register_deepspeed_module`, which also invalidates the
    coordinator's recorded trace) and the parameters partitioned again. Costs one whole copy of
    the weights per rank while open."""
    model = engine.module
    if engine.zero_optimization_stage() != 3:
        yield model
        return
    import deepspeed

    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield model
        finally:
            for p in model.parameters():
                p.ds_active_sub_modules.clear()
            offload._register_deepspeed_module(model)


def master_bytes(zero_optimizer) -> int:
    """Bytes of this rank's fp32 master partition where it is a copy of its own: ZeRO-2 always
    clones the partition it steps; under ZeRO-3 with fp32 weights chatforge has the optimizer step
    the parameter partition itself (`_step_partition_in_place`), and nothing extra is held."""
    fp32 = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)  # stage 1/2
    if fp32 is not None:
        return sum(t.numel() * t.element_size() for t in fp32)
    fp32 = getattr(zero_optimizer, "fp32_partitioned_groups_flat", [])
    params = getattr(zero_optimizer, "fp16_partitioned_groups_flat", [])
    return sum(a.numel() * a.element_size() for a, b in zip(fp32, params) if a.data_ptr() != b.data_ptr())


def grad_norm(engine) -> torch.Tensor:
    """The global gradient norm DeepSpeed computed in its last step (before clipping)."""
    norm = engine.get_global_grad_norm()
    return torch.as_tensor(0.0 if norm is None else float(norm))


def _plain(v) -> bool:
    """Tensors and plain Python values (exact types: an IntEnum is not plain), what `load_plain` reads."""
    if torch.is_tensor(v) or v is None or type(v) in (bool, int, float, str):
        return True
    if type(v) in (list, tuple):
        return all(_plain(x) for x in v)
    if type(v) is dict:
        return all(type(k) in (int, str) and _plain(x) for k, x in v.items())
    return False


def partition_state(zero_optimizer) -> dict:
    """This rank's part of the ZeRO optimizer as plain values: the inner AdamW's state over this
    rank's flat fp32 partition, and that fp32 master partition itself. DeepSpeed's loss-scaler
    object, stage enum and slice mappings (for its universal checkpoints) are left out: the first is
    rebuilt the same at start-up (static, scale 1, in fp32 and bf16), the others are not read back."""
    return {k: v for k, v in zero_optimizer.state_dict().items() if _plain(v)}


def load_partition_state(zero_optimizer, state: dict, rank: int, world: int) -> None:
    """Inverse of `partition_state`, on the same number of processes: DeepSpeed's own loader copies
    the fp32 master partition back and, under zero3, the model's parameter partitions from it."""
    states = [None] * world
    states[rank] = {**state, "loss_scaler": zero_optimizer.loss_scaler}
    zero_optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
