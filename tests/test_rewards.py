"""Rewards: built-ins, user functions from files and modules, weights, clear errors, reward-model scores."""

import math
import sys

import pytest
import torch

from chatforge.errors import ChatforgeError, ConfigError
from chatforge.rl.rewards import BUILTINS, ModelReward, RuleRewards, resolve

PROMPTS = ["2+3?", "2+3?", "2+3?"]


def test_builtins_score_as_documented():
    responses = ["5", "The answer is 5.", '{"a": 1}']
    answers = ["5", "5", "5"]
    _, parts = RuleRewards(list(BUILTINS))(PROMPTS, responses, answers)
    assert parts["exact_match"] == [1.0, 0.0, 0.0]
    assert parts["numeric_match"] == [1.0, 1.0, 0.0]  # the JSON holds 1, not 5
    assert parts["final_answer"] == [1.0, 1.0, 0.0]
    assert parts["non_empty"] == [1.0, 1.0, 1.0]
    assert parts["single_line"] == [1.0, 1.0, 1.0]
    assert parts["valid_json"] == [1.0, 0.0, 1.0]
    assert parts["length_penalty"] == [-1 / 200, -16 / 200, -8 / 200]


def test_final_answer_reads_worked_steps():
    responses = ["2 + 3 = 5. The answer is 5.", "2 + 3 = 6. The answer is 6.", "The answer is 5, not 6."]
    assert RuleRewards(["final_answer"])(PROMPTS, responses, ["5"] * 3)[0] == [1.0, 0.0, 1.0]
    assert RuleRewards(["exact_match"])(PROMPTS, responses, ["5"] * 3)[0] == [0.0, 0.0, 0.0]
    assert RuleRewards(["final_answer"])(["q"], ['{"a": 1}'], ['{"a":1}'])[0] == [1.0]  # non-numbers: exact
    assert RuleRewards(["final_answer", "non_empty"]).needs_answers == ["final_answer"]


def test_missing_answers_score_zero_not_crash():
    total, _ = RuleRewards(["exact_match", "numeric_match"])(["q"], ["5"], [None])
    assert total == [0.0]
    assert RuleRewards(["exact_match", "non_empty"]).needs_answers == ["exact_match"]


def test_weighted_sum_of_user_function_from_a_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def polite(prompts, responses, answers):\n"
        "    return [2.0 if 'please' in r else 0.0 for r in responses]\n"
    )
    rules = RuleRewards(["non_empty", f"{path}:polite"], [0.5, 3.0])
    total, parts = rules(["q", "q"], ["please", ""], [None, None])
    assert parts[f"{path}:polite"] == [2.0, 0.0]
    assert total == [0.5 * 1 + 3.0 * 2.0, 0.0]
    assert rules.names == ["non_empty", "polite"]


def test_user_function_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "reward_mod_xyz.py").write_text(
        "def n(prompts, responses, answers):\n    return [len(r) for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert RuleRewards(["reward_mod_xyz:n"])(["q"], ["abc"], [None])[0] == [3.0]
    finally:
        sys.modules.pop("reward_mod_xyz", None)


@pytest.mark.parametrize(
    "body, message",
    [
        ("    raise KeyError('oops')", "reward function '{spec}' raised KeyError: 'oops'"),
        ("    return [1.0]", "reward function '{spec}' returned 1 values for 2 responses"),
        ("    return [float('nan'), 1.0]", "reward function '{spec}' returned a NaN or infinite value"),
        ("    return ['a', 'b']", "reward function '{spec}' must return a list of numbers"),
        ("    return None", "reward function '{spec}' must return a list of numbers"),
    ],
)
def test_a_bad_user_function_gives_one_clear_error(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(f"def f(prompts, responses, answers):\n{body}\n")
    spec = f"{path}:f"
    with pytest.raises(ChatforgeError) as e:
        RuleRewards([spec])(["q", "q"], ["a", "b"], [None, None])
    assert str(e.value) == message.format(spec=spec)


def test_bad_specs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a built-in"):
        resolve("exact_matsh")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(f"{tmp_path}/nope.py:f")
    (tmp_path / "ok.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no function g"):
        resolve(f"{tmp_path}/ok.py:g")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve("no_such_module_abc:f")
    with pytest.raises(ConfigError, match="2 reward weights for 1"):
        RuleRewards(["non_empty"], [1.0, 2.0])
    (tmp_path / "broken.py").write_text("import not_a_module_qq\n")
    with pytest.raises(ChatforgeError, match="importing .*broken.py failed"):
        resolve(f"{tmp_path}/broken.py:f")


@pytest.mark.parametrize("as_adapter", [False, True])
def test_model_reward_loads_an_rm_dir_and_normalises(tiny_model_dir, tmp_path, as_adapter):
    from chatforge.config import PeftConfig
    from chatforge.models.adapters import apply_peft
    from chatforge.models.heads import ScalarHeadModel
    from chatforge.models.load import load_model, load_tokenizer

    torch.manual_seed(0)
    out = tmp_path / "rm"
    lm = load_model(tiny_model_dir, device=torch.device("cpu"))
    tok = load_tokenizer(tiny_model_dir)
    if as_adapter:
        lm = apply_peft(lm, PeftConfig(method="lora", r=4))
        with torch.no_grad():
            for n, p in lm.named_parameters():
                if "lora_B" in n:
                    p.normal_()  # a non-trivial adapter: scores differ from the base model's
    rm = ScalarHeadModel(lm)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    rm.save_head(out, {"reward_mean": 1.5, "reward_std": 2.0})

    loaded = ModelReward.from_dir(out, device=torch.device("cpu"))
    conv = [[{"role": "user", "content": "2+3?"}]] * 2
    got = loaded.score_texts(conv, ["5", "no idea at all"])
    from chatforge.data.collate import pad_batch
    from chatforge.data.templates import tokenize_prompt_response

    rows = [
        {"input_ids": tokenize_prompt_response(tok, c, [{"role": "assistant", "content": r}], 1024)[0]}
        for c, r in zip(conv, ["5", "no idea at all"])
    ]
    b = pad_batch(rows, tok.pad_token_id)
    rm.eval()
    with torch.no_grad():
        raw = rm.score(b["input_ids"], b["attention_mask"])
    assert got == pytest.approx(((raw - 1.5) / 2.0).tolist(), abs=1e-5)
    assert not math.isclose(got[0], got[1])


def test_model_reward_dir_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelReward.from_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no score_head.safetensors"):
        ModelReward.from_dir(tiny_model_dir)
