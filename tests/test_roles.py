"""PPO roles: the lean layout really switches adapters, keeps the right weights trainable, shares the
reward adapter correctly, and QLoRA still trains after generation."""

import pytest
import torch

from chatforge.config import load_config
from chatforge.errors import ConfigError
from chatforge.rl.build import build_roles

CPU = torch.device("cpu")


def make_adapter(base_dir, out_dir, seed=1, head_meta=None):
    """A LoRA adapter dir on `base_dir` with non-zero weights (an 'SFT output'); with head_meta also
    a score head, i.e. a `chatforge rm` output. Its LoRA dropout is on, as in a real SFT adapter:
    PPO must switch it off (first ratio 1)."""
    from peft import LoraConfig, get_peft_model

    from chatforge.models.adapters import save_final
    from chatforge.models.heads import ScalarHeadModel
    from chatforge.models.load import load_model, load_tokenizer

    torch.manual_seed(seed)
    lm = load_model(base_dir, device=CPU)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, task_type="CAUSAL_LM"
    )
    peft = get_peft_model(lm, cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_final(peft, load_tokenizer(base_dir), out_dir)
    if head_meta is not None:
        ScalarHeadModel(peft).save_head(out_dir, head_meta)
    return str(out_dir)


def roles_config(model_path, *overrides):
    return load_config(
        None,
        [
            f"model.path={model_path}",
            "model.dtype=float32",
            "peft.r=4",
            "ppo.reward_functions=[non_empty]",
            "train.device=cpu",
            *overrides,
        ],
    )


def batch(tok, n=3):
    from chatforge.data.collate import pad_batch

    rows = [{"input_ids": tok.encode(f"hello there number {i} " * (i + 1))} for i in range(n)]
    return pad_batch(rows, tok.pad_token_id)


def logps(roles, role, b):
    with torch.no_grad(), roles.use(role):
        model = roles.ref_policy if role == "ref" else roles.policy
        return model(b["input_ids"], b["attention_mask"], b["position_ids"])[0]


def values(roles, b):
    with torch.no_grad(), roles.use("critic"):
        return roles.critic(b["input_ids"], b["attention_mask"], b["position_ids"])


def perturb(model, key):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if key in n and "lora_" in n:
                p.add_(torch.randn_like(p) * 0.3)


def base_logps(model_dir, b):
    from chatforge.models.load import load_model
    from chatforge.models.logprobs import LogprobModel

    with torch.no_grad():
        return LogprobModel(load_model(model_dir, device=CPU))(
            b["input_ids"], b["attention_mask"], b["position_ids"]
        )[0]


def trainable_names(roles):
    return {n for n, p in roles.model().named_parameters() if p.requires_grad}


def test_sft_adapter_start_reference_stays_fixed_while_actor_moves(tiny_model_dir, tmp_path):
    sft = make_adapter(tiny_model_dir, tmp_path / "sft")
    roles = build_roles(roles_config(sft), CPU)
    text = roles.describe()
    assert "lean" in text and 'adapter "ref"' in text and 'adapter "actor"' in text
    with torch.no_grad():
        roles.critic.head.weight.normal_()  # the value head starts at 0: give it something to show
    b = batch(roles.tokenizer)
    actor0, ref0, base0, v0 = (
        logps(roles, "actor", b),
        logps(roles, "ref", b),
        base_logps(tiny_model_dir, b),
        values(roles, b),
    )
    assert torch.equal(actor0, ref0)  # the actor starts as the SFT policy, which is the reference
    assert not torch.allclose(ref0, base0, atol=1e-3)  # ... and that is not the bare base
    perturb(roles.policy.lm, ".actor.")
    actor1, ref1 = logps(roles, "actor", b), logps(roles, "ref", b)
    assert not torch.allclose(actor1, actor0, atol=1e-3)
    assert torch.equal(ref1, ref0) and torch.equal(values(roles, b), v0)
    perturb(roles.policy.lm, ".critic.")
    assert not torch.allclose(values(roles, b), v0, atol=1e-4)
    assert torch.equal(logps(roles, "actor", b), actor1) and torch.equal(logps(roles, "ref", b), ref0)
    # only the actor and critic adapters (and the value head) train, whatever was switched last
    names = trainable_names(roles)
    assert names and all(".actor." in n or ".critic." in n or n.startswith("critic.head") for n in names)
    assert any(".actor." in n for n in names) and any(".critic." in n for n in names)
    assert "critic.head.weight" in names


def test_full_model_start_reference_is_the_base_with_adapters_off(tiny_model_dir):
    roles = build_roles(roles_config(tiny_model_dir), CPU)
    assert "the base with adapters disabled" in roles.describe()
    b = batch(roles.tokenizer)
    base0 = base_logps(tiny_model_dir, b)
    assert torch.allclose(logps(roles, "ref", b), base0, atol=1e-6)
    perturb(roles.policy.lm, ".actor.")
    assert not torch.allclose(logps(roles, "actor", b), base0, atol=1e-3)
    assert torch.allclose(logps(roles, "ref", b), base0, atol=1e-6)
    before = trainable_names(roles)
    logps(roles, "ref", b)  # peft's disable/enable flips requires_grad; the switch restores it
    assert trainable_names(roles) == before


def test_reward_lora_of_the_same_base_is_an_adapter_scoring_like_the_separate_model(tiny_model_dir, tmp_path):
    from chatforge.rl.rewards import ModelReward

    rm = make_adapter(
        tiny_model_dir, tmp_path / "rm", seed=3, head_meta={"reward_mean": 0.5, "reward_std": 2.0}
    )
    sft = make_adapter(tiny_model_dir, tmp_path / "sft")
    roles = build_roles(roles_config(sft, f"ppo.reward_model={rm}", "ppo.critic_init=reward"), CPU)
    assert 'adapter "reward" + score head' in roles.describe()
    alone = ModelReward.from_dir(rm, device=CPU, dtype=torch.float32)
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    texts = ["an answer", "another longer answer here", " "]
    with roles.use("actor"):
        shared = roles.reward.score_texts(convs, texts)
    assert shared == pytest.approx(alone.score_texts(convs, texts), abs=1e-5)
    assert roles._active == "actor"  # scoring switched back
    # critic_init=reward: the critic starts as the reward model, in the units PPO rewards are in
    # (the raw score normalised with the RM's saved mean 0.5 and std 2.0) at the last token
    b = batch(roles.tokenizer)
    with torch.no_grad():
        raw = alone.model.score(b["input_ids"], b["attention_mask"])
    last = b["attention_mask"].sum(1) - 1
    expected = ((raw - 0.5) / 2.0).tolist()
    assert values(roles, b).gather(1, last[:, None]).squeeze(1) == pytest.approx(expected, abs=1e-5)


def test_reward_model_on_another_base_is_a_separate_model(tiny_model_dir, tmp_path):
    from chatforge.models.tiny import save_tiny

    other = save_tiny(tmp_path / "other-base", "llama", seed=5)
    rm = make_adapter(other, tmp_path / "rm", head_meta={})
    roles = build_roles(roles_config(tiny_model_dir, f"ppo.reward_model={rm}"), CPU)
    assert "separate model" in roles.describe() and "reward" not in roles.adapters
    with pytest.raises(ConfigError, match="critic_init=reward needs"):
        build_roles(roles_config(tiny_model_dir, f"ppo.reward_model={rm}", "ppo.critic_init=reward"), CPU)
    with pytest.raises(ConfigError, match="no score_head.safetensors"):
        build_roles(roles_config(tiny_model_dir, f"ppo.reward_model={tiny_model_dir}"), CPU)


def test_qlora_actor_gradients_survive_generation(tiny_model_dir, jsonl):
    pytest.importorskip("bitsandbytes")
    from chatforge.config import GenerateConfig
    from chatforge.data.prompts import build_prompt_examples
    from chatforge.rl.experience import sample

    roles = build_roles(roles_config(tiny_model_dir, "peft.method=qlora"), CPU)
    perturb(roles.policy.lm, ".actor.")  # non-zero lora_B so lora_A gets gradients too
    model = roles.model().train()
    b = batch(roles.tokenizer)

    def actor_grads():
        model.zero_grad(set_to_none=True)
        with roles.use("actor"):
            lp, _ = model.policy(b["input_ids"], b["attention_mask"], b["position_ids"])
        (-lp.sum()).backward()
        return {
            n: p.grad.clone() for n, p in model.named_parameters() if ".actor." in n and p.grad is not None
        }

    before = actor_grads()
    prompts, _ = build_prompt_examples(jsonl([{"prompt": "hi"}, {"prompt": "say 7"}]), roles.tokenizer, 64)
    sample(roles, prompts, GenerateConfig(max_new_tokens=6))
    after = actor_grads()
    assert len(after) == len(before) > 0
    for n, g in after.items():
        assert g.abs().sum() > 0, n
        assert torch.allclose(g, before[n], rtol=1e-3, atol=1e-6), n


def test_separate_layout_with_lora_is_the_four_model_baseline(tiny_model_dir):
    with pytest.raises(ConfigError, match="critic_init=reward needs the lean layout"):
        build_roles(roles_config(tiny_model_dir, "ppo.layout=separate", "ppo.critic_init=reward"), CPU)
    roles = build_roles(roles_config(tiny_model_dir, "ppo.layout=separate"), CPU)
    assert roles.layout == "separate" and "fresh LoRA" in roles.notes["actor"]
    assert roles.ref_policy is not roles.policy and roles.critic.lm is not roles.policy.lm
    names = trainable_names(roles)
    assert names and all("lora_" in n or n.startswith("critic.head") for n in names)
    b = batch(roles.tokenizer)
    perturb(roles.policy.lm, "lora_B")
    base0 = base_logps(tiny_model_dir, b)
    assert torch.allclose(logps(roles, "ref", b), base0, atol=1e-6)
    assert not torch.allclose(logps(roles, "actor", b), base0, atol=1e-3)
