"""The problem generators behind the built-in tasks (`chatforge.data.tasks`): arithmetic word
problems, unit conversions and format-following, each a `Problem` with one exact answer, plausible
wrong answers for preference pairs, and (arithmetic) worked steps.

A problem's key (template and numbers or words, never names) decides its split through a hash
(`split_of`), so an eval problem never appears in train under any name.

    >>> import random
    >>> p = SAMPLERS["arithmetic"](random.Random(0), "train")
    >>> p.task, p.solution.split(". ")[-1].startswith("The answer is")
    ('arithmetic', True)
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from chatforge.data.answers import verify

EVAL_FRACTION = 0.2
JUST_NUMBER = "Answer with just the number."


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


def draw(rng: random.Random, split: str, sampler: Callable[[random.Random, str], Problem]) -> Problem:
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


# Raw samplers: their split argument only picks names; `draw` filters their keys by split.
SAMPLERS: dict[str, Callable[[random.Random, str], Problem]] = {
    "arithmetic": _arithmetic,
    "units": _units,
    "format": _format,
}
