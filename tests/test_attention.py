"""A decoding step's attention through `models.kernels` or the fast side of torch's CPU flash kernel
(`models.attention`): transformers' sdpa bits in bf16 on torch's kernel (grouped heads or not, padding masks, scaling), prefill and float32
left to sdpa, the model's switch undone on exit, and the engine using it at every decoding step of
four architectures with transformers' greedy tokens."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chatforge.models import attention
from chatforge.models.attention import NAME, applies, decode_attention, one_token_attention
from chatforge.models.tiny import tiny_model
from chatforge.rl.engine import Sampling, decode
from test_engine import TEXTS, transformers_greedy


class Heads(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def qkv(batch=3, heads=6, kv_heads=2, q_len=1, length=7, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_one_token_attention_is_sdpas_attention_in_bf16(heads, kv_heads, mask_kind, torch_kernels):
    q, k, v = (x.to(torch.bfloat16) for x in qkv(heads=heads, kv_heads=kv_heads, length=40, dim=16))
    mask = None
    if mask_kind != "none":
        attend = torch.ones(3, 1, 1, 40, dtype=torch.bool)
        attend[1, ..., :3] = False  # a left-padded row
        attend[2, ..., :1] = False
        mask = attend if mask_kind == "bool" else torch.zeros(attend.shape).masked_fill(~attend, -1e9)
        mask = mask.to(torch.bfloat16) if mask_kind == "additive" else mask
    module = Heads(heads // kv_heads)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    got, weights = one_token_attention(module, q, k, v, mask, scaling=0.3)
    assert weights is None and got.shape == want.shape == (3, 1, heads, 16)
    # the same kernel and arithmetic: equal but for a rare last-bit rounding
    torch.testing.assert_close(got, want, atol=1e-6, rtol=2**-7)
    assert (got != want).float().mean() <= 0.01
    # the padding matters: the same query against an unmasked cache gives another answer
    if mask is not None:
        assert not torch.equal(got, one_token_attention(module, q, k, v, None, scaling=0.3)[0])


@pytest.mark.parametrize("q_len, dtype", [(4, torch.bfloat16), (1, torch.float32)])
def test_prefill_and_float32_are_left_to_sdpa(q_len, dtype, monkeypatch):
    from transformers.integrations import sdpa_attention

    q, k, v = (x.to(dtype) for x in qkv(q_len=q_len))
    calls = []
    monkeypatch.setattr(
        sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(a[1].shape) or "sdpa"
    )
    assert one_token_attention(Heads(3), q, k, v, None, scaling=0.5, is_causal=True) == "sdpa"
    assert calls == [q.shape]


def test_the_switch_is_undone_on_exit_and_skips_models_it_does_not_cover(tokenizer):
    lm = tiny_model("llama", tokenizer, seed=1).eval()
    assert applies(lm) and lm.config._attn_implementation == "sdpa"
    with decode_attention(lm):
        assert lm.config._attn_implementation == NAME
        with decode_attention(lm):  # nested: nothing more
            pass
        assert lm.config._attn_implementation == NAME
    assert lm.config._attn_implementation == "sdpa"
    eager = tiny_model("llama", tokenizer, seed=1)
    eager.config._attn_implementation_internal = "eager"
    with decode_attention(eager):
        assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_the_engine_decodes_bf16_with_one_token_attention_at_every_step(tokenizer, arch, monkeypatch):
    lm = tiny_model(arch, tokenizer, seed=5).to(torch.bfloat16).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]  # left padding, a repeated prompt
    with decode_attention(lm):  # the same attention: a last-bit rounding could flip a near tie
        want = transformers_greedy(lm, prompts, 10, [-1], tokenizer.pad_token_id)
    steps = []

    def counted(module, query, *args, **kwargs):
        steps.append(query.shape[2])
        return one_token_attention(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "one_token_attention", counted)
    with torch.no_grad(), decode_attention(lm):
        got, _ = decode(lm, prompts, 10, [-1], Sampling(greedy=True))
    assert steps.count(1) == 9 * lm.config.num_hidden_layers  # every decoding step of every layer
    assert got == want


def test_one_token_attention_runs_the_kernel_where_it_can(monkeypatch):
    from chatforge.models import kernels

    if kernels.library() is None:
        pytest.skip("needs a CPU with AVX512-BF16 and a C compiler")
    calls = []
    monkeypatch.setattr(
        kernels, "attention", lambda *a: calls.append(a[0].shape) or kernels.emulate_attention(*a)
    )
    q, k, v = (x.to(torch.bfloat16) for x in qkv(heads=6, kv_heads=2, length=40, dim=16))
    got, _ = one_token_attention(Heads(3), q, k, v, None, scaling=0.3)
    assert calls == [q.shape] and torch.equal(got, kernels.emulate_attention(q, k, v, None, 0.3))
