"""Serving throughput: 8 concurrent clients on `chatforge serve`'s continuous batching vs one at a time.

    .venv/bin/python benchmarks/bench_serve.py [--clients 8] [--rounds 1] [--max-tokens 48] [--no-write]
    .venv/bin/python benchmarks/bench_serve.py --model /tmp/tiny --no-write      # smoke

SmolLM2-135M-Instruct (the embedded default) in `--dtype` (auto: bf16 on a CPU with native bf16),
the real server (FastAPI on uvicorn, in this process) and the official `openai` client streaming
over HTTP. The same 8 x `--rounds` chat requests (built-in task prompts, `--temperature`, seed i,
at most `--max-tokens` tokens) are sent

1. one after another by one client to a server that answers one at a time (`--max-batch 1`);
2. by 8 clients at once, each sending its `--rounds` requests one after another, to a server that
   batches them (`--max-batch 8`, `serve.batch.Batched`). With one round the batch shrinks as
   answers end; with more, a client's next request takes the row its last one left.

Reported: total generated tokens/s (usage.completion_tokens over the wall time of all requests),
time to first token (from sending a request to its first content chunk; mean and worst) and how
many answers both runs share (the seeded draws do not depend on the batch, but the batched forward
rounds differently, which can move a draw across a token boundary). One warm-up request first.
Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from common import command_line, machine, resolved_dtype, threads, write_section


def serve(engine, scheduler):
    """(base url, stop()) of a server on `scheduler`."""
    from chatforge.serve.app import create_app, make_server
    from chatforge.serve.guard import Guard

    srv, sock = make_server(create_app(engine, Guard(), scheduler, log=lambda _line: None), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)

    def stop():
        srv.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", stop


def ask(client, messages, seed: int, max_tokens: int, temperature: float = 1.0) -> dict:
    """One streamed request: its text, tokens, time to first token and end time."""
    t0 = time.perf_counter()
    first, text, tokens = None, "", 0
    stream = client.chat.completions.create(
        model="bench",
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content and first is None:
                first = time.perf_counter() - t0
            text += c.delta.content or ""
    return {"text": text, "tokens": tokens, "ttft": first, "end": time.perf_counter()}


def run(base: str, prompts, max_tokens: int, clients: int, temperature: float = 1.0) -> dict:
    """Send `prompts` (request i: prompt i, seed i) from `clients` threads, client c sending requests
    c, c + clients, c + 2 * clients, ... one after another."""
    import openai

    client = openai.OpenAI(base_url=base, api_key="-", max_retries=0)
    ask(client, prompts[0], 0, 4)  # warm-up
    t0 = time.perf_counter()
    out = [None] * len(prompts)

    def one(c):
        for i in range(c, len(prompts), clients):
            out[i] = ask(client, prompts[i], i, max_tokens, temperature)

    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in out) - t0
    ttft = [r["ttft"] for r in out if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in out)
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_mean": statistics.mean(ttft),
        "ttft_max": max(ttft),
        "texts": [r["text"] for r in out],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model dir for a quick smoke run (e.g. a tiny model)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (to check batched answers)")
    p.add_argument("--no-write", action="store_true", help="print results, leave docs/benchmarks.md alone")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: what chatforge serve picks here (bf16 where the CPU computes it natively)",
    )
    args = p.parse_args()
    args.dtype = resolved_dtype(args.dtype)

    import torch

    from chatforge.data.tasks import make_task_data
    from chatforge.evaluate import load_inference_model
    from chatforge.serve.batch import Batched
    from chatforge.serve.engine import Engine, OneAtATime

    torch.manual_seed(0)
    lm, tok = load_inference_model(args.model, args.dtype, "cpu")
    engine = Engine(lm, tok, "bench")
    n = args.clients * args.rounds
    items = make_task_data("mixed", seed=0, sizes={"sft": 0, "preference": 0, "rl": n, "eval": 0})["rl"]
    prompts = [[{"role": "user", "content": it["prompt"]}] for it in items][:n]

    got = {}
    for name, scheduler, clients in (
        ("one at a time", OneAtATime(engine), 1),
        (f"{args.clients} concurrent, batched", Batched(engine, args.clients), args.clients),
    ):
        base, stop = serve(engine, scheduler)
        got[name] = run(base, prompts, args.max_tokens, clients, args.temperature)
        scheduler.close()
        stop()
    alone, batched = got.values()
    same = sum(a == b for a, b in zip(alone["texts"], batched["texts"]))
    print(json.dumps({k: {x: y for x, y in v.items() if x != "texts"} for k, v in got.items()}, indent=1))
    print(f"speed-up {batched['tok_s'] / alone['tok_s']:.2f}x, answers identical: {same} of {n}")
    if args.no_write:
        return
    lines = [
        "## Serving: continuous batching vs one request at a time"
        + (f" ({args.rounds} requests per client)" if args.rounds > 1 else ""),
        "",
        f"Command: `{command_line()}` on {machine()}.",
        f"SmolLM2-135M-Instruct {args.dtype}, `chatforge serve`'s app (FastAPI/uvicorn) in process, the `openai` "
        f"client streaming; {n} chat requests (built-in task prompts, temperature {args.temperature:g}, seed i, at "
        f"most {args.max_tokens} tokens; {args.rounds} per client, one after another, when concurrent), "
        f"{threads()}. Tokens/s: all completion tokens over the wall time of all requests; time to first token: "
        "from sending a request to its first content chunk.",
        "",
        "| clients | server | tokens | wall s | total tok/s | TTFT mean s | TTFT max s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in got.items():
        clients, server = ("1", "--max-batch 1") if not name.endswith("batched") else (
            f"{args.clients} at once", f"--max-batch {args.clients}")  # fmt: skip
        lines.append(
            f"| {clients} | {server} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} "
            f"| {r['ttft_mean']:.2f} | {r['ttft_max']:.2f} |"
        )
    lines += [
        "",
        f"Speed-up: {batched['tok_s'] / alone['tok_s']:.2f}x total tokens/s (goal: 4x). Answers identical in "
        f"both runs: {same} of {n} (each request draws from its own seeded RNG; a batched forward rounds "
        "differently, which can move a draw across a token boundary, and the answer goes its own way; "
        "in bf16 the logits themselves are rounded to 8 bits of mantissa, so this happens far more often).",
    ]
    write_section(f"serve-{args.rounds}" if args.rounds > 1 else "serve", "\n".join(lines))


if __name__ == "__main__":
    main()
