"""Small subcommands that are not training stages: merge, data, plan, score."""

from __future__ import annotations

import argparse


def merge_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="chatforge merge", description="Fold a LoRA adapter into its base model."
    )
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    import torch

    from chatforge.models.adapters import merge_adapter

    out = merge_adapter(args.adapter_dir, args.out_dir, dtype=getattr(torch, args.dtype))
    print(f"merged model written to {out}")
    return 0


def data_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="chatforge data", description="Write built-in verifiable task data as JSONL."
    )
    sub = p.add_subparsers(dest="action", required=True)
    make = sub.add_parser("make", help="write sft/preference/rl/eval JSONL files for a task")
    make.add_argument("task", help="task name (arithmetic, units, format, mixed)")
    make.add_argument("out_dir")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--sizes", default="", help="e.g. sft=2000,preference=2000,rl=1000,eval=200")
    args = p.parse_args(argv)
    from chatforge.data.tasks import parse_sizes, write_task_data

    paths = write_task_data(args.task, args.out_dir, seed=args.seed, sizes=parse_sizes(args.sizes) or None)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="chatforge plan", description="Estimate memory for training a model.")
    p.add_argument("model", help="a model dir, 'default', or a pretraining preset name")
    p.add_argument("--method", default="lora", choices=["full", "lora", "qlora"])
    p.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16", "int8", "nf4"],
        help="weight dtype (default: per method)",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--stage", default="sft", choices=["sft", "reward", "dpo", "ppo", "grpo", "inference"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device-gib", type=float, default=0.0, help="say whether it fits in this much memory")
    args = p.parse_args(argv)
    from chatforge.plan import memory, scaling

    shape = memory.load_shape(args.model)
    est = memory.estimate(
        shape,
        method=args.method,
        weight_dtype=args.dtype,
        lora_r=args.lora_r,
        batch=args.batch,
        seq_len=args.seq_len,
        grad_checkpointing=args.grad_checkpointing,
        stage=args.stage,
    )
    print(memory.format_table(est))
    if args.device_gib:
        print(f"fits in {args.device_gib:g} GiB: {'yes' if memory.fits(est, args.device_gib) else 'no'}")
    tokens = scaling.chinchilla_tokens(shape.n_params)
    flops = scaling.training_flops(shape.n_params, tokens)
    print(f"compute-optimal pretraining budget: {tokens:,} tokens, {flops:.3g} FLOPs")
    return 0
