"""SFT throughput and peak memory: chatforge against TRL's SFTTrainer, same model, data and LoRA.

    make bench-env            # once: .venv-bench with trl==1.16.0 beside chatforge
    .venv-bench/bin/python benchmarks/bench_sft.py [--steps 12] [--warmup 2]

Both sides: SmolLM2-135M-Instruct (the embedded default) in bf16, LoRA r16/alpha 32 on
q,k,v,o, batch 8, max length 256, the same multi-turn chats. chatforge packs examples (its default
recipe for throughput); TRL runs its defaults (padding). The figure that counts is real
(non-padding) tokens per second, median over the steps after warm-up. Peak memory is the child
process's maximum resident set size. Results go to docs/benchmarks.md.
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
    run_child,
    write_jsonl,
    write_section,
)

CHATFORGE = """
import json, statistics, sys
from chatforge.config import load_config
from chatforge.train import sft
cfg = load_config(None, [
    "model.path=default", "model.dtype=bfloat16", "data.train=[{data}]", "data.max_length=256",
    "data.packing={packing}", "model.gradient_checkpointing={gc}", "peft.method=lora", "peft.r=16", "peft.alpha=32",
    "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]", "train.batch_size=8", "train.max_steps={steps}",
    "train.output_dir={out}", "train.progress=false", "train.save_every=0", "train.lr=1e-4",
])
sft.run(cfg)
rows = [json.loads(l) for l in open("{out}/metrics.jsonl")]
tps = [r["tokens_per_s"] for r in rows if r["step"] > {warmup}]
print(json.dumps({{"tokens_per_s": statistics.median(tps), "final_loss": rows[-1]["loss"]}}))
"""

TRL = """
import json, statistics, time, torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from chatforge.models.load import resolve_model_path
path = resolve_model_path("default")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
ds = load_dataset("json", data_files="{data}", split="train")
counted = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): counted.append(time.perf_counter() - self.t)
cfg = SFTConfig(output_dir="{out}", per_device_train_batch_size=8, max_length=256, max_steps={steps},
                logging_steps=1, report_to=[], bf16=True, use_cpu=True, save_strategy="no", learning_rate=1e-4,
                dataloader_num_workers=0, packing=False)
lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                     callbacks=[Clock()])
inner = trainer.data_collator
tokens = []
def collate(batch):
    out = inner(batch)
    mask = out.get("attention_mask")
    tokens.append(int(mask.sum()) if mask is not None else int((out["labels"] != -100).sum()))
    return out
trainer.data_collator = collate
trainer.train()
tps = [t / s for t, s in list(zip(tokens, counted))[{warmup}:]]
print(json.dumps({{"tokens_per_s": statistics.median(tps), "final_loss": trainer.state.log_history[-2].get("loss")}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--skip-trl", action="store_true")
    add_malloc_option(p)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    data = write_jsonl(chat_records(args.examples), work / "chats.jsonl")
    fmt = dict(data=data, steps=args.steps, warmup=args.warmup)
    results = {}
    results["chatforge (packing)"] = run_child(
        CHATFORGE.format(out=work / "cf", packing="true", gc="false", **fmt)
    )
    results["chatforge (packing, grad. checkpointing)"] = run_child(
        CHATFORGE.format(out=work / "cf-gc", packing="true", gc="true", **fmt)
    )
    results["chatforge (padding)"] = run_child(
        CHATFORGE.format(out=work / "cf-pad", packing="false", gc="false", **fmt)
    )
    if not args.skip_trl:
        results["TRL 1.16 SFTTrainer"] = run_child(
            TRL.format(out=work / "trl", **fmt), malloc=args.peer_malloc
        )
    print(json.dumps(results, indent=1))
    rows = [
        "| run | real tokens/s | peak RSS (GiB) | malloc | wall (s) |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {v['tokens_per_s']:.0f} | {v['peak_rss_gib']:.2f} | {v['malloc']} | {v['wall_s']:.0f} |"
            for k, v in results.items()
        ),
    ]
    body = [
        "## SFT: chatforge vs TRL SFTTrainer",
        "",
        f"Command: `{command_line()}` on {machine()}.",
        f"SmolLM2-135M-Instruct bf16, LoRA r16 on q,k,v,o, batch 8, max length 256, {args.steps} steps "
        f"(median over steps after the first {args.warmup}), {args.examples} multi-turn chats.",
        "",
        *rows,
    ]
    trl = results.get("TRL 1.16 SFTTrainer")
    if trl:
        body += ["", "TRL runs its defaults, which include gradient checkpointing.", ""]
        for name in ("chatforge (packing)", "chatforge (packing, grad. checkpointing)"):
            cf = results[name]
            body.append(
                f"- {name} / TRL: {cf['tokens_per_s'] / trl['tokens_per_s']:.2f}x real tokens/s at "
                f"{cf['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x peak memory (goal: >= 2x at <= 0.6x)."
            )
    write_section("sft", "\n".join(body))


if __name__ == "__main__":
    main()
