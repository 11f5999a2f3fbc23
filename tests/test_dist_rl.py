"""GRPO and PPO's lean layout under dist.strategy=fsdp2 (2 CPU processes, gloo, LoRA on a sharded
frozen base): the rollout decodes on the whole weights gathered once per step, learning runs
sharded; a run takes the steps of one process at the same global batch, each rank holds half the
model, final/ is a plain peft adapter dir, and a sharded checkpoint resumes exactly."""

import shutil

import pytest
import torch

from conftest import launch, metrics_of, tiny_run_args

PROMPTS = [{"prompt": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)} for a in range(16)]
COMPARED = ("loss", "reward", "reward_std", "kl", "response_length", "clip_frac")


def _args(model_dir, data, out, reward, processes, *extra):
    return tiny_run_args(
        model_dir,
        data,
        out,
        f"grpo.reward_functions=[{reward}]",
        f"grpo.prompts_per_step={2 // processes}",  # the same global batch: 2 prompts x 8 answers
        "grpo.num_generations=8",
        f"train.batch_size={16 // processes}",
        "generate.seed_per_row=true",  # the same answers whatever the number of processes
        "generate.max_new_tokens=12",
        "data.max_length=96",
        "grpo.beta=0.05",  # the reference: the adapter switched off on the sharded model
        "grpo.samples_every=0",
        "peft.method=lora",
        "peft.r=8",
        "train.warmup_ratio=0",
        "train.scheduler=constant",
        "train.lr=2e-2",
        "train.device=cpu",
        "dist.strategy=fsdp2",
        *extra,
    )


def _logits(base_dir, adapter_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(torch.arange(3, 20)[None]).logits


def _assert_shards_and_final(one, two, out, model_dir, *dirs):
    """Each rank of `two` holds about half the parameters and Adam state of `one` (the engine's own
    local shards), and out/two/final is a peft adapter dir, loadable in a plain process, that gives
    the one-process run's logits and differs from the base."""
    ((params, state),) = one
    assert len(two) == 2
    for p, s in two:
        assert 0.4 * params < p < 0.6 * params
        assert 0.4 * state < s < 0.6 * state
    final = out / "two" / "final"
    assert (final / "adapter_config.json").is_file() and all((final / d).is_dir() for d in dirs)
    got = _logits(model_dir, final)
    assert torch.allclose(got, _logits(model_dir, out / "one" / "final"), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, _logits(model_dir), atol=1e-3)  # the adapter learned


def test_grpo_fsdp2_lora_runs_like_one_process_shards_and_saves_a_peft_adapter(
    tiny_model_dir, jsonl, reward_file, tmp_path
):
    data = jsonl(PROMPTS)
    run = ("train.max_steps=3",)
    one = launch("grpo", 1, _args(tiny_model_dir, data, tmp_path / "one", reward_file, 1, *run))
    two = launch("grpo", 2, _args(tiny_model_dir, data, tmp_path / "two", reward_file, 2, *run))
    a, b = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["grpo_step"], key)
        assert y["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert a[-1]["kl"] > 0 and len({r["reward"] for r in a}) > 1  # it learned, the same way in both
    _assert_shards_and_final(one, two, tmp_path, tiny_model_dir)


def _ppo_args(model_dir, data, out, reward, processes, *extra):
    return tiny_run_args(
        model_dir,
        data,
        out,
        f"ppo.reward_functions=[{reward}]",
        f"ppo.rollout_batch_size={8 // processes}",  # the same global rollout of 8 prompts
        f"ppo.mini_batch_size={8 // processes}",
        f"train.batch_size={4 // processes}",
        "generate.top_k=1",  # deterministic answers whatever the number of processes
        "generate.max_new_tokens=8",
        "data.max_length=96",
        "ppo.whiten_advantages=false",  # each process whitens its own part
        "ppo.ppo_epochs=1",
        "ppo.samples_every=0",
        "peft.method=lora",
        "peft.r=8",
        "train.warmup_ratio=0",
        "train.lr=1e-2",
        "train.device=cpu",
        "dist.strategy=fsdp2",
        *extra,
    )


def test_ppo_lean_layout_under_fsdp2_runs_like_one_process_and_shards(
    tiny_model_dir, jsonl, reward_file, tmp_path
):
    """One sharded base with the actor and critic adapters (and the reference = adapters off)."""
    data = jsonl(PROMPTS)
    one = launch(
        "ppo", 1, _ppo_args(tiny_model_dir, data, tmp_path / "one", reward_file, 1, "train.max_steps=3")
    )
    two = launch(
        "ppo", 2, _ppo_args(tiny_model_dir, data, tmp_path / "two", reward_file, 2, "train.max_steps=3")
    )
    a, b = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")
    assert len(a) == len(b) == 3
    keys = ("loss", "policy_loss", "value_loss", "reward", "kl", "response_length", "value_mean")
    for x, y in zip(a, b):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["ppo_step"], key)
        assert y["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # one epoch: on-policy
    assert a[-1]["kl"] > 0  # the actor moved, the same way in both
    _assert_shards_and_final(one, two, tmp_path, tiny_model_dir, "critic")


@pytest.mark.parametrize(
    ("stage", "keys"),
    [("grpo", COMPARED), ("ppo", ("loss", "policy_loss", "value_loss", "reward", "kl", "kl_coef"))],
)
def test_fsdp2_rl_resume_from_a_sharded_checkpoint_is_exact(
    stage, keys, tiny_model_dir, jsonl, reward_file, tmp_path
):
    data = jsonl(PROMPTS)
    args = {"grpo": _args, "ppo": _ppo_args}[stage]
    run = ("train.max_steps=4", "train.save_every=2", "train.keep_last=5")
    launch(stage, 2, args(tiny_model_dir, data, tmp_path / "full", reward_file, 2, *run))
    ckpt = tmp_path / "full" / "checkpoints" / "step-2"
    assert {p.name for p in ckpt.glob("optimizer-*.pt")} == {"optimizer-0.pt", "optimizer-1.pt"}
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "part" / "final")
    resume = (*run, "train.resume=true")
    launch(stage, 2, args(tiny_model_dir, data, tmp_path / "part", reward_file, 2, *resume))
    want = {m["step"]: m for m in metrics_of(tmp_path / "full")}
    got = {m["step"]: m for m in metrics_of(tmp_path / "part")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in keys:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), (step, key)
