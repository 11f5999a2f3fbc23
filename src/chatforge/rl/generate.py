"""Batched sampling for rollouts and evaluation: left padding, KV cache, stop at end-of-turn.

This module knows nothing about training: it turns prompts into responses. Log-probs for learning
are recomputed by the training forward path (`chatforge.models.logprobs`), so rollout and learning
agree exactly. Decoding runs on `rl.engine` (a prompt repeated in a batch is prefilled once, a
preallocated KV cache, finished rows leave the batch), or on transformers' `generate` for what the
engine does not cover (prompt-learning adapters, encoder-decoders, logits processors set in the
model's generation config) or when asked (`engine=False`). In bf16 on a CPU both run a decoding
step's attention through the fast side of torch's flash kernel (`models.attention`) and their
linear layers with weights packed once per call (`models.packed`: the same bits, faster).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

import torch

from chatforge.data.templates import stop_token_ids
from chatforge.models.attention import decode_attention
from chatforge.models.packed import packed_linears
from chatforge.rl.engine import Sampling, decode


@dataclass
class Generated:
    """Prompts and the responses sampled for them.

    prompt_ids: (B, P) left-padded prompt tokens; prompt_mask: (B, P) 1 on real tokens.
    response_ids: (B, R) right-padded response tokens (the stop token included when produced);
    response_mask: (B, R) 1 on response tokens up to and including the first stop token.
    stopped: (B,) bool, True where the response ended with a stop token (not the length limit).
    texts: decoded responses without special tokens. tokens_per_s: generated tokens per second.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    stopped: torch.Tensor
    texts: list[str]
    tokens_per_s: float


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with every prompt right-aligned.

    >>> ids, mask = left_pad([[5, 6], [7]], 0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def response_mask(response_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, stopped): 1 up to and including the first stop token of each row.

    >>> m, s = response_mask(torch.tensor([[4, 9, 2, 2], [4, 4, 4, 4]]), [9])
    >>> m.tolist(), s.tolist()
    ([[1, 1, 0, 0], [1, 1, 1, 1]], [True, False])
    """
    is_stop = torch.isin(response_ids, torch.tensor(stop_ids, device=response_ids.device))
    after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    return (~after_stop).long(), is_stop.any(1)


@contextlib.contextmanager
def contiguous_head_input(lm):
    """Feed the LM head a contiguous input while generating a batch.

    transformers slices the last position out of the prompt's hidden states, (B, 1, H) with a row
    stride of the whole prompt. For a frozen head (requires_grad False: adapters, RL, eval) torch's
    matmul does not fold such a strided 3-D input into one matrix product; it expands the head's
    weight to a (B, H, vocab) batch and copies it: B copies of the vocabulary matrix (1.4 GB for
    25 prompts on SmolLM2) on every prefill. A contiguous copy of the (B, 1, H) input avoids that:
    4.1 s -> 1.9 s for 25 prompts x 15 new tokens of SmolLM2-135M on CPU.
    """
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        yield
        return
    hook = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def inverse_cdf_multinomial(
    probs: torch.Tensor, generator=None, uniform: torch.Tensor | None = None, block: int = 1024
) -> torch.Tensor:
    """One draw per row of `probs` (B, V) (unnormalised, non-negative): (B, 1) indices.

    Inverse transform sampling: one uniform number per row against the row's running sum, where
    `torch.multinomial` draws an exponential for every entry of the vocabulary (on CPU that was 14%
    of a batch-8 decode of SmolLM2: 10.6 ms per step for 8 x 49k). The running sum is taken in two
    levels, in float64: over blocks of `block` entries, then inside the block the number falls in
    (a float64 running sum over all 49k entries was ~0.5 ms of a ~30 ms decoding step; this is a
    tenth of it). The same distribution; entries of probability 0 (cut by top-k / top-p) are never
    drawn. `uniform` (B, 1) gives the numbers instead.

    >>> g = torch.Generator().manual_seed(0)
    >>> draws = inverse_cdf_multinomial(torch.tensor([[0.0, 1.0, 0.0, 3.0]]).expand(4000, 4), g)
    >>> sorted(set(draws.view(-1).tolist())), round(float((draws == 3).float().mean()), 1)
    ([1, 3], 0.8)
    """
    b, v = probs.shape
    if uniform is None:
        uniform = torch.rand(b, 1, dtype=torch.float64, device=probs.device, generator=generator)
    pad = -v % block
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).reshape(b, -1, block)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # (B, blocks)
    target = uniform.to(cdf) * cdf[:, -1:]
    which = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)  # (B, 1)
    before = cdf.gather(1, (which - 1).clamp(min=0)).masked_fill_(which == 0, 0)
    inner = blocks.gather(1, which[:, :, None].expand(b, 1, block)).view(b, block).double().cumsum(-1)
    index = torch.searchsorted(inner, target - before, right=True)
    # a number past the block's own sum (the two sums round apart) takes its last drawable entry
    index = torch.minimum(index, torch.searchsorted(inner, inner[:, -1:].contiguous()))
    return (which * block + index).clamp_(max=v - 1)


def row_uniforms(seeds: list[int], step: int, device=None) -> torch.Tensor:
    """(B, 1) float64 uniforms, row b's drawn from its own generator seeded by (seeds[b], step): the
    numbers a row gets do not depend on which other rows share its batch."""
    out = torch.empty(len(seeds), 1, dtype=torch.float64)
    for b, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (1 << 63))
        out[b] = torch.rand(1, dtype=torch.float64, generator=gen)
    return out.to(device)


@contextlib.contextmanager
def one_uniform_per_draw(row_seeds: list[int] | None = None):
    """While active, `torch.multinomial(probs, 1)` on a (B, V) tensor (what transformers' sampler
    calls once per decoding step) draws by `inverse_cdf_multinomial`; other calls are unchanged.
    With `row_seeds` (one per row), row b's draw at decoding step t comes from (row_seeds[b], t)."""
    original = torch.multinomial
    step = itertools.count()

    def multinomial(input, num_samples, replacement=False, *, generator=None, out=None):  # noqa: A002
        if num_samples == 1 and input.dim() == 2 and out is None:
            if row_seeds is not None and len(row_seeds) == input.shape[0]:
                return inverse_cdf_multinomial(
                    input, uniform=row_uniforms(row_seeds, next(step), input.device)
                )
            return inverse_cdf_multinomial(input, generator)
        return original(input, num_samples, replacement, generator=generator, out=out)

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = original


@torch.no_grad()
def generate(
    lm,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    batch_size: int | None = None,
    row_seeds: list[int] | None = None,
    engine: bool = True,
) -> Generated:
    """Sample one response per prompt (token id lists) with the model's KV cache.

    `row_seeds` (one per prompt) makes each response's random draws its own: the same answers
    whatever `batch_size` or the other prompts in the batch (up to float rounding of the logits).
    `engine`: decode with `rl.engine` where it applies (`engine_applies`), else transformers'
    `generate`; both give the same law of tokens (greedy: the same tokens).
    """
    device = next(lm.parameters()).device
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer)
    was_training = lm.training
    lm.eval()
    chunks = []
    t0 = time.perf_counter()
    n_tokens = 0
    step = batch_size or len(prompts)
    sampling = Sampling(greedy, temperature, top_k, top_p)
    use_engine = engine and engine_applies(lm)
    try:
        with contiguous_head_input(lm), packed_linears(lm), decode_attention(lm):
            for s in range(0, len(prompts), step):
                chunk = prompts[s : s + step]
                seeds = None if row_seeds is None else row_seeds[s : s + step]
                ids, mask = left_pad(chunk, pad_id, device)
                if use_engine:
                    tokens, _ = decode(lm, chunk, max_new_tokens, stops, sampling, seeds)
                    resp = left_pad([t[::-1] for t in tokens], pad_id, device)[0].flip(1)
                else:
                    resp = _transformers_generate(
                        lm, ids, mask, max_new_tokens, stops, pad_id, sampling, seeds
                    )
                rmask, stopped = response_mask(resp, stops)
                resp = resp.masked_fill(rmask == 0, pad_id)
                n_tokens += int(rmask.sum())
                chunks.append((ids, mask, resp, rmask, stopped))
    finally:
        lm.train(was_training)
    seconds = time.perf_counter() - t0
    p_ids, p_mask = left_pad(
        [row[m.bool()].tolist() for c in chunks for row, m in zip(c[0], c[1])], pad_id, device
    )
    width = max(c[2].shape[1] for c in chunks)
    r_ids = torch.cat([_pad_right(c[2], width, pad_id) for c in chunks])
    r_mask = torch.cat([_pad_right(c[3], width, 0) for c in chunks])
    texts = tokenizer.batch_decode(r_ids.masked_fill(r_mask == 0, pad_id), skip_special_tokens=True)
    return Generated(
        p_ids, p_mask, r_ids, r_mask, torch.cat([c[4] for c in chunks]), texts, n_tokens / max(seconds, 1e-9)
    )


def engine_applies(lm) -> bool:
    """Whether `rl.engine` decodes `lm` with transformers' law: a decoder-only model, no
    prompt-learning adapter, and no logits processor asked for by its generation config."""
    from transformers import GenerationConfig

    config = getattr(lm, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return False
    if getattr(lm.config, "is_encoder_decoder", False):
        return False
    ours, neutral = getattr(lm, "generation_config", None), GenerationConfig()
    return ours is None or all(getattr(ours, k, None) == getattr(neutral, k) for k in _PROCESSOR_FIELDS)


# generation-config fields that add logits processors (their GenerationConfig defaults turn them off)
_PROCESSOR_FIELDS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_length",
    "min_new_tokens",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "encoder_repetition_penalty",
    "exponential_decay_length_penalty",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "renormalize_logits",
)


def _transformers_generate(lm, ids, mask, max_new_tokens, stops, pad_id, sampling, seeds) -> torch.Tensor:
    """(B, R) new tokens from transformers' `generate` (the draws by `one_uniform_per_draw`)."""
    s = sampling
    kw = (
        dict(do_sample=False)
        if s.greedy
        else dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    )
    with one_uniform_per_draw(seeds):
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad_id,
            use_cache=True,
            **kw,
        )
    return out[:, ids.shape[1] :]


def _pad_right(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def sequence_inputs(gen: Generated) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of prompt+response for one training forward pass.

    Positions count real tokens only, matching what generation used under left padding.
    """
    ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    mask = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions
