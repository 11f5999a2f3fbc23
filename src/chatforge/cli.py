"""The `chatforge` command: one subcommand per stage or tool, each a thin builder.

    chatforge sft CONFIG.yaml [section.key=value ...]     supervised fine-tuning
    chatforge sft --help                                  every config key, its type, default, help

Start-up stays fast: this module imports neither torch nor transformers; each subcommand imports
what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (one-line help, "module:function", config sections shown by --help or None for tools)
STAGES = {
    "sft": (
        "supervised fine-tuning on chat or prompt/completion data",
        "chatforge.train.sft:run",
        ("model", "data", "peft", "train", "dist"),
    ),
    "pretrain": (
        "train a small model from scratch on raw text (Chinchilla token budget)",
        "chatforge.train.pretrain:run",
        ("model", "data", "pretrain", "train", "dist"),
    ),
    "rm": (
        "train a reward model on preference pairs",
        "chatforge.train.reward:run",
        ("model", "data", "peft", "train", "rm", "dist"),
    ),
    "dpo": (
        "direct preference optimisation (DPO, IPO, hinge, SimPO) on preference pairs",
        "chatforge.train.dpo:run",
        ("model", "data", "peft", "train", "dpo", "dist"),
    ),
    "ppo": (
        "RLHF with PPO: actor, critic, reference and reward",
        "chatforge.train.ppo:run",
        ("model", "data", "peft", "train", "generate", "ppo", "dist"),
    ),
    "grpo": (
        "GRPO with rule-based and/or model rewards",
        "chatforge.train.grpo:run",
        ("model", "data", "peft", "train", "generate", "grpo", "dist"),
    ),
    "pipeline": (
        "run several stages from one config (e.g. sft -> rm -> ppo)",
        "chatforge.pipeline:run",
        None,
    ),
}

TOOLS = {
    "merge": (
        "fold a LoRA adapter into its base model: merge ADAPTER_DIR OUT_DIR",
        "chatforge.tools:merge_main",
    ),
    "score": ("score (prompt, response) records with a reward model", "chatforge.tools:score_main"),
    "export-rm": (
        "write a reward model as a transformers AutoModelForSequenceClassification dir: export-rm RM_DIR OUT_DIR",
        "chatforge.tools:export_rm_main",
    ),
    "export-gguf": (
        "a model as one GGUF file for llama.cpp, with an Ollama Modelfile: export-gguf MODEL OUT.gguf [--type q8_0]",
        "chatforge.export.gguf:main",
    ),
    "eval": ("accuracy, reward and perplexity of a model", "chatforge.evaluate:main"),
    "report": ("(re)write a pipeline run's report.md and report.html: report RUN", "chatforge.report:main"),
    "chat": ("chat with a model in the terminal", "chatforge.serve.chat:main"),
    "serve": ("OpenAI-compatible HTTP server", "chatforge.serve.server:main"),
    "data": (
        "built-in task data: data make TASK OUT_DIR [--seed N] [--sizes sft=2000,eval=200]",
        "chatforge.tools:data_main",
    ),
    "plan": (
        "memory and compute planning: what fits, how many tokens, train+serve optimal size",
        "chatforge.tools:plan_main",
    ),
    "bench": (
        "tokens/s, TFLOPS, MFU and peak memory of training a random-weight preset under a "
        "dist.strategy (torchrun for several processes)",
        "chatforge.bench:main",
    ),
    "scaling": (
        "scaling-law study on your text: scaling study CONFIG | scaling fit DIR",
        "chatforge.study.runner:main",
    ),
}


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatforge",
        description="Train your own ChatGPT-style assistant cheaply: SFT -> reward model -> PPO, or DPO / GRPO.",
        epilog="Run 'chatforge COMMAND --help' for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, _, _) in STAGES.items():
        sub.add_parser(name, help=text, add_help=False)
    for name, (text, _) in TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def run_stage(name: str, argv: list[str]) -> int:
    from chatforge.config import describe, load_config

    text, target, sections = STAGES[name]
    if not argv or argv[0] in ("-h", "--help"):
        seeds = " [--seeds 0,1,2]" if name == "pipeline" else ""
        print(f"usage: chatforge {name} CONFIG.yaml{seeds} [section.key=value ...]\n\n{text}\n")
        print(describe(sections))
        return 0
    seeds = None
    if name == "pipeline" and "--seeds" in argv:  # the last stage once per seed: chatforge.seeds
        at = argv.index("--seeds")
        if at + 1 >= len(argv):
            from chatforge.errors import ConfigError

            raise ConfigError("--seeds needs a value, e.g. --seeds 0,1,2")
        seeds, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
    path, overrides = argv[0], argv[1:]
    if "=" in path:  # no config file, only overrides
        path, overrides = None, argv
    cfg = load_config(path, overrides)
    if seeds is not None:
        from chatforge.seeds import parse_seeds, run

        run(cfg, parse_seeds(seeds))
        return 0
    _load(target)(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and _close_process_group():
        _exit_now(code)
    return code


def _main(argv: list[str] | None) -> int:
    from chatforge.errors import ChatforgeError

    as_command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        from chatforge import __version__

        print(f"chatforge {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    try:
        if as_command and (name in STAGES or name in TOOLS):
            from chatforge.allocator import restart_with_chosen_malloc

            restart_with_chosen_malloc()  # jemalloc & co. when installed: see chatforge.allocator
        if name in STAGES:
            return run_stage(name, rest)
        if name in TOOLS:
            return int(_load(TOOLS[name][1])(rest) or 0)
        _parser().error(f"unknown command '{name}'")
    except ChatforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `chatforge sft --help | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    return 0


def _close_process_group() -> bool:
    """Under torchrun, once the command is done: tear the process group down; True if there was one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def _exit_now(code: int) -> None:
    """End a torchrun rank whose work is saved: Python's exit handlers run, output is flushed, then
    the process exits without the interpreter's teardown. In that teardown a rank sometimes aborted
    ("terminate called without an active exception": a C++ thread destroyed while joinable) after
    writing final/, and torchrun then failed the whole launch (about 1 launch in 40 here)."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
