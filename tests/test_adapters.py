"""Every adapter kind trains, saves and reloads through peft; QLoRA survives no-grad eval on CPU."""

import importlib.util

import pytest
import torch

from chatforge.config import PeftConfig
from chatforge.models.adapters import apply_peft, default_target_modules, merge_adapter
from chatforge.models.load import load_model
from chatforge.models.logprobs import token_logprobs
from chatforge.models.tiny import TINY_ARCHITECTURES, tiny_model

CPU = torch.device("cpu")
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes missing"
)


def train_step(model, ids, lr=1e-2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    lp, _ = token_logprobs(model, ids, torch.ones_like(ids))
    (-lp.mean()).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_default_targets_are_attention_projections(arch, tokenizer):
    targets = default_target_modules(tiny_model(arch, tokenizer))
    assert targets != "all-linear" and len(targets) >= 2


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "none"])
def test_trainable_params_change_frozen_do_not_and_adapter_reloads(method, tiny_model_dir, tmp_path):
    model = apply_peft(
        load_model(tiny_model_dir, device=CPU), PeftConfig(method=method, r=4, num_virtual_tokens=4)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # LoRA's B starts at zero, so A only moves from the second step
        train_step(model, ids)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != p.requires_grad, f"{n}: trainable={p.requires_grad}"
    model.eval()
    with torch.no_grad():
        want, _ = token_logprobs(model, ids)
    model.save_pretrained(tmp_path / "out")
    if method == "none":
        from transformers import AutoModelForCausalLM

        again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    else:
        from peft import PeftModel

        again = PeftModel.from_pretrained(load_model(tiny_model_dir, device=CPU), tmp_path / "out")
    with torch.no_grad():
        got, _ = token_logprobs(again.eval(), ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_writes_a_plain_model_with_the_same_outputs(tiny_model_dir, tmp_path):
    model = apply_peft(load_model(tiny_model_dir, device=CPU), PeftConfig(method="lora", r=4))
    ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    train_step(model, ids)
    train_step(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    from chatforge.models.load import load_tokenizer

    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want, _ = token_logprobs(model.eval(), ids)
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        got, _ = token_logprobs(merged, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _lora_a_grads_after_eval_forward(model_dir, guarded: bool) -> list[float]:
    model = load_model(model_dir, dtype=torch.bfloat16, device=CPU, quantize_4bit=True)
    if not guarded:  # undo the guard to show what it prevents
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)
    model = apply_peft(model, PeftConfig(method="qlora", r=4))
    ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    train_step(model, ids)  # makes LoRA B non-zero so A gets gradients too
    model.eval()
    with torch.no_grad():
        token_logprobs(model, ids)  # generation / evaluation
    model.train()
    lp, _ = token_logprobs(model, ids)
    (-lp.mean()).backward()
    return [p.grad.float().abs().sum().item() for n, p in model.named_parameters() if "lora_A" in n]


@needs_bnb
def test_qlora_gradients_survive_a_no_grad_eval_forward(tiny_model_dir):
    guarded = _lora_a_grads_after_eval_forward(tiny_model_dir, guarded=True)
    assert all(g > 0 for g in guarded)
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX-512 bf16, so bitsandbytes never repacks")
    # Without the guard the repacked weights give zero or near-zero (wrong) LoRA gradients.
    unguarded = _lora_a_grads_after_eval_forward(tiny_model_dir, guarded=False)
    assert sum(unguarded) < 0.2 * sum(guarded), "the hazard the guard exists for did not show"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights stored transposed
def test_merged_lora_samples_like_the_adapter_and_restores_every_weight(arch, tokenizer):
    from peft import LoraConfig, get_peft_model

    from chatforge.models.adapters import merged_lora, sampling_model
    from chatforge.rl.generate import generate

    lm = tiny_model(arch, tokenizer, seed=2)
    targets = default_target_modules(lm)
    peft = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    peft.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in peft.named_parameters()}
    types = [type(m) for m in peft.modules()]
    prompts = [tokenizer("hello world")["input_ids"], tokenizer("two plus three is")["input_ids"]]
    want = generate(peft, tokenizer, prompts, max_new_tokens=8, greedy=True)
    with merged_lora(peft, "default") as merged:
        assert merged is not None and "lora" not in " ".join(type(m).__name__ for m in merged.modules())
        got = generate(merged, tokenizer, prompts, max_new_tokens=8, greedy=True)
    assert torch.equal(got.response_ids, want.response_ids)
    assert [type(m) for m in peft.modules()] == types
    for n, p in peft.named_parameters():  # the same tensors, bit for bit
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n
    with sampling_model(peft, merge=False) as same:
        assert same is peft


def test_dora_is_not_folded(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from chatforge.models.adapters import merged_lora

    lm = load_model(tiny_model_dir, device=CPU)
    peft = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with merged_lora(peft, "default") as merged:
        assert merged is None


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_is_sampled_as_it_is(method, tiny_model_dir):
    from chatforge.models.adapters import sampling_model

    model = apply_peft(
        load_model(tiny_model_dir, device=CPU), PeftConfig(method=method, num_virtual_tokens=4)
    )
    with sampling_model(model, merge=True) as sampler:
        assert sampler is model
