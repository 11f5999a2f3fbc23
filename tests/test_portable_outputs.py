"""Saved dirs carry the fields transformers 4.x reads, and still load the same in transformers 5."""

import json

import torch

from chatforge.models.adapters import save_final
from chatforge.models.tiny import tiny_model


def test_saved_models_name_rope_and_tokenizer_for_transformers_4(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_model("llama", tokenizer, seed=0)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
    save_final(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0  # 4.x would silently use 10000 without it
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x has no TokenizersBackend
    model.save_pretrained(tmp_path / "plain")  # what transformers 5 alone writes
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert again.config.rope_parameters["rope_theta"] == 100000.0
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    torch.testing.assert_close(again(ids).logits, plain(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path)("a b c").input_ids == tokenizer("a b c").input_ids
