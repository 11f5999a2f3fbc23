"""GRPO samples/s and peak memory: chatforge against TRL's GRPOTrainer, same model, prompts and LoRA.

    make bench-env            # once: .venv-bench with trl==1.16.0 beside chatforge
    .venv-bench/bin/python benchmarks/bench_grpo.py [--steps 8] [--warmup 2] [--skip-trl]

Both sides: SmolLM2-135M-Instruct (the embedded default) in bf16, LoRA r16/alpha 32 on q,k,v,o,
one prompt per step x 8 completions (group size 8) of at most 32 new tokens, temperature 1, the
same built-in task prompts (chat template applied), the numeric-answer reward, k3 KL with beta 0.04
(the reference is the adapter switched off on both sides), one optimizer step per generation, token-
mean loss, no gradient checkpointing (TRL's GRPOConfig turns it on by default; off here on both sides
so the compute matches). samples/s = completions per step / step time (generate + score + learn),
median over the steps after warm-up. Peak memory is the child process's maximum resident set size.
Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import add_malloc_option, command_line, machine, run_child, write_jsonl, write_section

GROUP, NEW_TOKENS, BETA, LR = 8, 32, 0.04, 1e-5

CHATFORGE = """
import json, statistics
from chatforge.config import load_config
from chatforge.train import grpo
cfg = load_config(None, [
    "model.path={model}", "model.dtype=bfloat16", "data.train=[{data}]", "data.max_length=512",
    "peft.method=lora", "peft.r=16", "peft.alpha=32", "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]",
    "grpo.prompts_per_step=1", "grpo.num_generations={group}", "grpo.beta={beta}", "grpo.epochs_per_step=1",
    "grpo.reward_functions=[numeric_match]", "generate.max_new_tokens={new_tokens}", "generate.temperature=1.0",
    "train.batch_size={group}", "train.max_steps={steps}", "train.lr={lr}", "train.warmup_ratio=0",
    "train.output_dir={out}", "train.progress=false", "train.save_every=0", "grpo.samples_every=0",
])
grpo.run(cfg)
rows = [json.loads(l) for l in open("{out}/metrics.jsonl")]
step_s = [r["time/generate"] + r["time/score"] + r["time/learn"] for r in rows if r["step"] > {warmup}]
gen_s = [r["time/generate"] for r in rows if r["step"] > {warmup}]
print(json.dumps({{"step_s": statistics.median(step_s), "generate_s": statistics.median(gen_s),
                  "samples_per_s": {group} / statistics.median(step_s),
                  "reward_last": rows[-1]["reward"],
                  "response_length": statistics.mean(r["response_length"] for r in rows if r["step"] > {warmup})}}))
"""

TRL = """
import json, statistics, time, torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from chatforge.models.load import resolve_model_path
from chatforge.rl.rewards import numeric_match
path = resolve_model_path("{model}")
tok = AutoTokenizer.from_pretrained(path)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
ds = load_dataset("json", data_files="{data}", split="train")
ds = ds.map(lambda r: {{"prompt": [{{"role": "user", "content": r["prompt"]}}]}})

def reward(prompts, completions, answer, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return numeric_match(prompts, texts, answer)

counted = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): counted.append(time.perf_counter() - self.t)
cfg = GRPOConfig(output_dir="{out}", per_device_train_batch_size={group}, num_generations={group},
                 max_completion_length={new_tokens}, temperature=1.0, beta={beta}, learning_rate={lr},
                 max_steps={steps}, logging_steps=1, report_to=[], bf16=True, save_strategy="no",
                 gradient_checkpointing=False, dataloader_num_workers=0, loss_type="dapo", disable_dropout=True,
                 use_cpu=not torch.cuda.is_available())
lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                      peft_config=lora, callbacks=[Clock()])
trainer.train()
step_s = statistics.median(counted[{warmup}:])
lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
print(json.dumps({{"step_s": step_s, "samples_per_s": {group} / step_s,
                  "response_length": statistics.mean(lengths[{warmup}:]) if lengths[{warmup}:] else float("nan")}}))
"""


def prompt_records(n: int, seed: int = 0) -> list[dict]:
    """Built-in task prompts with answers (arithmetic, units, format)."""
    from chatforge.data.tasks import make_task_data

    return make_task_data("mixed", seed=seed, sizes={"sft": 0, "preference": 0, "rl": n, "eval": 0})["rl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--model", default="default", help="model dir for a quick smoke run (e.g. a tiny model)")
    p.add_argument("--no-write", action="store_true", help="print results, leave docs/benchmarks.md alone")
    add_malloc_option(p)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    data = write_jsonl(prompt_records(max(64, args.steps)), work / "prompts.jsonl")
    fmt = dict(
        model=args.model,
        data=data,
        steps=args.steps,
        warmup=args.warmup,
        group=GROUP,
        new_tokens=NEW_TOKENS,
        beta=BETA,
        lr=LR,
    )
    results = {"chatforge": run_child(CHATFORGE.format(out=work / "cf", **fmt))}
    if not args.skip_trl:
        results["TRL 1.16 GRPOTrainer"] = run_child(
            TRL.format(out=work / "trl", **fmt), malloc=args.peer_malloc
        )
    print(json.dumps(results, indent=1))
    if args.no_write:
        return
    rows = [
        "| run | s/step | samples/s | answer tokens (mean) | peak RSS (GiB) | malloc | wall (s) |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['step_s']:.2f} | {v['samples_per_s']:.2f} | {v['response_length']:.1f} | "
            f"{v['peak_rss_gib']:.2f} | {v['malloc']} | {v['wall_s']:.0f} |"
            for k, v in results.items()
        ),
    ]
    body = [
        "## GRPO: chatforge vs TRL GRPOTrainer",
        "",
        f"Command: `{command_line()}` on {machine()}.",
        f"SmolLM2-135M-Instruct bf16, LoRA r16 on q,k,v,o, 1 prompt x {GROUP} completions of <= {NEW_TOKENS} "
        f"tokens per step, beta {BETA} (k3, adapter-disabled reference), {args.steps} steps (median over steps "
        f"after the first {args.warmup}), built-in task prompts, numeric-answer reward, no gradient checkpointing.",
        "chatforge learns on one row per prompt (the prompt once, its answers after it, each seeing the prompt "
        "and itself: `data.share_prompt=auto`); TRL on one prompt + answer row per completion.",
        "",
        *rows,
    ]
    trl = results.get("TRL 1.16 GRPOTrainer")
    if trl:
        cf = results["chatforge"]
        body += [
            "",
            f"chatforge/TRL: {cf['samples_per_s'] / trl['samples_per_s']:.2f}x samples/s at "
            f"{cf['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x peak memory (goal: >= 2x samples/s).",
            "",
            f"Answers end at the end-of-turn token, so a step's time follows the sampled lengths (answer tokens "
            f"above). chatforge's step: generate {cf['generate_s']:.2f} s (the LoRA folded into a copy of the "
            f"weights, one uniform draw per token), score + learn the rest.",
        ]
    write_section("grpo", "\n".join(body))


if __name__ == "__main__":
    main()
