"""The bf16 decoding kernels (`models.kernels`): the linear layers' arithmetic bit for bit, rows
independent of their batch, `F.linear` up to one bf16 step on rare outputs; one token's attention as
the float32 softmax rounded once (closer to exact than torch's); what `models.packed` and
`models.attention` do with them."""

import pytest
import torch

from chatforge.models import kernels
from chatforge.models.attention import decode_attention
from chatforge.models.packed import packed_linears
from chatforge.models.tiny import tiny_model
from chatforge.rl.generate import generate, left_pad
from test_engine import TEXTS, transformers_greedy

pytestmark = pytest.mark.skipif(
    kernels.library() is None, reason="needs a CPU with AVX512-BF16 and a C compiler"
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
    got = kernels.linear(x, kernels.pack(weight, b))
    assert got.shape == (2, rows, n)
    assert torch.equal(_bits(got), _bits(kernels.emulate_linear(x, weight, b)))
    wide = torch.randn(rows, 2 * k + 1, generator=g).bfloat16()[:, 1 : k + 1]  # strided, odd offset
    assert torch.equal(
        _bits(kernels.linear(wide, kernels.pack(weight, b))), _bits(kernels.emulate_linear(wide, weight, b))
    )


def test_a_row_gives_the_same_bits_alone_as_in_any_batch():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(96, 128, generator=g).bfloat16(), torch.randn(13, 128, generator=g).bfloat16()
    packed = kernels.pack(weight)
    batch = kernels.linear(x, packed)
    for r in (0, 7, 12):
        assert torch.equal(_bits(kernels.linear(x[r : r + 1], packed)), _bits(batch[r : r + 1]))
    torch.set_num_threads(1)
    try:
        assert torch.equal(_bits(kernels.linear(x, packed)), _bits(batch))  # nor on the thread count
    finally:
        torch.set_num_threads(2)


def test_it_matches_f_linear_but_for_rare_last_bit_roundings():
    g = torch.Generator().manual_seed(1)
    weight, x = torch.randn(2048, 576, generator=g).bfloat16(), torch.randn(8, 576, generator=g).bfloat16()
    got, want = kernels.linear(x, kernels.pack(weight)), torch.nn.functional.linear(x, weight)
    differ = _bits(got) != _bits(want)
    assert differ.float().mean() < 1e-3
    near = want.float()[differ]
    step = torch.ldexp(torch.ones_like(near), torch.frexp(near)[1] - 8)  # one bf16 step there
    assert bool(((got.float() - want.float())[differ].abs() <= step).all())


def test_no_kernel_where_switched_off_or_without_a_compiler(monkeypatch):
    monkeypatch.setenv("CHATFORGE_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        monkeypatch.setenv("CHATFORGE_KERNELS", "1")
        monkeypatch.setenv("CC", "no-such-compiler")
        kernels.library.cache_clear()
        assert kernels.library() is None  # callers then use oneDNN
    finally:
        monkeypatch.undo()
        kernels.library.cache_clear()
    assert kernels.library() is not None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_layers_use_the_kernel_and_keep_transformers_greedy_tokens(tokenizer, arch, monkeypatch):
    calls = []
    kernel = kernels.linear
    monkeypatch.setattr(
        kernels, "linear", lambda x, packed: calls.append(packed.out_features) or kernel(x, packed)
    )
    lm = tiny_model(arch, tokenizer, seed=6).to(torch.bfloat16).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with decode_attention(
        lm
    ):  # transformers with the same attention function (the kernel at a decoding step)
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


def _attention_inputs(rows, heads, kv_heads, length, dim, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    # keys and values as views of longer cache buffers, the query a transposed view: as decoding passes them
    k = torch.randn(rows, kv_heads, length + 7, dim, generator=g).bfloat16()[:, :, :length]
    v = torch.randn(rows, kv_heads, length + 7, dim, generator=g).bfloat16()[:, :, :length]
    q = torch.randn(rows, 1, heads, dim, generator=g).bfloat16().transpose(1, 2)
    keep = None
    if masked:  # left padding in some rows
        mask = torch.ones(rows, length, dtype=torch.bool)
        for r in range(0, rows, 2):
            mask[r, : (r + 3) % length] = False
        keep = mask[:, None, None, :]
    return q, k, v, keep


@pytest.mark.parametrize(
    "rows, heads, kv_heads, length, dim, masked",
    [
        (8, 9, 3, 110, 64, False),
        (8, 9, 3, 110, 64, True),
        (5, 4, 4, 37, 32, True),
        (3, 18, 1, 20, 16, True),
        (1, 6, 2, 1, 48, False),
    ],
)
def test_one_token_attention_is_the_float32_softmax_rounded_once(rows, heads, kv_heads, length, dim, masked):
    q, k, v, keep = _attention_inputs(rows, heads, kv_heads, length, dim, masked)
    got = kernels.attention(q, k, v, keep, dim**-0.5)
    want = kernels.emulate_attention(q, k, v, keep, dim**-0.5)
    assert got.shape == (rows, 1, heads, dim)
    differ = _bits(got) != _bits(want)  # float32 sums in another order: rare last-bit roundings
    assert differ.float().mean() < 2e-3
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-7


def test_one_token_attention_is_closer_to_exact_than_torchs_and_batch_invariant():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, keep = _attention_inputs(8, 9, 3, 110, 64, True)
    exact = kernels.emulate_attention(q.double(), k.double(), v.double(), keep, 64**-0.5).double()
    got = kernels.attention(q, k, v, keep, 64**-0.5)
    module = type("Attention", (), {"num_key_value_groups": 3, "is_causal": False})()
    torch_out, _ = sdpa_attention_forward(module, q, k, v, keep, scaling=64**-0.5, is_causal=False)
    assert (got.double() - exact).abs().mean() < (torch_out.double() - exact).abs().mean()
    for r in (0, 3, 7):  # a row's output alone, bit for bit as in the batch
        alone = kernels.attention(q[r : r + 1], k[r : r + 1], v[r : r + 1], keep[r : r + 1], 64**-0.5)
        assert torch.equal(_bits(alone), _bits(got[r : r + 1]))


def test_inputs_the_attention_kernel_does_not_take_go_to_torch():
    q, k, v, _ = _attention_inputs(2, 4, 2, 9, 64, False)
    additive = torch.zeros(2, 1, 1, 9, dtype=torch.bfloat16)
    assert kernels.attention(q, k, v, additive, 0.125) is None  # an additive mask
    assert kernels.attention(q.float(), k.float(), v.float(), None, 0.125) is None  # float32
    assert (
        kernels.attention(q[..., :40], k[..., :40], v[..., :40], None, 0.125) is None
    )  # dim not a multiple of 16
    two = torch.cat([q, q], 2)
    assert kernels.attention(two, k, v, None, 0.125) is None  # more than one query token


def test_the_fused_layer_steps_round_as_torchs_bf16_operations():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

    g = torch.Generator().manual_seed(3)
    h, y = (torch.randn(8, 1, 576, generator=g).bfloat16() for _ in range(2))
    norm = LlamaRMSNorm(576, eps=1e-5).bfloat16()
    norm.weight.data = torch.randn(576, generator=g).bfloat16()
    summed = h.clone()
    normed = kernels.add_rms_norm(summed, y, norm.weight, 1e-5)
    assert torch.equal(summed, h + y)  # the residual add, in place, exactly torch's
    want = norm(h + y)
    assert (normed != want).float().mean() < 1e-3  # the mean of squares in its own order: rare last bits
    torch.testing.assert_close(normed, want, atol=0, rtol=2**-7)
    assert torch.equal(
        kernels.add_rms_norm(h.clone(), None, norm.weight, 1e-5).float(),
        kernels.add_rms_norm(h.clone(), torch.zeros_like(h), norm.weight, 1e-5).float(),
    )

    gate_up = torch.randn(8, 1, 2 * 1536, generator=g).bfloat16() * 4
    want = torch.nn.functional.silu(gate_up[..., :1536]) * gate_up[..., 1536:]
    got = kernels.silu_mul(gate_up)
    assert (got != want).float().mean() < 1e-3
    torch.testing.assert_close(got, want, atol=0, rtol=2**-7)

    qk = torch.randn(8, 1, 12, 64, generator=g).bfloat16()
    cos, sin = (torch.randn(8, 1, 64, generator=g).bfloat16() for _ in range(2))
    want = qk * cos[:, :, None] + rotate_half(qk) * sin[:, :, None]  # transformers' apply_rotary_pos_emb
    kernels.rotary(qk, cos, sin)
    assert torch.equal(qk, want)
