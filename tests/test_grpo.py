"""GRPO end to end on a tiny model: the reward rises, beta=0 holds no reference, resume is exact."""

import json

import pytest
import torch

from chatforge.config import load_config
from chatforge.errors import ChatforgeError, DataError
from chatforge.train import grpo
from conftest import reward_that_raises, tiny_run_args

PROMPTS = [{"prompt": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)} for a in range(16)]
TIMING = ("time/", "tokens_per_s", "gen_tokens_per_s", "step_s")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def overrides(model_dir, data, out, reward, *extra) -> list[str]:
    grpo = ("grpo.prompts_per_step=2", "grpo.num_generations=8", f"grpo.reward_functions=[{reward}]")
    schedule = ("train.warmup_ratio=0", "train.scheduler=constant", "train.lr=2e-2", "train.batch_size=16")
    sizes = ("peft.r=8", "data.max_length=96", "generate.max_new_tokens=12")
    return tiny_run_args(model_dir, data, out, *grpo, *schedule, *sizes, *extra)


def config(model_dir, data, out, reward, *extra):
    return load_config(None, overrides(model_dir, data, out, reward, *extra))


def test_rule_reward_rises_and_everything_is_logged(tiny_model_dir, jsonl, reward_file, tmp_path):
    out = tmp_path / "run"
    final = grpo.run(config(tiny_model_dir, jsonl(PROMPTS), out, reward_file, "train.max_steps=20"))
    rows = metrics(out)
    rewards = [r["reward"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert first < 0.35 and last > first + 0.4, rewards
    want = {"loss", "reward", "reward_std", "reward/has_seven", "kl", "clip_frac", "response_length"}
    want |= {"gen_tokens_per_s", "time/generate", "time/score", "time/learn", "grpo_step"}
    assert want <= set(rows[-1])
    assert rows[-1]["kl"] > 0  # the adapter moved away from the reference (adapter disabled)
    assert (out / "final" / "adapter_config.json").is_file() and final == str(out / "final")
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "response", "reward", "answer"} <= set(samples[0])
    from safetensors.torch import load_file

    weights = load_file(str(out / "final" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # every adapter matrix learnt (B starts at 0)


@pytest.mark.slow
def test_qlora_reward_rises_after_generation(tiny_model_dir, jsonl, reward_file, tmp_path):
    # generation runs the 4-bit layers without grad in eval mode: the CPU repack would zero LoRA grads
    out = tmp_path / "run"
    grpo.run(
        config(tiny_model_dir, jsonl(PROMPTS), out, reward_file, "train.max_steps=20", "peft.method=qlora")
    )
    rewards = [r["reward"] for r in metrics(out)]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:3]) / 3 + 0.4, rewards


def test_reward_model_and_rules_are_weighted_together(tiny_model_dir, jsonl, reward_file, tmp_path):
    from chatforge.models.heads import ScalarHeadModel
    from chatforge.models.load import load_model, load_tokenizer

    rm_dir = tmp_path / "rm"
    lm = load_model(tiny_model_dir, device=torch.device("cpu"))
    lm.save_pretrained(rm_dir)
    load_tokenizer(tiny_model_dir).save_pretrained(rm_dir)
    ScalarHeadModel(lm).save_head(rm_dir, {"reward_mean": 0.0, "reward_std": 1.0})
    out = tmp_path / "run"
    cfg = config(
        tiny_model_dir,
        jsonl(PROMPTS),
        out,
        reward_file,
        "train.max_steps=2",
        f"grpo.reward_model={rm_dir}",
        "grpo.reward_model_weight=0.5",
        "grpo.reward_weights=[2.0]",
    )
    grpo.run(cfg)
    for row in metrics(out):
        assert row["reward/model"] != 0.0
        assert row["reward"] == pytest.approx(
            2.0 * row["reward/has_seven"] + 0.5 * row["reward/model"], abs=1e-5
        )


@pytest.mark.parametrize(
    "method, beta, loads, ref_calls", [("none", 0.0, 1, 0), ("none", 0.1, 2, 2), ("lora", 0.0, 1, 0)]
)
def test_beta_zero_holds_and_computes_no_reference(
    tiny_model_dir, jsonl, reward_file, tmp_path, monkeypatch, method, beta, loads, ref_calls
):
    import chatforge.models.load as load

    counts = {"load": 0, "ref": 0}
    real_load, real_ref = load.load_model, grpo.reference_context

    def counting_load(*a, **k):
        counts["load"] += 1
        return real_load(*a, **k)

    def counting_ref(*a, **k):
        counts["ref"] += 1
        return real_ref(*a, **k)

    monkeypatch.setattr(load, "load_model", counting_load)
    monkeypatch.setattr(grpo, "reference_context", counting_ref)
    out = tmp_path / "run"
    cfg = config(
        tiny_model_dir,
        jsonl(PROMPTS),
        out,
        reward_file,
        "train.max_steps=2",
        f"peft.method={method}",
        f"grpo.beta={beta}",
        "grpo.epochs_per_step=2",
        "train.lr=1e-3",
    )
    grpo.run(cfg)
    assert (counts["load"], counts["ref"]) == (loads, ref_calls)
    rows = metrics(out)
    assert ("kl" in rows[-1]) == (beta > 0)
    assert len(rows) == 2 and rows[-1]["step"] == 4  # 2 GRPO steps x 2 optimizer steps each


@pytest.mark.parametrize(
    "save_every, error, raised",
    [(2, "RuntimeError('disk full')", ChatforgeError), (0, "KeyboardInterrupt", KeyboardInterrupt)],
)
def test_resume_after_a_crash_is_exact(
    tiny_model_dir, jsonl, reward_file, tmp_path, save_every, error, raised
):
    # a crash in step 3, before it learns: resume from step 2 (a periodic checkpoint, or the one the
    # crash itself saved) gives the metrics of an uninterrupted run
    data = jsonl(PROMPTS)
    common = (
        "train.max_steps=4",
        "grpo.epochs_per_step=2",
        "grpo.beta=0.05",
        f"train.save_every={save_every}",
    )
    grpo.run(config(tiny_model_dir, data, tmp_path / "a", reward_file, *common))

    crash = reward_that_raises(tmp_path, error)
    b = tmp_path / "b"
    with pytest.raises(raised):
        grpo.run(config(tiny_model_dir, data, b, crash, *common))
    assert [r["grpo_step"] for r in metrics(b)] == [1, 2]
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["step-4"]
    grpo.run(config(tiny_model_dir, data, b, crash, *common, "train.resume=true"))

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]

    got, want = strip(metrics(b)), strip(metrics(tmp_path / "a"))
    assert [r["grpo_step"] for r in got] == [1, 2, 3, 4]
    assert got == want


def test_bad_prompts_and_missing_answers_fail_before_any_model_loads(
    tiny_model_dir, jsonl, reward_file, tmp_path, monkeypatch
):
    import chatforge.models.load as load

    monkeypatch.setattr(load, "load_model", None)  # any model load would fail with a TypeError
    bad = jsonl([{"prompt": "ok"}, {"messages": [{"role": "assistant", "content": "hi"}]}], "bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl:2: messages must end with a user turn"):
        grpo.run(config(tiny_model_dir, bad, tmp_path / "r", reward_file))
    no_answer = jsonl([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], "na.jsonl")
    with pytest.raises(DataError, match=r"na.jsonl:2: answer is missing; exact_match needs"):
        grpo.run(config(tiny_model_dir, no_answer, tmp_path / "r", "exact_match"))


class _FixedLogps(torch.nn.Module):
    """Stands in for a LogprobModel: returns given log-probs (B, T-1) whatever the input."""

    def __init__(self, logps):
        super().__init__()
        self.logps = torch.nn.Parameter(logps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, target_mask=None):
        return self.logps, None


def test_grpo_loss_by_hand():
    # 2 completions, response length 2 (the last two columns), second one has one token
    logps = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -3.0]])
    model = _FixedLogps(logps.clone())
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4),
        "position_ids": None,
        "target_mask": None,
        "response_mask": torch.tensor([[1, 1], [1, 0]]),
        "advantages": torch.tensor([[1.0], [-1.0]]),
        "ref_logp": torch.tensor([[-1.0, -2.0], [-0.5, -3.0]]),
    }
    loss, m = grpo.grpo_loss(model, batch, None, clip_eps=0.2, beta=0.0)
    # ratio 1: token mean of -A over the 3 response tokens = -(1 + 1 - 1) / 3
    assert float(loss.detach()) == pytest.approx(-1 / 3)
    loss.backward()
    # d/dlogp of -A * ratio / 3 at ratio 1 is -A / 3 on response tokens, 0 elsewhere
    want = torch.tensor([[0.0, -1 / 3, -1 / 3], [0.0, 1 / 3, 0.0]])
    assert torch.allclose(model.logps.grad, want)
    batch["ref_logp"] = torch.tensor([[-1.0, -1.0], [-0.5, -3.0]])  # differs on one token by r = 1
    loss_kl, m = grpo.grpo_loss(model, batch, None, clip_eps=0.2, beta=0.5)
    k3 = torch.e - 1 - 1  # e^r - 1 - r with r = ref - logp = 1
    assert float(m["kl"]) == pytest.approx(k3 / 3)
    assert float(loss_kl.detach()) == pytest.approx(-1 / 3 + 0.5 * k3 / 3)


@pytest.mark.parametrize("precision", ["none", "bf16"])
def test_first_ratio_is_one_with_several_epochs(tiny_model_dir, jsonl, reward_file, tmp_path, precision):
    # old log-probs (no grad, before learning) and training log-probs take the same forward path:
    # dropout forced off (peft.dropout is ignored), the same autocast. Step 3 has a trained adapter.
    from accelerate.state import AcceleratorState

    out = tmp_path / "run"
    cfg = config(
        tiny_model_dir,
        jsonl(PROMPTS),
        out,
        reward_file,
        "train.max_steps=3",
        "grpo.epochs_per_step=2",
        "peft.dropout=0.5",
        f"train.mixed_precision={precision}",
    )
    AcceleratorState._reset_state()  # accelerate keeps one mixed-precision setting per process
    try:
        grpo.run(cfg)
    finally:
        AcceleratorState._reset_state()
    rows = metrics(out)
    assert all(r["first_ratio"] == pytest.approx(1.0, abs=1e-5) for r in rows), rows
    assert rows[-1]["ratio_mean"] != pytest.approx(1.0, abs=1e-5)  # the second epoch is off-policy


def test_shared_prompt_runs_like_one_row_per_answer(tiny_model_dir, jsonl, reward_file, tmp_path, capsys):
    data = jsonl(PROMPTS)
    grpo.run(config(tiny_model_dir, data, tmp_path / "shared", reward_file, "train.max_steps=3"))
    assert (
        "learning batches: prompt shared, one row per prompt (data.share_prompt=auto)"
        in capsys.readouterr().out
    )
    grpo.run(
        config(
            tiny_model_dir, data, tmp_path / "rows", reward_file, "train.max_steps=3", "data.share_prompt=off"
        )
    )
    for x, y in zip(metrics(tmp_path / "shared"), metrics(tmp_path / "rows"), strict=True):
        for key in ("loss", "kl", "reward", "response_length"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)


def test_two_process_ddp_matches_one_process(tiny_model_dir, jsonl, reward_file, tmp_path):
    """2 processes x 1 prompt = 1 process x 2 prompts, 8 answers each: with per-row sampler seeds
    both runs draw the same answers, so rewards, losses and the KL must agree step by step."""
    from conftest import one_and_two_processes

    data = jsonl(PROMPTS)

    def args(out, processes):
        return overrides(
            tiny_model_dir,
            data,
            out,
            reward_file,
            "train.device=cpu",
            "generate.seed_per_row=true",
            "grpo.samples_every=0",
            "train.max_steps=3",
            f"grpo.prompts_per_step={2 // processes}",
            f"train.batch_size={16 // processes}",
        )

    a, b = one_and_two_processes("grpo", args, tmp_path)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "reward", "reward_std", "kl", "response_length", "clip_frac"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["grpo_step"], key)
    assert a[-1]["kl"] > 0 and len({r["reward"] for r in a}) > 1  # it learned, the same way in both


@pytest.mark.parametrize(
    "aggregation,want",
    [("token", -(1 + 1 - 1) / 3), ("sequence", -(1 + -1) / 2), ("dr_grpo", -(1 + 1 - 1) / (2 * 4))],
)
def test_loss_aggregations_by_hand(aggregation, want):
    """grpo.loss_aggregation: token mean (DAPO), mean of per-answer means, or the sum over a constant
    answers x generate.max_new_tokens (Dr. GRPO: 2 x 4 here, whatever the answers' lengths)."""
    model = _FixedLogps(torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -3.0]]))
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4),
        "position_ids": None,
        "target_mask": None,
        "response_mask": torch.tensor([[1, 1], [1, 0]]),
        "advantages": torch.tensor([[1.0], [-1.0]]),
    }
    mode = grpo.AGGREGATIONS[aggregation]
    units = grpo.grpo_units(batch, mode, length=4)
    loss, _ = grpo.grpo_loss(model, batch, units, clip_eps=0.2, beta=0.0, reduction=mode)
    assert float(loss.detach()) == pytest.approx(want)
    # one answer per micro-batch, the global count as normalizer: the same loss (accumulation)
    halves = []
    for i in range(2):
        part = {k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in batch.items()}
        halves.append(_FixedLogps(model.logps[i : i + 1].detach().clone()))
        halves[-1].part = part
    total = sum(grpo.grpo_units(m.part, mode, length=4) for m in halves)
    got = sum(
        float(grpo.grpo_loss(m, m.part, total, clip_eps=0.2, beta=0.0, reduction=mode)[0].detach())
        for m in halves
    )
    assert got == pytest.approx(want)


def test_loss_aggregation_reaches_the_learning_step(
    tiny_model_dir, jsonl, reward_file, tmp_path, monkeypatch
):
    seen = []
    real = grpo.grpo_loss

    def spy(model, batch, normalizer, clip_eps, beta, reduction="token"):
        seen.append((reduction, normalizer))
        return real(model, batch, normalizer, clip_eps, beta, reduction)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    out = tmp_path / "dr"
    grpo.run(
        config(
            tiny_model_dir,
            jsonl(PROMPTS),
            out,
            reward_file,
            "train.max_steps=1",
            "grpo.loss_aggregation=dr_grpo",
        )
    )
    # 2 prompts x 8 answers, one micro-batch of 16, normalised by 16 x max_new_tokens (12)
    assert seen and {s[0] for s in seen} == {"constant"} and seen[0][1] == 16 * 12
