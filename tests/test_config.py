"""The config schema: YAML + dotted overrides, validation before any model loads, help text."""

import pytest

from chatforge.cli import main
from chatforge.config import all_keys, describe, load_config, save_config
from chatforge.errors import ConfigError


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 3e-4\n  batch_size: 2\npeft:\n  method: qlora\ndata:\n  train: a.jsonl\n")
    cfg = load_config(path, ["train.batch_size=8", "data.eval=[x.jsonl, y.jsonl]", "train.resume=true"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8 and cfg.train.resume is True
    assert cfg.peft.method == "qlora"
    assert cfg.data.train == ["a.jsonl"]  # a scalar where a list is expected becomes a list
    assert cfg.data.eval == ["x.jsonl", "y.jsonl"]


def test_string_fields_keep_what_was_typed():
    cfg = load_config(None, ["model.path=no", "train.output_dir=1e-4"])
    assert cfg.model.path == "no" and cfg.train.output_dir == "1e-4"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("tran.lr=1", "unknown config key 'tran.lr' (did you mean 'train.lr'?)"),
        ("train.batch_size=two", "train.batch_size must be int (got 'two')"),
        ("train.batch_size=0", "train.batch_size must be a positive integer (got 0)"),
        ("peft.method=lora2", "peft.method must be one of none, lora, qlora, prefix, prompt (got 'lora2')"),
        ("train.resume=maybe", "train.resume must be bool"),
        ("train.lr", "override 'train.lr' must look like section.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "sec.yaml").write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(tmp_path / "sec.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["train.lr=1e-3", "peft.target_modules=[q_proj]", "ppo.kl_coef=0.2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_help_lists_every_key_with_type_default_and_help(capsys):
    text = describe()
    for key in all_keys():
        assert f"  {key} (" in text
    assert "peft.method (none|lora|qlora|prefix|prompt, default 'lora')" in text
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "train.max_steps (int, default 0)" in out
    assert "ppo.kl_coef" not in out  # a stage's help shows only its sections


@pytest.mark.parametrize("name", ["quickstart", "sft", "dpo", "grpo", "arithmetic"])
def test_every_shipped_recipe_loads(name):
    from pathlib import Path

    cfg = load_config(str(Path(__file__).parent.parent / "configs" / f"{name}.yaml"), [])
    assert cfg.model.path == "default" and cfg.pipeline.stages
