"""`chatforge bench`: how fast a training step runs, and in how much memory, per dist.strategy.

A size preset (chatforge.plan.scaling.PRESETS or WIDTHxDEPTH) is built with random weights (nothing
is downloaded) and trained for a few steps on random tokens through the same `Trainer` the stages
use, so the strategy is applied exactly as in a real run. For several processes launch it the
usual way:

    chatforge bench --preset 256m --steps 3                                  # one process
    torchrun --nproc_per_node 2 -m chatforge.cli bench --preset 256m --strategy fsdp2

It prints tokens/s over all processes, achieved TFLOP/s and MFU, and per process the peak memory
(RSS on CPU, max allocated on CUDA) and the parameter + optimizer-state bytes it holds (counted on
its local shards). FLOPs per token follow PaLM's MFU accounting (Chowdhery et al., 2022, app. B):
2N forward + 2N backward through the activations + 2N' for the weight gradients (N parameters in
matmuls: all but an untied input embedding; N' of them trained, so 6N for full fine-tuning), plus
12 * layers * hidden * seq_len for attention (the causal half counted whole). MFU divides by the
peak of all processes: `--peak-tflops`, else the known-device table (chatforge.plan.devices), else
on CPU an fp32 estimate from /proc/cpuinfo.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

STAGES = ("sft", "pretrain")


def flops_per_token(n_matmul: int, n_trained: int, n_layers: int, hidden: int, seq_len: int) -> int:
    """Training FLOPs per token (see the module docstring).

    >>> flops_per_token(100, 100, 2, 8, 16) == 6 * 100 + 12 * 2 * 8 * 16
    True
    """
    return 4 * n_matmul + 2 * n_trained + 12 * n_layers * hidden * seq_len


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatforge bench",
        description="Train a size preset with random weights (no download) for a few steps on random "
        "tokens under a dist.strategy, through the stages' own Trainer; print tokens/s, achieved "
        "TFLOP/s, MFU and each process's peak memory and parameter + optimizer-state bytes. For "
        "several processes: torchrun --nproc_per_node N -m chatforge.cli bench ...",
        epilog="FLOPs per token: 6N (4N + 2N' with adapters, N' trained) + 12*layers*hidden*seq_len "
        "for attention (PaLM's MFU accounting). MFU peak: --peak-tflops, else the known GPU table, "
        "else an fp32 estimate of this CPU.",
    )
    p.add_argument(
        "--preset", default="mini", help="size preset (tiny ... 590m) or WIDTHxDEPTH; random weights"
    )
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (49152: SmolLM2's tokenizer)")
    p.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp2", "zero2", "zero3"])
    p.add_argument(
        "--offload",
        default="none",
        choices=["none", "optimizer", "all"],
        help="dist.offload (zero2/zero3/fsdp2)",
    )
    p.add_argument(
        "--keep-gathered",
        action="store_true",
        help="fsdp2: keep each layer's gathered weights from forward to backward (dist.reshard_after_forward=false)",
    )
    p.add_argument("--stage", default="sft", choices=STAGES, help="sft: loss on the second half of each row")
    p.add_argument("--method", default="full", choices=["full", "lora"], help="lora: r 16 on attention")
    p.add_argument("--batch", type=int, default=2, help="sequences per process per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak TFLOP/s of one device")
    p.add_argument("--json", help="also write the results to this JSON file (rank 0)")
    return p


def _model(preset: str, vocab: int, method: str, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chatforge.config import PeftConfig
    from chatforge.errors import ConfigError
    from chatforge.models.adapters import apply_peft
    from chatforge.models.logprobs import LogprobModel
    from chatforge.plan.scaling import preset_config

    try:
        config = LlamaConfig(**preset_config(preset, vocab))
    except ValueError as e:
        raise ConfigError(f"--preset: {e}") from None
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lm = apply_peft(lm, PeftConfig(method="none" if method == "full" else "lora", r=16))
    return LogprobModel(lm), config


def _batches(steps: int, batch: int, seq_len: int, vocab: int, stage: str, rank: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
        labels = ids.clone()
        if stage == "sft":  # a prompt, then the completion the loss is on
            labels[:, : seq_len // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _peak_tflops(args, device) -> tuple[float | None, str]:
    from chatforge.plan import devices

    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        known = devices.find(name)
        return (known.peak_tflops, f"{known.name} dense bf16") if known else (None, f"unknown GPU {name}")
    threads = devices.cpu_threads()
    return devices.cpu_peak_tflops(threads), f"CPU fp32 estimate, {threads} thread(s)"


def run(args) -> dict:
    import torch

    from chatforge.config import DistConfig, TrainConfig
    from chatforge.models.load import pick_device
    from chatforge.train import dist as sharding
    from chatforge.train.loop import Trainer
    from chatforge.train.sft import sft_loss, sft_units

    sharding.check_supported(
        args.stage, args.strategy, args.offload, 1, "none" if args.method == "full" else "lora"
    )
    device = pick_device(args.device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, config = _model(args.preset, args.vocab, args.method, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_matmul = n_params - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
    tcfg = TrainConfig(
        output_dir=os.path.join(tempfile.gettempdir(), f"chatforge-bench-{run_id}"),
        batch_size=args.batch,
        mixed_precision="none",
        progress=False,
        warmup_ratio=0.0,
        device=str(device),
    )
    total = args.warmup + args.steps
    dist = DistConfig(
        strategy=args.strategy, offload=args.offload, reshard_after_forward=not args.keep_gathered
    )
    trainer = Trainer(model, tcfg, total, dist=dist)
    rank, world = trainer.acc.process_index, trainer.world
    batches = _batches(total, args.batch, args.seq_len, args.vocab, args.stage, rank)
    times = []
    for i, batch in enumerate(batches):
        trainer.acc.wait_for_everyone()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        batch = {k: v.to(trainer.acc.device) for k, v in batch.items()}
        trainer.train_step([batch], sft_loss, sft_units)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        trainer.acc.wait_for_everyone()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    params, state = sharding.local_bytes(trainer.acc.unwrap_model(trainer.model), trainer.optimizer)
    trainer.acc.wait_for_everyone()
    if trainer.is_main:  # the Trainer claimed it; nothing of a benchmark is kept
        shutil.rmtree(tcfg.output_dir, ignore_errors=True)
    mine = {"rank": rank, "peak_bytes": _peak_memory(device), "param_bytes": params, "optim_bytes": state}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
    step_s = sum(times) / len(times)
    tokens = args.batch * args.seq_len * world / step_s
    per_token = flops_per_token(
        n_matmul, n_trained, config.num_hidden_layers, config.hidden_size, args.seq_len
    )
    achieved = tokens * per_token / 1e12
    peak, peak_source = _peak_tflops(args, device)
    strategy = sharding.resolve(args.strategy, world)
    return {
        "preset": args.preset,
        "params": n_params,
        "trained": n_trained,
        "method": args.method,
        "stage": args.stage,
        "strategy": strategy,
        "offload": args.offload,
        "reshard_after_forward": not args.keep_gathered,
        "processes": world,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": "bf16" if bf16 else "fp32",
        "device": device.type,
        "steps": args.steps,
        "step_s": step_s,
        "tokens_per_s": tokens,
        "flops_per_token": per_token,
        "tflops": achieved,
        "peak_tflops": peak * world if peak else None,
        "peak_source": peak_source,
        "mfu": achieved / (peak * world) if peak else None,
        "ranks": ranks,
    }


def strategy_label(r: dict) -> str:
    """A result's strategy with its non-default dist settings, e.g. 'fsdp2 (kept gathered)'.

    >>> strategy_label({"strategy": "zero3", "offload": "all"})
    'zero3 (offload all)'
    """
    extras = [f"offload {r['offload']}"] if r.get("offload", "none") != "none" else []
    if r["strategy"] == "fsdp2" and not r.get("reshard_after_forward", True):
        extras.append("kept gathered")
    return f"{r['strategy']} ({', '.join(extras)})" if extras else r["strategy"]


def format_result(r: dict) -> str:
    """The lines `chatforge bench` prints."""
    mib = 2**20
    mfu = (
        f"MFU {r['mfu']:.1%} of {r['peak_tflops']:.3g} TFLOP/s ({r['peak_source']}, x{r['processes']})"
        if r["mfu"] is not None
        else f"MFU unknown ({r['peak_source']}: give --peak-tflops)"
    )
    lines = [
        f"bench: {r['preset']} ({r['params'] / 1e6:.1f}M params, {r['trained'] / 1e6:.1f}M trained), "
        f"{r['method']} {r['stage']}, {strategy_label(r)} x {r['processes']} process(es), "
        f"batch {r['batch']} x {r['seq_len']} tokens per process, {r['dtype']} on {r['device']}",
        f"{r['step_s']:.3f} s/step over {r['steps']} steps | {r['tokens_per_s']:.1f} tokens/s | "
        f"{r['tflops']:.4g} TFLOP/s achieved (6N + attention) | {mfu}",
        f"{'rank':<6}{'peak MiB':>10}{'params MiB':>12}{'optimizer MiB':>15}",
    ]
    for k in r["ranks"]:
        lines.append(
            f"{k['rank']:<6}{k['peak_bytes'] / mib:>10.0f}{k['param_bytes'] / mib:>12.1f}{k['optim_bytes'] / mib:>15.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2 or args.warmup < 0:
        from chatforge.errors import ConfigError

        raise ConfigError("--steps, --batch must be >= 1, --seq-len >= 2 and --warmup >= 0")
    result = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_result(result), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return 0
