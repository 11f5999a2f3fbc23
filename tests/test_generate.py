"""Rollout generation: masks, stop tokens, left padding, and agreement with training log-probs."""

import pytest
import torch

from chatforge.data.templates import stop_token_ids
from chatforge.models.logprobs import token_logprobs
from chatforge.models.tiny import tiny_model
from chatforge.rl.generate import generate, sequence_inputs


def test_generate_masks_and_greedy_matches_training_forward(tokenizer):
    lm = tiny_model("llama", tokenizer, seed=3)
    prompts = [tokenizer("hello world")["input_ids"], tokenizer("What is two plus three?")["input_ids"]]
    gen = generate(lm, tokenizer, prompts, max_new_tokens=6, greedy=True)
    assert gen.response_ids.shape == gen.response_mask.shape and gen.response_ids.shape[1] <= 6
    stops = stop_token_ids(tokenizer)
    for row, mask, stopped in zip(gen.response_ids, gen.response_mask, gen.stopped):
        n = int(mask.sum())
        assert bool(stopped) == (row[n - 1].item() in stops)
    ids, mask, pos = sequence_inputs(gen)
    target = torch.cat([torch.zeros_like(gen.prompt_mask), gen.response_mask], 1)
    logps, _ = token_logprobs(lm, ids, mask, pos, target_mask=target)
    # greedy tokens are the argmax, so each one's log-prob is the max over the vocabulary
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].float()
    best = torch.log_softmax(logits, -1).max(-1).values
    resp = target[:, 1:].bool()
    torch.testing.assert_close(logps[resp], best[resp], atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded(tokenizer):
    lm = tiny_model("llama", tokenizer, seed=3)
    prompts = [tokenizer("hello")["input_ids"]] * 3
    torch.manual_seed(0)
    a = generate(lm, tokenizer, prompts, max_new_tokens=5)
    torch.manual_seed(0)
    b = generate(lm, tokenizer, prompts, max_new_tokens=5)
    assert torch.equal(a.response_ids, b.response_ids)


def test_frozen_head_gets_contiguous_inputs(tokenizer):
    # a strided (B, 1, H) input makes torch expand a frozen head's weight into B copies (slow)
    lm = tiny_model("llama", tokenizer, seed=3).requires_grad_(False)
    seen = []
    lm.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(args[0].is_contiguous())
    )
    prompts = [tokenizer("hello world, how are you")["input_ids"], tokenizer("hi")["input_ids"]]
    generate(lm, tokenizer, prompts, max_new_tokens=3, greedy=True)
    assert seen and all(seen)
    assert not lm.get_output_embeddings()._forward_pre_hooks  # removed again after generating


def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_entries():
    from chatforge.rl.generate import inverse_cdf_multinomial, one_uniform_per_draw

    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.0, 0.5, 0.0, 0.25, 0.15]) * 3  # unnormalised, as transformers may pass
    n = 40000
    draws = inverse_cdf_multinomial(probs.expand(n, 6)).view(-1)
    freq = torch.bincount(draws, minlength=6).double() / n
    p = probs.double() / probs.sum()
    assert freq[1] == freq[3] == 0
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12).all(), freq
    original = torch.multinomial
    with one_uniform_per_draw():
        assert torch.multinomial is not original
        assert torch.multinomial(probs[None], 1).shape == (1, 1)
        assert torch.multinomial(probs, 2).shape == (2,)  # other calls go to torch's own
    assert torch.multinomial is original


@pytest.mark.parametrize("block", [1, 3, 4, 16])
def test_inverse_cdf_in_blocks_draws_what_one_running_sum_draws(block):
    from chatforge.rl.generate import inverse_cdf_multinomial

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 10, generator=g)
    probs[:, [0, 3, 4, 9]] = 0  # cut entries, a whole block of them at block=2..4, and the last one
    probs[4] = 0
    probs[4, 9] = 1.0  # only the last entry
    uniform = torch.cat([torch.rand(5, 400, dtype=torch.float64, generator=g), torch.zeros(5, 1)], 1)
    cdf = probs.double().cumsum(-1)
    for u in uniform.T:  # the plain one-level inverse CDF as the reference
        want = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp(max=9)
        got = inverse_cdf_multinomial(probs, uniform=u[:, None], block=block)
        assert torch.equal(got, want), (u, got, want)
        assert (probs.gather(1, got) > 0).all()


def test_row_seeds_give_each_row_its_own_draws_whatever_the_batch(tokenizer):
    model = tiny_model("llama", tokenizer, seed=1)
    prompts = [tokenizer(t)["input_ids"] for t in ("hello", "What is 2 plus 3?", "hi", "The quick brown fox")]
    seeds = [11, 12, 13, 14]
    whole = generate(model, tokenizer, prompts, max_new_tokens=8, row_seeds=seeds)
    torch.manual_seed(123)  # the global RNG plays no part
    pairs = generate(model, tokenizer, prompts, max_new_tokens=8, row_seeds=seeds, batch_size=2)
    alone = generate(model, tokenizer, prompts[2:3], max_new_tokens=8, row_seeds=seeds[2:3])
    assert whole.texts == pairs.texts and alone.texts == whole.texts[2:3]
    other = generate(model, tokenizer, prompts, max_new_tokens=8, row_seeds=[21, 22, 23, 24])
    assert other.texts != whole.texts
