"""Saved dirs carry the fields transformers 4.x reads, and still load the same in transformers 5."""

import json

import pytest
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


def save_lora(base_dir, out):
    from chatforge.config import PeftConfig
    from chatforge.models.adapters import apply_peft
    from chatforge.models.load import load_model, load_tokenizer

    model = apply_peft(load_model(str(base_dir), device=torch.device("cpu")), PeftConfig(method="lora", r=4))
    save_final(model, load_tokenizer(str(base_dir)), out)
    return json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_adapter_records_its_base_relative_and_loads_after_the_run_moves(tmp_path):
    import shutil

    from chatforge.models.adapters import load_adapter_model
    from chatforge.models.tiny import save_tiny

    save_tiny(tmp_path / "run" / "base", "llama")
    final = tmp_path / "run" / "sft" / "final"
    assert save_lora(tmp_path / "run" / "base", final) == str((tmp_path / "run" / "base").resolve())
    assert json.loads((final / "chatforge_base.json").read_text()) == {"relative": "../../base"}
    shutil.move(tmp_path / "run", tmp_path / "moved")
    model = load_adapter_model(tmp_path / "moved" / "sft" / "final", device=torch.device("cpu"))
    assert model.peft_config["default"].r == 4


def test_adapter_of_a_hub_snapshot_or_the_default_records_the_hub_id(tmp_path, monkeypatch):
    from chatforge.models.adapters import adapter_base
    from chatforge.models.load import DEFAULT_HUB_ID, default_model_dir
    from chatforge.models.tiny import save_tiny

    snapshot = tmp_path / "hub" / "models--Org--Tiny-1" / "snapshots" / "abc123"
    save_tiny(snapshot, "llama")
    assert save_lora(snapshot, tmp_path / "a") == "Org/Tiny-1"
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    save_tiny(default_model_dir(), "llama")  # stands in for the converted embedded default
    assert save_lora(default_model_dir(), tmp_path / "b") == DEFAULT_HUB_ID
    assert adapter_base(tmp_path / "b") == "default"


def test_missing_base_is_one_line_naming_the_adapter(tmp_path):
    import pytest

    from chatforge.errors import ConfigError
    from chatforge.models.adapters import adapter_base
    from chatforge.models.tiny import save_tiny

    save_tiny(tmp_path / "base", "llama")
    save_lora(tmp_path / "base", tmp_path / "final")
    import shutil

    shutil.rmtree(tmp_path / "base")
    with pytest.raises(ConfigError) as e:
        adapter_base(tmp_path / "final")
    assert "adapter_config.json" in str(e.value) and "../base" in str(e.value) and "\n" not in str(e.value)


def test_model_card_names_base_data_stage_and_held_out_result(tmp_path):
    from chatforge.card import write_card
    from chatforge.report import write_report

    run = tmp_path / "run"
    (run / "sft" / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("pipeline:\n  stages: [sft]\n")
    (run / "sft" / "config.yaml").write_text(
        "model:\n  path: Org/Tiny-1\ndata:\n  train: [chats.jsonl]\npeft:\n  method: lora\n  r: 8\n  alpha: 16\n"
    )
    (run / "sft" / "stage").write_text("sft\n")
    (run / "sft" / "metrics.jsonl").write_text('{"step": 5, "loss": 1.25}\n')
    (run / "sft" / "done").write_text('{"final": "x", "wall_s": 1, "peak_rss_gib": 1}')
    card = write_card(run / "sft" / "final", run / "sft").read_text()
    assert card.startswith("---\nbase_model: Org/Tiny-1\nlibrary_name: transformers\n")
    assert "`chats.jsonl`" in card and "lora (r=8, alpha=16)" in card and "loss 1.25" in card
    assert "Pipeline: sft" in card
    (run / "eval").mkdir()
    exact = {"accuracy": 0.75, "stderr": 0.1, "n": 20, "correct": 15, "is_correct": [True] * 15 + [False] * 5}
    (run / "eval" / "sft.json").write_text(json.dumps({"exact": exact, "responses": ["1"] * 20}))
    write_report(run)
    assert "exact accuracy 0.750 ± 0.100 on 20 items" in (run / "sft" / "final" / "README.md").read_text()


def test_no_deprecation_warning_from_peft_on_a_lora_model(tiny_model_dir):
    # `-W default` shows every warning; chatforge's own narrow filter must hide peft's one
    import subprocess
    import sys

    code = (
        "import chatforge\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
        "get_peft_model(m, LoraConfig(r=2, target_modules=['q_proj']))\n"
    )
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "is_gradient_checkpointing" not in run.stderr


def test_no_accelerator_line_from_deepspeed_at_start_up():
    # accelerate imports deepspeed whenever it is installed; on a CPU machine deepspeed logs
    # "Setting accelerator to CPU" to stdout on every command unless chatforge filters it
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    code = "import chatforge\nfrom accelerate.utils import extract_model_from_parallel\nimport deepspeed\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Setting accelerator" not in run.stdout + run.stderr
