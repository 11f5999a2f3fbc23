"""Read records from files, `datasets` folders or the hub, each tagged with where it came from.

Every record comes out as `(where, record)`: `where` is the `FILE:LINE` (or `FILE:item N`,
`FILE:row N`) prefix that error messages start with, so a bad record is named precisely however
deep the validation that rejects it. Numbers count from 1, like line numbers.

    path                    record                          where
    x.jsonl                 one JSON object per line        x.jsonl:LINE (blank lines skipped)
    x.json                  a JSON array of objects         x.json:item N
                            (or JSON Lines, when the file does not start with `[`)
    x.csv                   one row (header = field names)  x.csv:LINE (the header is line 1)
    x.parquet               one row                         x.parquet:row N
    DIR (save_to_disk)      one row (split `train` of a     DIR:row N
                            DatasetDict, or its only split)
    x.txt                   {"text": whole file}            x.txt:1
    org/name[:split]        one row of a hub dataset        org/name:row N (when it loads: offline
                            that is not a local path        runs only see the local cache)

A `.txt` file is one record, not one per paragraph: prose documents have blank lines inside them,
and splitting there would put an end-of-text token between paragraphs of the same document. Give
several documents as several files, or as JSONL `{"text": ...}` records.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
    >>> _ = path.write_text('{"text": "a"}\\n\\n{"text": "b"}\\n')
    >>> [(where.rsplit("/", 1)[1], rec) for where, rec in read_records(path)]
    [('d.jsonl:1', {'text': 'a'}), ('d.jsonl:3', {'text': 'b'})]
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from chatforge.errors import DataError

SUPPORTED = (
    ".jsonl",
    ".json",
    ".csv",
    ".parquet",
    ".txt",
    "a datasets save_to_disk folder",
    "org/name[:split]",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}


def looks_like_hub_id(path: str) -> bool:
    """True for `org/name` or `org/name:split` that is not obviously a local file name.

    >>> looks_like_hub_id("HuggingFaceH4/ultrachat_200k:train_sft"), looks_like_hub_id("data/x.jsonl")
    (True, False)
    >>> looks_like_hub_id("./org/name"), looks_like_hub_id("a/b/c")
    (False, False)
    """
    name = path.split(":", 1)[0]
    return bool(_HUB_ID.match(path)) and Path(name).suffix.lower() not in _FILE_SUFFIXES


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield `(where, record)` for every record of one file, folder or hub dataset.

    Raises `DataError` (a one-line message starting with `where`) at the first record that is not
    valid JSON or not an object, for a missing path and for an unsupported file type.
    """
    for where, rec in records_or_errors(path):
        if isinstance(rec, DataError):
            raise rec
        yield where, rec


def read_many(paths: str | Path | Iterable[str | Path]) -> Iterator[tuple[str, dict]]:
    """`read_records` over one path or several, in order."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        yield from read_records(path)


def records_or_errors(path: str | Path) -> Iterator[tuple[str, dict | DataError]]:
    """Like `read_records`, but a bad record comes out as `(where, DataError)`, so that a caller can
    count every bad record before stopping; problems with the file itself still raise."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        if looks_like_hub_id(name):
            yield from _hub(name)
            return
        raise DataError(f"{name}: no such file or directory")
    if p.is_dir():
        yield from _saved_dataset(p, name)
        return
    suffix = p.suffix.lower()
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet, ".txt": _txt}
    if suffix not in readers:
        raise DataError(
            f"{name}: unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}"
        )
    yield from readers[suffix](p, name)


def _object(where: str, value) -> dict | DataError:
    if isinstance(value, dict):
        return value
    return DataError(f"{where}: expected a JSON object {{...}}, got {type(value).__name__}")


def _json_error(where: str, e: json.JSONDecodeError) -> DataError:
    """`where: invalid JSON (what at column N)`; json's own text for an open string ends in "at".

    >>> str(_json_error("x.jsonl:3", json.JSONDecodeError("Unterminated string starting at", '{"a', 1)))
    'x.jsonl:3: invalid JSON (Unterminated string at column 2)'
    """
    what = e.msg.removesuffix(" at").removesuffix(" starting")
    return DataError(f"{where}: invalid JSON ({what} at column {e.colno})")


def _jsonl(p: Path, name: str) -> Iterator[tuple[str, dict | DataError]]:
    # Bytes, decoded line by line, so that a bad byte is reported on its own line.
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{name}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield where, _object(where, json.loads(line))
            except json.JSONDecodeError as e:
                yield where, _json_error(where, e)


def _decode(p: Path, name: str) -> str:
    """A whole file as text; a bad byte is a one-line error naming its line and place."""
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{name}:{line}: not valid UTF-8 (byte {e.start - line_start + 1} of the line)"
        ) from None


def _json(p: Path, name: str) -> Iterator[tuple[str, dict | DataError]]:
    with open(p, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        # Many datasets ship JSON Lines under a .json name.
        yield from _jsonl(p, name)
        return
    try:
        items = json.loads(_decode(p, name))
    except json.JSONDecodeError as e:
        raise _json_error(f"{name}:{e.lineno}", e) from None
    for n, item in enumerate(items, 1):
        where = f"{name}:item {n}"
        yield where, _object(where, item)


def _csv(p: Path, name: str) -> Iterator[tuple[str, dict | DataError]]:
    import io

    with io.StringIO(_decode(p, name), newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        while True:
            start = reader.line_num + 1  # a quoted cell may span lines: report where the row starts
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{name}:{start}: invalid CSV ({e})") from None
            if None in row:
                yield f"{name}:{start}", DataError(f"{name}:{start}: more cells than header fields")
                continue
            yield f"{name}:{start}", row


def _txt(p: Path, name: str) -> Iterator[tuple[str, dict | DataError]]:
    yield f"{name}:1", {"text": _decode(p, name)}


def _parquet(p: Path, name: str) -> Iterator[tuple[str, dict | DataError]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{name}: not a readable Parquet file ({type(e).__name__})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{name}:row {n}", row


def _rows(ds, name: str) -> Iterator[tuple[str, dict]]:
    for n, row in enumerate(ds, 1):
        yield f"{name}:row {n}", row


def _saved_dataset(p: Path, name: str) -> Iterator[tuple[str, dict]]:
    if not any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{name}: a folder, but not a datasets save_to_disk folder; list its files instead")
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(p))
    if isinstance(ds, DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{name}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
    yield from _rows(ds, name)


def _hub(name: str) -> Iterator[tuple[str, dict]]:
    repo, _, split = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception:  # offline, missing repo, missing split, auth: all mean "not available"
        raise DataError(
            f"{name}: not found locally and could not be loaded from the hub (offline?)"
        ) from None
    yield from _rows(ds, name)
