"""Training examples from data files: read, validate everything, then tokenise and account for it.

Every stage goes through `load_validated`: all records are read and normalised before any
tokenisation, so one bad record stops the run early with `FILE:LINE: what is wrong` and the number
of bad records, instead of failing an hour in. Whatever is then truncated or skipped is counted in
a `DataReport` the stage logs: nothing is dropped silently.

    build_sft_examples(paths, tokenizer, max_length)   chat records -> input_ids + assistant labels
    build_text_examples(paths, tokenizer, block_size)  raw text -> fixed-size blocks (pretraining)
    load_validated(paths, to_preference | to_prompt)   validated records for the rm / dpo / RL stages
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.data.formats import to_messages, to_text
from chatforge.data.sources import records_or_errors
from chatforge.errors import DataError

Paths = str | Path | Iterable[str | Path]


@dataclass
class DataReport:
    """What became of the records: examples made, tokens, truncations and skips with reasons.

    >>> r = DataReport(records=3, examples=2, tokens=40, trained_tokens=12, truncated=1, max_length=16)
    >>> r.skip("assistant reply cut off by max_length")
    >>> r.summary()
    '3 records -> 2 examples, 40 tokens (12 trained); 1 truncated to 16 tokens; skipped 1 (assistant reply cut off by max_length: 1)'
    """

    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int | None = None
    truncated: int = 0
    max_length: int | None = None
    skipped: Counter = field(default_factory=Counter)
    unit: str = "examples"

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        text = f"{self.records:,} records -> {self.examples:,} {self.unit}, {self.tokens:,} tokens"
        if self.trained_tokens is not None:
            text += f" ({self.trained_tokens:,} trained)"
        if self.truncated:
            text += f"; {self.truncated:,} truncated to {self.max_length} tokens"
        if self.skipped:
            reasons = ", ".join(f"{why}: {n:,}" for why, n in self.skipped.most_common())
            text += f"; skipped {sum(self.skipped.values()):,} ({reasons})"
        return text


def _as_list(paths: Paths) -> list[str | Path]:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def load_validated(paths: Paths, normaliser: Callable[[dict, str], object], with_where: bool = False) -> list:
    """Every record of `paths` through `normaliser(record, where)`, all checked before returning.

    Raises one `DataError` naming the first bad record and how many there are in all, or saying
    that there are no records. With `with_where` the items are `(where, value)` pairs.
    """
    files = _as_list(paths)
    out, first, bad = [], None, 0
    for path in files:
        for where, rec in records_or_errors(path):
            try:
                if isinstance(rec, DataError):
                    raise rec
                value = normaliser(rec, where)
            except DataError as e:
                bad += 1
                first = first or str(e)
                continue
            out.append((where, value) if with_where else value)
    if bad:
        more = f" (and {bad - 1:,} more bad records)" if bad > 1 else ""
        raise DataError(f"{first}{more}")
    if not out:
        raise DataError(f"{', '.join(map(str, files)) or 'no files given'}: no records")
    return out


def build_sft_examples(
    paths: Paths, tokenizer, max_length: int, assistant_only: bool = True
) -> tuple[list[dict], DataReport]:
    """`{"input_ids", "labels"}` per chat record (labels IGNORE_INDEX off the assistant replies).

    An example left with nothing to learn (its reply cut off by max_length) is skipped and counted.
    """
    from chatforge.data.templates import ensure_chat_template, tokenize_chat

    ensure_chat_template(tokenizer)
    records = load_validated(paths, to_messages)
    report = DataReport(records=len(records), trained_tokens=0, max_length=max_length)
    examples = []
    for messages in records:
        ex = tokenize_chat(tokenizer, messages, max_length, assistant_only)
        report.truncated += ex.truncated
        if ex.num_trainable == 0:
            report.skip("assistant reply cut off by max_length" if ex.truncated else "no trainable tokens")
            continue
        examples.append({"input_ids": ex.input_ids, "labels": ex.labels})
        report.tokens += len(ex.input_ids)
        report.trained_tokens += ex.num_trainable
    report.examples = len(examples)
    if not examples:
        raise DataError(f"no training examples left: {report.summary()}; raise data.max_length")
    return examples, report


def build_text_examples(paths: Paths, tokenizer, block_size: int) -> tuple[list[dict], DataReport]:
    """Pretraining blocks: each text + EOS, all concatenated, cut into `block_size` tokens.

    No BOS is added (tokenisation without special tokens): EOS alone separates documents. The last,
    shorter block is kept (the collator pads it); a 1-token tail, which has nothing to predict, is
    skipped and counted.

    >>> import pathlib, tempfile
    >>> from chatforge.models.tiny import tiny_tokenizer
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = path.write_text("hello world")
    >>> blocks, report = build_text_examples(path, tiny_tokenizer(), block_size=2)
    >>> [b["input_ids"] for b in blocks], report.summary()
    ([[263, 79], [351, 460]], '1 records -> 2 blocks, 5 tokens; skipped 1 (1-token tail: 1)')
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (got {block_size})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    texts = load_validated(paths, to_text)
    stream: list[int] = []
    for s in range(0, len(texts), 256):
        for ids in tokenizer(texts[s : s + 256], add_special_tokens=False)["input_ids"]:
            stream += ids
            stream.append(eos)
    blocks = []
    for s in range(0, len(stream), block_size):
        block = stream[s : s + block_size]
        if len(block) >= 2:
            blocks.append({"input_ids": block, "labels": list(block)})
    report = DataReport(records=len(texts), examples=len(blocks), tokens=len(stream), unit="blocks")
    if len(stream) % block_size == 1:
        report.skip("1-token tail")
    return blocks, report
