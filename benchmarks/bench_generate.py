"""Sampling speed: chatforge's engine (`rl.generate` on `rl.engine`) against bare transformers `generate`.

    .venv/bin/python benchmarks/bench_generate.py [--repeats 3] [--no-write]
    .venv/bin/python benchmarks/bench_generate.py --model /tmp/tiny --repeats 1 --no-write   # smoke
    .venv/bin/python benchmarks/bench_generate.py --static [--repeats 1]   # static cache, torch.compile
    .venv/bin/python benchmarks/bench_generate.py --kernels-ab   # models.kernels on vs off, printed

SmolLM2-135M-Instruct (the embedded default) in `--dtype` (auto: bf16 on a CPU with native bf16),
built-in task prompts in the chat template, at most 48 new tokens, stop at end-of-turn, the same
sampling settings on both sides:

1. batch 8: 8 different prompts, one answer each, sampled (temperature 1, the rollout setting)
   and greedy (evaluation; rows counted identical in the batch and with each prompt alone);
2. GRPO's shape: 1 prompt x 8 answers, sampled.

Generated tokens/s counts the tokens up to and including each row's first stop token, over the
wall time of the call; median over `--repeats` calls after one warm-up call. Both sides of a shape
run in one child process (benchmarks/common.py), taking turns call by call, so that the shared
machine's noise hits both; the ratio is the median of the turns' ratios. Results go to
docs/benchmarks.md. `--static` instead compares, at batch 8 greedy, transformers with a static
cache, alone and with its decode step compiled (`torch.compile`, compile time in the first call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from common import command_line, machine, resolved_dtype, run_child, threads, write_section

BATCH, NEW_TOKENS = 8, 48
PY = sys.executable  # chatforge's own environment (no peer library needed)

SIDE = """
import json, statistics, time, torch
from chatforge.data.tasks import make_task_data
from chatforge.data.templates import stop_token_ids, tokenize_prompt
from chatforge.models.load import load_model, load_tokenizer
from chatforge.rl.generate import generate, left_pad, response_mask
torch.manual_seed(0)
tok = load_tokenizer("{model}")
lm = load_model("{model}", dtype=getattr(torch, "{dtype}")).eval()
items = make_task_data("mixed", seed=0, sizes={{"sft": 0, "preference": 0, "rl": {batch}, "eval": 0}})["rl"]
prompts = [tokenize_prompt(tok, [{{"role": "user", "content": it["prompt"]}}]) for it in items]
prompts = prompts[:1] * {batch} if {grpo} else prompts[:{batch}]
stops = stop_token_ids(tok)
def ours(greedy, prompts=prompts):
    g = generate(lm, tok, prompts, max_new_tokens={new_tokens}, temperature=1.0, greedy=greedy)
    return int(g.response_mask.sum()), [r[m.bool()].tolist() for r, m in zip(g.response_ids, g.response_mask)]
def torch_kernels(greedy, prompts=prompts):  # the same engine with models.kernels switched off
    import os
    from chatforge.models import kernels
    os.environ["CHATFORGE_KERNELS"] = "0"; kernels.library.cache_clear()
    try:
        return ours(greedy, prompts)
    finally:
        os.environ["CHATFORGE_KERNELS"] = "1"; kernels.library.cache_clear()
def bare(greedy, prompts=prompts):
    ids, mask = left_pad(prompts, tok.pad_token_id)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    if "{cache}" != "dynamic":
        kw["cache_implementation"] = "static"
    if "{cache}" == "compiled":  # transformers compiles the decode forward of a static cache (inductor)
        from transformers import CompileConfig
        kw["compile_config"] = CompileConfig(mode="default")
        kw["compile_config"]._compile_all_devices = True  # its switch for compiling on a CPU
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens={new_tokens}, eos_token_id=stops,
                          pad_token_id=tok.pad_token_id, **kw)
    resp = out[:, ids.shape[1]:]
    m, _ = response_mask(resp, stops)
    return int(m.sum()), [r[k.bool()].tolist() for r, k in zip(resp, m)]
runs = {{name: globals()[name] for name in {sides}}}
result = {{name: {{}} for name in runs}}
for mode in {modes}:
    rates = {{name: [] for name in runs}}
    for i in range({repeats} + 1):  # the sides take turns, call by call: the machine's noise hits both
        for name in (list(runs) if i % 2 else list(runs)[::-1]):
            t = time.perf_counter()
            n, tokens = runs[name](mode == "greedy")
            seconds = time.perf_counter() - t
            if i:
                rates[name].append(n / seconds)
            else:
                result[name][mode] = {{"first_s": seconds}}
            result[name][mode]["tokens"] = tokens
    for name, r in rates.items():
        result[name][mode]["tok_s"] = statistics.median(r)
        result[name][mode]["rates"] = r
        if mode == "greedy" and "{cache}" == "dynamic":  # each prompt alone too (untimed): bf16 rounding depends on the batch's shape
            result[name][mode]["alone"] = [runs[name](True, [p])[1][0] for p in prompts]
print(json.dumps(result))
"""

SHAPES = {"batch 8": (False, ["sampled", "greedy"]), "1 prompt x 8 answers": (True, ["sampled"])}
GOALS = {"batch 8": 1.5, "1 prompt x 8 answers": 2.0}


def child(args, sides: list[str], grpo: bool, modes: list[str], cache: str = "dynamic") -> dict:
    """{side: {mode: results}} for `sides` ("ours", "bare") run in one process, taking turns."""
    code = SIDE.format(
        model=args.model,
        dtype=args.dtype,
        batch=BATCH,
        grpo=grpo,
        new_tokens=NEW_TOKENS,
        sides=sides,
        cache=cache,
        modes=modes,
        repeats=args.repeats,
    )
    return run_child(code, python=PY)


def static_caches(args) -> None:
    """Batch 8 greedy: chatforge and transformers with a dynamic cache, a static cache, and a static
    cache with its decode step compiled; the first call (warm-up) includes the compile."""
    sides = [("chatforge engine", "ours", "dynamic"), ("transformers, dynamic cache", "bare", "dynamic")]
    sides += [("transformers, static cache", "bare", "static")]
    sides += [("transformers, static cache + torch.compile", "bare", "compiled")]
    got = {name: child(args, [side], False, ["greedy"], cache)[side]["greedy"] for name, side, cache in sides}
    ours = got["chatforge engine"]["tokens"]
    print(json.dumps({k: {x: y for x, y in v.items() if x != "tokens"} for k, v in got.items()}, indent=1))
    if args.no_write:
        return
    lines = [
        "## Generation: transformers' static cache and torch.compile on this CPU",
        "",
        f"Command: `{command_line()}` on {machine()}.",
        f"Batch 8 greedy, otherwise as in the section above ({NEW_TOKENS} new tokens, {args.dtype}, "
        f"median of {args.repeats} calls after one warm-up call). Compiled: `CompileConfig(mode='default')` "
        "with compiling on a CPU switched on (inductor); its first call includes the compile.",
        "",
        "| side | tok/s after warm-up | first call s | greedy rows identical to chatforge's |",
        "|---|---|---|---|",
    ]
    for name, r in got.items():
        same = (
            ""
            if name == "chatforge engine"
            else f"{sum(a == b for a, b in zip(r['tokens'], ours))} of {BATCH}"
        )
        lines.append(f"| {name} | {r['tok_s']:.1f} | {r['first_s']:.1f} | {same} |")
    write_section("generate-static", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="default", help="model dir for a quick smoke run (e.g. a tiny model)")
    p.add_argument("--no-write", action="store_true", help="print results, leave docs/benchmarks.md alone")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="both sides' dtype; auto: what chatforge picks here (bf16 where the CPU computes it natively)",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="instead: transformers with a static cache, and with it + torch.compile (batch 8 greedy)",
    )
    p.add_argument(
        "--kernels-ab",
        action="store_true",
        help="instead: chatforge with models.kernels against chatforge on torch's kernels (printed)",
    )
    args = p.parse_args()
    args.dtype = resolved_dtype(args.dtype)
    if args.static:
        return static_caches(args)
    if args.kernels_ab:  # the engine with and without models.kernels, taking turns; printed only
        for shape, (grpo, modes) in SHAPES.items():
            got = child(args, ["ours", "torch_kernels"], grpo, modes)
            for mode in modes:
                on, off = got["ours"][mode], got["torch_kernels"][mode]
                ratio = statistics.median(a / b for a, b in zip(on["rates"], off["rates"]))
                same = sum(a == b for a, b in zip(on["tokens"], off["tokens"])) if mode == "greedy" else None
                print(
                    f"{shape}, {mode}: kernels {on['tok_s']:.1f} tok/s, torch's {off['tok_s']:.1f}: "
                    f"{ratio:.2f}x" + ("" if same is None else f"; greedy rows identical {same} of {BATCH}")
                )
        return

    rows = []
    for shape, (grpo, modes) in SHAPES.items():
        got = child(args, ["ours", "bare"], grpo, modes)
        for mode in modes:
            ours, bare = got["ours"][mode], got["bare"][mode]
            same = None
            if mode == "greedy":  # rows identical in the batch, and each prompt decoded alone
                same = tuple(sum(a == b for a, b in zip(ours[k], bare[k])) for k in ("tokens", "alone"))
                # each side's rows in the batch against the same prompts decoded alone
                same += tuple(sum(a == b for a, b in zip(r["tokens"], r["alone"])) for r in (bare, ours))
            pairs = statistics.median(a / b for a, b in zip(ours["rates"], bare["rates"]))
            rows.append((shape, mode, ours["tok_s"], bare["tok_s"], same, pairs))
    print(json.dumps(rows, indent=1))
    if args.no_write:
        return
    lines = [
        "## Generation: chatforge's engine vs bare transformers generate",
        "",
        f"Command: `{command_line()}` on {machine()}.",
        f"SmolLM2-135M-Instruct {args.dtype}, built-in task prompts in the chat template, at most {NEW_TOKENS} new "
        "tokens, stop at end-of-turn, temperature 1 (top-k/top-p off) when sampled. Generated tokens/s "
        f"(up to each row's stop token, over the call's wall time), median of {args.repeats} calls after "
        f"one warm-up each; both sides in one process per shape, taking turns call by call, {threads()}. "
        "Ratio: the median over turns of chatforge's tok/s over transformers' in the same turn.",
        "",
        "| shape | mode | chatforge tok/s | transformers tok/s | ratio | goal | greedy rows, chatforge = transformers: in the batch, alone | greedy rows, batch = alone: transformers, chatforge |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, mode, ours, bare, same, ratio in rows:
        marks = (
            ["", ""] if same is None else [f"{same[i]} of {BATCH}, {same[i + 1]} of {BATCH}" for i in (0, 2)]
        )
        lines.append(
            f"| {shape} | {mode} | {ours:.1f} | {bare:.1f} | {ratio:.2f}x | >= {GOALS[shape]}x | {' | '.join(marks)} |"
        )
    lines += [
        "",
        "chatforge prefills a prompt repeated in the batch once and shares its KV cache, writes keys and "
        "values into preallocated buffers instead of concatenating them, and drops rows once they stop; "
        "transformers decodes all 8 rows until the last one stops (`chatforge.rl.engine`). Its linear "
        "layers lay their weights out once per call (`chatforge.models.packed`; layers reading one input, "
        "such as q, k and v, as one product), and a Llama-shaped model's step runs on its own modules "
        "without transformers' per-layer glue (`chatforge.models.decode_step`). In bf16 on a CPU with "
        "AVX512-BF16 a decoding step runs on `chatforge.models.kernels` (a small C file compiled on first "
        "use): linear layers, one token's attention, and each layer's norms, residual adds, rotary "
        "embedding and SiLU gate, with float32 sums in an order of their own (linear layers: ~1 output in "
        "20,000 one bf16 step from torch's; attention: about a third of its outputs, where torch's flash "
        "kernel is the one further from a float64 reference, tested); elsewhere oneDNN's packed kernel "
        "and torch's flash kernel given several query rows (`chatforge.models.attention`), the same bits "
        "as transformers' but for rare last-bit roundings. Greedy rows: bf16 rounds differently with the "
        "kernels and, in transformers, with the batch's shape, so a row can take another token at a near "
        "tie.",
    ]
    write_section("generate", "\n".join(lines))


if __name__ == "__main__":
    main()
