"""`chatforge eval`: exact accuracy on a case whose answers are known, errors, table and JSON."""

import json
import math

import pytest

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.evaluate import accuracy, generate_answers, load_inference_model, read_items

PROMPTS = ["Say a word.", "Name a colour.", "Write the word tree in upper case.", "Count to three."]


def test_eval_accuracy_is_exact_on_known_answers(tiny_model_dir, jsonl, tmp_path, capsys):
    lm, tok = load_inference_model(tiny_model_dir, "float32", "cpu")
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    produced, _ = generate_answers(lm, tok, convs, max_new_tokens=6, batch_size=4, progress=False)
    assert all(produced)
    # Items 0 and 1 expect exactly what the model greedily says; items 2 and 3 something it never says.
    answers = [produced[0], produced[1], "never said", "also never said"]
    data = jsonl(
        [{"prompt": p, "answer": a, "task": "format"} for p, a in zip(PROMPTS, answers)], "eval.jsonl"
    )
    out = tmp_path / "results.json"
    args = [
        tiny_model_dir,
        "--data",
        data,
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
        "--dtype",
        "float32",
        "--out",
        str(out),
    ]
    assert main(["eval", *args]) == 0
    results = json.loads(out.read_text())
    exact = results["exact"]
    assert exact["is_correct"] == [True, True, False, False]
    assert (exact["correct"], exact["n"], exact["accuracy"]) == (2, 4, 0.5)
    assert exact["stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    assert results["responses"] == produced
    table = capsys.readouterr().out
    assert "0.500 ± 0.250 (2/4)" in table


def test_accuracy_per_task_and_verifier_rules():
    items = [
        {"answer": "7", "task": "arithmetic"},
        {"answer": "7", "task": "arithmetic"},
        {"answer": '{"a": "b"}', "task": "format"},
    ]
    result = accuracy(items, ["7.", "The answer is 7.", '{"a":"b"}'])
    assert result["is_correct"] == [True, False, True]
    assert result["per_task"] == {
        "arithmetic": {"accuracy": 0.5, "n": 2},
        "format": {"accuracy": 1.0, "n": 1},
    }


def test_eval_records_need_an_answer(jsonl):
    path = jsonl([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], "bad.jsonl")
    with pytest.raises(ChatforgeError, match=r"bad.jsonl:2"):
        read_items(path)
