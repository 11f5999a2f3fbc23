"""`dist.strategy` -> how the Trainer spreads a model over processes: DDP, FSDP2 or DeepSpeed ZeRO.

    ddp     every process holds the whole model, gradients and optimizer state (accelerate's DDP)
    fsdp2   torch's `fully_shard` per decoder layer, then the root: parameters, gradients and
            optimizer state are sharded over the processes (gloo on CPU, NCCL on GPU)
    zero2   DeepSpeed ZeRO-2: gradients and optimizer state partitioned (chatforge.train.zero;
            SFT and DPO, full fine-tuning or LoRA; GRPO with LoRA)
    zero3   DeepSpeed ZeRO-3: parameters partitioned too

accelerate 1.15 turns an FSDP config into DDP on CPU, so FSDP2 is applied here with torch's own
`fully_shard`, and the sharded model is not passed to `accelerate.prepare`. What is saved does not
depend on the strategy: `final/` and `trainable.safetensors` hold the full weights gathered from
the shards; the optimizer state is saved per rank (`optimizer-R.pt`, this rank's shard or ZeRO
partition), so a sharded checkpoint resumes with the same number of processes. GRPO and PPO (lean
layout) run under fsdp2 with LoRA, GRPO with LoRA under zero2 and zero3 too: the rollout decodes
inside `unsharded(trainer.model)`, which gathers the whole weights once per rollout (fsdp2,
zero3) or hands over the engine's model as it is (zero2).

`dist.offload` keeps shards in host memory: `optimizer` under zero2/zero3, `all` under zero3 and
fsdp2 (`CPUOffloadPolicy`); `offloaded(model)` reads back from the engine what it really offloads.

`check_supported(stage, strategy, offload, grad_accum, method)` refuses an unsupported combination at start-up in one
line; `local_bytes(model, optimizer)` reads what this rank really holds from the local shards.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from chatforge.errors import ConfigError
from chatforge.plan.strategies import offload_refusal

# stages whose loop is the shared Trainer.fit and whose model is only called through forward()
SHARDED_STAGES = ("sft", "pretrain", "rm", "dpo")
# of those, the ones tested under DeepSpeed ZeRO
ZERO_STAGES = ("sft", "dpo")
# the peft methods tested under ZeRO ("none" = full fine-tuning)
ZERO_METHODS = ("none", "lora")
# RL stages tested under DeepSpeed ZeRO, and their peft methods: LoRA, the rollout decoding on the
# whole weights (`unsharded`, gathered once under zero3)
ZERO_RL_STAGES = {"grpo": ("lora",)}
# RL stages that run under fsdp2, and the peft methods tested for them: LoRA on a sharded frozen
# base, the rollout decoding on the whole weights gathered once (`unsharded`)
SHARDED_RL_STAGES = {"grpo": ("lora",), "ppo": ("lora",)}


def resolve(strategy: str, world: int) -> str:
    """`auto` = ddp when several processes, none when one; one process never shards.

    >>> resolve("auto", 1), resolve("auto", 2), resolve("fsdp2", 1), resolve("fsdp2", 2)
    ('none', 'ddp', 'none', 'fsdp2')
    """
    if world == 1:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def check_supported(
    stage: str, strategy: str, offload: str, grad_accum: int = 1, method: str = "none"
) -> None:
    """One-line refusal of a stage x strategy x offload this version cannot run, saying what can."""
    if strategy in ("zero2", "zero3"):
        if stage in ZERO_RL_STAGES and method not in ZERO_RL_STAGES[stage]:
            methods = " or ".join(f"peft.method={m}" for m in ZERO_RL_STAGES[stage])
            raise ConfigError(
                f"dist.strategy={strategy} with peft.method={method} is not supported for the {stage} "
                f"stage yet: use {methods}, or dist.strategy=ddp"
            )
        if stage not in (*ZERO_STAGES, *ZERO_RL_STAGES):
            fsdp2 = stage in SHARDED_STAGES or stage in SHARDED_RL_STAGES
            instead = "dist.strategy=fsdp2 or ddp" if fsdp2 else "dist.strategy=ddp"
            raise ConfigError(
                f"dist.strategy={strategy} is not supported for the {stage} stage yet: use {instead}"
            )
        if method not in ZERO_METHODS:
            raise ConfigError(
                f"dist.strategy={strategy} with peft.method={method} is not supported yet: use "
                "peft.method=lora or none, or dist.strategy=fsdp2"
            )
        if grad_accum != 1:
            raise ConfigError(
                f"dist.strategy={strategy} with train.grad_accum={grad_accum} is not supported yet: use "
                "train.grad_accum=1 (raise train.batch_size), or dist.strategy=fsdp2"
            )
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"dist.strategy={strategy} needs DeepSpeed: pip install 'chatforge[deepspeed]'"
            ) from None
    if strategy == "fsdp2" and stage in SHARDED_RL_STAGES and method not in SHARDED_RL_STAGES[stage]:
        methods = " or ".join(f"peft.method={m}" for m in SHARDED_RL_STAGES[stage])
        raise ConfigError(
            f"dist.strategy=fsdp2 with peft.method={method} is not supported for the {stage} stage "
            f"yet: use {methods}, or dist.strategy=ddp"
        )
    if strategy == "fsdp2" and stage not in (*SHARDED_STAGES, *SHARDED_RL_STAGES):
        sharded = ", ".join((*SHARDED_STAGES, *SHARDED_RL_STAGES))
        raise ConfigError(
            f"dist.strategy=fsdp2 is not supported for the {stage} stage yet: use dist.strategy=ddp, "
            f"or fsdp2 with {sharded}"
        )
    if (why := offload_refusal(strategy, offload, key="dist.")) is not None:
        raise ConfigError(why)
    if offload != "none" and stage in ("grpo", "ppo"):  # the rollout's gather of offloaded shards is untested
        raise ConfigError(
            f"dist.offload={offload} is not supported for the {stage} stage yet: use dist.offload=none"
        )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks to shard one by one: modules whose class transformers names in
    `_no_split_modules` (LlamaDecoderLayer, ...)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(
    model: torch.nn.Module, reshard_after_forward: bool = True, offload: str = "none"
) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` each decoder layer, then the root (embeddings, norm, head).
    `offload="all"`: the shards (parameters, gradients, hence the optimizer state and its step)
    live in CPU memory, each layer copied to the device for its forward and backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload == "all" else OffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"dist.strategy=fsdp2: found no decoder layers in {type(model).__name__} "
            "(no _no_split_modules): use dist.strategy=ddp"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    return model


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (the whole tensor when it is not sharded). A ZeRO-3 parameter
    keeps its partition in `ds_tensor` (the parameter itself is an empty placeholder)."""
    return t.to_local() if is_sharded(t) else getattr(t, "ds_tensor", t)


def local_bytes(model: torch.nn.Module, optimizer) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) held by this process, counted on the local shards;
    under DeepSpeed the optimizer's state includes its fp32 master partition where that is a copy
    (zero2: +4 bytes per trained parameter / processes)."""
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    state = 0
    if "deepspeed" in sys.modules:  # imported by the Trainer when it built an engine
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        from chatforge.train import zero

        if isinstance(optimizer, ZeROOptimizer):
            state += zero.master_bytes(optimizer)
    for per_param in optimizer.state.values():
        for v in per_param.values():
            if torch.is_tensor(v) and v.dim() > 0:
                state += local(v).numel() * v.element_size()
    return params, state


def offloaded(model: torch.nn.Module) -> tuple[str, ...]:
    """What the engine itself keeps in host memory between uses ("parameters", "optimizer"), read
    from its own runtime state: DeepSpeed's ZeRO optimizer flags, FSDP2's per-parameter offload."""
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        zero_opt = model.optimizer
        params = getattr(zero_opt, "offload_param", False)
        optim = getattr(zero_opt, "offload_optimizer", False) or getattr(zero_opt, "cpu_offload", False)
        return ("parameters",) * bool(params) + ("optimizer",) * bool(optim)
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for m in model.modules():
        if isinstance(m, FSDPModule):
            groups = getattr(fully_shard.state(m), "_fsdp_param_groups", None) or []
            if any(p.offload_to_cpu for g in groups for p in g.fsdp_params):
                return ("parameters", "optimizer")  # the optimizer steps the offloaded shards
    return ()


@contextlib.contextmanager
def unsharded(model: torch.nn.Module, reshard_after_forward: bool = True) -> Iterator[torch.nn.Module]:
    """All ranks: a block of many small forwards outside the training step (an RL rollout) that
    runs on the whole weights, gathered once, with no collective inside. `model` is the Trainer's
    (`trainer.model`); the block gets the plain module: a DeepSpeed engine's own model on its whole
    weights (`chatforge.train.zero.unsharded`: gathered under zero3, as it is under zero2); a model
    with no FSDP2 modules as it is.

    Every FSDP2 module is unsharded (`FSDPModule.unshard`, one all-gather per layer) with
    reshard-after-forward off: in torch 2.13 a module's post-forward hook reshards it when that
    flag is on, even after an explicit `unshard()`, and the next forward would all-gather again,
    a collective every rank must then join in the same order. With it off the pre-forward hook
    finds the parameters unsharded (a no-op) and the post-forward leaves them so, and each rank
    decodes its own prompts, stopping when its own answers end. On exit every module is resharded
    and the flag set back (`dist.reshard_after_forward`). Costs one full copy of the weights per
    rank while open, as the whole model under DDP; gradients and optimizer state stay sharded.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    deepspeed = sys.modules.get("deepspeed")  # imported by the Trainer when it built an engine
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        from chatforge.train import zero

        with zero.unsharded(model) as whole:
            yield whole
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield model
        return
    # FSDP2 takes the first of its modules to run a forward for the root; a rollout before the
    # first training step would run a decoder layer first, so the root is initialised here
    # (torch has no public call for it: this is what the root's own pre-forward calls first)
    fully_shard.state(model)._lazy_init()
    model.set_reshard_after_forward(False, recurse=True)
    for m in modules:
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
        model.set_reshard_after_forward(reshard_after_forward, recurse=True)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """All ranks: inside the block every sharded parameter is replaced by its full tensor (gathered
    with `DTensor.full_tensor`), so `save_pretrained`, a finiteness check or a state dict see the
    whole model; the shards are put back after. Collective; holds one full copy per rank."""
    slots = [
        (module, name, p)
        for module in model.modules()
        for name, p in module.named_parameters(recurse=False)
        if is_sharded(p)
    ]
    full: dict[int, torch.nn.Parameter] = {}
    for module, name, p in slots:
        if id(p) not in full:  # a tied weight is gathered once
            full[id(p)] = torch.nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
        setattr(module, name, full[id(p)])
    try:
        yield model
    finally:
        for module, name, p in slots:
            setattr(module, name, p)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip over the global gradient norm; a norm over sharded gradients is reduced to one number."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    return norm.full_tensor() if is_sharded(norm) else norm


def load_full(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into a (possibly sharded) model's parameters; each rank keeps its shard."""
    from torch.distributed.tensor import distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            p = params[name]
            if is_sharded(p):
                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(value)


def local_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with sharded tensors replaced by this rank's shards."""
    sd = optimizer.state_dict()
    sd["state"] = {
        k: {n: local(v) if torch.is_tensor(v) else v for n, v in s.items()} for k, s in sd["state"].items()
    }
    return sd


def load_local_optimizer_state(optimizer, sd: dict) -> None:
    """Inverse of `local_optimizer_state`: this rank's shards become DTensors like their params."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(sd)
    for p, s in optimizer.state.items():
        if not is_sharded(p):
            continue
        for n, v in s.items():
            if torch.is_tensor(v) and v.dim() > 0 and not is_sharded(v):
                s[n] = DTensor.from_local(
                    v.to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
