"""A Llama-shaped model's decoding step without transformers' glue (`models.decode_step`): the
model's own logits bit for bit over several steps, with left padding, in float32 and bf16; models
it does not restate are left to their forward."""

import pytest
import torch

from chatforge.models.attention import decode_attention
from chatforge.models.decode_step import covers, step_fn
from chatforge.models.tiny import tiny_model
from chatforge.rl.engine import Rows
from test_engine import TEXTS


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_gives_the_models_own_logits(tokenizer, arch, dtype):
    lm = tiny_model(arch, tokenizer, seed=7).to(dtype).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]  # left padding: a mask in every step
    with torch.no_grad(), decode_attention(lm):
        ours = Rows.prefill(lm, prompts, capacity=64)
        theirs = Rows.prefill(lm, prompts, capacity=64)
        assert ours._step is not None
        theirs._step = None  # the model's own forward
        tokens = ours.logits.argmax(-1)
        for _ in range(6):
            got, want = ours.step(tokens), theirs.step(tokens)
            assert torch.equal(got, want)
            tokens = got.argmax(-1)
        # rows leaving the batch (no padding left in one of them) keep it exact
        wanted = torch.tensor([True, False, True, False, False])
        ours.keep(wanted), theirs.keep(wanted)
        assert torch.equal(ours.step(tokens[wanted]), theirs.step(tokens[wanted]))


def test_models_it_does_not_restate_run_their_own_forward(tokenizer):
    for arch in ("gpt2", "opt"):
        assert step_fn(tiny_model(arch, tokenizer, seed=1)) is None
    lm = tiny_model("qwen2", tokenizer, seed=1)
    assert covers(lm)
    lm.model.layers[0].self_attn.sliding_window = 16  # a sliding-window layer masks otherwise
    assert not covers(lm)
    eager = tiny_model("llama", tokenizer, seed=1)
    eager.config._attn_implementation_internal = "eager"  # an additive mask, not sdpa's
    assert not covers(eager)
