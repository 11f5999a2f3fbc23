"""Preference pairs: tokenisation, skips counted with FILE:LINE, one concatenated forward for both sides."""

import pytest
import torch

from chatforge.cli import main
from chatforge.data.collate import pad_batch
from chatforge.data.preference import IDENTICAL, build_preference_examples, collate_pairs
from chatforge.errors import DataError
from chatforge.models.logprobs import LogprobModel
from chatforge.models.tiny import tiny_model
from chatforge.train.dpo import sequence_logps

PAIRS = [
    {"prompt": "What is 2 plus 3?", "chosen": "The answer is 5.", "rejected": "7"},
    {
        "chosen": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"},
        ],
        "rejected": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "no"}],
        "margin": 2,
    },
]


def test_pairs_share_the_prompt_and_end_with_the_turn_end(tokenizer, jsonl):
    examples, report = build_preference_examples(jsonl(PAIRS), tokenizer, max_length=64)
    assert report.records == report.examples == 2 and not report.skipped
    for ex in examples:
        n = ex["prompt_len"]
        assert ex["chosen_ids"][:n] == ex["rejected_ids"][:n]
        assert tokenizer.decode(ex["chosen_ids"][:n]).endswith("<|im_start|>assistant\n")
    assert (
        tokenizer.decode(examples[0]["chosen_ids"][examples[0]["prompt_len"] :])
        == "The answer is 5.<|im_end|>"
    )
    assert tokenizer.decode(examples[1]["rejected_ids"][examples[1]["prompt_len"] :]) == "no<|im_end|>"
    assert [ex["margin"] for ex in examples] == [None, 2.0]
    assert report.trained_tokens == sum(
        len(ex[k]) - ex["prompt_len"] for ex in examples for k in ("chosen_ids", "rejected_ids")
    )


def test_collate_puts_chosen_rows_then_rejected_rows(tokenizer, jsonl):
    examples, _ = build_preference_examples(jsonl(PAIRS), tokenizer, max_length=64)
    b = collate_pairs(examples, pad_id=tokenizer.pad_token_id)
    assert b["input_ids"].shape[0] == 4
    for i, ex in enumerate(examples):
        for row, key in ((i, "chosen_ids"), (i + 2, "rejected_ids")):
            n = len(ex[key])
            assert b["input_ids"][row, :n].tolist() == ex[key]
            assert (b["labels"][row] != -100).sum() == n - ex["prompt_len"]
    assert b["margin"].tolist() == [0.0, 2.0]


def test_one_concatenated_forward_equals_two_forwards(tokenizer, jsonl):
    examples, _ = build_preference_examples(jsonl(PAIRS * 2), tokenizer, max_length=64)
    model = LogprobModel(tiny_model("llama", tokenizer, seed=3)).eval()
    together, counts = sequence_logps(model, collate_pairs(examples, tokenizer.pad_token_id))
    apart = []
    for key in ("chosen_ids", "rejected_ids"):
        rows = [
            {"input_ids": ex[key], "labels": [-100] * ex["prompt_len"] + ex[key][ex["prompt_len"] :]}
            for ex in examples
        ]
        apart.append(sequence_logps(model, pad_batch(rows, tokenizer.pad_token_id))[0])
    torch.testing.assert_close(together, torch.cat(apart), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [
        len(ex[k]) - ex["prompt_len"] for k in ("chosen_ids", "rejected_ids") for ex in examples
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_branched_pairs_give_the_numbers_of_separate_rows(family, tokenizer, jsonl):
    """One row per pair (prompt once, both responses after it) = chosen and rejected rows:
    log-probs, token counts, reward scores and LoRA gradients."""
    from peft import LoraConfig, get_peft_model

    from chatforge.models.heads import ScalarHeadModel
    from chatforge.models.logprobs import branches_supported
    from chatforge.train.reward import pair_scores

    examples, _ = build_preference_examples(jsonl(PAIRS * 2), tokenizer, max_length=64)
    rows, branched = (collate_pairs(examples, tokenizer.pad_token_id, branched=b) for b in (False, True))
    assert branched["input_ids"].shape[0] == len(examples) and "branch" in branched
    assert branched["num_tokens"] < int(rows["attention_mask"].sum())  # the prompt is there once
    lm = tiny_model(family, tokenizer, seed=3).eval()
    assert branches_supported(lm)
    model = LogprobModel(lm)
    (sums_r, counts_r), (sums_b, counts_b) = (sequence_logps(model, b) for b in (rows, branched))
    torch.testing.assert_close(sums_b, sums_r, atol=1e-5, rtol=1e-5)
    assert counts_b.tolist() == counts_r.tolist()
    scorer = ScalarHeadModel(lm)
    with torch.no_grad():
        torch.testing.assert_close(
            pair_scores(scorer, branched), pair_scores(scorer, rows), atol=1e-5, rtol=1e-5
        )
    if family == "llama":
        peft = LogprobModel(get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
        for p in peft.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        grads = []
        for batch in (rows, branched):
            peft.zero_grad()
            (sequence_logps(peft, batch)[0] * torch.arange(1.0, 9.0)).sum().backward()
            grads.append([p.grad.clone() for p in peft.parameters() if p.requires_grad])
        for g_r, g_b in zip(*grads):
            torch.testing.assert_close(g_b, g_r, atol=1e-5, rtol=1e-4)


def test_the_probe_keeps_separate_rows_where_branching_is_not_exact(tokenizer, monkeypatch):
    from chatforge.data import collate
    from chatforge.models.logprobs import branches_supported

    assert not branches_supported(tiny_model("bloom", tokenizer))  # ALiBi from a 2D mask
    ignore_mask = collate.collate_branches

    def plain_causal(*args, **kw):  # as if a model ignored the 4D mask: branches see each other
        b = ignore_mask(*args, **kw)
        width = b["input_ids"].shape[1]
        b["attention_mask"] = torch.ones(width, width, dtype=torch.bool).tril()[None, None]
        return b

    lm = tiny_model("llama", tokenizer)
    assert branches_supported(lm)
    monkeypatch.setattr(collate, "collate_branches", plain_causal)
    assert not branches_supported(lm)


def test_missing_field_names_file_line_and_field(tokenizer, jsonl):
    path = jsonl(
        [PAIRS[0], {"prompt": "hi", "chosen": "yes"}, {"prompt": "x", "chosen": "", "rejected": "y"}]
    )
    with pytest.raises(DataError) as e:
        build_preference_examples(path, tokenizer, max_length=64)
    assert str(e.value) == f"{path}:2: rejected is missing (and 1 more bad records)"


def test_identical_and_too_long_pairs_are_skipped_counted_and_reported(tokenizer, jsonl):
    long_prompt = " ".join(["apples"] * 80)
    path = jsonl(
        [
            PAIRS[0],
            {"prompt": "hi", "chosen": "same", "rejected": "same"},
            {"prompt": long_prompt, "chosen": "a", "rejected": "b"},
            {"prompt": "hi", "chosen": "yes " * 40 + "A", "rejected": "yes " * 40 + "B"},
            # the same once extra message keys are dropped
            {"prompt": "hi", "chosen": [{"role": "assistant", "content": "ok", "id": 1}], "rejected": "ok"},
        ]
    )
    warnings = []
    examples, report = build_preference_examples(path, tokenizer, max_length=48, warn=warnings.append)
    assert len(examples) == 1 and report.records == 5
    assert report.skipped == {
        IDENTICAL: 2,
        "prompt leaves no room for a response": 1,
        "chosen and rejected identical after truncation to max_length": 1,
    }
    assert warnings[0] == f"{path}:2: chosen and rejected are identical (skipped)"
    assert warnings[1].startswith(f"{path}:3: prompt leaves no room for a response (")
    assert warnings[2].startswith(f"{path}:4: chosen and rejected identical after truncation")
    assert warnings[3] == f"{path}:5: chosen and rejected are identical (skipped)"
    assert "skipped 4" in report.summary()


def test_nothing_left_is_an_error_naming_the_first_record(tokenizer, jsonl):
    path = jsonl([{"prompt": " ".join(["apples"] * 80), "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=f"{path}:1: prompt leaves no room"):
        build_preference_examples(path, tokenizer, max_length=16)


def test_dpo_cli_reports_bad_data_with_file_and_line(tiny_model_dir, jsonl, tmp_path, capsys):
    bad = jsonl([PAIRS[0], {"prompt": "hi", "chosen": 3, "rejected": "b"}])
    args = [f"model.path={tiny_model_dir}", f"data.train=[{bad}]", f"train.output_dir={tmp_path / 'run'}"]
    assert main(["dpo", *args]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: chosen must be" in err
    assert main(["rm", *args]) == 2
    assert f"{bad}:2: chosen must be" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("branched", [False, True])
def test_padding_to_a_multiple_changes_widths_not_numbers(branched, tokenizer, jsonl):
    """data.pad_to_multiple_of: batch widths from a few buckets (kernels are cached per shape),
    the same log-probs, counts and reward scores as padding to the longest row."""
    from chatforge.models.heads import ScalarHeadModel
    from chatforge.train.reward import pair_scores

    examples, _ = build_preference_examples(jsonl(PAIRS * 2), tokenizer, max_length=64)
    tight, padded = (
        collate_pairs(examples, tokenizer.pad_token_id, branched=branched, pad_to_multiple_of=m)
        for m in (None, 16)
    )
    assert tight["input_ids"].shape[1] % 16 != 0  # else the test would not pad anything
    assert padded["input_ids"].shape[1] == -(-tight["input_ids"].shape[1] // 16) * 16
    lm = tiny_model("llama", tokenizer, seed=3).eval()
    model = LogprobModel(lm)
    (sums_t, counts_t), (sums_p, counts_p) = (sequence_logps(model, b) for b in (tight, padded))
    torch.testing.assert_close(sums_p, sums_t, atol=1e-5, rtol=1e-5)
    assert counts_p.tolist() == counts_t.tolist()
    with torch.no_grad():
        scorer = ScalarHeadModel(lm)
        torch.testing.assert_close(
            pair_scores(scorer, padded), pair_scores(scorer, tight), atol=1e-5, rtol=1e-5
        )
