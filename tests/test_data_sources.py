"""Reading records from JSONL, JSON, CSV, Parquet, .txt, save_to_disk folders and the hub."""

from __future__ import annotations

import json
import re

import pytest

from chatforge.data.sources import read_many, read_records
from chatforge.errors import DataError


def test_jsonl_line_numbers_skip_blank_lines(jsonl):
    path = jsonl([{"text": "a"}, "", "   ", {"text": "b"}])
    assert list(read_records(path)) == [(f"{path}:1", {"text": "a"}), (f"{path}:4", {"text": "b"})]


def test_jsonl_bad_json_names_the_line(jsonl):
    path = jsonl([{"text": "a"}, '{"text": "b",}'])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON \(.+ at column \d+\)$"):
        list(read_records(path))


def test_jsonl_record_must_be_an_object(jsonl):
    path = jsonl(["[1, 2]"])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: expected a JSON object .*got list$"):
        list(read_records(path))


def test_jsonl_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        list(read_records(path))


def test_json_array_items(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [w for w, _ in read_records(path)] == [f"{path}:item 1", f"{path}:item 2"]


def test_json_array_bad_json_names_the_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: invalid JSON"):
        list(read_records(path))


def test_json_holding_json_lines(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [w for w, _ in read_records(path)] == [f"{path}:1", f"{path}:2"]


def test_csv_counts_the_header_as_line_1(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('prompt,completion\nhi,hello\n"multi\nline",x\nq,a\n')
    got = list(read_records(path))
    assert [w for w, _ in got] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert got[1][1] == {"prompt": "multi\nline", "completion": "x"}


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), path)
    assert list(read_records(path))[2] == (f"{path}:row 3", {"text": "c"})


def test_saved_dataset_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(tmp_path / "ds")
    assert list(read_records(tmp_path / "ds"))[1] == (f"{tmp_path / 'ds'}:row 2", {"text": "b"})
    dd = DatasetDict(
        {"train": Dataset.from_list([{"text": "t"}]), "test": Dataset.from_list([{"text": "e"}])}
    )
    dd.save_to_disk(tmp_path / "dd")
    assert [r for _, r in read_records(tmp_path / "dd")] == [{"text": "t"}]


def test_plain_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="not a datasets save_to_disk folder"):
        list(read_records(tmp_path))


def test_txt_is_one_record(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("Para one.\n\nPara two.\n")
    assert list(read_records(path)) == [(f"{path}:1", {"text": "Para one.\n\nPara two.\n"})]


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'; supported: \.jsonl, \.json, \.csv"):
        list(read_records(path))


def test_missing_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no such file or directory$"):
        list(read_records(path))
    with pytest.raises(DataError, match=r"^data/train\.jsonl: no such file or directory$"):
        list(read_records("data/train.jsonl"))


def test_hub_id_offline(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(
        DataError, match=r"^org/name:test: not found locally and could not be loaded from the hub"
    ):
        list(read_records("org/name:test"))


def test_hub_id_loads_the_split(monkeypatch):
    import datasets

    calls = []

    def load(repo, split):
        calls.append((repo, split))
        return datasets.Dataset.from_list([{"text": "hub"}])

    monkeypatch.setattr(datasets, "load_dataset", load)
    assert list(read_records("org/name")) == [("org/name:row 1", {"text": "hub"})]
    list(read_records("org/name:test"))
    assert calls == [("org/name", "train"), ("org/name", "test")]


def test_read_many_chains_files(jsonl):
    a, b = jsonl([{"text": "a"}], "a.jsonl"), jsonl([{"text": "b"}], "b.jsonl")
    assert [r["text"] for _, r in read_many([a, b])] == ["a", "b"]
    assert [r["text"] for _, r in read_many(a)] == ["a"]
