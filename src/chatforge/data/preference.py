"""Preference pairs for the reward-model and DPO stages: validated, tokenised, counted, batched.

`build_preference_examples(paths, tokenizer, max_length)` reads `{"prompt"?, "chosen", "rejected",
"margin"?}` records (strings or chat messages, see `formats.to_preference`), stops on the first
malformed one with `FILE:LINE: field what is wrong`, and tokenises each pair as prompt + response
exactly as generation sees it (`templates.tokenize_prompt_response`). Pairs that cannot be trained
are skipped, counted in the `DataReport` and reported with their `FILE:LINE`, never dropped
silently: chosen identical to rejected, a prompt that leaves no room for a response at max_length,
and pairs whose responses become identical once cut to max_length.

`collate_pairs` puts the B chosen rows first and the B rejected rows after them in ONE (2B, T)
batch, so a single forward pass scores both sides (the same numbers as two separate forwards); or,
branched, one row per pair holding the prompt once and both responses after it (`data.share_prompt`).

    >>> ex = {"prompt_len": 2, "chosen_ids": [5, 6, 7], "rejected_ids": [5, 6, 8, 9], "margin": None}
    >>> b = collate_pairs([ex], pad_id=0)
    >>> b["input_ids"].tolist(), b["labels"].tolist(), b["margin"].tolist()
    ([[5, 6, 7, 0], [5, 6, 8, 9]], [[-100, -100, 7, -100], [-100, -100, 8, 9]], [0.0])
"""

from __future__ import annotations

from collections.abc import Callable

from chatforge.data.collate import IGNORE_INDEX, pad_batch
from chatforge.data.dataset import DataReport, Paths, load_validated
from chatforge.data.formats import PreferenceExample, to_preference
from chatforge.errors import DataError

IDENTICAL = "chosen and rejected are identical"
IDENTICAL_CUT = "chosen and rejected identical after truncation to max_length"


def _identical(record) -> bool:
    return (
        isinstance(record, dict)
        and record.get("chosen") is not None
        and record["chosen"] == record.get("rejected")
    )


def to_preference_or_tie(record, where: str) -> PreferenceExample | None:
    """`to_preference`, except that a pair whose two responses are the same gives None (a skip)."""
    if _identical(record):
        return None
    try:
        return to_preference(record, where)
    except DataError as e:
        if str(e).endswith(IDENTICAL):  # identical once the shared prompt turns are split off
            return None
        raise


def tokenize_pair(tokenizer, ex: PreferenceExample, max_length: int) -> tuple[dict, bool]:
    """(`{"prompt_len", "chosen_ids", "rejected_ids", "margin"}`, truncated); raises PromptTooLong."""
    from chatforge.data.templates import tokenize_prompt_response

    chosen, start, cut_c = tokenize_prompt_response(tokenizer, ex.prompt, ex.chosen, max_length)
    rejected, start_r, cut_r = tokenize_prompt_response(tokenizer, ex.prompt, ex.rejected, max_length)
    assert start == start_r, "the prompt tokenises the same before both responses"
    return {"prompt_len": start, "chosen_ids": chosen, "rejected_ids": rejected, "margin": ex.margin}, (
        cut_c or cut_r
    )


def build_preference_examples(
    paths: Paths, tokenizer, max_length: int, warn: Callable[[str], None] | None = None, max_warnings: int = 5
) -> tuple[list[dict], DataReport]:
    """Tokenised pairs and a report of what was truncated or skipped (and why).

    `warn` receives one `FILE:LINE: reason (skipped)` line per skipped pair, up to `max_warnings`.
    Raises DataError when a record is malformed or no pair is left.
    """
    from chatforge.data.templates import PromptTooLong, ensure_chat_template

    ensure_chat_template(tokenizer)
    records = load_validated(paths, to_preference_or_tie, with_where=True)
    report = DataReport(records=len(records), trained_tokens=0, max_length=max_length, unit="pairs")
    examples, first_skip = [], None
    warned = 0

    def skip(where: str, reason: str, detail: str = "") -> None:
        nonlocal first_skip, warned
        report.skip(reason)
        message = f"{where}: {detail or reason}"
        first_skip = first_skip or message
        if warn is not None and warned < max_warnings:
            warn(f"{message} (skipped)")
            warned += 1

    for where, ex in records:
        if ex is None:
            skip(where, IDENTICAL)
            continue
        try:
            item, cut = tokenize_pair(tokenizer, ex, max_length)
        except PromptTooLong as e:
            skip(where, PromptTooLong.reason, str(e))
            continue
        if item["chosen_ids"] == item["rejected_ids"]:
            skip(where, IDENTICAL_CUT)
            continue
        report.truncated += cut
        report.tokens += len(item["chosen_ids"]) + len(item["rejected_ids"])
        report.trained_tokens += len(item["chosen_ids"]) + len(item["rejected_ids"]) - 2 * item["prompt_len"]
        examples.append(item)
    report.examples = len(examples)
    if not examples:
        raise DataError(
            f"no preference pairs left ({first_skip}): {report.summary()}; raise data.max_length?"
        )
    return examples, report


def collate_pairs(
    examples: list[dict], pad_id: int, branched: bool = False, pad_to_multiple_of: int | None = None
) -> dict:
    """A pair batch: (2B, T) rows, or with `branched` one (B, T) row per pair.

    Rows: right-padded [chosen_0..chosen_B-1, rejected_0..rejected_B-1]; `labels` mark the response
    tokens (IGNORE_INDEX on prompt and padding). Branched (`collate.collate_branches`): the prompt
    once, then the chosen and the rejected response, each attending to the prompt and itself, so
    the prompt is computed once per pair; `branch` is 1 on chosen and 2 on rejected tokens, `last`
    (B, 2) their last positions. A batch with an empty prompt or response falls back to rows.
    Widths are rounded up to a multiple of `pad_to_multiple_of` when given.
    Either way `margin` is (B,) with 0 where a pair has none, and `ref_chosen` / `ref_rejected` (B,)
    are passed on when the examples carry precomputed reference log-probs.
    """
    import torch

    from chatforge.data.collate import collate_branches

    groups = [
        (
            ex["chosen_ids"][: ex["prompt_len"]],
            [ex[side][ex["prompt_len"] :] for side in ("chosen_ids", "rejected_ids")],
        )
        for ex in examples
    ]
    if branched and all(prefix and all(responses) for prefix, responses in groups):
        batch = collate_branches(groups, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    else:
        rows = []
        for side in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                ids, start = ex[side], ex["prompt_len"]
                rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * start + ids[start:]})
        batch = pad_batch(rows, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    batch["margin"] = torch.tensor([float(ex.get("margin") or 0.0) for ex in examples])
    for key in ("ref_chosen", "ref_rejected"):
        if all(key in ex for ex in examples):
            batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
    return batch
