"""Scalar heads read the right position, train, and round-trip through save/load."""

import pytest
import torch

from chatforge.models.heads import ScalarHeadModel, disable_dropout, load_head
from chatforge.models.tiny import TINY_ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_score_reads_last_real_token_for_left_and_right_padding(arch, tokenizer):
    model = ScalarHeadModel(tiny_model(arch, tokenizer)).eval()
    ids = torch.randint(5, 400, (1, 6))
    pad = torch.full((1, 3), tokenizer.pad_token_id)
    alone = model.score(ids, torch.ones_like(ids))
    right = model.score(torch.cat([ids, pad], 1), torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    if arch in ("llama", "qwen2"):  # rotary models: left padding with matching positions is exact
        attn = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], 1)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        values = model(torch.cat([pad, ids], 1), attn, pos)
        torch.testing.assert_close(values[:, -1], alone, atol=1e-5, rtol=1e-5)


def test_head_round_trip(tmp_path, tokenizer):
    model = ScalarHeadModel(tiny_model("llama", tokenizer), name="value")
    model.save_head(tmp_path, {"mean": 0.5})
    head, meta = load_head(tmp_path, "value")
    assert meta["mean"] == 0.5
    torch.testing.assert_close(head.weight, model.head.weight)


def test_disable_dropout(tokenizer):
    lm = tiny_model("gpt2", tokenizer)
    disable_dropout(lm)
    assert all(m.p == 0 for m in lm.modules() if isinstance(m, torch.nn.Dropout))
