"""The decoding engine (`rl.engine`): greedy parity with transformers' `generate` on four
architectures, with and without shared prompts; the law of sampled tokens; stops, length limits,
left padding; the step-wise API a batching scheduler drives (keep, join)."""

import math

import pytest
import torch

from chatforge.data.collate import shared_prefix_length
from chatforge.models.attention import decode_attention
from chatforge.models.packed import can_pack, packed_linears
from chatforge.models.tiny import tiny_model
from chatforge.rl.engine import Rows, Sampling, decode, pick_tokens
from chatforge.rl.generate import generate, left_pad

TEXTS = ("hello world", "What is two plus three? The answer", "hi", "hello world", "The quick brown fox")


def transformers_greedy(lm, prompts, max_new_tokens, stops, pad_id):
    """Each row's tokens up to and including its first stop, from transformers' `generate`."""
    ids, mask = left_pad(prompts, pad_id)
    with torch.no_grad():
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad_id,
            do_sample=False,
        )
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:end])
    return rows


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_greedy_tokens_match_transformers_with_shared_prompts_stops_and_left_padding(tokenizer, arch):
    lm = tiny_model(arch, tokenizer, seed=3).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]  # rows 0 and 3 share a prompt
    free = transformers_greedy(lm, prompts, 10, [-1], tokenizer.pad_token_id)
    stops = [free[1][2], free[4][5]]  # tokens the model does produce: some rows stop early
    want = transformers_greedy(lm, prompts, 10, stops, tokenizer.pad_token_id)
    assert len({len(r) for r in want}) > 1  # rows end at different steps
    with torch.no_grad():
        got, stopped = decode(lm, prompts, 10, stops, Sampling(greedy=True))
        alone = [decode(lm, [p], 10, stops, Sampling(greedy=True))[0][0] for p in prompts]
    assert got == want and alone == want
    assert stopped == [r[-1] in stops for r in want]


HEAD = "system: You are a helpful assistant, answer briefly. user: "


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_a_head_every_prompt_shares_is_prefilled_once_with_transformers_tokens(tokenizer, arch):
    lm = tiny_model(arch, tokenizer, seed=4).eval()
    prompts = [tokenizer(HEAD + t)["input_ids"] for t in TEXTS]
    shared = shared_prefix_length(prompts)
    assert shared >= 8
    want = transformers_greedy(lm, prompts, 8, [-1], tokenizer.pad_token_id)
    fed = []  # tokens the model is fed, per forward call
    hook = lm.get_input_embeddings().register_forward_hook(lambda m, args, out: fed.append(args[0].shape))
    with torch.no_grad():
        got, _ = decode(lm, prompts, 8, [-1], Sampling(greedy=True))
    hook.remove()
    assert got == want
    distinct = {tuple(p) for p in prompts}
    # the head once (1 x shared), then each distinct prompt's rest: fewer than the prompts' tokens
    assert fed[0] == (1, shared) and fed[1][0] == len(distinct)
    assert fed[1][1] == max(len(p) for p in distinct) - shared


def test_generate_runs_on_the_engine_and_gives_transformers_outputs(tokenizer):
    lm = tiny_model("llama", tokenizer, seed=5)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    ours = generate(lm, tokenizer, prompts, max_new_tokens=7, greedy=True)
    theirs = generate(lm, tokenizer, prompts, max_new_tokens=7, greedy=True, engine=False)
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "stopped"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert ours.texts == theirs.texts


def test_cache_buffers_grow_when_a_row_outlives_their_capacity(tokenizer):
    lm = tiny_model("llama", tokenizer, seed=3).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    want = transformers_greedy(lm, prompts, 9, [-1], tokenizer.pad_token_id)
    with torch.no_grad():
        rows = Rows.prefill(lm, prompts, capacity=1)  # smaller than the prompts: grows at once
        got = [[] for _ in prompts]
        for _ in range(9):
            tokens = pick_tokens(rows.logits, Sampling(greedy=True))
            for r, t in zip(rows.rows.tolist(), tokens.tolist()):
                got[r].append(t)
            rows.step(tokens)
    assert got == want


def chi2_quantile(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: the 0.999 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 12, 0.9)])
def test_first_tokens_follow_the_tempered_cut_softmax(tokenizer, temperature, top_k, top_p):
    lm = tiny_model("llama", tokenizer, seed=2).eval()
    prompt = tokenizer("hello world")["input_ids"]
    n = 6000
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(0)
    with torch.no_grad():
        tokens, _ = decode(lm, [prompt] * n, 1, [], sampling)  # one prefill shared by n rows
        logits = lm(torch.tensor([prompt])).logits[0, -1].float()
    p = torch.softmax(sampling.warp(logits[None]), -1)[0].double()
    counts = torch.bincount(torch.tensor([t[0] for t in tokens]), minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0  # cut tokens are never drawn
    big = p * n >= 5
    expected = torch.cat([p[big] * n, (p[~big].sum() * n).view(1)])
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    assert df >= 5 and stat < chi2_quantile(df), (stat, df)


def test_row_seeds_draws_do_not_depend_on_the_other_rows(tokenizer):
    lm = tiny_model("llama", tokenizer, seed=1).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    with torch.no_grad():
        whole, _ = decode(lm, prompts, 6, [], Sampling(), row_seeds=[1, 2, 3, 4, 5])
        part, _ = decode(lm, prompts[3:], 6, [], Sampling(), row_seeds=[4, 5])
    assert whole[3:] == part and whole[0] != whole[3]  # same prompt, own seeds: own answers


def test_max_new_tokens_caps_every_row(tokenizer):
    lm = tiny_model("gpt2", tokenizer, seed=4).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    with torch.no_grad():
        got, stopped = decode(lm, prompts, 3, [], Sampling())
        one, _ = decode(lm, prompts, 1, [], Sampling(greedy=True))
    assert [len(r) for r in got] == [3] * 5 and not any(stopped)
    assert [len(r) for r in one] == [1] * 5


def test_rows_joined_or_dropped_mid_decode_continue_as_if_alone(tokenizer):
    # what a batching scheduler does: new requests join a running batch, finished ones leave
    lm = tiny_model("qwen2", tokenizer, seed=6).eval()
    a, b, c = (tokenizer(t)["input_ids"] for t in TEXTS[1:4])
    want = transformers_greedy(lm, [a, b, c], 8, [-1], tokenizer.pad_token_id)
    greedy = Sampling(greedy=True)
    got = {0: [], 1: [], 2: []}
    with torch.no_grad():
        rows = Rows.prefill(lm, [a, b], capacity=20)
        for step in range(8 + 3):
            if step == 3:  # request 2 arrives after three steps
                rows.join(Rows.prefill(lm, [c], capacity=20, row_ids=[2]))
            tokens = pick_tokens(rows.logits, greedy)
            for r, t in zip(rows.rows.tolist(), tokens.tolist()):
                got[r].append(t)
            wanted = torch.tensor([len(got[r]) < 8 for r in rows.rows.tolist()])
            if step == 4:
                wanted[0] = False  # request 0 is cancelled (a client went away)
            rows.keep(wanted)
            if not len(rows):
                break
            rows.step(tokens[wanted])
    assert got[0] == want[0][:5] and got[1] == want[1] and got[2] == want[2]


def test_generation_config_processors_fall_back_to_transformers(tokenizer):
    from chatforge.rl.generate import engine_applies

    lm = tiny_model("llama", tokenizer, seed=3)
    assert engine_applies(lm)
    lm.generation_config.repetition_penalty = 1.5
    assert not engine_applies(lm)
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS[:2]]
    ours = generate(lm, tokenizer, prompts, max_new_tokens=6, greedy=True)
    theirs = generate(lm, tokenizer, prompts, max_new_tokens=6, greedy=True, engine=False)
    assert torch.equal(ours.response_ids, theirs.response_ids)


def test_per_row_settings_pick_what_each_row_picks_alone():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    uniform = torch.rand(5, 1, dtype=torch.float64)
    settings = [
        Sampling(greedy=True),
        Sampling(temperature=0.5, top_p=0.8),
        Sampling(temperature=1.5),
        Sampling(temperature=0.5, top_p=0.8),
        Sampling(top_k=3),
    ]
    got = pick_tokens(logits, settings, uniform).tolist()
    alone = [int(pick_tokens(logits[b : b + 1], s, uniform[b : b + 1])) for b, s in enumerate(settings)]
    assert got == alone and got[0] == int(logits[0].argmax())
    assert got != pick_tokens(logits, Sampling(temperature=1.5), uniform).tolist()  # settings matter


@pytest.mark.skipif(not can_pack(), reason="oneDNN's packed bf16 linear needs an AVX-512 CPU")
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_packed_bf16_linears_give_the_same_bits_and_transformers_greedy_tokens(
    tokenizer, arch, torch_kernels
):
    lm = tiny_model(arch, tokenizer, seed=6).to(torch.bfloat16).eval()
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with decode_attention(lm):  # generate's attention; bf16 can round its last bit otherwise
        want = transformers_greedy(lm, prompts, 8, [-1], tokenizer.pad_token_id)
    with torch.no_grad():
        plain = lm(input_ids=ids, attention_mask=mask).logits
        with packed_linears(lm):
            wrapped = [m for m in lm.modules() if "forward" in m.__dict__]
            with packed_linears(lm):  # nested (generate inside an evaluation): nothing more to pack
                pass
            assert [m for m in lm.modules() if "forward" in m.__dict__] == wrapped
            packed = lm(input_ids=ids, attention_mask=mask).logits
            if arch != "gpt2":  # q, k, v (and gate, up) read one input: one packed product
                attention = next(m for m in lm.modules() if hasattr(m, "q_proj"))
                heads = [getattr(attention, n).forward for n in ("q_proj", "k_proj", "v_proj")]
                assert len({id(f.func.__self__) for f in heads}) == 1
    assert wrapped and all(type(m) is torch.nn.Linear for m in wrapped)  # gpt2: its head only
    assert torch.equal(plain, packed)  # the same kernel on a packed layout: the same bits
    assert not any("forward" in m.__dict__ for m in lm.modules())  # undone on exit
    got = generate(lm, tokenizer, prompts, max_new_tokens=8, greedy=True)  # packs for the call
    assert [row[m.bool()].tolist() for row, m in zip(got.response_ids, got.response_mask)] == want


@pytest.mark.skipif(not can_pack(), reason="oneDNN's packed bf16 linear needs an AVX-512 CPU")
def test_a_packed_linear_that_needs_gradients_runs_unpacked(tokenizer):
    lm = tiny_model("llama", tokenizer, seed=6).to(torch.bfloat16)
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    with packed_linears(lm):
        lm(input_ids=ids).logits.float().sum().backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)
