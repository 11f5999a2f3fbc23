"""Built-in verifiable tasks: verifier rules, preference pairs, determinism, train/eval disjointness."""

from __future__ import annotations

import json
import random
import re

import pytest

from chatforge.data import problems as problem_gen
from chatforge.data.answers import extract_number, final_number, verify
from chatforge.data.problems import split_of
from chatforge.data.tasks import (
    DEFAULT_SIZES,
    SPLITS,
    TASKS,
    generate,
    make_task_data,
    parse_sizes,
    sample,
    write_task_data,
)

KINDS = ("arithmetic", "units", "format")
SMALL = {"sft": 300, "preference": 300, "rl": 100, "eval": 100}


def test_registry_and_item_schema():
    assert set(TASKS) == {*KINDS, "mixed"}
    rng = random.Random(0)
    for task in TASKS:
        for split in ("train", "eval"):
            item = sample(task, rng, split)
            assert set(item) == {"prompt", "answer", "task"}
            assert item["task"] in KINDS and (task == "mixed" or item["task"] == task)
            # Short enough for the CPU demo (< 60 / < 20 SmolLM2 tokens; checked by hand with its tokenizer).
            assert len(item["prompt"]) < 200 and len(item["answer"]) < 60
    with pytest.raises(ValueError, match="unknown task"):
        sample("poetry", rng)
    with pytest.raises(ValueError, match="split"):
        sample("units", rng, "test")


@pytest.mark.parametrize(
    "response, answer, ok",
    [
        ("7", "7", True),
        ("  7.\n", "7", True),
        ("1,000", "1000", True),
        ("07", "7", True),
        ("8", "7", False),
        ("7 apples", "7", False),
        ("The answer is 7.", "7", False),
        ("7.0", "7", False),
        ("", "7", False),
        ("BLUE", "BLUE", True),
        ("BLUE.", "BLUE", True),
        ("blue", "BLUE", False),
        ("BLUE!", "BLUE", False),
        ('{"color":"blue"}', '{"color": "blue"}', True),
        ('{"b": "y", "a": "x"}', '{"a": "x", "b": "y"}', True),
        ("{'color': 'blue'}", '{"color": "blue"}', False),
        ('{"color": "blue"', '{"color": "blue"}', False),
        ('{"color": "Blue"}', '{"color": "blue"}', False),
        ('{"color": "blue", "x": 1}', '{"color": "blue"}', False),
    ],
)
def test_verify_rules(response, answer, ok):
    assert verify("mixed", response, answer) is ok


def test_extract_number():
    assert extract_number("3 apples and 4 more make 7") == 7
    assert extract_number("It is 12.50 dollars.") == 12.5
    assert extract_number("-3") == -3
    assert extract_number("no digits") is None


@pytest.mark.parametrize("task", [*KINDS, "mixed"])
def test_chosen_passes_and_rejected_fails(task):
    for seed in range(3):
        data = make_task_data(task, seed, SMALL)
        for r in data["sft"]:
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
        for r in data["preference"]:
            kind = "mixed" if task == "mixed" else task
            answer = r["chosen"]
            if "The answer is" in answer:  # a worked arithmetic demonstration: judged on its final answer
                kind, answer = "arithmetic", str(final_number(answer))
            assert verify(kind, r["chosen"], answer)
            assert not verify(kind, r["rejected"], answer), r
        for r in data["rl"] + data["eval"]:
            assert verify(task, r["answer"], r["answer"])


def test_every_wrong_candidate_fails():
    rng = random.Random(1)
    for task in KINDS:
        for _ in range(500):
            p = generate(task, rng, rng.choice(["train", "eval"]))
            assert verify(task, p.answer, p.answer)
            assert p.wrong and not any(verify(task, w, p.answer) for w in p.wrong), p


def test_rejected_kinds_are_varied():
    prefs = make_task_data("format", 0, {**SMALL, "preference": 400})["preference"]
    assert any(r["chosen"].isupper() and r["rejected"] == r["chosen"].lower() for r in prefs)  # wrong case
    assert any(r["rejected"].startswith("{") and not _is_json(r["rejected"]) for r in prefs)  # malformed JSON
    nums = make_task_data("arithmetic", 0, SMALL)["preference"]
    assert any(r["rejected"].startswith("The answer is") for r in nums)  # worded, wrong number
    assert any(" = " in r["rejected"] for r in nums)  # worked steps with a slip
    right = [int(r["chosen"].rsplit(" ", 1)[1].rstrip(".")) for r in nums]
    assert any(r["rejected"].isdigit() and abs(int(r["rejected"]) - a) == 1 for r, a in zip(nums, right))


def _is_json(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_deterministic_per_seed_and_independent_splits():
    a = make_task_data("mixed", 7, SMALL)
    assert a == make_task_data("mixed", 7, SMALL)
    assert a["sft"] != make_task_data("mixed", 8, SMALL)["sft"]
    # Changing one split's size leaves the other splits unchanged.
    b = make_task_data("mixed", 7, {**SMALL, "rl": 5})
    assert b["sft"] == a["sft"] and b["eval"] == a["eval"] and b["rl"] == a["rl"][:5]


def test_slips_replace_that_share_of_demonstrations_with_the_typical_slip():
    from chatforge.data.tasks import _problems

    clean = make_task_data("format", 3, SMALL)
    assert make_task_data("format", 3, SMALL, slips=0.0) == clean
    half = make_task_data("format", 3, SMALL, slips=0.5)
    problems, _ = _problems("format", 3, "sft", SMALL["sft"])
    assert [r["messages"][0]["content"] for r in half["sft"]] == [p.prompt for p in problems]
    shown = [r["messages"][1]["content"] for r in half["sft"]]
    slipped = [text != p.answer for text, p in zip(shown, problems)]
    assert 0.4 < sum(slipped) / len(slipped) < 0.6  # 300 draws at p = 0.5
    for text, p, bad in zip(shown, problems, slipped):
        assert text == (p.wrong[0] if bad else p.answer)
        assert verify("format", text, p.answer) is (not bad)
    every = make_task_data("format", 3, SMALL, slips=1.0)["sft"]
    assert [r["messages"][1]["content"] for r in every] == [p.wrong[0] for p in problems]
    # the preference pairs (chosen: the answer), RL and eval records do not change
    for split in ("preference", "rl", "eval"):
        assert half[split] == clean[split]
    with pytest.raises(ValueError, match="slips"):
        make_task_data("format", 3, SMALL, slips=1.5)


def test_split_of_fraction():
    share = sum(split_of(("k", i)) == "eval" for i in range(4000)) / 4000
    assert abs(share - problem_gen.EVAL_FRACTION) < 0.03


def test_train_and_eval_are_disjoint():
    rng = random.Random(0)
    for task in KINDS:
        train = [generate(task, rng, "train") for _ in range(2000)]
        evals = [generate(task, rng, "eval") for _ in range(500)]
        assert all(split_of(p.key) == "train" for p in train)
        assert all(split_of(p.key) == "eval" for p in evals)
        assert split_of(TASKS[task](rng, "eval").key) == "eval"
        assert not {p.key for p in train} & {p.key for p in evals}
        assert not {p.prompt for p in train} & {p.prompt for p in evals}
    # Arithmetic names differ between splits as well.
    evals = [generate("arithmetic", rng, "eval").prompt for _ in range(300)]
    assert not any(name in prompt.split() for prompt in evals for name in problem_gen._NAMES["train"])


@pytest.mark.parametrize(
    "response, ok",
    [
        ("22", True),
        (" 22.\n", True),
        ("3 x 6 = 18. 18 + 4 = 22. The answer is 22.", True),
        ("The answer is 22 shells.", True),
        ("The answer is: 22", True),
        ("Final answer: **22**", True),
        ("So the answer is 22, because 18 + 4 = 22.", True),
        ("The answer is 22. Tom had 4 more than 18.", True),  # the stated answer, not the last number
        ("18 + 4 = 22", True),  # no stated answer: the last number
        ("Tom has 22 shells.", True),
        ("22.0", True),
        ("3 x 6 = 18. 18 + 4 = 23. The answer is 23.", False),
        ("The answer is 23. 22 is wrong.", False),
        ("3 x 6 = 18. The answer is 18. Plus 4 makes 22.", False),
        ("22 or 23? The answer is 23.", False),
        ("18 + 4", False),
        ("I do not know.", False),
        ("", False),
        ("-22", False),
        ("220", False),
    ],
)
def test_arithmetic_verify_reads_the_final_answer(response, ok):
    assert verify("arithmetic", response, "22") is ok
    assert verify("units", response, "22") is (response.strip().rstrip(".") == "22")  # units stay strict


def test_final_number():
    assert final_number("3 x 6 = 18. 18 + 4 = 22. The answer is 22.") == 22
    assert final_number("the ANSWER IS 1,200 stamps") == 1200
    assert final_number("My answer = 7; 8 is not it") == 7
    assert final_number("The answer is unclear, maybe 5") == 5  # no number after the mark: the last one
    assert final_number("It is -3.") == -3
    assert final_number("nothing") is None


def _frame(problem):
    """The prompt with its numbers, name and object replaced: what is left is the template."""
    text = re.sub(r"\d+", "#", problem.prompt)
    words = [
        w for split in ("train", "eval") for w in problem_gen._NAMES[split] + problem_gen._OBJECTS[split]
    ]
    return re.sub(r"\b(" + "|".join(words) + r")\b", "_", text)


def _ngrams(text, n=4):
    words = re.findall(r"[a-z]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_arithmetic_eval_split_differs_in_names_objects_and_phrasing():
    for split in ("train", "eval"):
        assert set(problem_gen._TEMPLATES[split]) == set(problem_gen._ARITHMETIC_KINDS)
    assert not set(problem_gen._NAMES["train"]) & set(problem_gen._NAMES["eval"])
    assert not set(problem_gen._OBJECTS["train"]) & set(problem_gen._OBJECTS["eval"])
    train_t = [t for ts in problem_gen._TEMPLATES["train"].values() for t in ts]
    eval_t = [t for ts in problem_gen._TEMPLATES["eval"].values() for t in ts]
    assert not set(train_t) & set(eval_t)
    # Other phrasings, not the same sentences with a word swapped: no run of 4 words in common.
    shared = {g for t in train_t for g in _ngrams(t)} & {g for t in eval_t for g in _ngrams(t)}
    assert not shared, shared
    rng = random.Random(0)
    train = [generate("arithmetic", rng, "train") for _ in range(1500)]
    evals = [generate("arithmetic", rng, "eval") for _ in range(500)]
    for problems, split in ((train, "train"), (evals, "eval")):
        words = {w for p in problems for w in re.findall(r"[A-Za-z]+", p.prompt)}
        other = "eval" if split == "train" else "train"
        assert not words & set(problem_gen._NAMES[other] + problem_gen._OBJECTS[other]), split
        # every template of the split is drawn
        assert len({_frame(p) for p in problems}) == sum(map(len, problem_gen._TEMPLATES[split].values()))
    assert not {_frame(p) for p in train} & {_frame(p) for p in evals}
    data = make_task_data("arithmetic", 0, {"sft": 300, "preference": 0, "rl": 100, "eval": 400})
    seen = {_frame_text(r["messages"][0]["content"]) for r in data["sft"]}
    seen |= {_frame_text(r["prompt"]) for r in data["rl"]}
    assert not seen & {_frame_text(r["prompt"]) for r in data["eval"]}


def _frame_text(prompt):
    return _frame(problem_gen.Problem("arithmetic", prompt, "", (), ()))


def _check_steps(solution, answer):
    """Every `x op y = z.` step is true, each step starts from the previous result, the last one
    gives ANSWER and "The answer is ANSWER." closes; returns the numbers the steps take in."""
    *steps, last = solution.split(". ")
    assert last == f"The answer is {answer}.", solution
    previous, operands = None, []
    for step in steps:
        m = re.fullmatch(r"(\d+) ([-+x]) (\d+) = (\d+)", step)
        assert m, solution
        x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
        assert z == {"+": x + y, "-": x - y, "x": x * y}[op], solution
        assert previous is None or x == previous, solution
        operands += [x, y] if previous is None else [y]
        previous = z
    assert previous == int(answer), solution
    return operands


def test_arithmetic_demonstrations_show_worked_steps():
    data = make_task_data("arithmetic", 0, SMALL)
    two_step = 0
    for r in data["sft"]:
        prompt, demo = r["messages"][0]["content"], r["messages"][1]["content"]
        answer = str(final_number(demo))
        # the steps take the prompt's numbers in order
        assert _check_steps(demo, answer) == [int(n) for n in re.findall(r"\d+", prompt)]
        assert verify("arithmetic", demo, answer)
        two_step += demo.count("=") == 2
    assert 0 < two_step < len(data["sft"])
    for r in data["preference"]:
        _check_steps(r["chosen"], str(final_number(r["chosen"])))
    # The bare variant: same prompts, the answer alone; RL and eval records do not change.
    bare = make_task_data("arithmetic", 0, SMALL, demos="answer")
    assert [r["messages"][0] for r in bare["sft"]] == [r["messages"][0] for r in data["sft"]]
    assert [r["messages"][1]["content"] for r in bare["sft"]] == [
        str(final_number(r["messages"][1]["content"])) for r in data["sft"]
    ]
    assert bare["rl"] == data["rl"] and bare["eval"] == data["eval"]
    # Tasks without steps show the answer either way.
    assert make_task_data("format", 0, SMALL) == make_task_data("format", 0, SMALL, demos="answer")
    with pytest.raises(ValueError, match="unknown demos"):
        make_task_data("arithmetic", 0, SMALL, demos="chain")


def test_made_eval_split_is_unseen_and_unique():
    data = make_task_data("mixed", 0, SMALL)
    seen = {r["messages"][0]["content"] for r in data["sft"]}
    seen |= {r["prompt"] for r in data["preference"] + data["rl"]}
    prompts = [r["prompt"] for r in data["eval"]]
    assert len(set(prompts)) == len(prompts)
    assert not seen & set(prompts)
    assert {r["task"] for r in data["eval"]} == set(KINDS)


def test_parse_sizes():
    assert parse_sizes("sft=2000,eval=200") == {"sft": 2000, "eval": 200}
    assert parse_sizes("") == {}
    for bad in ("sft", "foo=1", "rl=x", "rl=-1"):
        with pytest.raises(ValueError, match="bad size"):
            parse_sizes(bad)
    with pytest.raises(ValueError, match="unknown split"):
        make_task_data("units", 0, {"train": 3})


def test_write_task_data(tmp_path):
    sizes = {"sft": 4, "preference": 3, "rl": 2, "eval": 1}
    paths = write_task_data("units", tmp_path / "out", seed=3, sizes=sizes)
    assert set(paths) == set(SPLITS) == set(DEFAULT_SIZES)
    expected = make_task_data("units", 3, sizes)
    for split, path in paths.items():
        assert path.name == f"{split}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert records == expected[split]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{s}.jsonl" for s in SPLITS)
