"""Shared fixtures: an offline tokenizer and tiny random models saved to disk."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from chatforge.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaMA-shaped model + tokenizer on disk, loadable by `from_pretrained`."""
    from chatforge.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def jsonl(tmp_path):
    """`jsonl(records, name="data.jsonl")` writes records (dicts or raw lines) and returns the path."""

    def _write(records, name="data.jsonl"):
        return write_jsonl(tmp_path / name, records)

    return _write
