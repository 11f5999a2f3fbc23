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


def test_reward_win_rate_and_perplexity(tiny_model_dir, jsonl, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from chatforge.evaluate import evaluate
    from chatforge.models.heads import ScalarHeadModel
    from chatforge.reward import load_reward_model, score_texts

    rm_dir = tmp_path / "rm"
    shutil.copytree(tiny_model_dir, rm_dir)
    torch.manual_seed(0)
    ScalarHeadModel(AutoModelForCausalLM.from_pretrained(rm_dir)).save_head(rm_dir, extra={})
    data = jsonl([{"prompt": p, "answer": "x"} for p in PROMPTS], "eval.jsonl")
    chats = [{"prompt": p, "completion": "a b c"} for p in PROMPTS]
    ppl_data = jsonl(chats, "ppl.jsonl")
    r = evaluate(tiny_model_dir, data, str(rm_dir), ppl_data, tiny_model_dir, 4, 4, dtype="float32")
    # The same model against itself: every pair ties, so the win rate is exactly one half.
    assert r["win_rate"]["ties"] == 4 and r["win_rate"]["win_rate"] == 0.5
    model, tok, _ = load_reward_model(rm_dir)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    expected = score_texts(model, tok, convs, r["responses"])
    assert r["reward"]["scores"] == pytest.approx(expected, abs=1e-5)
    # Perplexity = exp(mean NLL of the completion tokens), as transformers computes it per example.
    from chatforge.data.dataset import build_sft_examples

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples, _ = build_sft_examples(ppl_data, tok, 512)
    total, count = 0.0, 0
    for ex in examples:
        labels = torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(lm(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss) * n
        count += n
    assert r["ppl"]["tokens"] == count
    assert r["ppl"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_accuracy_per_task_and_verifier_rules():
    items = [
        {"answer": "7", "task": "units"},
        {"answer": "7", "task": "units"},
        {"answer": '{"a": "b"}', "task": "format"},
        {"answer": "7", "task": "arithmetic"},  # arithmetic is judged on the final answer
        {"answer": "7", "task": "arithmetic"},
    ]
    responses = ["7.", "The answer is 7.", '{"a":"b"}', "3 + 4 = 7. The answer is 7.", "3 + 4 = 8."]
    result = accuracy(items, responses)
    assert result["is_correct"] == [True, False, True, True, False]
    assert result["per_task"] == {
        "arithmetic": {"accuracy": 0.5, "n": 2},
        "format": {"accuracy": 1.0, "n": 1},
        "units": {"accuracy": 0.5, "n": 2},
    }


def test_eval_records_need_an_answer(jsonl):
    path = jsonl([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], "bad.jsonl")
    with pytest.raises(ChatforgeError, match=r"bad.jsonl:2"):
        read_items(path)
