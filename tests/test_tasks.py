"""Built-in verifiable tasks: verifier rules, preference pairs, determinism, train/eval disjointness."""

from __future__ import annotations

import json
import random

import pytest

from chatforge.data import tasks
from chatforge.data.tasks import (
    DEFAULT_SIZES,
    SPLITS,
    TASKS,
    extract_number,
    generate,
    make_task_data,
    parse_sizes,
    sample,
    split_of,
    verify,
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
            assert verify(kind, r["chosen"], r["chosen"])
            assert not verify(kind, r["rejected"], r["chosen"]), r
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
    assert any(r["rejected"].startswith("The answer is") for r in nums)  # verbose
    assert any(r["rejected"].isdigit() and abs(int(r["rejected"]) - int(r["chosen"])) == 1 for r in nums)


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


def test_split_of_fraction():
    share = sum(split_of(("k", i)) == "eval" for i in range(4000)) / 4000
    assert abs(share - tasks.EVAL_FRACTION) < 0.03


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
    assert not any(name in prompt.split() for prompt in evals for name in tasks._NAMES["train"])


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
