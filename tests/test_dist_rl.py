"""GRPO and PPO's lean layout under dist.strategy=fsdp2 (2 CPU processes, gloo, LoRA on a sharded
frozen base): the rollout decodes on the whole weights gathered once per step, learning runs
sharded; a run takes the steps of one process at the same global batch, each rank holds half the
model, final/ is a plain peft adapter dir, and a sharded checkpoint resumes exactly. GRPO with LoRA
under DeepSpeed zero2/zero3 runs like one process too (zero3's rollout on the parameters gathered
once, the engine's hooks off)."""

import shutil

import pytest
import torch

from conftest import SEVEN_REWARD, launch, metrics_of, tiny_run_args, write_jsonl

PROMPTS = [{"prompt": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)} for a in range(16)]
COMPARED = ("loss", "reward", "reward_std", "kl", "response_length", "clip_frac")


def _args(model_dir, data, out, reward, processes, *extra, strategy="fsdp2"):
    """A GRPO run at the same global batch whatever the processes; strategy None: plain training."""
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
        f"dist.strategy={strategy or 'ddp'}",  # one process never shards: the plain reference
        *extra,
    )


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "data.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """The rule reward of conftest's `reward_file`, in one file for the whole module."""
    path = tmp_path_factory.mktemp("reward") / "rewards.py"
    path.write_text(SEVEN_REWARD)
    return f"{path}:has_seven"


def _logits(base_dir, adapter_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(torch.arange(3, 20)[None]).logits


def _assert_shards_and_final(one, two, one_dir, two_dir, model_dir, *dirs, strategy="fsdp2"):
    """Each rank of `two` holds about half the parameters (all of them under zero2) and Adam state
    of `one` (the engine's own local shards; under zero2 plus DeepSpeed's fp32 master copy of the
    partition: 3/4 in all), and two_dir/final is a peft adapter
    dir, loadable in a plain process, that gives the one-process run's logits and differs from the
    base."""
    ((params, state),) = one
    assert len(two) == 2
    share = 0.75 if strategy == "zero2" else 0.5
    for p, s in two:
        assert p == params if strategy == "zero2" else 0.4 * params < p < 0.6 * params
        assert (share - 0.1) * state < s < (share + 0.1) * state
    final = two_dir / "final"
    assert (final / "adapter_config.json").is_file() and all((final / d).is_dir() for d in dirs)
    got = _logits(model_dir, final)
    assert torch.allclose(got, _logits(model_dir, one_dir / "final"), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, _logits(model_dir), atol=1e-3)  # the adapter learned


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_grpo_lora_runs_sharded_like_one_process_and_saves_a_peft_adapter(
    strategy, tiny_model_dir, prompts, seven, one_process, tmp_path
):
    """fsdp2 and zero3: the rollout decodes on the weights gathered once per step (zero3 with the
    engine's per-module hooks off); the reference is the adapter switched off on the sharded model."""
    if strategy != "fsdp2":
        pytest.importorskip("deepspeed")
    args = (tiny_model_dir, prompts)
    run = ("train.max_steps=3",)
    one, plain = one_process("grpo", lambda out: _args(*args, out, seven, 1, *run, strategy=None))
    two = launch("grpo", 2, _args(*args, tmp_path / "two", seven, 2, *run, strategy=strategy))
    a, b = metrics_of(plain), metrics_of(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in COMPARED:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["grpo_step"], key)
        assert y["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert a[-1]["kl"] > 0 and len({r["reward"] for r in a}) > 1  # it learned, the same way in both
    _assert_shards_and_final(one, two, plain, tmp_path / "two", tiny_model_dir, strategy=strategy)


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
    _assert_shards_and_final(one, two, tmp_path / "one", tmp_path / "two", tiny_model_dir, "critic")


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


ZERO3_UNSHARDED = """
import json, os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from chatforge.train import zero
from chatforge.train.dist import unsharded

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
want = model(torch.ones(3, 8)).detach()
config = zero.ds_config(3, 1, 1.0, False)
config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
whole = lambda: all(p.ds_status == ZeroParamStatus.AVAILABLE for p in model.parameters())
out = {"before": whole()}
with unsharded(engine) as m:
    got = [m(torch.ones(3, 8)) for _ in range(3)]  # several forwards: nothing released between them
    out["inside"] = whole() and m is model
    out["same"] = all(torch.allclose(g, want) for g in got)
out["after"] = whole()
engine.backward(engine(torch.ones(3, 8)).square().sum())  # the hooks are back: gather, release
engine.step()
out["trained"] = not whole() and not torch.allclose(engine(torch.ones(3, 8)).detach(), want)
print(json.dumps(out))
"""


def test_zero3_unsharded_gathers_once_and_gives_the_hooks_back(tmp_path):
    """With every parameter partitioned (no persistent ones, unlike the tiny model's), the rollout
    block keeps the whole weights across forwards and the engine trains as before after it."""
    import json
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", ZERO3_UNSHARDED, str(port)], capture_output=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    got = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert got == {"before": False, "inside": True, "same": True, "after": False, "trained": True}
