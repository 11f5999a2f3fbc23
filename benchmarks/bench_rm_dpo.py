"""Reward-model and DPO step time and peak memory: chatforge against TRL's RewardTrainer and DPOTrainer.

    make bench-env            # once: .venv-bench with trl==1.16.0 beside chatforge
    .venv-bench/bin/python benchmarks/bench_rm_dpo.py [--steps 12] [--warmup 2] [--only dpo]

Every side: SmolLM2-135M-Instruct (the embedded default) in bf16, LoRA r16/alpha 32 on q,k,v,o,
batch 4 pairs, max length 256, lr 1e-4, the same conversational preference pairs (a 1-3 turn chat
history, then a built-in task prompt with a right and a wrong answer). Both libraries put chosen and
rejected rows in one forward; both use the policy with the adapter disabled as the DPO reference.
TRL runs its own defaults otherwise (in 1.16 that includes gradient checkpointing); chatforge runs
without and with `model.gradient_checkpointing`, so the memory figures compare like for like. Step
time is the median over the steps after warm-up (forward, backward, optimizer step); pairs/s =
4 / step time; real tokens are the non-padding tokens of both rows of every pair. Peak memory is the
child process's maximum resident set size. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import (
    add_malloc_option,
    chat_records,
    command_line,
    machine,
    preference_records,
    run_child,
    write_jsonl,
    write_section,
)

BATCH = 4
MAX_LEN = 256

CHATFORGE = """
import json, statistics, time
from chatforge.config import load_config
from chatforge.train import loop, {module} as stage
times, tokens = [], []
_step = loop.Trainer.train_step
def timed(self, micro, loss_fn, units_fn):
    t = time.perf_counter()
    out = _step(self, micro, loss_fn, units_fn)
    times.append(time.perf_counter() - t)
    tokens.append(sum(loop.batch_tokens(b) for b in micro))
    return out
loop.Trainer.train_step = timed
cfg = load_config(None, [
    "model.path=default", "model.dtype=bfloat16", "data.train=[{data}]", "data.eval=[{eval_data}]",
    "data.max_length={max_len}", "peft.method=lora", "peft.r=16", "peft.alpha=32",
    "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]", "train.batch_size={batch}", "train.max_steps={steps}",
    "train.output_dir={out}", "train.progress=false", "train.lr=1e-4", "train.warmup_ratio=0",
    "model.gradient_checkpointing={gc}",
])
stage.run(cfg)
w = {warmup}
step = statistics.median(times[w:])
rows = [json.loads(l) for l in open("{out}/metrics.jsonl")]
print(json.dumps({{"step_s": step, "pairs_per_s": {batch} / step,
                   "tokens_per_s": statistics.median([n / s for n, s in zip(tokens[w:], times[w:])]),
                   "grad_ckpt": {gc}, "final_loss": rows[-1]["loss"]}}))
"""

TRL = """
import json, statistics, time, torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer, TrainerCallback
from trl import {trl_config}, {trl_trainer}
from chatforge.models.load import resolve_model_path
path = resolve_model_path("default")
tok = AutoTokenizer.from_pretrained(path)
if "{kind}" == "rm":
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.bfloat16)
    model.config.pad_token_id = tok.pad_token_id
    task = "SEQ_CLS"
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    task = "CAUSAL_LM"
ds = load_dataset("json", data_files="{data}", split="train")
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
cfg = {trl_config}(output_dir="{out}", per_device_train_batch_size={batch}, max_length={max_len},
                   max_steps={steps}, logging_steps=1, report_to=[], bf16=True, save_strategy="no",
                   use_cpu=not torch.cuda.is_available(),
                   learning_rate=1e-4, dataloader_num_workers=0)
lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type=task)
trainer = {trl_trainer}(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                        callbacks=[Clock()])
inner = trainer.data_collator
tokens = []
def collate(batch):
    out = inner(batch)
    tokens.append(int(out["attention_mask"].sum()))
    return out
trainer.data_collator = collate
trainer.train()
w = {warmup}
step = statistics.median(times[w:])
losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
print(json.dumps({{"step_s": step, "pairs_per_s": {batch} / step,
                   "tokens_per_s": statistics.median([n / s for n, s in list(zip(tokens, times))[w:]]),
                   "grad_ckpt": bool(cfg.gradient_checkpointing), "final_loss": losses[-1] if losses else None}}))
"""

TRL_CLASSES = {"rm": ("RewardConfig", "RewardTrainer"), "dpo": ("DPOConfig", "DPOTrainer")}


def pair_records(n: int, seed: int = 0) -> list[dict]:
    """Conversational pairs: a short chat history, then a task prompt with a right and a wrong reply."""
    history = chat_records(n, seed=seed, max_turns=3)
    out = []
    for chat, pref in zip(history, preference_records(n, seed=seed)):
        prompt = chat["messages"] + [{"role": "user", "content": pref["prompt"]}]
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": pref["chosen"]}],
                "rejected": [{"role": "assistant", "content": pref["rejected"]}],
            }
        )
    return out


def token_lengths(records: list[dict]) -> tuple[float, float]:
    """Mean prompt and mean response tokens of the pairs (chat template applied), as chatforge counts."""
    from chatforge.data.formats import to_preference
    from chatforge.data.preference import tokenize_pair
    from chatforge.data.templates import ensure_chat_template
    from chatforge.models.load import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("default"))
    ensure_chat_template(tok)
    prompt = response = 0
    for i, r in enumerate(records):
        ex, _ = tokenize_pair(tok, to_preference(r, f"record {i}"), MAX_LEN)
        prompt += ex["prompt_len"]
        response += (len(ex["chosen_ids"]) + len(ex["rejected_ids"])) / 2 - ex["prompt_len"]
    return prompt / len(records), response / len(records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--only", choices=["rm", "dpo"], help="run one stage only")
    p.add_argument("--skip-trl", action="store_true")
    add_malloc_option(p)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-rm-dpo-"))
    records = pair_records(args.pairs + 8)
    prompt_len, response_len = token_lengths(records[: args.pairs])
    data = write_jsonl(records[: args.pairs], work / "pairs.jsonl")
    eval_data = write_jsonl(records[args.pairs :], work / "eval.jsonl")
    fmt = dict(
        data=data, eval_data=eval_data, steps=args.steps, warmup=args.warmup, batch=BATCH, max_len=MAX_LEN
    )
    results = {}
    for kind in ("rm", "dpo"):
        if args.only and kind != args.only:
            continue
        module = "reward" if kind == "rm" else "dpo"
        for gc in (False, True):
            name = f"chatforge {kind}" + (" + grad ckpt" if gc else "")
            out = work / f"cf-{kind}-{int(gc)}"
            results[name] = run_child(CHATFORGE.format(module=module, out=out, gc=gc, **fmt))
        if not args.skip_trl:
            config, trainer = TRL_CLASSES[kind]
            code = TRL.format(
                kind=kind, trl_config=config, trl_trainer=trainer, out=work / f"trl-{kind}", **fmt
            )
            results[f"TRL 1.16 {trainer}"] = run_child(code, malloc=args.peer_malloc)
    print(json.dumps(results, indent=1))
    rows = [
        "| run | pairs/s | real tokens/s | step (s) | peak RSS (GiB) | grad ckpt | malloc | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['pairs_per_s']:.2f} | {v['tokens_per_s']:.0f} | {v['step_s']:.2f} | "
            f"{v['peak_rss_gib']:.2f} | {'on' if v['grad_ckpt'] else 'off'} | {v['malloc']} | {v['wall_s']:.0f} |"
            for k, v in results.items()
        ),
    ]
    body = [
        "## Reward model and DPO: chatforge vs TRL RewardTrainer / DPOTrainer",
        "",
        f"Command: `{command_line()}` on {machine()}.",
        f"SmolLM2-135M-Instruct bf16, LoRA r16 on q,k,v,o, batch {BATCH} pairs, max length {MAX_LEN}, "
        f"{args.steps} steps (median step time over the steps after the first {args.warmup}), "
        f"{args.pairs} conversational preference pairs: prompts of {prompt_len:.0f} tokens on average, "
        f"responses of {response_len:.1f}.",
        "chatforge puts each pair in one row, the prompt once and both responses after it, each seeing the "
        "prompt and itself (`data.share_prompt=auto`); TRL runs a chosen row and a rejected row per pair. "
        "Real tokens are the tokens each side runs through the model: the prompt once for chatforge, twice for TRL.",
        "",
        *rows,
    ]
    for kind, peer in (("rm", "TRL 1.16 RewardTrainer"), ("dpo", "TRL 1.16 DPOTrainer")):
        trl = results.get(peer)
        for name in (f"chatforge {kind}", f"chatforge {kind} + grad ckpt"):
            cf = results.get(name)
            if cf and trl:
                body += [
                    "",
                    f"{name} / TRL: {cf['pairs_per_s'] / trl['pairs_per_s']:.2f}x pairs/s at "
                    f"{cf['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x peak memory (goal: >= 2x at <= 0.6x).",
                ]
    write_section("rm-dpo", "\n".join(body))


if __name__ == "__main__":
    main()
