"""Reward-model stage on a tiny model: learns a separable preference, saves the promised format,
loads back for scoring, `chatforge score` prints and writes scores, full fine-tuning, exact resume."""

import json
from functools import partial
from pathlib import Path

import pytest

from chatforge.cli import main
from chatforge.config import load_config
from chatforge.train import reward
from conftest import check_resume_is_exact, one_and_two_processes, tiny_run_args

WORDS = ["apples", "fox", "dog", "sea", "Paris", "haiku", "JSON", "meters", "case", "answer", "world", "time"]


def pairs(lo: int, hi: int) -> list[dict]:
    """The chosen reply always contains 'yes', the rejected one 'no' (same text otherwise)."""
    out = []
    for i in range(lo, hi):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 5 + 1) % len(WORDS)]
        out.append(
            {"prompt": f"Tell me about {a} and {b}.", "chosen": f"{b} {a} yes", "rejected": f"{b} {a} no"}
        )
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_rm(model_dir, data, out, *overrides):
    common = ("train.warmup_ratio=0", "train.batch_size=4", "train.lr=2e-2")
    cfg = load_config(None, tiny_run_args(model_dir, data, out, *common, *overrides))
    return reward.run(cfg)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in pairs(0, 48)))
    held = tmp / "eval.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in pairs(48, 64)))
    final = run_rm(
        tiny_model_dir, train, tmp / "run", f"data.eval=[{held}]", "train.max_steps=20", "rm.center_coef=0.01"
    )
    return Path(final), tmp / "run", held


def test_reward_model_separates_held_out_pairs(trained):
    final, out, _ = trained
    last = metrics(out)[-1]
    assert last["eval/rewards/accuracy"] > 0.9
    assert last["eval/rewards/margin"] > 0
    assert {"eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "rewards/accuracy"} <= set(last)
    assert metrics(out)[-1]["loss"] < metrics(out)[0]["loss"]


def test_reward_model_learns_the_opposite_preference_too(tiny_model_dir, jsonl, tmp_path):
    """An untrained head orders every pair the same way; only learning separates both directions."""
    flip = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in pairs(0, 64)]
    run_rm(
        tiny_model_dir,
        jsonl(flip[:48]),
        tmp_path,
        f"data.eval=[{jsonl(flip[48:], 'eval.jsonl')}]",
        "train.max_steps=15",
    )
    assert metrics(tmp_path)[-1]["eval/rewards/accuracy"] > 0.9


def test_final_dir_is_a_peft_adapter_plus_score_head(trained, tiny_model_dir):
    final, _, _ = trained
    assert (final / "adapter_config.json").is_file() and (final / "tokenizer_config.json").is_file()
    meta = json.loads((final / "score_head.json").read_text())
    assert meta["eval_accuracy"] > 0.9 and meta["stats_on"] == "eval" and meta["pairs"] == 16
    assert meta["base_model"] == str(Path(tiny_model_dir)) and meta["reward_std"] > 0
    assert {"reward_mean", "reward_std", "eval_accuracy", "base_model"} <= set(meta)
    assert (final / "score_head.safetensors").is_file()


def test_load_reward_model_scores_like_training(trained):
    import torch

    from chatforge.reward import load_reward_model, score_texts

    final, _, held = trained
    model, tok, meta = load_reward_model(final, device="cpu")
    records = [json.loads(line) for line in held.read_text().splitlines()]
    prompts = [r["prompt"] for r in records] * 2
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    scores = torch.tensor(score_texts(model, tok, prompts, responses, batch_size=5))
    n = len(records)
    assert (scores[:n] > scores[n:]).float().mean() == pytest.approx(meta["eval_accuracy"])
    assert float(scores.mean()) == pytest.approx(meta["reward_mean"], rel=1e-4, abs=1e-4)
    as_messages = score_texts(model, tok, [[{"role": "user", "content": prompts[0]}]], [responses[0]])
    assert as_messages[0] == pytest.approx(float(scores[0]), abs=1e-5)


def test_score_cli_prints_and_writes_jsonl(trained, jsonl, capsys, tmp_path):
    final, _, _ = trained
    data = jsonl(
        [
            {"prompt": "Tell me about fox and sea.", "response": "sea fox yes"},
            {
                "messages": [
                    {"role": "user", "content": "Tell me about dog."},
                    {"role": "assistant", "content": "dog no"},
                ]
            },
            pairs(0, 1)[0],
        ]
    )
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(final), data, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert len(lines) == 3 and len(lines[2].split("\t")) == 2
    assert "4 responses scored" in printed.err and "1/1 pairs" in printed.err
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert float(lines[0]) == pytest.approx(written[0]["score"], abs=1e-4)
    assert written[0]["response"] == "sea fox yes" and "score" in written[1]
    assert written[2]["chosen_score"] > written[2]["rejected_score"]


def test_export_rm_loads_as_a_transformers_sequence_classifier(trained, tmp_path, capsys):
    """AutoModelForSequenceClassification on the export gives chatforge's scores minus the head's
    bias, with right padding by the exported tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from chatforge.data.collate import pad_batch
    from chatforge.data.templates import tokenize_prompt_response
    from chatforge.reward import load_reward_model, score_texts

    final, _, held = trained
    out = tmp_path / "seqcls"
    assert main(["export-rm", str(final), str(out)]) == 0
    assert "sequence classifier written" in capsys.readouterr().out
    model, tok, meta = load_reward_model(final, device="cpu")
    records = [json.loads(line) for line in held.read_text().splitlines()]
    prompts, responses = [r["prompt"] for r in records], [r["chosen"] for r in records]
    ours = torch.tensor(score_texts(model, tok, prompts, responses))
    seq = AutoModelForSequenceClassification.from_pretrained(out).eval()
    seq_tok = AutoTokenizer.from_pretrained(out)
    rows = [
        {
            "input_ids": tokenize_prompt_response(
                seq_tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": r}], 512
            )[0]
        }
        for p, r in zip(prompts, responses)
    ]
    batch = pad_batch(rows, pad_id=seq_tok.pad_token_id)
    with torch.no_grad():
        theirs = seq(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    saved = json.loads((out / "chatforge_reward.json").read_text())
    torch.testing.assert_close(theirs, ours - saved["score_bias_dropped"], atol=1e-4, rtol=1e-4)
    assert saved["reward_mean"] == pytest.approx(meta["reward_mean"] - saved["score_bias_dropped"])


def test_export_pads_with_a_token_that_does_not_end_responses(tokenizer):
    import copy

    from chatforge.reward import spare_pad_token

    assert spare_pad_token(tokenizer) == tokenizer.pad_token_id  # <|pad|>: ends nothing
    same_as_eos = copy.deepcopy(tokenizer)
    same_as_eos.pad_token = same_as_eos.eos_token  # as SmolLM2 ships: pad = <|im_end|>
    pad = spare_pad_token(same_as_eos)
    assert pad not in (same_as_eos.eos_token_id, same_as_eos.convert_tokens_to_ids("<|im_start|>"))
    assert same_as_eos.convert_ids_to_tokens(pad) in ("<|endoftext|>", "<|pad|>")


def test_score_cli_bad_record_names_file_and_line(trained, jsonl, capsys):
    final, _, _ = trained
    data = jsonl([{"prompt": "hi", "response": "yes"}, {"prompt": "hi"}])
    assert main(["score", str(final), data]) == 2
    assert f"{data}:2: completion is missing" in capsys.readouterr().err


def test_full_finetune_reward_model_saves_a_model_dir(tiny_model_dir, jsonl, tmp_path):
    from chatforge.reward import load_reward_model, score_texts

    final = Path(
        run_rm(
            tiny_model_dir,
            jsonl(pairs(0, 8)),
            tmp_path,
            "peft.method=none",
            "train.max_steps=2",
            "train.lr=1e-3",
        )
    )
    assert (final / "config.json").is_file() and (final / "score_head.safetensors").is_file()
    meta = json.loads((final / "score_head.json").read_text())
    assert meta["stats_on"] == "train" and meta["peft_method"] == "none"
    model, tok, _ = load_reward_model(final, device="cpu")
    assert len(score_texts(model, tok, ["hi"], ["there"])) == 1


def test_shared_prompt_rows_train_like_separate_rows(tiny_model_dir, jsonl, tmp_path):
    data = jsonl(pairs(0, 16))
    # centring gives the head's bias a gradient: without it the bias gets float noise, which Adam
    # turns into lr-sized steps that shift every reward (margins and accuracy are unaffected)
    common = ("train.max_steps=3", "rm.center_coef=0.01", "data.pad_to_multiple_of=1")
    run_rm(tiny_model_dir, data, tmp_path / "shared", *common, "data.share_prompt=on")
    run_rm(tiny_model_dir, data, tmp_path / "rows", *common, "data.share_prompt=off")
    for x, y in zip(metrics(tmp_path / "shared"), metrics(tmp_path / "rows"), strict=True):
        for key in ("loss", "rewards/margin", "rewards/chosen"):  # 2e-5 apart by step 3 on AVX-512
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    head = [json.loads((tmp_path / r / "final" / "score_head.json").read_text()) for r in ("shared", "rows")]
    assert head[0]["reward_mean"] == pytest.approx(head[1]["reward_mean"], abs=1e-4)


def test_resume_equals_uninterrupted(tiny_model_dir, jsonl, tmp_path):
    data = jsonl(pairs(0, 16))
    check_resume_is_exact(partial(run_rm, tiny_model_dir, data), tmp_path, ("loss", "rewards/margin"))
    a = json.loads((tmp_path / "full" / "final" / "score_head.json").read_text())
    b = json.loads((tmp_path / "part" / "final" / "score_head.json").read_text())
    assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-5, abs=1e-6)


def test_two_process_ddp_matches_one_process(tiny_model_dir, jsonl, tmp_path):
    data = jsonl(pairs(0, 24))

    def args(out, processes):  # the same global batch of 4 pairs
        extra = ("train.warmup_ratio=0", "train.lr=2e-2", "train.max_steps=3", "rm.center_coef=0.01")
        return tiny_run_args(tiny_model_dir, data, out, *extra, f"train.batch_size={4 // processes}")

    a, b = one_and_two_processes("rm", args, tmp_path)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "rewards/margin", "rewards/accuracy", "rewards/chosen"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)


def test_rendered_text_scores_the_same_with_the_templates_trailing_newline(trained, tmp_path):
    """apply_chat_template(..., tokenize=False) ends with a newline after the end-of-turn token;
    scoring it must read the score at that token, as training does, not one token late."""
    import torch

    from chatforge.reward import load_reward_model, render_for_scoring, score_rendered, score_texts

    final, _, held = trained
    model, tok, _ = load_reward_model(final, device="cpu")
    records = [json.loads(line) for line in held.read_text().splitlines()][:4]
    chats = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
        for r in records
    ]
    raw = [tok.apply_chat_template(c, tokenize=False) for c in chats]
    assert all(t.endswith("\n") for t in raw)
    with_newline = torch.tensor(score_rendered(model, tok, raw))
    stripped = torch.tensor(score_rendered(model, tok, [render_for_scoring(tok, c) for c in chats]))
    trained_way = torch.tensor(
        score_texts(model, tok, [r["prompt"] for r in records], [r["chosen"] for r in records])
    )
    torch.testing.assert_close(with_newline, stripped)
    torch.testing.assert_close(with_newline, trained_way, atol=1e-5, rtol=1e-5)
    out = tmp_path / "seqcls"
    assert main(["export-rm", str(final), str(out)]) == 0
    assert (
        "strip trailing whitespace"
        in json.loads((out / "chatforge_reward.json").read_text())["input_rendering"]
    )
    assert "strip trailing whitespace" in (out / "README.md").read_text()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_scoring_runs_a_shared_head_once_with_the_scores_of_whole_rows(tokenizer, arch):
    import torch

    from chatforge.models.heads import ScalarHeadModel
    from chatforge.models.tiny import tiny_model
    from chatforge.reward import score_rendered

    model = ScalarHeadModel(tiny_model(arch, tokenizer, seed=2)).eval()
    head = "system: You are a helpful assistant, answer briefly. user: "
    texts = [head + t for t in ("add 2 and 3 assistant: 5", "say hi assistant: hello there", "hi")]
    fed = []
    hook = model.lm.get_input_embeddings().register_forward_hook(lambda m, a, o: fed.append(a[0].shape))
    got = score_rendered(model, tokenizer, texts, batch_size=3)
    hook.remove()
    alone = []
    for t in texts:
        ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            alone.append(float(model.score(ids, torch.ones_like(ids))))
    assert got == pytest.approx(alone, rel=1e-4, abs=1e-5)
    assert fed[0][0] == 1 and fed[1][0] == 3  # the head alone once, then the three rows' rest
