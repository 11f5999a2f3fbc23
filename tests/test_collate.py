"""Padding and packing: masks, positions, labels, and packed == unpacked per-token loss on real models."""

from __future__ import annotations

import random

import pytest
import torch

from chatforge.data.collate import IGNORE_INDEX, collate_packed, pack, pad_batch


def test_pad_right_and_left():
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    right = pad_batch(exs, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert right["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    left = pad_batch(exs, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 9]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_pad_to_multiple_and_extra_fields():
    exs = [
        {"input_ids": [1, 2, 3], "old_logps": [0.0, -1.5, -2.0], "response_start": 1, "where": "a:1"},
        {"input_ids": [4], "old_logps": [0.0], "response_start": 0, "where": "a:2"},
    ]
    b = pad_batch(exs, pad_id=9, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert b["labels"].tolist() == [[1, 2, 3, -100], [4, -100, -100, -100]]  # no labels: every token
    assert b["old_logps"].dtype == torch.float32 and b["old_logps"][0].tolist() == [0.0, -1.5, -2.0, 0.0]
    assert b["response_start"].tolist() == [1, 0] and b["where"] == ["a:1", "a:2"]


def test_pack_first_fit_decreasing_is_deterministic_and_complete():
    rng = random.Random(0)
    exs = [{"input_ids": list(range(rng.randint(1, 30)))} for _ in range(200)]
    rows = pack(exs, max_length=32)
    assert rows == pack(exs, max_length=32)
    assert sorted(i for r in rows for i in r.indices) == list(range(200))
    assert all(len(r) <= 32 and sum(r.seq_lens) == len(r) for r in rows)
    total = sum(len(e["input_ids"]) for e in exs)
    assert len(rows) <= -(-total // 32) + 10  # nearly full rows
    # first fit decreasing by hand on a small case
    small = [{"input_ids": [0] * n} for n in (3, 5, 2, 4, 1)]
    assert [r.indices for r in pack(small, max_length=6)] == [[1, 4], [3, 2], [0]]


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="example 1 has 5 tokens, more than max_length 4"):
        pack([{"input_ids": [1]}, {"input_ids": [1] * 5}], max_length=4)


def test_collate_packed_restarts_positions_and_masks_boundaries():
    exs = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]},
    ]
    b = collate_packed(pack(exs, max_length=6), pad_id=0)
    assert "attention_mask" not in b
    assert b["input_ids"].tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 8, 9, -100, 5], [-100, 2, 3, -100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert b["num_tokens"] == 9


def per_token_loss(model, input_ids, labels, position_ids=None, attention_mask=None) -> torch.Tensor:
    """Unreduced next-token NLL (B, T-1), 0 where the label is ignored."""
    # use_cache=False matters: with a KV cache transformers does not look for packed sequences.
    logits = model(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
    ).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return loss


def random_examples(vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    exs = []
    for n in (11, 7, 5, 9, 3, 6):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]  # a prompt part without labels
        exs.append({"input_ids": ids, "labels": labels})
    return exs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_equals_unpacked(arch, tokenizer):
    from chatforge.models.tiny import tiny_model

    model = tiny_model(arch, tokenizer).eval()
    exs = random_examples(len(tokenizer))
    rows = pack(exs, max_length=16)
    assert len(rows) >= 2 and max(len(r.indices) for r in rows) >= 2
    batch = collate_packed(rows, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        packed = per_token_loss(model, batch["input_ids"], batch["labels"], batch["position_ids"])
        expected = torch.zeros_like(packed)
        for r, row in enumerate(rows):
            offset = 0
            for i, n in zip(row.indices, row.seq_lens):
                ids = torch.tensor([exs[i]["input_ids"]])
                alone = per_token_loss(model, ids, torch.tensor([exs[i]["labels"]]))[0]
                # packed position offset + t - 1 predicts token offset + t of this example
                expected[r, offset : offset + n - 1] = alone
                offset += n
        assert (packed != 0).sum() == sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in exs)
        torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)

        # Without restarting positions the examples would see each other: the test can fail.
        flat = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaky = per_token_loss(model, batch["input_ids"], batch["labels"], flat)
        assert not torch.allclose(leaky, expected, atol=1e-3)


def test_packed_log_probs_through_the_training_forward(tokenizer):
    """The SFT stage's forward path (LogprobModel: attention_mask None + position ids) agrees too."""
    from chatforge.models.logprobs import LogprobModel
    from chatforge.models.tiny import tiny_model

    model = LogprobModel(tiny_model("llama", tokenizer).eval())
    exs = random_examples(len(tokenizer), seed=1)
    rows = pack(exs, max_length=16)
    batch = collate_packed(rows, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        packed, _ = model(batch["input_ids"], None, batch["position_ids"], batch["labels"] != IGNORE_INDEX)
        for r, row in enumerate(rows):
            offset = 0
            for i, n in zip(row.indices, row.seq_lens):
                ids = torch.tensor([exs[i]["input_ids"]])
                alone, _ = model(ids, None, None, torch.tensor([exs[i]["labels"]]) != IGNORE_INDEX)
                torch.testing.assert_close(packed[r, offset : offset + n - 1], alone[0], atol=1e-5, rtol=1e-5)
                if offset:
                    assert packed[r, offset - 1] == 0  # the boundary token is never a target
                offset += n
