"""PPO memory and speed: the lean layout against four separate models and against an SFT LoRA step,
and rollout generation against bare transformers `generate`.

    .venv/bin/python benchmarks/bench_ppo.py [--steps 6] [--warmup 2] [--no-write]
    .venv/bin/python benchmarks/bench_ppo.py --model /tmp/tiny --steps 2 --warmup 0 --no-write   # smoke

Every run: SmolLM2-135M-Instruct (the embedded default) in bf16, LoRA r16/alpha 32 on q,k,v,o, a
reward model that is a LoRA of the same base (made here with random weights: only its cost
matters), a rollout of 8 built-in task prompts x 1 answer of at most 48 new tokens, one PPO epoch
of one minibatch (= the rollout) per step; each run without, then with gradient checkpointing.

1. PPO step, `ppo.layout=auto` (one base: actor/critic/ref/reward adapters) against
   `ppo.layout=separate` (actor, critic, reference and reward as four models): peak RSS of the
   child process (and that peak minus the RSS once torch, transformers and peft are imported) and
   the median step time (generate + score + experience + learn) after warm-up.
   Goal: lean peak <= 0.5x four models. Also the lean layout with `ppo.critic=head` (a value head
   on the actor instead of a critic adapter: no critic forward or backward).
2. An SFT LoRA step at the same batch (8 sequences of the same prompt + 48-token answers): peak
   RSS and step time. Goal: lean PPO peak <= 1.3x SFT.
3. Rollout generation (the actor adapter active, `chatforge.rl.experience.sample`) against bare
   transformers `generate` of the base model at the same batch, sampling settings and stop tokens:
   generated tokens/s, median of 3 after one warm-up. Goal: >= 0.9x.

Each side runs in its own child process (benchmarks/common.py). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import command_line, machine, run_child, write_jsonl, write_section

ROLLOUT, NEW_TOKENS, LR = 8, 48, 1e-5
PY = sys.executable  # chatforge's own environment (no peer library needed)

TIMED = """
import json, statistics, time
from chatforge.train import loop
_times = []
_orig = loop.Trainer.train_step
def _timed(self, *a, **k):
    t = time.perf_counter(); out = _orig(self, *a, **k); _times.append(time.perf_counter() - t); return out
loop.Trainer.train_step = _timed
"""

COMMON = """
    "model.path={model}", "model.dtype=bfloat16", "data.max_length=512", "peft.method=lora", "peft.r=16",
    "peft.alpha=32", "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]", "train.lr={lr}",
    "train.warmup_ratio=0", "train.max_steps={steps}", "train.progress=false", "train.save_every=0",
    "train.output_dir={out}", "train.batch_size={micro}", "model.gradient_checkpointing={gc}",
"""

MAKE_RM = """
import json, torch
from peft import LoraConfig, get_peft_model
from chatforge.models.adapters import save_final
from chatforge.models.heads import ScalarHeadModel
from chatforge.models.load import load_model, load_tokenizer, resolve_model_path
torch.manual_seed(0)
lm = load_model("{model}", dtype=torch.bfloat16)
cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
peft = get_peft_model(lm, cfg)
with torch.no_grad():
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.01)
save_final(peft, load_tokenizer("{model}"), "{rm}")
ScalarHeadModel(peft).save_head("{rm}", {{"reward_mean": 0.0, "reward_std": 1.0, "base_model": resolve_model_path("{model}")}})
print(json.dumps({{}}))
"""

PPO = (
    TIMED
    + """
from chatforge.config import load_config
from chatforge.train import ppo
cfg = load_config(None, [COMMON
    "data.train=[{data}]", "ppo.layout={layout}", "ppo.critic={critic}", "ppo.reward_model={rm}", "ppo.rollout_batch_size={rollout}",
    "ppo.mini_batch_size={rollout}", "ppo.ppo_epochs=1", "generate.max_new_tokens={new_tokens}",
    "ppo.samples_every=0",
])
ppo.run(cfg)
rows = [json.loads(l) for l in open("{out}/metrics.jsonl")][{warmup}:]
step = [r["time/generate"] + r["time/score"] + r["time/experience"] + r["time/learn"] for r in rows]
print(json.dumps({{"step_s": statistics.median(step), "learn_s": statistics.median(_times[{warmup}:]),
                  "generate_s": statistics.median(r["time/generate"] for r in rows),
                  "experience_s": statistics.median(r["time/experience"] for r in rows),
                  "response_length": statistics.mean(r["response_length"] for r in rows)}}))
"""
)

SFT = (
    TIMED
    + """
from chatforge.config import load_config
from chatforge.train import sft
cfg = load_config(None, [COMMON "data.train=[{sft_data}]"])
sft.run(cfg)
print(json.dumps({{"step_s": statistics.median(_times[{warmup}:]), "learn_s": statistics.median(_times[{warmup}:])}}))
"""
)

GENERATE = """
import json, statistics, time, torch
from transformers import AutoModelForCausalLM
from chatforge.config import GenerateConfig, load_config
from chatforge.data.prompts import build_prompt_examples
from chatforge.data.templates import stop_token_ids
from chatforge.models.load import resolve_model_path
from chatforge.rl import experience as xp
from chatforge.rl.generate import left_pad
from chatforge.rl.build import build_roles
cfg = load_config(None, [COMMON "ppo.reward_functions=[non_empty]"])
roles = build_roles(cfg)
tok = roles.tokenizer
prompts, _ = build_prompt_examples(["{data}"], tok, 400)
prompts = prompts[:{rollout}]
gcfg = GenerateConfig(max_new_tokens={new_tokens}, temperature=1.0)
ours = []
for i in range(4):
    g = xp.sample(roles, prompts, gcfg)
    ours.append(g.tokens_per_s)
bare = AutoModelForCausalLM.from_pretrained(resolve_model_path("{model}"), dtype=torch.bfloat16).eval()
ids, mask = left_pad([p.ids for p in prompts], tok.pad_token_id)
stops = stop_token_ids(tok)
theirs = []
for i in range(4):
    t = time.perf_counter()
    with torch.no_grad():
        out = bare.generate(input_ids=ids, attention_mask=mask, max_new_tokens={new_tokens}, do_sample=True,
                            temperature=1.0, top_p=1.0, top_k=0, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    s = time.perf_counter() - t
    resp = out[:, ids.shape[1]:]
    is_stop = torch.isin(resp, torch.tensor(stops))
    real = ((is_stop.long().cumsum(1) - is_stop.long()) == 0).sum()
    theirs.append(int(real) / s)
print(json.dumps({{"chatforge_tok_s": statistics.median(ours[1:]), "transformers_tok_s": statistics.median(theirs[1:])}}))
"""


def prompt_records(n: int, seed: int = 0) -> list[dict]:
    from chatforge.data.tasks import make_task_data

    return make_task_data("mixed", seed=seed, sizes={"sft": 0, "preference": 0, "rl": n, "eval": 0})["rl"]


def sft_records(prompts: list[dict]) -> list[dict]:
    """The PPO prompts answered by ~NEW_TOKENS-token replies, so the SFT batch matches a rollout's shape."""
    reply = " ".join(["the answer is"] * (NEW_TOKENS // 3))
    return [
        {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": reply}]}
        for p in prompts
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model", default="default", help="model dir for a quick smoke run (e.g. a tiny model)")
    p.add_argument("--no-write", action="store_true", help="print results, leave docs/benchmarks.md alone")
    p.add_argument(
        "--only",
        nargs="+",
        choices=["lean", "four", "head", "sft", "gen"],
        help="run these only (with --no-write), e.g. on a larger model: --only four head sft",
    )
    p.add_argument("--grad-ckpt", choices=["both", "off", "on"], default="both")
    p.add_argument(
        "--micro-batch", type=int, default=ROLLOUT, help="sequences per forward/backward (train.batch_size)"
    )
    args = p.parse_args()
    if args.only and not args.no_write:
        p.error("--only needs --no-write (the docs table wants every run)")
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    prompts = prompt_records(max(64, ROLLOUT * args.steps))
    data = write_jsonl(prompts, work / "prompts.jsonl")
    sft_data = write_jsonl(sft_records(prompts[: ROLLOUT * (args.steps + 1)]), work / "sft.jsonl")
    fmt = dict(
        model=args.model,
        data=data,
        sft_data=sft_data,
        rm=work / "rm",
        steps=args.steps,
        warmup=args.warmup,
        rollout=ROLLOUT,
        micro=args.micro_batch,
        new_tokens=NEW_TOKENS,
        lr=LR,
    )

    def code(template: str, **kw) -> str:
        return template.replace("COMMON", COMMON).format(**{**fmt, **kw})

    run_child(MAKE_RM.format(**fmt), python=PY)
    runs = {
        "lean": ("PPO lean (one base, 4 roles as adapters)", PPO, dict(layout="auto", critic="adapter")),
        "four": ("PPO four separate models", PPO, dict(layout="separate", critic="adapter")),
        "head": (
            "PPO lean, value head on the actor (ppo.critic=head)",
            PPO,
            dict(layout="auto", critic="head"),
        ),
        "sft": ("SFT LoRA step, same batch", SFT, {}),
    }
    wanted = set(args.only or [*runs, "gen"])
    results = {}
    for gc in {"both": (False, True), "off": (False,), "on": (True,)}[args.grad_ckpt]:
        for i, (key, (name, template, kw)) in enumerate(runs.items()):
            if key not in wanted:
                continue
            label = name + (" + grad ckpt" if gc else "")
            results[label] = run_child(code(template, gc=gc, out=work / f"run{int(gc)}{i}", **kw), python=PY)
    gen = run_child(code(GENERATE, gc=False, out=work / "gen"), python=PY) if "gen" in wanted else {}
    print(json.dumps({**results, "generation": gen}, indent=1))
    if args.no_write:
        return
    lean, sep, head, sft, lean_gc, sep_gc, head_gc, sft_gc = results.values()

    def ratio(a: dict, b: dict) -> str:
        above = (a["peak_rss_gib"] - a["start_rss_gib"]) / (b["peak_rss_gib"] - b["start_rss_gib"])
        return f"{a['peak_rss_gib'] / b['peak_rss_gib']:.2f}x peak ({above:.2f}x above start)"

    rows = [
        "| run | s/step | learn s/step | peak RSS (GiB) | above start (GiB) | malloc |",
        "|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['step_s']:.2f} | {v['learn_s']:.2f} | {v['peak_rss_gib']:.2f} | "
            f"{v['peak_rss_gib'] - v['start_rss_gib']:.2f} | {v['malloc']} |"
            for k, v in results.items()
        ),
    ]
    body = [
        "## PPO: memory-lean layout vs four models vs SFT; rollout generation vs transformers",
        "",
        f"Command: `{command_line()}` on {machine()}.",
        f"SmolLM2-135M-Instruct bf16, LoRA r16 on q,k,v,o, reward model = a LoRA of the same base, rollout of "
        f"{ROLLOUT} prompts x <= {NEW_TOKENS} new tokens, 1 epoch x 1 minibatch per step, {args.steps} steps "
        f"(median after the first {args.warmup}). s/step for PPO = generate + score + experience + learn. "
        "Above start = peak RSS minus the child's RSS once torch, transformers and peft are imported "
        f"(the {lean['start_rss_gib']:.2f} GiB of interpreter and libraries every run carries, whatever its layout).",
        "",
        *rows,
        "",
        f"Lean/four models: {ratio(lean, sep)}; lean PPO/SFT: {ratio(lean, sft)} (goals <= 0.5x and <= 1.3x).",
        f"With gradient checkpointing: lean/four models {ratio(lean_gc, sep_gc)}; lean PPO/SFT "
        f"{ratio(lean_gc, sft_gc)}.",
        f"With ppo.critic=head: {ratio(head, sep)} of four models, {ratio(head, sft)} of SFT "
        f"(with checkpointing {ratio(head_gc, sep_gc)} and {ratio(head_gc, sft_gc)}); step "
        f"{lean['step_s'] / head['step_s']:.2f}x faster than the lean layout with a critic adapter.",
        "",
        f"Rollout generation at batch {ROLLOUT}: chatforge {gen['chatforge_tok_s']:.1f} tok/s (actor adapter on), "
        f"bare transformers generate {gen['transformers_tok_s']:.1f} tok/s (base model): "
        f"{gen['chatforge_tok_s'] / gen['transformers_tok_s']:.2f}x (goal >= 0.9x).",
    ]
    write_section("ppo", "\n".join(body))


if __name__ == "__main__":
    main()
