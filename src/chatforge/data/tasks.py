"""Built-in verifiable instruction tasks: the data the demo trains and the rewards it checks.

Three kinds of short problems with one exact answer each, sized so SmolLM2-135M learns them in a few
hundred SFT steps and still has room to improve under RL (prompts < 60 tokens, answers < 20):

- `arithmetic`: one- or two-step word problems with small integers, demonstrated with worked steps
  ("3 x 6 = 18. 18 + 4 = 22. The answer is 22.") and judged on the final answer;
- `units`: unit conversions with small integers (meters -> centimeters, hours -> minutes, ...);
- `format`: format-following (upper/lower case, first letter, JSON objects with given keys);
- `mixed`: any of them.

Every problem has a key (template and numbers or words, never names); a hash of the key puts it in
the train or the eval split, so an eval problem never appears in train under any name; arithmetic
eval problems also use other names, objects and sentence templates than training ones, so the eval
split measures solving word problems, not recalling the training sentences. `make_task_data` turns problems into SFT, preference,
RL and eval records; `verify` is the exact checker that rule-based rewards and evaluation use.

    >>> item = sample("arithmetic", random.Random(0))
    >>> sorted(item)
    ['answer', 'prompt', 'task']
    >>> verify(item["task"], item["answer"] + ".", item["answer"])
    True
    >>> data = make_task_data("mixed", seed=0, sizes={"sft": 3, "preference": 2, "rl": 2, "eval": 2})
    >>> {split: len(records) for split, records in data.items()}
    {'sft': 3, 'preference': 2, 'rl': 2, 'eval': 2}
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from chatforge.data.answers import verify
from chatforge.data.problems import SAMPLERS, Problem, draw

SPLITS = ("sft", "preference", "rl", "eval")
DEFAULT_SIZES = {"sft": 2000, "preference": 2000, "rl": 1000, "eval": 200}
DEMOS = (
    "steps",
    "answer",
)  # what SFT demonstrations show: worked steps (where a task has them) or the answer


def _generator(sampler: Callable[[random.Random, str], Problem]) -> Callable[..., Problem]:
    def generate_kind(rng: random.Random, split: str = "train") -> Problem:
        return draw(rng, split, sampler)

    return generate_kind


def _mixed(rng: random.Random, split: str = "train") -> Problem:
    # The kind is chosen before filtering by split, so both splits mix the kinds evenly.
    return TASKS[rng.choice(sorted(SAMPLERS))](rng, split)


# name -> generator `(rng, split="train") -> Problem` whose key belongs to `split`.
TASKS: dict[str, Callable[..., Problem]] = {
    **{name: _generator(sampler) for name, sampler in SAMPLERS.items()},
    "mixed": _mixed,
}


def _task(task: str) -> Callable[..., Problem]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


def generate(task: str, rng: random.Random, split: str = "train") -> Problem:
    """One `Problem` of `task` whose key belongs to `split` ('train' or 'eval')."""
    return _task(task)(rng, split)


def sample(task: str, rng: random.Random, split: str = "train") -> dict:
    """One item `{"prompt", "answer", "task"}` of `task` from `split`; `task` is the concrete kind."""
    return generate(task, rng, split).item()


# Datasets --------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> dict[str, int]:
    """Parse `"sft=2000,eval=200"` into `{"sft": 2000, "eval": 200}` (the CLI's `--sizes`).

    >>> parse_sizes("sft=2000, eval=200")
    {'sft': 2000, 'eval': 200}
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SPLITS:
            raise ValueError(f"bad size {part!r}: write SPLIT=N with SPLIT one of {', '.join(SPLITS)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad size {part!r}: {value.strip()!r} is not an integer") from None
        if sizes[name] < 0:
            raise ValueError(f"bad size {part!r}: sizes must be >= 0")
    return sizes


def _problems(task: str, seed: int, record_split: str, n: int) -> tuple[list[Problem], random.Random]:
    # One generator per output split, so changing one split's size leaves the others unchanged.
    rng = random.Random(f"chatforge.tasks/{task}/{seed}/{record_split}")
    split = "eval" if record_split == "eval" else "train"
    if split == "train":
        return [generate(task, rng, split) for _ in range(n)], rng
    # Eval prompts are distinct while the eval space allows it (it is small for some kinds).
    out, seen = [], set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        p = generate(task, rng, split)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    while len(out) < n:
        out.append(generate(task, rng, split))
    return out, rng


def _rejected(problem: Problem, rng: random.Random) -> str:
    wrong = [w for w in problem.wrong if not verify(problem.task, w, problem.answer)]
    if not wrong:  # pragma: no cover - every generator supplies failing candidates
        raise RuntimeError(f"no wrong answer for {problem.prompt!r}")
    return rng.choice(wrong)


def make_task_data(
    task: str = "mixed",
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    demos: str = "steps",
    slips: float = 0.0,
) -> dict:
    """Records for every stage, deterministic per `(task, seed)`: `{split: [record, ...]}`.

    - `sft`: `{"messages": [{"role": "user", ...}, {"role": "assistant", "content": demonstration}]}`
    - `preference`: `{"prompt", "chosen", "rejected"}`, rejected a plausible wrong or badly formatted one
    - `rl`: `{"prompt", "answer"}` (answers checked with `verify`)
    - `eval`: `{"prompt", "answer", "task"}` from the eval split, disjoint from the others

    `sizes` overrides entries of `DEFAULT_SIZES`. `demos` picks the demonstrations (SFT answers and
    chosen responses): `steps` gives the worked steps where the task has them (arithmetic: "3 x 6 =
    18. 18 + 4 = 22. The answer is 22.") and the answer elsewhere; `answer` always the bare answer.
    The prompts, RL and eval records are the same for both.

    `slips` (0 to 1): the fraction of SFT demonstrations that show the problem's typical slip (its
    first plausible wrong answer: the word not put in upper case, the JSON keys' values swapped, one
    off) instead of the answer, drawn from a generator of their own. It models demonstrators who
    make mistakes that raters comparing two answers still catch: the preference pairs (chosen the
    answer) are unchanged, and so are the prompts, RL and eval records.
    """
    _task(task)
    if demos not in DEMOS:
        raise ValueError(f"unknown demos {demos!r}; known: {', '.join(DEMOS)}")
    unknown = set(sizes or {}) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {', '.join(sorted(unknown))}; known: {', '.join(SPLITS)}")
    if not 0 <= slips <= 1:
        raise ValueError(f"slips must be in [0, 1] (got {slips!r})")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    slipped = random.Random(f"chatforge.tasks/{task}/{seed}/slips")

    def shown(p: Problem) -> str:
        return p.solution if demos == "steps" and p.solution else p.answer

    data: dict[str, list[dict]] = {}
    for split in SPLITS:
        problems, rng = _problems(task, seed, split, sizes[split])
        if split == "sft":
            data[split] = [
                {
                    "messages": [
                        {"role": "user", "content": p.prompt},
                        {
                            "role": "assistant",
                            "content": p.wrong[0] if slipped.random() < slips else shown(p),
                        },
                    ]
                }
                for p in problems
            ]
        elif split == "preference":
            data[split] = [
                {"prompt": p.prompt, "chosen": shown(p), "rejected": _rejected(p, rng)} for p in problems
            ]
        elif split == "rl":
            data[split] = [{"prompt": p.prompt, "answer": p.answer} for p in problems]
        else:
            data[split] = [p.item() for p in problems]
    return data


def write_task_data(
    task: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    demos: str = "steps",
    slips: float = 0.0,
) -> dict[str, Path]:
    """Write `sft.jsonl`, `preference.jsonl`, `rl.jsonl` and `eval.jsonl` under `out_dir`.

    Each file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in make_task_data(task, seed, sizes, demos, slips).items():
        path = out / f"{split}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths[split] = path
    return paths
