"""Per-device memory under a `dist.strategy`: what each of N devices (and its host) holds.

`per_device(estimate, strategy, devices, offload)` spreads a one-device `memory.estimate` over
`devices` processes. Activations, logits and the KV cache belong to each process's own micro-batch
and stay whole; the model states (weights, gradients, optimizer states) depend on the strategy:

    none, ddp  every device holds everything; DDP also keeps a flat copy of the gradients in its
               reduce buckets (torch's default, gradient_as_bucket_view=False)
    fsdp2      torch fully_shard in the weights' own dtype: weights, gradients and optimizer states
               / N, plus the gathered root (embeddings) and two decoder layers (the running one and
               the prefetched one); offload=all keeps the shards in host memory (CPUOffloadPolicy)
    zero2      DeepSpeed: 16-bit weights whole; per trainable parameter the 16-bit gradient and an
               fp32 gradient partition (2 + 4 bytes) and the fp32 master copy with Adam's two fp32
               states (4 + 8 bytes) / N; offload=optimizer moves the fp32 gradients and the
               optimizer states to the host (the 16-bit gradients leave with them)
    zero3      DeepSpeed: weights / N too, the fp32 gradient partition (4 bytes) and master + Adam
               (12 bytes) / N, plus the largest module gathered (its 16-bit weights and gradients);
               offload=optimizer moves the 16 bytes to the host, offload=all the weights as well

These are the counts of DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`, which the tests compare with), which leave out its
communication buckets and the host copy each process loads before partitioning.

    >>> from chatforge.plan.memory import estimate
    >>> from chatforge.plan.shapes import DEFAULT_MODEL_CONFIG, ModelShape
    >>> e = estimate(ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG), method="full", batch=1, seq_len=512)
    >>> p = per_device(e, "zero3", devices=8, offload="optimizer")
    >>> round(p.model_states / 2**30, 3), round(p.host_total / 2**30, 3)
    (0.137, 0.251)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatforge.plan.devices import DEVICES, Device
from chatforge.plan.memory import BYTES_PER_PARAM, GIB, OPTIMIZERS, Estimate, short_count
from chatforge.plan.shapes import ModelShape

STRATEGIES = ("none", "ddp", "fsdp2", "zero2", "zero3")
OFFLOADS = ("none", "optimizer", "all")
MODEL_STATES = ("weights", "gradients", "optimizer", "gathered")
PER_PROCESS = ("activations", "logits", "kv_cache")


def largest_module_params(shape: ModelShape) -> int:
    """Parameters of the largest single module (its own, not its children's): what ZeRO-3 gathers
    at once. The embedding (vocab x hidden) or the largest decoder linear."""
    return max(shape.vocab * shape.hidden, *(i * o for i, o in shape.linear_shapes().values()))


def layer_params(shape: ModelShape) -> int:
    """Parameters of one decoder layer (all layers alike), what FSDP2 gathers per unit."""
    return (shape.n_params - shape.embedding_params - shape.hidden) // shape.n_layers


@dataclass(frozen=True)
class DevicePlan:
    """Bytes per device (`device`) and per process in host memory (`host`, offloaded states)."""

    estimate: Estimate
    strategy: str
    devices: int
    offload: str
    device: dict[str, int]
    host: dict[str, int]
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return sum(self.device.values())

    @property
    def model_states(self) -> int:
        """Weights, gradients, optimizer states and gathered buffers on one device."""
        return sum(self.device[k] for k in MODEL_STATES)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def _check(strategy: str, devices: int, offload: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if (why := offload_refusal(strategy, offload)) is not None:
        raise ValueError(why)


def offload_refusal(strategy: str, offload: str, key: str = "") -> str | None:
    """Why `offload` cannot go with `strategy`, in one line that says what can (None: it can).
    `key` prefixes the option names (`dist.` in a config).

    >>> offload_refusal("zero2", "all", key="dist.")
    'dist.offload=all needs partitioned parameters (zero2 keeps them on every device): use dist.strategy=zero3 or fsdp2, or dist.offload=optimizer'
    """
    if offload == "none":
        return None
    if strategy not in ("fsdp2", "zero2", "zero3"):
        return (
            f"{key}offload={offload} needs a sharded strategy: {key}strategy=zero2 or zero3 "
            f"({key}offload=optimizer or all) or fsdp2 ({key}offload=all)"
        )
    if strategy == "fsdp2" and offload == "optimizer":
        return (
            f"{key}offload=optimizer is not supported with fsdp2 (torch's fully_shard offloads parameters, "
            f"gradients and optimizer states together): use {key}offload=all, or {key}strategy=zero2/zero3"
        )
    if strategy == "zero2" and offload == "all":
        return (
            f"{key}offload=all needs partitioned parameters (zero2 keeps them on every device): "
            f"use {key}strategy=zero3 or fsdp2, or {key}offload=optimizer"
        )
    return None


def per_device(
    estimate: Estimate, strategy: str = "none", devices: int = 1, offload: str = "none"
) -> DevicePlan:
    """Spread `estimate` (one device's memory) over `devices` processes under `strategy`."""
    _check(strategy, devices, offload)
    e, n = estimate, devices
    b = e.breakdown
    trainable = e.trainable_params
    grad_bytes = b["gradients"] / trainable if trainable else 0.0  # the trainable dtype's bytes
    w = BYTES_PER_PARAM[e.weight_dtype]
    rest = {k: b[k] for k in PER_PROCESS}
    zero = dict.fromkeys(MODEL_STATES, 0)
    notes = list(e.notes)
    if strategy in ("none", "ddp"):
        grads = b["gradients"] * (2 if strategy == "ddp" else 1)
        if strategy == "ddp":
            notes.append("DDP reduce buckets: a second copy of the gradients")
        states = {"weights": b["weights"], "gradients": grads, "optimizer": b["optimizer"], "gathered": 0}
        return DevicePlan(e, strategy, n, offload, {**states, **rest}, dict(zero), tuple(notes))

    if strategy == "fsdp2":
        shards = {k: round(b[k] / n) for k in ("weights", "gradients", "optimizer")}
        gathered = round((e.shape.embedding_params + 2 * layer_params(e.shape)) * w)
        notes.append("fsdp2: the root (embeddings) and two decoder layers gathered at a time")
        if offload == "all":
            device = {**dict(zero), "gathered": gathered}
            return DevicePlan(e, strategy, n, offload, {**device, **rest}, {**zero, **shards}, tuple(notes))
        device = {**shards, "gathered": gathered}
        return DevicePlan(e, strategy, n, offload, {**device, **rest}, dict(zero), tuple(notes))

    # DeepSpeed ZeRO: fp32 master weights and fp32 optimizer states whatever the weights' dtype
    n_states, state_bytes = OPTIMIZERS[e.optimizer]
    optimizer = round(trainable * (4 + n_states * (state_bytes or 4.0)) / n)
    fp32_grads = round(trainable * 4 / n)
    notes.append(f"{strategy}: fp32 master weights, fp32 optimizer states and an fp32 gradient partition")
    device, host = dict(zero), dict(zero)
    if strategy == "zero2":
        device["weights"] = b["weights"]
        if offload == "none":
            device["gradients"] = round(trainable * grad_bytes / n) + fp32_grads
            device["optimizer"] = optimizer
        else:
            host["gradients"], host["optimizer"] = fp32_grads, optimizer
        return DevicePlan(e, strategy, n, offload, {**device, **rest}, host, tuple(notes))

    largest = largest_module_params(e.shape)
    device["gathered"] = round(largest * (w + grad_bytes)) if trainable else round(largest * w)
    notes.append(f"zero3: the largest module ({short_count(largest)} parameters) gathered at a time")
    weights = round(b["weights"] / n)
    (host if offload == "all" else device)["weights"] = weights
    if offload == "none":
        device["gradients"], device["optimizer"] = fp32_grads, optimizer
    else:
        host["gradients"], host["optimizer"] = fp32_grads, optimizer
    return DevicePlan(e, strategy, n, offload, {**device, **rest}, host, tuple(notes))


def fits_on(
    plan: DevicePlan, reserve: float = 0.1, devices: tuple[Device, ...] = DEVICES
) -> list[tuple[Device, bool]]:
    """Each known device and whether one device's share fits in it, keeping `reserve` free."""
    return [(d, plan.total <= d.memory_gib * GIB * (1 - reserve)) for d in devices]


def format_plan(plan: DevicePlan) -> str:
    """A table of GiB per device and per process on the host, then where it fits.

    >>> from chatforge.plan.memory import estimate
    >>> from chatforge.plan.shapes import DEFAULT_MODEL_CONFIG, ModelShape
    >>> e = estimate(ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG), method="full", batch=1, seq_len=512)
    >>> print(format_plan(per_device(e, "zero2", devices=2)).splitlines()[1])
    zero2 over 2 devices, offload none
    """
    e = plan.estimate
    lines = [
        f"{e.shape.model_type} {short_count(e.shape.n_params)} params | {e.method}, {e.weight_dtype} weights, "
        f"{e.stage}, batch {e.batch} x {e.seq_len} tokens per device, {short_count(e.trainable_params)} trainable",
        f"{plan.strategy} over {plan.devices} device{'s' if plan.devices > 1 else ''}, offload {plan.offload}",
        f"{'component':<12}{'GiB/device':>11}{'GiB/host':>10}",
    ]
    for name in plan.device:
        lines.append(f"{name:<12}{plan.device[name] / GIB:>11.3f}{plan.host.get(name, 0) / GIB:>10.3f}")
    lines.append(f"{'total':<12}{plan.total / GIB:>11.3f}{plan.host_total / GIB:>10.3f}")
    verdicts = fits_on(plan)
    yes = [f"{d.name} ({d.memory_gib:g})" for d, ok in verdicts if ok]
    no = [d.name for d, ok in verdicts if not ok]
    lines.append(f"fits on (GiB, 10% kept free): {', '.join(yes) or 'none of the known devices'}")
    if no:
        lines.append(f"does not fit on: {', '.join(no)}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
