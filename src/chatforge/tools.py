"""Small subcommands that are not training stages: merge, data, plan, score."""

from __future__ import annotations

import argparse


def _convert_main(
    argv: list[str], prog: str, description: str, source: str, target: str, written: str
) -> int:
    """`prog SOURCE OUT_DIR [--dtype]`: run `target` (module:function)(source, out_dir, dtype=...)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(source)
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    import importlib

    import torch

    module, name = target.split(":")
    convert = getattr(importlib.import_module(module), name)
    out = convert(getattr(args, source), args.out_dir, dtype=getattr(torch, args.dtype))
    print(f"{written} written to {out}")
    return 0


def merge_main(argv: list[str]) -> int:
    return _convert_main(
        argv,
        "chatforge merge",
        "Fold a LoRA adapter into its base model.",
        "adapter_dir",
        "chatforge.models.adapters:merge_adapter",
        "merged model",
    )


def export_rm_main(argv: list[str]) -> int:
    return _convert_main(
        argv,
        "chatforge export-rm",
        "Write a chatforge reward model as a transformers AutoModelForSequenceClassification dir "
        "(LoRA folded in, num_labels=1), loadable by other tools.",
        "rm_dir",
        "chatforge.reward:export_sequence_classifier",
        "sequence classifier",
    )


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
    make.add_argument(
        "--demos",
        default="steps",
        choices=["steps", "answer"],
        help="SFT answers: worked steps or bare answer",
    )
    args = p.parse_args(argv)
    from chatforge.data.tasks import parse_sizes, write_task_data

    sizes = parse_sizes(args.sizes) or None
    paths = write_task_data(args.task, args.out_dir, seed=args.seed, sizes=sizes, demos=args.demos)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="chatforge plan",
        description="Estimate memory for training a model (MODEL), and/or the model size and tokens that "
        "minimise training + serving compute for a budget or a target loss (--budget / --target-loss).",
    )
    p.add_argument("model", nargs="?", help="a model dir, 'default', or a pretraining preset name")
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
    spread = p.add_argument_group("several devices (dist.strategy and dist.offload of a run)")
    spread.add_argument(
        "--strategy",
        default="none",
        choices=["none", "ddp", "fsdp2", "zero2", "zero3"],
        help="how the devices share the model; zero2/zero3 count DeepSpeed's fp32 master weights",
    )
    spread.add_argument("--devices", type=int, default=1, help="processes (devices) in the run")
    spread.add_argument(
        "--offload",
        default="none",
        choices=["none", "optimizer", "all"],
        help="optimizer states (or parameters too) kept in host memory",
    )
    size = p.add_argument_group("model size (Chinchilla law; training 6ND, serving 2N per token)")
    goal = size.add_mutually_exclusive_group()
    goal.add_argument(
        "--budget", type=float, help="training FLOPs: aim for the loss its compute-optimal model reaches"
    )
    goal.add_argument("--target-loss", type=float, help="the loss to reach")
    size.add_argument(
        "--serve-tokens", type=float, default=0.0, help="tokens the model will generate or read"
    )
    size.add_argument(
        "--law", help="a study's scaling.json (or its dir); default: the published Chinchilla fit"
    )
    size.add_argument("--train-cost", type=float, default=1.0, help="cost per training FLOP (any unit)")
    size.add_argument("--serve-cost", type=float, default=1.0, help="cost per serving FLOP (same unit)")
    args = p.parse_args(argv)
    sizing = args.budget is not None or args.target_loss is not None
    if args.model is None and not sizing:
        p.error("give MODEL for a memory estimate, or --budget / --target-loss for a model size")
    if args.model is not None:
        _plan_memory(args)
    if sizing:
        _plan_size(args)
    return 0


def _plan_memory(args) -> None:
    from chatforge.plan import memory, scaling, shapes

    shape = shapes.load_shape(args.model)
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
    if (args.strategy, args.devices, args.offload) == ("none", 1, "none"):
        print(memory.format_table(est))
        fits = memory.fits(est, args.device_gib)
    else:
        from chatforge.errors import ConfigError
        from chatforge.plan import strategies

        try:
            plan = strategies.per_device(est, args.strategy, args.devices, args.offload)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        print(strategies.format_plan(plan))
        fits = plan.total <= args.device_gib * memory.GIB * 0.9
    if args.device_gib:
        print(f"fits in {args.device_gib:g} GiB: {'yes' if fits else 'no'}")
    tokens = scaling.chinchilla_tokens(shape.n_params)
    flops = scaling.training_flops(shape.n_params, tokens)
    print(f"compute-optimal pretraining budget: {tokens:,} tokens, {flops:.3g} FLOPs")


def _plan_size(args) -> None:
    from chatforge.errors import ConfigError
    from chatforge.plan import law as laws

    law = laws.load_law(args.law) if args.law else laws.CHINCHILLA
    try:
        target, chin, best = laws.compare(
            law, args.budget, args.target_loss, args.serve_tokens, args.train_cost, args.serve_cost
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"law: {law.formula()} ({law.source}); N_opt ~ C^{law.a:.3f}, D_opt ~ C^{law.b:.3f}")
    priced = args.train_cost != 1.0 or args.serve_cost != 1.0
    print(laws.format_comparison(target, chin, best, args.serve_tokens, priced))


def _score_record(record, where: str):
    """(prompt messages, [response messages, ...]) of a record to score; one response, or two for a pair."""
    from chatforge.data.formats import to_messages, to_preference
    from chatforge.errors import DataError

    if isinstance(record, dict) and "chosen" in record:
        ex = to_preference(record, where)
        return ex.prompt, [ex.chosen, ex.rejected]
    if isinstance(record, dict) and "response" in record:
        record = {**record, "completion": record["response"]}
        record.pop("response")
    msgs = to_messages(record, where)
    cut = len(msgs)
    while cut > 0 and msgs[cut - 1]["role"] == "assistant":
        cut -= 1
    if cut == 0:
        raise DataError(f"{where}: nothing before the response to use as the prompt")
    return msgs[:cut], [msgs[cut:]]


def score_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="chatforge score",
        description="Score (prompt, response) records with a reward model (chatforge rm output). Records: "
        "{prompt, response|completion}, {messages} (the last assistant turn is scored) or "
        "{prompt?, chosen, rejected} (both are scored).",
    )
    p.add_argument("model_dir")
    p.add_argument("data_file")
    p.add_argument("--out", help="write the records with their scores to this JSONL file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--normalize", action="store_true", help="(score - reward_mean) / reward_std as saved")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    import json

    from chatforge.data.dataset import load_validated
    from chatforge.models.load import pick_device
    from chatforge.reward import load_reward_model, score_texts

    items = load_validated(args.data_file, lambda rec, where: (rec, *_score_record(rec, where)))
    model, tok, meta = load_reward_model(args.model_dir, device=pick_device(args.device))
    prompts = [prompt for _, prompt, responses in items for _ in responses]
    responses = [r for _, _, responses in items for r in responses]
    flat = score_texts(model, tok, prompts, responses, args.batch_size, args.max_length)
    if args.normalize:
        mean, std = float(meta.get("reward_mean", 0.0)), float(meta.get("reward_std", 1.0)) or 1.0
        flat = [(s - mean) / std for s in flat]
    import contextlib

    k, wins = 0, []
    with open(args.out, "w") if args.out else contextlib.nullcontext() as out_file:
        for rec, _, responses in items:
            scores = flat[k : k + len(responses)]
            k += len(responses)
            if len(scores) == 2:
                wins.append(scores[0] > scores[1])
                fields = {"chosen_score": scores[0], "rejected_score": scores[1]}
                print(f"{scores[0]:.4f}\t{scores[1]:.4f}")
            else:
                fields = {"score": scores[0]}
                print(f"{scores[0]:.4f}")
            if out_file:
                out_file.write(json.dumps({**rec, **fields}, default=str) + "\n")
    summary = f"{len(flat)} responses scored, mean {sum(flat) / len(flat):.4f}"
    if wins:
        summary += f"; chosen scored higher in {sum(wins)}/{len(wins)} pairs"
    if args.out:
        summary += f"; written to {args.out}"
    import sys

    print(summary, file=sys.stderr)
    return 0
