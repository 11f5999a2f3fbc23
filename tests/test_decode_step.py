"""A Llama-shaped model's decoding step without transformers' glue (`models.decode_step`): the
model's own logits bit for bit over several steps, with left padding, in float32 and bf16 on torch's
kernels; in bf16 with `models.kernels`, its fused norms, rotary embedding and SiLU gate close to
them and transformers' greedy tokens; models it does not restate are left to their forward."""

import contextlib

import pytest
import torch

from chatforge.models.attention import decode_attention
from chatforge.models.decode_step import _side_by_side, covers, step_fn
from chatforge.models.packed import packed_linears
from chatforge.models.tiny import tiny_model
from chatforge.rl.engine import Rows
from test_engine import TEXTS


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "packed"])
def test_the_step_gives_the_models_own_logits(tokenizer, arch, dtype, torch_kernels):
    packed = dtype == "packed"  # bf16 with models.packed's layers (q, k, v in one product) where it can
    lm = tiny_model(arch, tokenizer, seed=7).to(torch.bfloat16 if packed else dtype).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]  # left padding: a mask in every step
    layers = packed_linears(lm) if packed else contextlib.nullcontext()
    with torch.no_grad(), decode_attention(lm), layers:
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


def test_side_by_side_views_adjacent_blocks_and_copies_others():
    out = torch.arange(2 * 10.0).view(2, 1, 10)  # one product's output: q | k | v per row
    q, k, v = out.split([4, 3, 3], -1)
    joined = _side_by_side(q, k)
    assert torch.equal(joined, out[..., :7]) and joined.data_ptr() == out.data_ptr()  # a view
    apart = _side_by_side(q, v)  # not adjacent: a copy of the two
    assert torch.equal(apart, torch.cat([q, v], -1)) and apart.data_ptr() != out.data_ptr()
    assert torch.equal(_side_by_side(q.clone(), k.clone()), joined)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_fused_bf16_step_stays_with_the_models_logits_and_greedy_tokens(tokenizer, arch, monkeypatch):
    from chatforge.models import kernels
    from chatforge.rl.engine import Sampling, decode
    from test_engine import transformers_greedy

    if kernels.library() is None:
        pytest.skip("needs a CPU with AVX512-BF16 and a C compiler")
    calls = []
    silu_mul = kernels.silu_mul
    monkeypatch.setattr(kernels, "silu_mul", lambda x: calls.append(x.shape) or silu_mul(x))
    # head_dim 32: the fused rotary embedding takes halves of 16
    lm = tiny_model(arch, tokenizer, seed=7, num_attention_heads=2, num_key_value_heads=1).to(torch.bfloat16)
    lm.eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    with torch.no_grad(), decode_attention(lm), packed_linears(lm):
        ours = Rows.prefill(lm, prompts, capacity=64)
        theirs = Rows.prefill(lm, prompts, capacity=64)
        theirs._step = None  # the model's own forward
        tokens = ours.logits.argmax(-1)
        for _ in range(6):
            got, want = ours.step(tokens), theirs.step(tokens)
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)  # bf16 logits, rare last bits apart
            tokens = want.argmax(-1)
    assert len(calls) == 6 * lm.config.num_hidden_layers  # every layer of every step took the fused path
    with decode_attention(lm):
        want = transformers_greedy(lm, prompts, 10, [-1], tokenizer.pad_token_id)
    with torch.no_grad(), decode_attention(lm):
        got, _ = decode(lm, prompts, 10, [-1], Sampling(greedy=True))
    assert got == want
