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

import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("sft", "preference", "rl", "eval")
DEFAULT_SIZES = {"sft": 2000, "preference": 2000, "rl": 1000, "eval": 200}
EVAL_FRACTION = 0.2
JUST_NUMBER = "Answer with just the number."
DEMOS = (
    "steps",
    "answer",
)  # what SFT demonstrations show: worked steps (where a task has them) or the answer


@dataclass(frozen=True)
class Problem:
    """One generated problem; `key` decides its split, `wrong` holds plausible wrong responses."""

    task: str
    prompt: str
    answer: str
    key: tuple
    wrong: tuple[str, ...]
    solution: str = ""  # worked steps ending in "The answer is N."; empty where a task has none

    def item(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "task": self.task}


def split_of(key: tuple) -> str:
    """'train' or 'eval' for a problem key, stable across processes and Python versions.

    >>> split_of(("arithmetic", "add", 3, 4))
    'train'
    """
    digest = hashlib.sha256(repr(key).encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < EVAL_FRACTION else "train"


def _draw(rng: random.Random, split: str, sampler: Callable[[random.Random, str], Problem]) -> Problem:
    """Sample until the problem's key belongs to `split` (about 1 in 5 tries for eval)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    for _ in range(10_000):
        problem = sampler(rng, split)
        if split_of(problem.key) == split:
            return problem
    raise RuntimeError(f"no {split} problem found for {sampler.__name__}")  # pragma: no cover


def _wrong(answer: str, *candidates) -> tuple[str, ...]:
    """Distinct wrong responses (as strings), without the answer itself or negative numbers."""
    out = []
    for c in candidates:
        c = str(c)
        if c != answer and c not in out and not c.startswith("-"):
            out.append(c)
    return tuple(out)


# Arithmetic ------------------------------------------------------------------------------------------

# Each split has its own names, objects and sentence templates, so an eval problem is new in its
# wording, not only in its numbers: the eval split measures whether the model solves word problems,
# not whether it learned the training sentences. Templates take the numbers in order a, b, c; the
# worked steps follow from the kind alone.
_NAMES = {
    "train": ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Jack", "Emma", "Leo", "Sara", "Max", "Nora"],
    "eval": ["Kate", "Ivan", "Rosa", "Hugo", "Nina", "Carl", "Ella", "Omar"],
}
_OBJECTS = {
    "train": ["apples", "pencils", "stickers", "books", "marbles", "cookies", "cards", "toys", "eggs"],
    "eval": ["stamps", "shells", "coins", "beads", "buttons", "ribbons", "candles"],
}
_TEMPLATES = {
    "train": {
        "add": [
            "{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?",
            "{n} had {a} {o}. A friend gave {n} {b} more. How many {o} does {n} have?",
            "There are {a} {o} in a box and {n} puts in {b} more. How many {o} are in the box?",
        ],
        "sub": [
            "{n} has {a} {o} and gives {b} to a friend. How many {o} does {n} have left?",
            "{n} had {a} {o} and sold {b} of them. How many {o} does {n} have left?",
            "There are {a} {o} on the table. {n} takes {b} away. How many {o} are left on the table?",
        ],
        "mul": [
            "{n} buys {a} bags with {b} {o} in each bag. How many {o} does {n} buy?",
            "{n} has {a} boxes and each box holds {b} {o}. How many {o} does {n} have?",
            "There are {a} plates with {b} {o} on each plate. How many {o} are there?",
        ],
        "add_sub": [
            "{n} has {a} {o}, buys {b} more and then gives away {c}. How many {o} does {n} have now?",
            "{n} had {a} {o}. {n} got {b} more and then sold {c}. How many {o} does {n} have left?",
            "There are {a} {o} in a box. {n} puts in {b} more and takes out {c}. How many {o} are in the box?",
        ],
        "mul_add": [
            "{n} has {a} boxes with {b} {o} in each box and {c} more {o}. How many {o} does {n} have in total?",
            "{n} buys {a} bags with {b} {o} in each bag and {c} single {o}. How many {o} does {n} buy?",
            "There are {a} plates with {b} {o} on each plate and {c} {o} on the table. How many {o} are there?",
        ],
    },
    "eval": {
        "add": [
            "{n} collected {a} {o} on Monday and {b} on Tuesday. What is the total number of {o}?",
            "A shelf holds {a} {o}. {n} adds another {b}. Count the {o} on the shelf now.",
        ],
        "sub": [
            "{n} started with {a} {o} but lost {b}. How many {o} remain?",
            "Out of {a} {o}, {n} used {b}. What number of {o} is still unused?",
        ],
        "mul": [
            "{n} arranges {o} in {a} rows of {b}. What is the total count of {o}?",
            "Each of {n}'s {a} jars contains {b} {o}. Find the number of {o} in all the jars.",
        ],
        "add_sub": [
            "{n} owned {a} {o}, received {b} as a gift, and later lost {c}. What number of {o} remain?",
            "A jar held {a} {o}. {n} dropped in {b} and then removed {c}. Count the {o} in the jar now.",
        ],
        "mul_add": [
            "{n} packs {a} crates, putting {b} {o} into every crate, plus {c} loose {o}. What is the total?",
            "Picture {a} rows of {b} {o} with {c} extra {o} beside them. Find the total number of {o}.",
        ],
    },
}
_ARITHMETIC_KINDS = ("add", "sub", "mul", "add_sub", "mul_add")


def _arithmetic(rng: random.Random, split: str) -> Problem:
    name, things = rng.choice(_NAMES[split]), rng.choice(_OBJECTS[split])
    kind = rng.choice(_ARITHMETIC_KINDS)
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(1, 20)
        nums, ans, steps, alt = (a, b), a + b, [f"{a} + {b} = {a + b}."], [abs(a - b), a * b]
    elif kind == "sub":
        a = rng.randint(2, 20)
        b = rng.randint(1, a - 1)
        nums, ans, steps, alt = (a, b), a - b, [f"{a} - {b} = {a - b}."], [a + b]
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        nums, ans, steps, alt = (a, b), a * b, [f"{a} x {b} = {a * b}."], [a + b, a * (b + 1)]
    elif kind == "add_sub":
        a, b = rng.randint(2, 15), rng.randint(1, 15)
        c = rng.randint(1, a + b - 1)
        nums, ans, alt = (a, b, c), a + b - c, [a + b + c, a + b]
        steps = [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {ans}."]
    else:
        a, b, c = rng.randint(2, 6), rng.randint(2, 9), rng.randint(1, 9)
        nums, ans, alt = (a, b, c), a * b + c, [a * b, a + b + c]
        steps = [f"{a} x {b} = {a * b}.", f"{a * b} + {c} = {ans}."]
    template = rng.choice(_TEMPLATES[split][kind])
    prompt = template.format(n=name, o=things, **dict(zip("abc", nums)))
    answer = str(ans)
    solution = " ".join([*steps, f"The answer is {ans}."])
    # Slips a learner makes: off by one, the wrong operation, a right step then a wrong last one.
    slip = " ".join([*steps[:-1], steps[-1].rsplit("=", 1)[0] + f"= {ans + 1}.", f"The answer is {ans + 1}."])
    wrong = _wrong(
        answer, ans + 1, ans - 1, *alt, f"{name} has {ans + 1} {things}.", f"The answer is {alt[0]}.", slip
    )
    wrong = tuple(w for w in wrong if not verify("arithmetic", w, answer))  # e.g. 2 x 2 = 2 + 2
    return Problem("arithmetic", prompt, answer, ("arithmetic", kind, *nums), wrong, solution)


# Units -----------------------------------------------------------------------------------------------

_CONVERSIONS = [  # (larger unit, smaller unit, factor)
    ("meters", "centimeters", 100),
    ("hours", "minutes", 60),
    ("kilograms", "grams", 1000),
    ("minutes", "seconds", 60),
    ("kilometers", "meters", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("liters", "milliliters", 1000),
]
_UNIT_TEMPLATES = [
    "Convert {v} {src} to {dst}.",
    "How many {dst} are in {v} {src}?",
    "{v} {src} is how many {dst}?",
]


def _unit(name: str, value: int) -> str:
    return name[:-1] if value == 1 else name  # every unit name above is a regular plural


def _units(rng: random.Random, split: str) -> Problem:
    index = rng.randrange(len(_CONVERSIONS))
    big, small, factor = _CONVERSIONS[index]
    n = rng.randint(1, 25)
    down = rng.random() < 0.5  # big -> small multiplies; small -> big divides a multiple of the factor
    v, ans, src, dst = (n, n * factor, big, small) if down else (n * factor, n, small, big)
    template = rng.choice(_UNIT_TEMPLATES)
    text = template.format(v=v, src=_unit(src, v), dst=dst)
    text = text[0].upper() + text[1:]
    answer = str(ans)
    # Typical slips: the wrong direction, a factor of ten off, echoing the input, a unit appended.
    wrong_factor = n * factor * 10 if down else n * 10
    wrong = _wrong(answer, ans + 1, v, wrong_factor, f"{ans} {dst}", f"{v} {src} is {ans} {dst}.")
    return Problem("units", f"{text} {JUST_NUMBER}", answer, ("units", index, down, n), wrong)


# Format ----------------------------------------------------------------------------------------------

_WORD_TEXT = (
    "apple river garden window candle forest planet rabbit summer winter pencil button castle dragon "
    "tiger lemon mirror rocket island bridge cloud silver orange yellow purple jacket pocket basket "
    "carpet ladder tunnel engine wallet turtle parrot monkey spider camera guitar violin piano hammer "
    "kettle bottle blanket pillow market school doctor farmer sailor pirate wizard robot anchor arrow "
    "butter cheese cookie pepper tomato potato carrot banana cherry melon grape peach mango water "
    "stone paper glass metal wood sand snow rain storm thunder shadow light music dance story dream "
    "voice smile heart friend family house door chair table phone clock watch shoe sock hat coat "
    "ship train plane truck bicycle horse sheep goat duck eagle whale shark zebra lion bear wolf fox"
)
_WORDS = _WORD_TEXT.split()
_KEYS = ["name", "color", "city", "animal", "fruit", "word", "item", "label", "value", "answer", "status"]
_COLORS = ["blue", "green", "white", "black", "yellow", "red", "orange", "brown", "pink", "gray"]
_FACTS = [  # (thing, its colour), colours a small model has seen often
    ("the sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("a banana", "yellow"),
    ("a ripe tomato", "red"),
    ("an orange", "orange"),
    ("milk", "white"),
    ("a lemon", "yellow"),
    ("a frog", "green"),
    ("chocolate", "brown"),
    ("a fire truck", "red"),
    ("the sea", "blue"),
    ("a crow", "black"),
    ("an elephant", "gray"),
    ("a flamingo", "pink"),
]
_JSON_ONLY = "Reply with only a JSON object"


def _js(obj: dict) -> str:
    return json.dumps(obj)


def _other_word(w: str) -> str:
    """Another word from the list, chosen without randomness (keeps every split's draws unchanged)."""
    return _WORDS[(_WORDS.index(w) + 1) % len(_WORDS)] if w in _WORDS else w + "s"


def _format(rng: random.Random, split: str) -> Problem:
    kind = rng.choice(
        ["upper", "lower", "first_letter", "color_upper", "json_word", "json_two", "json_color"]
    )
    if kind in ("upper", "lower", "first_letter"):
        w = rng.choice(_WORDS)
        key = ("format", kind, w)
        verbose = "Sure! Here it is: "
        if kind == "upper":
            prompt, answer = f"Repeat the word {w} in upper case. Reply with just that word.", w.upper()
            # Wrong form (case, chatter) and wrong content in the right form (another word, a
            # clipped one): a reward model must check both, or PPO learns to shout any word.
            wrong = _wrong(
                answer, w, w.capitalize(), verbose + answer, f"{answer}!", _other_word(w).upper(), answer[:-1]
            )
        elif kind == "lower":
            prompt = f"Write the word {w.upper()} in lower case. Reply with just that word."
            answer = w
            wrong = _wrong(
                answer, w.upper(), w.capitalize(), verbose + answer, f'"{answer}"', _other_word(w), w[1:]
            )
        else:
            prompt = f"What is the first letter of the word {w}? Reply with just the letter in upper case."
            answer = w[0].upper()
            wrong = _wrong(
                answer, w[0], w[-1].upper(), w[1].upper(), w.upper(), f"The first letter is {answer}."
            )
    elif kind == "color_upper":
        thing, color = rng.choice(_FACTS)
        key = ("format", kind, thing)
        prompt, answer = f"What color is {thing}? Answer in one word in upper case.", color.upper()
        other = rng.choice([c for c in _COLORS if c != color])
        wrong = _wrong(answer, color, color.capitalize(), other.upper(), f"{thing.capitalize()} is {color}.")
    elif kind == "json_word":
        k, w = rng.choice(_KEYS), rng.choice(_WORDS)
        key = ("format", kind, k, w)
        prompt, answer = f'{_JSON_ONLY} with key "{k}" set to "{w}".', _js({k: w})
        other_key = rng.choice([x for x in _KEYS if x != k])
        wrong = _wrong(
            answer, f"{{'{k}': '{w}'}}", f'{{"{k}": "{w}"', _js({other_key: w}), w, _js({k: _other_word(w)})
        )
    elif kind == "json_two":
        k1, k2 = rng.sample(_KEYS, 2)
        w1, w2 = rng.sample(_WORDS, 2)
        key = ("format", kind, k1, k2, w1, w2)
        prompt = f'{_JSON_ONLY} with keys "{k1}" and "{k2}" set to "{w1}" and "{w2}".'
        answer = _js({k1: w1, k2: w2})
        wrong = _wrong(
            answer,
            _js({k1: w2, k2: w1}),
            _js({k1: w1}),
            f'{{"{k1}": "{w1}", "{k2}": "{w2}"',
            f"{w1} {w2}",
            _js({k1: w1, k2: w1}),
        )
    else:
        thing, color = rng.choice(_FACTS)
        key = ("format", kind, thing)
        prompt = f'{_JSON_ONLY} with key "color" set to the color of {thing} in one lower-case word.'
        answer = _js({"color": color})
        other = rng.choice([c for c in _COLORS if c != color])
        wrong = _wrong(
            answer, _js({"color": color.upper()}), _js({"color": other}), f"{{color: {color}}}", color
        )
    return Problem("format", prompt, answer, key, wrong)


# Raw samplers: their split argument only picks names; `_draw` filters their keys by split.
_SAMPLERS: dict[str, Callable[[random.Random, str], Problem]] = {
    "arithmetic": _arithmetic,
    "units": _units,
    "format": _format,
}


def _generator(sampler: Callable[[random.Random, str], Problem]) -> Callable[..., Problem]:
    def generate_kind(rng: random.Random, split: str = "train") -> Problem:
        return _draw(rng, split, sampler)

    return generate_kind


def _mixed(rng: random.Random, split: str = "train") -> Problem:
    # The kind is chosen before filtering by split, so both splits mix the kinds evenly.
    return TASKS[rng.choice(sorted(_SAMPLERS))](rng, split)


# name -> generator `(rng, split="train") -> Problem` whose key belongs to `split`.
TASKS: dict[str, Callable[..., Problem]] = {
    **{name: _generator(sampler) for name, sampler in _SAMPLERS.items()},
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


# Verification ----------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_INT = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)")


def extract_number(text: str) -> int | float | None:
    """The last number in `text` (thousands commas allowed), an int when it has no fraction.

    >>> extract_number("Tom has 7 apples, so the answer is 1,200.")
    1200
    >>> extract_number("about -2.5 degrees"), extract_number("none")
    (-2.5, None)
    """
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "")
    return float(s) if "." in s else int(s)


def _normalise(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


_ANSWER_MARK = re.compile(r"\banswer\s*(?:is\b|:|=)", re.IGNORECASE)


def _as_number(s: str) -> int | float:
    s = s.replace(",", "")
    return float(s) if "." in s else int(s)


def final_number(text: str) -> int | float | None:
    """The number a worked answer ends on: the first number after its last "answer is" (or
    "answer:"), else the last number in the text; None without any number.

    >>> final_number("3 x 6 = 18. 18 + 4 = 22. The answer is 22.")
    22
    >>> final_number("The answer is 22 shells, 4 more than 18."), final_number("So 3 + 4 = 7")
    (22, 7)
    >>> final_number("Final answer: **1,200**"), final_number("I do not know.")
    (1200, None)
    """
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        found = _NUMBER.search(text, marks[-1].end())
        if found:
            return _as_number(found.group())
    found = _NUMBER.findall(text)
    return _as_number(found[-1]) if found else None


def verify(task: str, response_text: str, answer: str) -> bool:
    """Exact check of a response; the rule follows the answer's form, `task` must be a known task.

    Light normalisation only: surrounding whitespace and one trailing period are ignored.
    - `arithmetic` with an integer answer: the response's final answer (`final_number`: the number
      after its last "The answer is", else its last number) must equal it, so worked steps
      ("3 x 6 = 18. 18 + 4 = 22. The answer is 22.") and a bare "22" both count;
    - other integer answers: the response must be just that integer (`"7"`, `" 7."`, `"1,000"`), so
      "The answer is 7." fails: those prompts ask for just the number and the demo rewards exact
      answers; use `extract_number` for a lenient score;
    - JSON answers: the response must parse to an equal JSON value (key order and spacing free);
    - anything else: an exact, case-sensitive string match.

    >>> verify("units", " 7.", "7"), verify("units", "The answer is 7.", "7")
    (True, False)
    >>> verify("arithmetic", "3 + 4 = 7. The answer is 7.", "7"), verify("arithmetic", "3 + 4 = 8.", "7")
    (True, False)
    >>> verify("format", '{"color":"blue"}', '{"color": "blue"}'), verify("format", "blue", "BLUE")
    (True, False)
    """
    _task(task)
    text = _normalise(response_text)
    if _PLAIN_INT.fullmatch(answer):
        want = int(answer.replace(",", ""))
        if task == "arithmetic":
            return final_number(text) == want
        return bool(_PLAIN_INT.fullmatch(text)) and int(text.replace(",", "")) == want
    if answer.startswith("{"):
        try:
            return json.loads(text) == json.loads(answer)
        except ValueError:
            return False
    return text == answer


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
    task: str = "mixed", seed: int = 0, sizes: dict[str, int] | None = None, demos: str = "steps"
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
    """
    _task(task)
    if demos not in DEMOS:
        raise ValueError(f"unknown demos {demos!r}; known: {', '.join(DEMOS)}")
    unknown = set(sizes or {}) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {', '.join(sorted(unknown))}; known: {', '.join(SPLITS)}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}

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
                        {"role": "assistant", "content": shown(p)},
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
) -> dict[str, Path]:
    """Write `sft.jsonl`, `preference.jsonl`, `rl.jsonl` and `eval.jsonl` under `out_dir`.

    Each file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in make_task_data(task, seed, sizes, demos).items():
        path = out / f"{split}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths[split] = path
    return paths
