"""Batches from tokenised examples: padding with masks and positions, or packing without padding.

`pad_batch` pads examples to one length (right for training, left for generation). `pack` puts
several examples into each row of at most max_length tokens (first-fit-decreasing, deterministic)
and `collate_packed` turns rows into a batch whose position ids restart at 0 for every example and
which has no attention mask: transformers (5.x, `find_packed_sequence_indices` in masking_utils)
then builds a block-diagonal causal mask from the position ids when `attention_mask` is None and
there is no KV cache, so no token attends across examples. Call the model with `use_cache=False`:
an eval-mode forward otherwise creates a cache, and the examples silently attend to each other. Labels stay unshifted (`labels[t]` is
the target of token t); the first token of every packed example gets no label, since the model
would otherwise learn to predict it from the end of the previous, unrelated example.

    >>> b = pad_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], pad_id=0)
    >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["position_ids"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[0, 1, 2], [0, 0, 0]])
    >>> b["labels"].tolist()
    [[5, 6, 7], [8, -100, -100]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


def _padded_length(longest: int, multiple: int | None) -> int:
    if multiple:
        return -(-longest // multiple) * multiple
    return longest


def bucket_span(
    lo: int, prompt_width: int, width: int, response_width: int, multiple: int | None
) -> tuple[int, int]:
    """(lo, width) such that columns lo .. prompt_width + width of a (left-padded prompt,
    right-padded response) tensor number a multiple of `multiple`, taking padding columns from the
    response side first (up to response_width), then the prompt side (down to 0); as close as the
    tensor allows when it has too few.

    >>> bucket_span(lo=5, prompt_width=8, width=3, response_width=6, multiple=8)  # 6 -> 8 columns
    (5, 5)
    >>> bucket_span(lo=5, prompt_width=8, width=3, response_width=4, multiple=8)
    (4, 4)
    """
    if not multiple:
        return lo, width
    short = -(prompt_width - lo + width) % multiple
    grow = min(short, response_width - width)
    return max(lo - (short - grow), 0), width + grow


def pad_batch(
    examples: Sequence[Mapping],
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad examples (`input_ids`, optional `labels`, other fields) into (B, T) tensors.

    Returns `input_ids` (pads = pad_id), `attention_mask` (1 on real tokens), `labels` (IGNORE_INDEX on
    pads; a copy of input_ids when the examples have none) and `position_ids` (0.. from each row's
    first real token, 0 on pads). Any other per-token list field (same length as input_ids) is padded
    with 0; a scalar field becomes a (B,) tensor; anything else is passed through as a list.

    >>> b = pad_batch([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [8], "labels": [8]}],
    ...               pad_id=0, padding_side="left", pad_to_multiple_of=4)
    >>> b["input_ids"].tolist(), b["labels"].tolist(), b["position_ids"].tolist()
    ([[0, 0, 5, 6], [0, 0, 0, 8]], [[-100, -100, -100, 6], [-100, -100, -100, 8]], [[0, 0, 0, 1], [0, 0, 0, 0]])
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left' (got {padding_side!r})")
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = _padded_length(max(lengths), pad_to_multiple_of)
    left = padding_side == "left"

    def place(rows: list, fill, dtype) -> torch.Tensor:
        out = torch.full((len(rows), width), fill, dtype=dtype)
        for i, row in enumerate(rows):
            if not len(row):
                continue
            t = torch.as_tensor(list(row), dtype=dtype)
            if left:
                out[i, width - len(row) :] = t
            else:
                out[i, : len(row)] = t
        return out

    batch = {
        "input_ids": place([ex["input_ids"] for ex in examples], pad_id, torch.long),
        "attention_mask": place([[1] * n for n in lengths], 0, torch.long),
        "labels": place([ex.get("labels", ex["input_ids"]) for ex in examples], IGNORE_INDEX, torch.long),
        "position_ids": place([range(n) for n in lengths], 0, torch.long),
    }
    for key in examples[0]:
        if key in batch:
            continue
        values = [ex[key] for ex in examples]
        if all(isinstance(v, (list, tuple)) and len(v) == n for v, n in zip(values, lengths)):
            is_float = any(isinstance(x, float) for v in values for x in v)
            batch[key] = place(values, 0, torch.float32 if is_float else torch.long)
        elif all(isinstance(v, (int, float)) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


@dataclass
class PackedRow:
    """Several examples laid end to end: `seq_lens[k]` tokens of example `indices[k]`, in order."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def position_ids(self) -> list[int]:
        return [p for n in self.seq_lens for p in range(n)]

    def add(self, index: int, example: Mapping) -> None:
        ids = list(example["input_ids"])
        labels = list(example.get("labels", ids))
        if labels:
            labels[0] = IGNORE_INDEX  # predicted from the previous example's last token otherwise
        self.input_ids += ids
        self.labels += labels
        self.seq_lens.append(len(ids))
        self.indices.append(index)


def pack(examples: Sequence[Mapping], max_length: int) -> list[PackedRow]:
    """Pack examples into rows of at most `max_length` tokens, first-fit-decreasing.

    Examples go longest first (ties in input order) into the first row with room, so the result is
    deterministic; rows come in the order they were opened. A max-segment-tree over the rows' free
    space finds that row in O(log n).

    >>> rows = pack([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5]}, {"input_ids": [6]}], max_length=4)
    >>> [(r.input_ids, r.labels, r.position_ids) for r in rows]
    [([3, 4, 5, 6], [-100, 4, 5, -100], [0, 1, 2, 0]), ([1, 2], [-100, 2], [0, 1])]
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length {max_length}: truncate first")
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    size = 1
    while size < max(len(examples), 1):
        size *= 2
    free = [max_length] * (2 * size)  # tree node = the most free space of any row below it
    rows: list[PackedRow] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(rows):
            rows.append(PackedRow())
        rows[slot].add(i, examples[i])
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def collate_packed(
    rows: Sequence[PackedRow], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor | int]:
    """(B, T) `input_ids`, `labels` and restarting `position_ids` for packed rows; no attention mask.

    Right padding forms a sequence of its own (positions 0.. again) and carries no labels, so it
    neither sees nor is seen by real tokens. `num_tokens` counts the real tokens (for throughput).

    >>> b = collate_packed(pack([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5]}], 3), pad_id=0)
    >>> b["input_ids"].tolist(), b["position_ids"].tolist(), b["num_tokens"]
    ([[3, 4, 5], [1, 2, 0]], [[0, 1, 2], [0, 1, 0]], 5)
    """
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    width = _padded_length(max(len(r) for r in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        input_ids[i, :n] = torch.as_tensor(r.input_ids, dtype=torch.long)
        labels[i, :n] = torch.as_tensor(r.labels, dtype=torch.long)
        position_ids[i, :n] = torch.as_tensor(r.position_ids, dtype=torch.long)
        position_ids[i, n:] = torch.arange(width - n)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "num_tokens": sum(len(r) for r in rows),
    }


def collate_branches(
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict:
    """One row per group of sequences that share a prefix: the prefix once, then each branch.

    `groups` holds (prefix ids, [branch ids, ...]) (a preference pair is a prompt with 2 responses,
    a GRPO group a prompt with its answers; groups may have different numbers of branches). Each
    branch attends to the prefix and to itself only, and its positions continue from the prefix's
    length, so every branch token sees exactly what it would see in a row of its own: prefix +
    branch. The prefix is computed once instead of K times.

    Returns, for G groups padded right to T tokens (the longest row, rounded up to a multiple of
    `pad_to_multiple_of` when given; padding attends to padding only):
        input_ids (G, T); position_ids (G, T) (0 on padding);
        attention_mask (G, 1, T, T) bool, True where query t may attend to key s (transformers
            uses a 4D mask as given);
        branch (G, T) long: 0 on the prefix, k+1 on branch k, -1 on padding;
        prev (G, T) long: the position whose hidden state predicts each token (t-1, but the
            prefix's last position for a branch's first token; 0 where nothing predicts it);
        last (G, K) long: the position of each branch's last token (K = the most branches of any
            group; 0 past a group's own);
        num_tokens: real tokens in the batch.

    >>> b = collate_branches([([1, 2], [[3, 4], [5]])], pad_id=0)
    >>> b["input_ids"].tolist(), b["position_ids"].tolist(), b["branch"].tolist()
    ([[1, 2, 3, 4, 5]], [[0, 1, 2, 3, 2]], [[0, 0, 1, 1, 2]])
    >>> b["prev"].tolist(), b["last"].tolist()
    ([[0, 0, 1, 2, 1]], [[3, 4]])
    >>> b["attention_mask"][0, 0].int().tolist()[-1]  # token 5 sees the prefix and itself
    [1, 1, 0, 0, 1]
    """
    if not groups:
        raise ValueError("collate_branches needs at least one group")
    k = max(len(branches) for _, branches in groups)
    rows = []
    for prefix, branches in groups:
        if not prefix or not branches or not all(branches):
            raise ValueError("every group needs a non-empty prefix and at least one branch, none empty")
        ids, pos, br, last = list(prefix), list(range(len(prefix))), [0] * len(prefix), []
        prev = [max(t - 1, 0) for t in range(len(prefix))]
        for j, branch in enumerate(branches, start=1):
            start = len(ids)
            ids += branch
            pos += range(len(prefix), len(prefix) + len(branch))
            br += [j] * len(branch)
            prev += [len(prefix) - 1] + list(range(start, start + len(branch) - 1))
            last.append(len(ids) - 1)
        rows.append((ids, pos, br, prev, last))
    width = _padded_length(max(len(r[0]) for r in rows), pad_to_multiple_of)
    g = len(rows)
    input_ids = torch.full((g, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((g, width), dtype=torch.long)
    branch = torch.full((g, width), -1, dtype=torch.long)
    prev = torch.zeros((g, width), dtype=torch.long)
    for i, (ids, pos, br, pv, _) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        position_ids[i, :n] = torch.tensor(pos)
        branch[i, :n] = torch.tensor(br)
        prev[i, :n] = torch.tensor(pv)
    t = torch.arange(width)
    causal = t[None, :] <= t[:, None]  # [query, key]
    key, query = branch[:, None, :], branch[:, :, None]
    mask = causal & ((key == 0) | (key == query))
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
        "branch": branch,
        "prev": prev,
        "last": torch.tensor([r[4] + [0] * (k - len(r[4])) for r in rows], dtype=torch.long),
        "num_tokens": sum(len(r[0]) for r in rows),
    }


def shared_prefix_length(prompts: list[list[int]], minimum: int = 8) -> int:
    """Tokens at the start of every sequence that a no-grad forward runs once (`rl.engine.Rows.prefill`,
    reward scoring): their common prefix, less one token so that every sequence keeps a token of
    its own (its next-token logits or its score are read there); 0 for fewer than two sequences or
    a prefix shorter than `minimum`.

    >>> shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3]], minimum=2)
    2
    >>> shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]], minimum=4)
    0
    """
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n if n >= minimum else 0
