"""Evaluation: exact-answer accuracy, reward-model score, perplexity and win rate of a model.

    chatforge eval MODEL_DIR --data eval.jsonl [--reward-model DIR] [--ppl FILE]
                   [--against OTHER_MODEL_DIR] [--out results.json]

MODEL_DIR is a full model dir, a LoRA/prefix/prompt adapter dir, a .gguf file or `default`.
Eval records are `{"prompt": str | messages, "answer": ..., "task"?: ...}` (the built-in tasks'
`eval.jsonl`); answers are checked with `chatforge.data.tasks.verify`, so "correct" means exactly the
requested answer in the requested form. Decoding is greedy and batched. Accuracy comes with its
binomial standard error sqrt(p(1-p)/n): two models differ beyond sampling noise when their gap is
well above sqrt(se_a^2 + se_b^2). Win rate compares the two models' greedy answers to the same
prompts as judged by the reward model (ties count half).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from chatforge.errors import ChatforgeError


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a proportion p measured on n independent items.

    >>> round(binomial_stderr(0.5, 100), 3), binomial_stderr(1.0, 10), binomial_stderr(0.0, 0)
    (0.05, 0.0, 0.0)
    """
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def paired_stderr(before: list[bool], after: list[bool]) -> float:
    """Standard error of the accuracy change between two models answering the same n items.

    The per-item differences d_i = after_i - before_i are in {-1, 0, 1}; the s.e. of their mean is
    sd(d) / sqrt(n). Items both models get right (or wrong) add no noise, so this is the fair yardstick
    for "did this stage help", and usually well below the unpaired sqrt(se_a^2 + se_b^2).

    >>> round(paired_stderr([True, False, True, False], [True, True, True, False]), 3)
    0.25
    >>> paired_stderr([True, False], [True, False])
    0.0
    """
    if len(before) != len(after):
        raise ValueError(f"paired_stderr: {len(before)} answers against {len(after)}")
    n = len(before)
    if n < 2:
        return 0.0
    d = [int(b) - int(a) for a, b in zip(before, after)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return math.sqrt(var / n)


def auc(positive: list[float], negative: list[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half).

    Used to ask whether a reward model ranks a policy's correct answers above its wrong ones.

    >>> auc([3.0, 2.0], [1.0, 2.0]), auc([1.0], [])
    (0.875, None)
    """
    if not positive or not negative:
        return None
    ranked = sorted([(s, 1) for s in positive] + [(s, 0) for s in negative])
    # rank-sum (Mann-Whitney) with average ranks for ties: O(n log n)
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        avg = (i + j + 1) / 2  # 1-based average rank of the tie block
        rank_sum += avg * sum(lab for _, lab in ranked[i:j])
        i = j
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def load_inference_model(path: str, dtype: str = "auto", device=None):
    """(causal LM in eval mode, tokenizer) from a model dir, an adapter dir, a .gguf file or 'default'.

    LoRA adapters are folded into the base weights in memory (faster generation; nothing is written).
    """

    from chatforge.data.templates import ensure_chat_template
    from chatforge.models.adapters import is_adapter_dir, load_adapter_model
    from chatforge.models.load import load_model, load_tokenizer, pick_device, resolve_dtype

    device = device or pick_device()
    torch_dtype = resolve_dtype(dtype, device, full_finetune=False)
    tok = load_tokenizer(path)
    ensure_chat_template(tok)
    if is_adapter_dir(path):
        lm = load_adapter_model(path, dtype=torch_dtype, device=device)
        if lm.peft_config["default"].peft_type.value == "LORA":
            lm = lm.merge_and_unload()
    else:
        lm = load_model(path, dtype=torch_dtype, device=device)
    if getattr(lm.config, "pad_token_id", None) is None:
        lm.config.pad_token_id = tok.pad_token_id
    return lm.eval(), tok


def read_items(path: str | Path) -> list[dict]:
    """Eval records as `{"messages", "answer", "task"}`; bad records fail with FILE:LINE."""
    from chatforge.data.dataset import load_validated
    from chatforge.data.formats import to_prompt

    items = []
    for where, ex in load_validated(path, to_prompt, with_where=True):
        if ex.answer is None:
            raise ChatforgeError(f"{where}: an eval record needs an answer field")
        items.append({"messages": ex.prompt, "answer": ex.answer, "task": ex.meta.get("task", "mixed")})
    return items


def generate_answers(
    lm,
    tok,
    conversations: list[list[dict]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[str], float]:
    """Greedy answers (in input order) and generated tokens/s; prompts are batched by length."""
    import time

    from tqdm.auto import tqdm

    from chatforge.data.templates import tokenize_prompt
    from chatforge.models.packed import packed_linears
    from chatforge.rl.generate import generate

    prompts = [tokenize_prompt(tok, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    tokens, seconds = 0.0, 0.0
    bar = tqdm(total=len(prompts), desc="eval", unit="answer", disable=not progress)
    with packed_linears(lm):  # once for every batch: the weights do not change
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            t0 = time.perf_counter()
            out = generate(lm, tok, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens, greedy=True)
            seconds += time.perf_counter() - t0
            tokens += float(out.response_mask.sum())
            for k, i in enumerate(chunk):
                texts[i] = out.texts[k].strip()
            bar.update(len(chunk))
    bar.close()
    return texts, tokens / max(seconds, 1e-9)


def accuracy(items: list[dict], responses: list[str]) -> dict:
    """Exact-answer accuracy overall and per task, with n and the binomial standard error."""
    from chatforge.data.answers import verify
    from chatforge.data.tasks import TASKS

    correct = [
        verify(it["task"] if it["task"] in TASKS else "mixed", r, it["answer"])
        for it, r in zip(items, responses)
    ]
    per_task: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct):
        per_task.setdefault(it["task"], []).append(ok)
    n = len(correct)
    p = sum(correct) / n if n else 0.0
    return {
        "accuracy": p,
        "correct": sum(correct),
        "n": n,
        "stderr": binomial_stderr(p, n),
        "per_task": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_task.items())},
        "is_correct": correct,
    }


def reward_scores(
    rm, conversations: list[list[dict]], responses: list[str], batch_size: int = 16
) -> list[float]:
    """Reward-model scores of (prompt, response) pairs; `rm` is a `chatforge rm` output dir or an
    already loaded `(model, tokenizer)` pair (`chatforge.reward.load_reward_model`)."""
    from chatforge.reward import load_reward_model, score_texts

    model, tok = rm if isinstance(rm, tuple) else load_reward_model(rm)[:2]
    scores = score_texts(model, tok, conversations, responses, batch_size=batch_size)
    return [float(s) for s in scores]


def win_rate(scores: list[float], other: list[float]) -> dict:
    """How often `scores` beats `other` item by item (ties count half), with its standard error.

    >>> win_rate([1.0, 2.0, 0.5], [0.0, 2.0, 1.0])["win_rate"]
    0.5
    """
    wins = sum(a > b for a, b in zip(scores, other))
    ties = sum(a == b for a, b in zip(scores, other))
    n = len(scores)
    rate = (wins + 0.5 * ties) / n if n else 0.0
    return {
        "win_rate": rate,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "n": n,
        "stderr": binomial_stderr(rate, n),
    }


def perplexity(lm, tok, path: str, max_length: int = 512, batch_size: int = 8) -> dict:
    """exp(mean NLL) over the assistant tokens of chat / prompt-completion records in `path`."""
    import torch

    from chatforge.data.collate import pad_batch
    from chatforge.data.dataset import build_sft_examples
    from chatforge.models.logprobs import token_logprobs

    examples, _ = build_sft_examples(path, tok, max_length)
    device = next(lm.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            batch = pad_batch(examples[s : s + batch_size], pad_id=tok.pad_token_id)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            target = labels != -100
            logps, _ = token_logprobs(lm, ids, batch["attention_mask"].to(device), None, target)
            nll -= float(logps[target[:, 1:]].sum())
            count += int(target[:, 1:].sum())
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(min(mean, 50.0)), "nll": mean, "tokens": count}


def evaluate(
    model: str,
    data: str | None = None,
    reward_model: str | None = None,
    ppl_data: str | None = None,
    against: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    limit: int = 0,
    dtype: str = "auto",
) -> dict:
    """Every requested metric for `model`; answers are kept in `results['responses']`."""
    import gc

    results: dict = {"model": model}
    items = read_items(data)[: limit or None] if data else []
    convs = [it["messages"] for it in items]
    lm, tok = load_inference_model(model, dtype)
    if items:
        responses, tps = generate_answers(lm, tok, convs, max_new_tokens, batch_size)
        results.update(data=str(data), generate_tokens_per_s=tps, responses=responses)
        results["exact"] = accuracy(items, responses)
    if ppl_data:
        results["ppl"] = {"data": str(ppl_data), **perplexity(lm, tok, ppl_data)}
    del lm
    gc.collect()
    if against:
        if not items:
            raise ChatforgeError("--against needs --data (the prompts both models answer)")
        if not reward_model:
            raise ChatforgeError("--against needs --reward-model (the judge)")
        other_lm, other_tok = load_inference_model(against, dtype)
        other, _ = generate_answers(other_lm, other_tok, convs, max_new_tokens, batch_size)
        del other_lm
        results["against"] = {"model": against, "responses": other, "exact": accuracy(items, other)}
    if reward_model and items:
        from chatforge.reward import load_reward_model

        judge = load_reward_model(reward_model)[:2]  # loaded once for both models' answers
        scores = reward_scores(judge, convs, results["responses"], batch_size)
        results["reward"] = {"model": reward_model, "mean": sum(scores) / len(scores), "scores": scores}
        if against:
            other_scores = reward_scores(judge, convs, results["against"]["responses"], batch_size)
            results["against"]["reward_mean"] = sum(other_scores) / len(other_scores)
            results["win_rate"] = win_rate(scores, other_scores)
    return results


def format_table(results: dict) -> str:
    """A human-readable summary of `evaluate`'s results."""
    rows = [("model", results["model"])]
    if "exact" in results:
        e = results["exact"]
        rows.append(("exact accuracy", f"{e['accuracy']:.3f} ± {e['stderr']:.3f} ({e['correct']}/{e['n']})"))
        for task, t in e["per_task"].items():
            rows.append((f"  {task}", f"{t['accuracy']:.3f} (n={t['n']})"))
        rows.append(("generation tokens/s", f"{results['generate_tokens_per_s']:.1f}"))
    if "reward" in results:
        rows.append(("mean reward", f"{results['reward']['mean']:.3f}"))
    if "ppl" in results:
        rows.append(("perplexity", f"{results['ppl']['perplexity']:.3f} ({results['ppl']['tokens']} tokens)"))
    if "against" in results:
        a = results["against"]
        rows.append(("against", a["model"]))
        rows.append(("  its exact accuracy", f"{a['exact']['accuracy']:.3f} ± {a['exact']['stderr']:.3f}"))
        if "reward_mean" in a:
            rows.append(("  its mean reward", f"{a['reward_mean']:.3f}"))
    if "win_rate" in results:
        w = results["win_rate"]
        rows.append(
            (
                "win rate",
                f"{w['win_rate']:.3f} ± {w['stderr']:.3f} "
                f"({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="chatforge eval", description="Evaluate a model (see module docs).")
    p.add_argument("model", help="model dir, adapter dir, .gguf file or 'default'")
    p.add_argument("--data", help="eval JSONL with prompt and answer (e.g. the built-in eval.jsonl)")
    p.add_argument("--reward-model", help="reward model dir: mean score, and the judge for --against")
    p.add_argument(
        "--ppl", "--ppl-data", dest="ppl_data", help="chat or prompt/completion records for perplexity"
    )
    p.add_argument("--against", help="another model: win rate judged by --reward-model")
    p.add_argument("--out", help="write the full results (with every answer) as JSON here")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N items")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    if not (args.data or args.ppl_data):
        p.error("give --data and/or --ppl")
    results = evaluate(
        args.model,
        args.data,
        args.reward_model,
        args.ppl_data,
        args.against,
        args.max_new_tokens,
        args.batch_size,
        args.limit,
        args.dtype,
    )
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"results written to {args.out}")
    return 0
