"""The bf16 decoding kernel (`models.gemv`): its arithmetic bit for bit, rows independent of their
batch, `F.linear` up to one bf16 step on rare outputs, and what `models.packed` does with it."""

import pytest
import torch

from chatforge.models import gemv
from chatforge.models.packed import packed_linears
from chatforge.models.tiny import tiny_model
from chatforge.rl.generate import generate, left_pad
from test_engine import TEXTS, transformers_greedy

pytestmark = pytest.mark.skipif(
    gemv.library() is None, reason="needs a CPU with AVX512-BF16 and a C compiler"
)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("n, k, bias", [(64, 96, False), (48, 32, True), (16, 2, False)])
def test_the_kernel_computes_its_stated_sums_bit_for_bit(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * n + k)
    weight = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    x = torch.randn(2, rows, k, generator=g).bfloat16()
    got = gemv.linear(x, gemv.pack(weight, b))
    assert got.shape == (2, rows, n)
    assert torch.equal(_bits(got), _bits(gemv.emulate(x, weight, b)))
    wide = torch.randn(rows, 2 * k + 1, generator=g).bfloat16()[:, 1 : k + 1]  # strided, odd offset
    assert torch.equal(_bits(gemv.linear(wide, gemv.pack(weight, b))), _bits(gemv.emulate(wide, weight, b)))


def test_a_row_gives_the_same_bits_alone_as_in_any_batch():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 128, generator=g).bfloat16(), torch.randn(13, 128, generator=g).bfloat16()
    packed = gemv.pack(weight)
    batch = gemv.linear(x, packed)
    for r in (0, 7, 12):
        assert torch.equal(_bits(gemv.linear(x[r : r + 1], packed)), _bits(batch[r : r + 1]))
    torch.set_num_threads(1)
    try:
        assert torch.equal(_bits(gemv.linear(x, packed)), _bits(batch))  # nor on the thread count
    finally:
        torch.set_num_threads(2)


def test_it_matches_f_linear_but_for_rare_last_bit_roundings():
    g = torch.Generator().manual_seed(1)
    weight, x = torch.randn(2048, 576, generator=g).bfloat16(), torch.randn(8, 576, generator=g).bfloat16()
    got, want = gemv.linear(x, gemv.pack(weight)), torch.nn.functional.linear(x, weight)
    differ = _bits(got) != _bits(want)
    assert differ.float().mean() < 1e-3
    near = want.float()[differ]
    step = torch.ldexp(torch.ones_like(near), torch.frexp(near)[1] - 8)  # one bf16 step there
    assert bool(((got.float() - want.float())[differ].abs() <= step).all())


def test_no_kernel_where_switched_off_or_without_a_compiler(monkeypatch):
    monkeypatch.setenv("CHATFORGE_GEMV", "0")
    gemv.library.cache_clear()
    try:
        assert gemv.library() is None
        monkeypatch.setenv("CHATFORGE_GEMV", "1")
        monkeypatch.setenv("CC", "no-such-compiler")
        gemv.library.cache_clear()
        assert gemv.library() is None  # callers then use oneDNN
    finally:
        monkeypatch.undo()
        gemv.library.cache_clear()
    assert gemv.library() is not None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_layers_use_the_kernel_and_keep_transformers_greedy_tokens(tokenizer, arch, monkeypatch):
    calls = []
    kernel = gemv.linear
    monkeypatch.setattr(
        gemv, "linear", lambda x, packed: calls.append(packed.out_features) or kernel(x, packed)
    )
    lm = tiny_model(arch, tokenizer, seed=6).to(torch.bfloat16).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    want = transformers_greedy(lm, prompts, 8, [-1], tokenizer.pad_token_id)
    with torch.no_grad():
        plain = lm(input_ids=ids, attention_mask=mask).logits
        with packed_linears(lm):
            packed = lm(input_ids=ids, attention_mask=mask).logits
    layers = len(lm.model.layers)
    attention, mlp = lm.model.layers[0].self_attn, lm.model.layers[0].mlp
    qkv = attention.q_proj.out_features + 2 * attention.k_proj.out_features
    assert (
        calls.count(qkv) == layers and calls.count(2 * mlp.up_proj.out_features) == layers
    )  # one product each
    assert (attention.q_proj.bias is not None) == (arch == "qwen2")  # with and without a bias
    torch.testing.assert_close(packed, plain, atol=0.05, rtol=0.02)  # bf16 logits, a few last bits apart
    got = generate(lm, tokenizer, prompts, max_new_tokens=8, greedy=True)
    assert [row[m.bool()].tolist() for row, m in zip(got.response_ids, got.response_mask)] == want
