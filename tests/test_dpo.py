"""DPO stage on a tiny model: step-0 sanity values, probability moves to chosen, references agree, resume."""

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from chatforge.config import load_config
from chatforge.train import dpo
from conftest import check_resume_is_exact, one_and_two_processes, tiny_run_args

PAIRS = [
    {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.", "rejected": "no"}
    for a in range(1, 5)
    for b in range(1, 5)
]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_dpo(model_dir, data, out, *overrides):
    common = ("train.warmup_ratio=0", "train.batch_size=4", "train.lr=2e-2")
    return dpo.run(load_config(None, tiny_run_args(model_dir, data, out, *common, *overrides)))


def test_lora_dpo_starts_at_ln2_and_moves_probability_from_rejected_to_chosen(
    tiny_model_dir, jsonl, tmp_path
):
    from peft import PeftModel

    from chatforge.data.preference import build_preference_examples, collate_pairs
    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.models.logprobs import LogprobModel

    data = jsonl(PAIRS)
    final = run_dpo(tiny_model_dir, data, tmp_path / "run", "train.max_steps=10", "peft.dropout=0.1")
    logged = metrics(tmp_path / "run")
    assert logged[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference at step 0
    assert logged[0]["rewards/margin"] == 0.0
    assert logged[-1]["rewards/margin"] > 1.0 and logged[-1]["rewards/accuracy"] == 1.0
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(logged[0])

    tok = load_tokenizer(final)
    model = LogprobModel(
        PeftModel.from_pretrained(load_model(tiny_model_dir, device=torch.device("cpu")), final)
    )
    examples, _ = build_preference_examples(data, tok, max_length=512)
    batch = collate_pairs(examples, tok.pad_token_id)
    with torch.no_grad():
        after = dpo.sequence_logps(model, batch)[0]
        with model.lm.disable_adapter():
            before = dpo.sequence_logps(model, batch)[0]
    n = len(examples)
    gain = after - before
    assert gain[:n].mean() > 0 > gain[n:].mean()  # chosen up, rejected down
    assert (gain[:n] > gain[n:]).all()


@pytest.mark.parametrize("loss_type, beta, want", [("ipo", 0.1, 25.0), ("hinge", 0.1, 1.0)])
def test_step_zero_loss_with_lora(loss_type, beta, want, tiny_model_dir, jsonl, tmp_path):
    run_dpo(
        tiny_model_dir,
        jsonl(PAIRS),
        tmp_path,
        "train.max_steps=1",
        f"dpo.loss_type={loss_type}",
        f"dpo.beta={beta}",
    )
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("method", ["none", "lora"])
def test_precomputed_reference_equals_live_reference(method, tiny_model_dir, jsonl, tmp_path):
    data = jsonl(PAIRS)
    common = (
        "train.max_steps=3",
        f"peft.method={method}",
        "train.lr=1e-3" if method == "none" else "train.lr=2e-2",
    )
    live = run_dpo(tiny_model_dir, data, tmp_path / "live", *common)
    run_dpo(tiny_model_dir, data, tmp_path / "pre", *common, "dpo.precompute_ref=true")
    a, b = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
    assert a[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    for x, y in zip(a, b):
        for key in ("loss", "rewards/margin", "logps/chosen"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    assert a[-1]["loss"] < a[0]["loss"]
    kind = "config.json" if method == "none" else "adapter_config.json"
    assert (Path(live) / kind).is_file()


def test_shared_prompt_rows_train_like_separate_rows(tiny_model_dir, jsonl, tmp_path, capsys):
    data = jsonl(PAIRS)
    run_dpo(tiny_model_dir, data, tmp_path / "shared", "train.max_steps=3")
    assert (
        "pair batches: prompt shared, one row per prompt (data.share_prompt=auto)" in capsys.readouterr().out
    )
    run_dpo(tiny_model_dir, data, tmp_path / "rows", "train.max_steps=3", "data.share_prompt=off")
    for x, y in zip(metrics(tmp_path / "shared"), metrics(tmp_path / "rows"), strict=True):
        for key in ("loss", "rewards/margin", "logps/chosen", "logps/rejected"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)


def test_shared_prompt_on_refuses_a_model_that_cannot_branch(jsonl, tmp_path):
    from chatforge.errors import ConfigError
    from chatforge.models.tiny import save_tiny

    bloom = save_tiny(tmp_path / "bloom", "bloom")
    with pytest.raises(ConfigError, match="data.share_prompt=on, but this model does not"):
        run_dpo(bloom, jsonl(PAIRS), tmp_path / "run", "train.max_steps=1", "data.share_prompt=on")


def test_simpo_with_sft_term_learns_without_a_reference(tiny_model_dir, jsonl, tmp_path):
    overrides = ("train.max_steps=6", "dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.sft_weight=0.5")
    run_dpo(tiny_model_dir, jsonl(PAIRS), tmp_path, *overrides, "dpo.label_smoothing=0.1")
    logged = metrics(tmp_path)
    assert "nll" in logged[0]
    assert logged[-1]["rewards/margin"] > logged[0]["rewards/margin"]
    assert logged[-1]["nll"] < logged[0]["nll"]


def test_bad_dpo_settings_are_config_errors(tiny_model_dir, jsonl, tmp_path):
    from chatforge.errors import ConfigError

    with pytest.raises(ConfigError, match="dpo.label_smoothing applies to the sigmoid and simpo"):
        run_dpo(tiny_model_dir, jsonl(PAIRS), tmp_path, "dpo.loss_type=ipo", "dpo.label_smoothing=0.1")


def test_resume_equals_uninterrupted(tiny_model_dir, jsonl, tmp_path):
    data = jsonl(PAIRS)
    check_resume_is_exact(partial(run_dpo, tiny_model_dir, data), tmp_path, ("loss", "rewards/margin"))
    assert (tmp_path / "part" / "final" / "adapter_config.json").is_file()


def test_two_process_ddp_matches_one_process(tiny_model_dir, jsonl, tmp_path):
    data = jsonl(PAIRS)

    def args(out, processes):  # the same global batch of 4 pairs
        return tiny_run_args(
            tiny_model_dir, data, out, "train.max_steps=3", f"train.batch_size={4 // processes}"
        )

    a, b = one_and_two_processes("dpo", args, tmp_path)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "rewards/margin", "rewards/accuracy"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
