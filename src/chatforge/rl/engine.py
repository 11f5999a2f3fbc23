"""The decoding engine behind `rl.generate`: a step-wise batch of rows over a preallocated KV cache.

Where transformers' `generate` concatenates every layer's keys and values at each step and decodes
every row until the last one stops, a `Rows` batch

- prefills each distinct prompt once and shares its KV cache with every row that repeats it (a
  GRPO group's answers, a PPO prompt sampled several times): exact, the rows start from one cache;
- prefills the head all prompts share (a chat template's system prompt: 24 of the ~50 tokens of a
  quickstart prompt) once, and only the rest of each prompt per prompt;
- writes new keys and values in place into per-layer buffers sized for prompt + answer (`BufferLayer`,
  a transformers cache layer: the model's own attention and masks run unchanged);
- drops rows that produced a stop token, so the batch shrinks as answers end;
- runs a Llama-shaped model's decoding steps without transformers' per-layer glue
  (`models.decode_step`: the same operations on the model's own modules, the same bits).

The law of the tokens is transformers': float32 logits of the last position, greedy argmax, or the
temperature / top-k / top-p warpers of `transformers.generation` and a softmax draw. A scheduler
(continuous batching in a server) drives the same object: `Rows.prefill` new requests, `join` them
into the running batch, `step` it, and `keep` the rows still wanted (finished or disconnected rows
leave).

    rows = Rows.prefill(lm, [[1, 2, 3]], source=[0, 0, 0, 0], capacity=64)  # 4 answers, 1 prefill
    tokens = pick_tokens(rows.logits, Sampling(greedy=True))
    rows.step(tokens); rows.keep(tokens != stop)
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import astuple, dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from chatforge.models import base_model
from chatforge.models.decode_step import step_fn


class BufferLayer(DynamicLayer):
    """One layer's keys and values in (B, heads, capacity, head_dim) buffers filled in place.

    `update` returns views of the filled part, so attention sees exactly what a concatenating
    cache would hold; the buffers grow (doubling) only if a row outlives `capacity`.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, n, d = key_states.shape
        self.device = key_states.device
        size = max(self.capacity, n)
        self.keys = key_states.new_empty(b, h, size, d)
        self.values = value_states.new_empty(b, h, size, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self.keys, self.values = (_widen(x, max(end, 2 * x.shape[-2])) for x in (self.keys, self.values))
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(self.length - abs(tokens_to_remove), 0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, 0)
            self.values = self.values.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Rows `indices` (repeats allowed: that is how rows share a prompt's cache)."""
        if self.is_initialized:
            self.keys = self.keys.index_select(0, indices)
            self.values = self.values.index_select(0, indices)


def _widen(x: torch.Tensor, size: int, left: int = 0) -> torch.Tensor:
    """x (B, H, T, D) in a new (B, H, size, D) buffer, its T entries starting at `left`."""
    out = x.new_zeros(x.shape[0], x.shape[1], size, x.shape[3])
    out[:, :, left : left + x.shape[2]] = x
    return out


def buffer_cache(capacity: int) -> Cache:
    """A transformers cache of `BufferLayer`s (one is made per decoder layer on first use)."""
    return Cache(layer_class_to_replicate=functools.partial(BufferLayer, capacity))


@dataclass
class Sampling:
    """How a token is picked from a row's logits: greedy argmax, else a draw from the tempered,
    top-k / top-p cut softmax (transformers' warpers, in transformers' order)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if self.temperature != 1.0:
            scores = TemperatureLogitsWarper(self.temperature)(None, scores)
        if self.top_k:
            scores = TopKLogitsWarper(top_k=self.top_k)(None, scores)
        if self.top_p < 1.0:
            scores = TopPLogitsWarper(top_p=self.top_p)(None, scores)
        return scores


def pick_tokens(
    logits: torch.Tensor, sampling: Sampling | list[Sampling], uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) next tokens from float32 logits (B, V); `sampling`: one for every row, or one per row (a
    server's requests; rows with equal settings are warped together). `uniform` (B, 1) float64
    numbers drive the draws (inverse CDF, `rl.generate.inverse_cdf_multinomial`), else the global RNG."""
    if isinstance(sampling, Sampling):
        return _pick(logits, sampling, uniform)
    groups: dict[tuple, list[int]] = {}
    for b, s in enumerate(sampling):
        groups.setdefault(astuple(s), []).append(b)
    out = torch.empty(len(sampling), dtype=torch.long, device=logits.device)
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        part = None if uniform is None else uniform[index]
        out[index] = _pick(logits[index], sampling[rows[0]], part)
    return out


def _pick(logits: torch.Tensor, sampling: Sampling, uniform: torch.Tensor | None) -> torch.Tensor:
    from chatforge.rl.generate import inverse_cdf_multinomial

    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(sampling.warp(logits), -1)
    return inverse_cdf_multinomial(probs, uniform=uniform).view(-1)


@functools.lru_cache(maxsize=32)
def _forward_args(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


class Rows:
    """A batch of rows being decoded: their KV cache, attention mask and next positions.

    cache: per layer (B, heads, T, head_dim); mask: (B, T) 1 on real tokens (prompts left-padded);
    positions: (B,) the position of each row's next token; rows: (B,) each row's caller id;
    logits: (B, V) float32 logits of each row's next token (after `prefill` or `step`).
    """

    def __init__(self, lm, cache: Cache, mask: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor):
        self.lm, self.cache, self.mask, self.positions, self.rows = lm, cache, mask, positions, rows
        self.logits: torch.Tensor | None = None
        args = _forward_args(type(base_model(lm)))
        self._positions_arg = "position_ids" in args
        self._keep_arg = "logits_to_keep" in args
        self._step = step_fn(lm)  # Llama-shaped models: the step without transformers' glue

    @classmethod
    def prefill(
        cls, lm, prompts: list[list[int]], source: list[int] | None = None, capacity: int = 0, row_ids=None
    ) -> Rows:
        """Run each prompt once; row b then continues prompt `source[b]` (default: row b is prompt
        b), rows of one prompt sharing its cache. `capacity`: tokens per row the buffers hold before
        growing (prompt + answer). `row_ids`: the caller's id of each row (default 0..B-1)."""
        from chatforge.data.collate import shared_prefix_length
        from chatforge.rl.generate import left_pad

        device = next(lm.parameters()).device
        n = len(prompts) if source is None else len(source)
        rows = torch.arange(n, device=device) if row_ids is None else torch.as_tensor(row_ids, device=device)
        # a model that places tokens by the mask alone (no position_ids) runs whole prompts
        takes_positions = "position_ids" in _forward_args(type(base_model(lm)))
        shared = shared_prefix_length(prompts) if takes_positions else 0
        ids, mask = left_pad([p[shared:] for p in prompts], 0, device)
        positions = shared + (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        batch = cls(lm, buffer_cache(max(capacity, shared + ids.shape[1])), mask, positions[:, -1] + 1, rows)
        if shared:
            # the common head (a chat template's system prompt) once, its cache copied to every prompt:
            # rows are [head | left padding | the rest], positions counting real tokens only
            batch.mask = mask.new_ones(1, shared)
            batch._forward(
                torch.tensor([prompts[0][:shared]], device=device), torch.arange(shared)[None].to(device)
            )
            batch.cache.batch_select_indices(torch.zeros(len(prompts), dtype=torch.long, device=device))
            batch.mask = torch.cat([mask.new_ones(len(prompts), shared), mask], 1)
        batch.logits = batch._forward(ids, positions)
        if source is not None and list(source) != list(range(len(prompts))):
            index = torch.as_tensor(source, device=device)
            batch.cache.batch_select_indices(index)
            batch.mask, batch.positions = batch.mask[index], batch.positions[index]
            batch.logits = batch.logits[index]
        return batch

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kw = {"position_ids": positions} if self._positions_arg else {}
        if self._keep_arg:
            kw["logits_to_keep"] = 1
        out = self.lm(input_ids=ids, attention_mask=self.mask, cache=self.cache, use_cache=True, **kw)
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token (B,); returns and keeps the logits of the token after it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], 1)
        ids, positions = tokens.view(-1, 1), self.positions.view(-1, 1)
        if self._step is not None:
            self.logits = self._step(ids, positions, self.mask, self.cache)
        else:
            self.logits = self._forward(ids, positions)
        self.positions = self.positions + 1
        return self.logits

    def keep(self, wanted: torch.Tensor) -> None:
        """Keep only the rows where `wanted` (B,) bool is True (finished or cancelled rows leave)."""
        if bool(wanted.all()):
            return
        index = wanted.nonzero().view(-1)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.rows = self.mask[index], self.positions[index], self.rows[index]
        self.logits = None if self.logits is None else self.logits[index]
        # columns that are padding in every remaining row carry nothing: drop them
        first = int(self.mask.any(0).long().argmax()) if len(self) else 0
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                layer.length -= first

    def join(self, other: Rows) -> None:
        """Append `other`'s rows (e.g. new requests, prefilled apart) to this batch: the shorter
        side's cache and mask are padded on the left so both end at the same column."""
        t, u = self.mask.shape[1], other.mask.shape[1]
        width = max(t, u)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            size = max(mine.keys.shape[2] - t, theirs.keys.shape[2] - u, 1) + width
            for name in ("keys", "values"):
                a = _widen(getattr(mine, name)[:, :, :t], size, width - t)
                b = _widen(getattr(theirs, name)[:, :, :u], size, width - u)
                setattr(mine, name, torch.cat([a, b]))
            mine.length = width
        pad = torch.nn.functional.pad
        self.mask = torch.cat([pad(self.mask, (width - t, 0)), pad(other.mask, (width - u, 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows = torch.cat([self.rows, other.rows])
        if self.logits is not None and other.logits is not None:
            self.logits = torch.cat([self.logits, other.logits])


@torch.inference_mode()  # no autograd bookkeeping per operation (~7% faster steps); only token ids leave
def decode(
    lm,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: list[int],
    sampling: Sampling,
    row_seeds: list[int] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Each prompt's new tokens (up to and including its first stop token, at most
    `max_new_tokens`) and whether it stopped. Repeated prompts are prefilled once. With
    `row_seeds`, row b's draw at step t comes from (row_seeds[b], t) (`rl.generate.row_uniforms`)."""
    from chatforge.rl.generate import row_uniforms

    first = {}
    source = [first.setdefault(tuple(p), len(first)) for p in prompts]
    width = max(len(p) for p in prompts)
    rows = Rows.prefill(lm, [list(p) for p in first], source, capacity=width + max_new_tokens)
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    stop_ids = torch.tensor(stops, device=rows.rows.device)
    for t in range(max_new_tokens):
        ids = rows.rows.tolist()
        uniform = None
        if row_seeds is not None and not sampling.greedy:
            uniform = row_uniforms([row_seeds[r] for r in ids], t, rows.rows.device)
        tokens = pick_tokens(rows.logits, sampling, uniform)
        done = torch.isin(tokens, stop_ids)
        for r, token, end in zip(ids, tokens.tolist(), done.tolist()):
            out[r].append(token)
            stopped[r] = end
        if t == max_new_tokens - 1:
            break
        rows.keep(~done)
        if not len(rows):
            break
        rows.step(tokens[~done])
    return out, stopped
