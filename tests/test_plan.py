"""Memory and compute planning against real parameter counts and hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from chatforge.cli import main
from chatforge.errors import ConfigError
from chatforge.plan.memory import (
    BYTES_PER_PARAM,
    GIB,
    NF4_BYTES,
    describe,
    estimate,
    fits,
    format_table,
)
from chatforge.plan.scaling import (
    CEREBRAS_GPT,
    PRESETS,
    chinchilla_tokens,
    compute_optimal,
    cost,
    preset_config,
    training_flops,
    training_time,
)
from chatforge.plan.shapes import DEFAULT_MODEL_CONFIG, ModelShape, load_shape

SMOL = ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG)
P = 134_515_008  # SmolLM2-135M, by hand: 49152*576 + 30*(884736 + 2654208 + 1152) + 576
LORA16 = 30 * 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)  # all-linear, r=16


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_param_counts_match_tiny_transformers_models(tokenizer):
    from chatforge.models.tiny import TINY_ARCHITECTURES, tiny_config, tiny_model

    cases = [(arch, {}) for arch in TINY_ARCHITECTURES]
    cases += [
        ("llama", {"tie_word_embeddings": False}),
        ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
        ("qwen2", {"tie_word_embeddings": False}),
        ("opt", {"word_embed_proj_dim": 32}),
        ("gpt2", {"n_inner": 96}),
    ]
    for arch, overrides in cases:
        model = tiny_model(arch, tokenizer, **overrides)
        config = tiny_config(arch, tokenizer, **overrides)
        shape = ModelShape.from_hf_config(config)
        assert shape.n_params == _numel(model), (arch, overrides)
        assert ModelShape.from_hf_config(config.to_dict()).n_params == shape.n_params, (arch, overrides)
        assert shape.model_type == arch and shape.n_layers == 2


def test_param_count_mistral_and_presets_build_as_llama():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):  # shapes only: no memory, no init time
        mistral = AutoConfig.for_model(
            "mistral",
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
        )
        assert ModelShape.from_hf_config(mistral).n_params == _numel(
            AutoModelForCausalLM.from_config(mistral)
        )
        for name in ("tiny", "micro", "111m"):
            config = LlamaConfig(**preset_config(name, vocab_size=512))
            model = AutoModelForCausalLM.from_config(config)
            assert ModelShape.from_hf_config(config).n_params == _numel(model), name


def test_default_model_shape():
    assert SMOL.n_params == P
    assert (SMOL.head_dim, SMOL.n_kv_heads, SMOL.tied_embeddings) == (64, 3, True)
    assert SMOL.embedding_params == 49152 * 576
    assert SMOL.lora_params(16) == LORA16 == 4_884_480
    assert SMOL.lora_params(8, ["q_proj", "v"]) == 30 * 8 * ((576 + 576) + (576 + 192))
    assert SMOL.lora_params(16, "attention") + SMOL.lora_params(16, "mlp") == LORA16
    with pytest.raises(ValueError, match="unknown LoRA target"):
        SMOL.lora_params(16, ["c_attn"])


def test_bytes_per_param():
    # NF4 + double quantisation: 4 bits, an 8-bit absmax per 64 weights, an fp32 scale per 256 blocks.
    assert math.isclose(NF4_BYTES, (4 + 8 / 64 + 32 / (64 * 256)) / 8)
    assert round(NF4_BYTES, 6) == 0.515869
    assert [BYTES_PER_PARAM[d] for d in ("fp32", "bf16", "fp16", "int8")] == [4, 2, 2, 1]


def test_full_finetune_sft_breakdown():
    b, s = 2, 128
    e = estimate(SMOL, method="full", weight_dtype="bf16", batch=b, seq_len=s)
    assert e.trainable_params == P
    assert e.breakdown["weights"] == 2 * P
    assert e.breakdown["gradients"] == 2 * P
    assert e.breakdown["optimizer"] == 4 * P  # two AdamW states in bf16
    assert e.breakdown["activations"] == 30 * s * b * 576 * 34
    assert e.breakdown["logits"] == b * s * 49152 * 4
    assert e.breakdown["kv_cache"] == 0
    assert e.total == sum(e.breakdown.values())

    m = estimate(SMOL, method="full", batch=b, seq_len=s, master_weights=True)
    assert m.breakdown["optimizer"] == 4 * P + 8 * P  # fp32 master copy + fp32 AdamW states
    f32 = estimate(SMOL, method="full", weight_dtype="fp32", batch=b, seq_len=s)
    assert f32.breakdown["optimizer"] == 8 * P
    assert f32.breakdown["activations"] == 2 * e.breakdown["activations"]
    assert estimate(SMOL, method="full", optimizer="sgd").breakdown["optimizer"] == 0
    assert estimate(SMOL, method="full", optimizer="adamw_8bit").breakdown["optimizer"] == 2 * P


def test_activation_options():
    b, s, h, a, n_layers = 4, 256, 576, 9, 30
    flash = estimate(SMOL, batch=b, seq_len=s).breakdown["activations"]
    eager = estimate(SMOL, batch=b, seq_len=s, flash_attention=False).breakdown["activations"]
    assert eager - flash == n_layers * 5 * a * s * s * b
    ckpt = estimate(SMOL, batch=b, seq_len=s, grad_checkpointing=True).breakdown["activations"]
    assert ckpt == n_layers * 2 * s * b * h + 34 * s * b * h
    chunked = estimate(SMOL, batch=b, seq_len=s, logits_chunk=256)
    assert chunked.breakdown["logits"] == 256 * 49152 * 4


def test_lora_and_qlora_weights():
    lora = estimate(SMOL, method="lora", lora_r=16)
    assert lora.trainable_params == LORA16
    assert lora.breakdown["weights"] == 2 * P + 4 * LORA16  # adapters in fp32
    assert lora.breakdown["gradients"] == 4 * LORA16
    assert lora.breakdown["optimizer"] == 8 * LORA16
    q = estimate(SMOL, method="qlora", lora_params=1000)
    emb = 49152 * 576
    assert q.weight_dtype == "nf4" and q.trainable_params == 1000
    assert q.breakdown["weights"] == round((P - emb) * NF4_BYTES + emb * 2 + 4000)
    assert q.total < lora.total
    with pytest.raises(ValueError, match="qlora"):
        estimate(SMOL, method="full", weight_dtype="nf4")


def test_stage_layouts():
    base, ad = 2 * P, 4 * LORA16
    dpo = estimate(SMOL, method="lora", stage="dpo", batch=2, seq_len=64)
    assert dpo.breakdown["weights"] == base + ad  # reference = adapters disabled
    assert dpo.breakdown["activations"] == 30 * 64 * 4 * 576 * 34  # chosen + rejected
    assert estimate(SMOL, method="full", stage="dpo").breakdown["weights"] == 2 * base

    lean = estimate(SMOL, method="lora", stage="ppo", batch=4, seq_len=128)
    assert lean.breakdown["weights"] == base + 3 * ad  # actor, critic, reward adapters on one base
    assert lean.trainable_params == 2 * LORA16
    assert lean.breakdown["kv_cache"] == 2 * 30 * 4 * 128 * 3 * 64 * 2
    four = estimate(SMOL, method="lora", stage="ppo", ppo_layout="four", batch=4, seq_len=128)
    assert four.breakdown["weights"] == 4 * base + 2 * ad
    full = estimate(SMOL, method="full", stage="ppo", batch=4, seq_len=128)
    assert full.breakdown["weights"] == 4 * base and full.trainable_params == 2 * P
    assert lean.total < four.total < full.total
    with pytest.raises(ValueError, match="lean"):
        estimate(SMOL, method="full", stage="ppo", ppo_layout="lean")

    reward = estimate(SMOL, method="lora", stage="reward")
    assert reward.breakdown["logits"] == 0
    inf = estimate(SMOL, method="full", stage="inference", batch=8, seq_len=100)
    assert inf.trainable_params == 0 and inf.breakdown["gradients"] == inf.breakdown["optimizer"] == 0
    assert inf.breakdown["logits"] == 8 * 49152 * 4


def test_bad_arguments():
    for kwargs in ({"method": "dora"}, {"stage": "pretrain"}, {"weight_dtype": "fp8"}, {"optimizer": "lion"}):
        with pytest.raises(ValueError):
            estimate(SMOL, **kwargs)


def test_fits_format_and_describe(tmp_path):
    e = estimate(SMOL, method="full", batch=8, seq_len=1024)
    assert fits(e, device_gib=e.total / GIB / 0.9 + 0.01)
    assert not fits(e, device_gib=e.total / GIB / 0.9 - 0.01)
    table = format_table(e)
    assert table.splitlines()[0].startswith("llama 134.5M params | full, bf16 weights, sft")
    assert "total" in table and "activations" in table
    assert "does NOT fit in 1 GiB" in describe(SMOL, device_gib=1, method="full")
    assert "fits in 80 GiB" in describe("default", device_gib=80)
    assert describe(DEFAULT_MODEL_CONFIG) == describe(SMOL)

    (tmp_path / "config.json").write_text(json.dumps(DEFAULT_MODEL_CONFIG))
    assert load_shape(str(tmp_path)) == SMOL
    assert load_shape("tiny", vocab_size=512).n_params == 106_816
    with pytest.raises(ConfigError, match="not a preset"):
        load_shape(str(tmp_path / "missing"))


def test_plan_of_a_hub_id_offline_is_one_line(capsys):
    assert main(["plan", "SomeOrg/not-downloaded"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hub ids are not fetched" in err and "Traceback" not in err


def test_chinchilla_and_compute():
    assert chinchilla_tokens(1e9) == 20_000_000_000
    assert chinchilla_tokens(1e6, tokens_per_param=100) == 100_000_000
    assert training_flops(1e9, 2e10) == 1.2e20
    n, d = compute_optimal(1.2e20)
    assert (n, d) == (1_000_000_000, 20_000_000_000)
    n, d = compute_optimal(6.0 * 70e9 * 1.4e12)  # Chinchilla itself: 70B params, 1.4T tokens
    assert n == pytest.approx(70e9, rel=1e-9) and d == pytest.approx(1.4e12, rel=1e-9)
    # 1e18 FLOPs at 100 TFLOP/s peak and 50% MFU: 2e4 seconds on one device.
    assert training_time(1e18, tflops=100, mfu=0.5) == pytest.approx(2e4 / 3600)
    assert training_time(1e18, tflops=100, mfu=0.5, n_devices=4) == pytest.approx(5e3 / 3600)
    assert cost(10, 2.5) == 25 and cost(10, 2.5, n_devices=8) == 200
    with pytest.raises(ValueError):
        compute_optimal(0)
    with pytest.raises(ValueError):
        training_time(1e18, tflops=100, mfu=1.5)


def test_presets():
    assert set(PRESETS) == {"tiny", "micro", "mini", "111m", "256m", "590m"}
    keys = {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    }
    assert all(set(p) == keys for p in PRESETS.values())
    counts = {
        name: ModelShape.from_hf_config(preset_config(name, vocab_size=512)).n_params for name in PRESETS
    }
    # tiny by hand: per layer q 64*64 + k,v 2*64*32 + o 64*64 + MLP 3*64*128 + 2 norms of 64.
    assert counts["tiny"] == 512 * 64 + 2 * (4096 + 4096 + 4096 + 24576 + 128) + 64 == 106_816
    assert 50_000 < counts["tiny"] < 200_000
    assert 1_000_000 <= counts["micro"] <= 2_000_000
    assert 10_000_000 <= counts["mini"] <= 20_000_000
    for name, c in CEREBRAS_GPT.items():
        p = PRESETS[name]
        assert (p["num_hidden_layers"], p["hidden_size"], p["num_attention_heads"]) == (
            c["n_layer"],
            c["d_model"],
            c["n_head"],
        )
        assert p["intermediate_size"] % 64 == 0
        # SwiGLU's three matrices hold about as many weights as Cerebras' two GELU ones.
        assert math.isclose(3 * p["intermediate_size"], 2 * c["d_ffn"], rel_tol=0.01)
    # With GPT-2's vocabulary the totals land near the names (no learned position table here).
    for name, target in (("111m", 111e6), ("256m", 256e6), ("590m", 590e6)):
        n = ModelShape.from_hf_config(preset_config(name, vocab_size=50257)).n_params
        assert abs(n / target - 1) < 0.03, (name, n)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("7b")
