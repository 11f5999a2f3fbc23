"""Pretraining from scratch on raw text with a size preset and the Chinchilla default budget."""

import json

import pytest
from transformers import AutoModelForCausalLM

from chatforge.config import load_config
from chatforge.errors import ConfigError
from chatforge.train import pretrain

TEXT = "\n".join(f"the cat number {i} sat on the mat and the dog number {i} ran." for i in range(60))


def _cfg(tiny_model_dir, data, out, *extra):
    return load_config(
        None,
        [
            "pretrain.preset=tiny",
            f"pretrain.tokenizer={tiny_model_dir}",
            f"data.train=[{data}]",
            "data.max_length=64",
            f"train.output_dir={out}",
            "train.progress=false",
            "train.batch_size=4",
            "train.lr=1e-2",
            "train.mixed_precision=none",
            *extra,
        ],
    )


def test_pretrain_learns_and_saves_a_full_model(tiny_model_dir, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    final = pretrain.run(_cfg(tiny_model_dir, data, tmp_path / "run", "train.max_steps=25"))
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 25
    assert losses[-1] < 0.6 * losses[0], losses
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2


def test_zero_steps_means_twenty_tokens_per_parameter(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in TEXT.splitlines()))
    # a tiny budget so the test is quick: 0.02 tokens/parameter on ~100k parameters ~ 8 steps
    pretrain.run(_cfg(tiny_model_dir, data, tmp_path / "run", "pretrain.tokens_per_param=0.02"))
    out = capsys.readouterr().out
    assert "compute-optimal budget of 0.02 tokens/parameter" in out
    n_params = sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").parameters()
    )
    steps = -(-int(n_params * 0.02) // (4 * 64))
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(logged[-1])["step"] == pytest.approx(steps, abs=1)


def test_unknown_preset_is_a_config_error(tiny_model_dir, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    with pytest.raises(ConfigError, match="pretrain.preset must be one of tiny, micro"):
        pretrain.run(_cfg(tiny_model_dir, data, tmp_path / "run", "pretrain.preset=huge"))
