"""Rewards for RL: rule-based functions (built-in or your own) and a reward model, combined with weights.

A reward function scores a batch of responses:

    def my_reward(prompts: list[str], responses: list[str], answers: list[str | None]) -> list[float]:
        return [1.0 if "please" in r else 0.0 for r in responses]

`prompts` are the last user turns, `responses` the decoded completions (special tokens removed),
`answers` the records' `answer` fields (None where a record has none). It returns one finite number
per response. Name it in the config as `module:function` (importable) or `path/to/file.py:function`;
built-ins go by name:

    exact_match     1 if the response is exactly the answer (chatforge.data.tasks.verify rules)
    numeric_match   1 if the last number in the response equals the answer's number
    final_answer    1 if the response's final answer (the number after its last "The answer is", else
                    its last number) equals the answer: worked steps count (the arithmetic task's rule)
    non_empty       1 if the response has any non-space text
    single_line     1 if the response is one non-empty line
    valid_json      1 if the response parses as JSON
    length_penalty  -min(1, characters / 200): weight it to prefer short answers

`RuleRewards(["exact_match", "my.py:polite"], [1.0, 0.5])` sums the weighted functions; a function
that raises or returns the wrong thing stops the run with a `ChatforgeError` naming it.
`ModelReward` scores token sequences with a reward model's score head (`chatforge rm` output),
normalised with the statistics the reward stage saved. `Scorer` combines both into one total per
completion (what PPO and GRPO call).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError, ConfigError

RewardFn = Callable[[list[str], list[str], list], list[float]]


# Built-ins ---------------------------------------------------------------------------------------


def exact_match(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """1.0 where the response is the answer (surrounding space and one final period ignored).

    >>> exact_match(["2+3?", "2+3?"], [" 5.", "It is 5"], ["5", "5"])
    [1.0, 0.0]
    """
    from chatforge.data.answers import verify

    return [float(a is not None and verify("mixed", r, a)) for r, a in zip(responses, answers)]


def numeric_match(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """1.0 where the last number in the response equals the number in the answer.

    >>> numeric_match(["q", "q", "q"], ["The answer is 1,200.", "12", "none"], ["1200", "1200", "1"])
    [1.0, 0.0, 0.0]
    """
    from chatforge.data.answers import extract_number

    out = []
    for r, a in zip(responses, answers):
        want = extract_number(a) if a is not None else None
        got = extract_number(r)
        out.append(float(want is not None and got is not None and math.isclose(got, want, abs_tol=1e-9)))
    return out


def final_answer(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """1.0 where the response's final answer is the answer, read as `verify` reads arithmetic.

    The number after the last "The answer is" (or "answer:"), else the last number; answers that are
    not integers must match exactly.

    >>> final_answer(["q"] * 3, ["3 x 6 = 18. 18 + 4 = 22. The answer is 22.", "22", "18 + 4 = 23."], ["22"] * 3)
    [1.0, 1.0, 0.0]
    """
    from chatforge.data.answers import verify

    return [float(a is not None and verify("arithmetic", r, a)) for r, a in zip(responses, answers)]


def non_empty(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """1.0 where the response has any non-space text.

    >>> non_empty(["q", "q"], ["hi", "  "], [None, None])
    [1.0, 0.0]
    """
    return [float(bool(r.strip())) for r in responses]


def single_line(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """1.0 where the response is one non-empty line.

    >>> single_line(["q", "q", "q"], ["one line", "two\\nlines", ""], [None] * 3)
    [1.0, 0.0, 0.0]
    """
    return [float(bool(r.strip()) and "\n" not in r.strip()) for r in responses]


def valid_json(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """1.0 where the response parses as JSON.

    >>> valid_json(["q", "q"], ['{"a": 1}', "{a: 1}"], [None, None])
    [1.0, 0.0]
    """
    out = []
    for r in responses:
        try:
            json.loads(r)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


def length_penalty(prompts: list[str], responses: list[str], answers: list) -> list[float]:
    """-characters / 200, capped at -1: weight it to prefer shorter answers.

    >>> length_penalty(["q", "q"], ["", "x" * 50], [None, None])
    [0.0, -0.25]
    """
    return [0.0 - min(1.0, len(r) / 200) for r in responses]


BUILTINS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "numeric_match": numeric_match,
    "final_answer": final_answer,
    "non_empty": non_empty,
    "single_line": single_line,
    "valid_json": valid_json,
    "length_penalty": length_penalty,
}
NEEDS_ANSWER = ("exact_match", "numeric_match", "final_answer")


def resolve(spec: str) -> RewardFn:
    """A built-in name, `package.module:function` or `path/to/file.py:function` -> the function."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(
            f"reward function '{spec}' is not a built-in ({', '.join(BUILTINS)}) "
            "nor module:function / file.py:function"
        )
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward function '{spec}': {path} does not exist")
        module_name = f"chatforge_user_reward_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ChatforgeError(f"reward function '{spec}': importing {path} failed: {e!r}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"reward function '{spec}': cannot import {where} ({e})") from e
        except Exception as e:  # the user's module raised while it was imported
            raise ChatforgeError(f"reward function '{spec}': importing {where} failed: {e!r}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward function '{spec}': {where} has no function {name}")
    return fn


def short_name(spec: str) -> str:
    """`reward/NAME` metric name of a spec.

    >>> short_name("exact_match"), short_name("rewards/mine.py:polite"), short_name("pkg.mod:fn")
    ('exact_match', 'polite', 'fn')
    """
    return spec.rpartition(":")[2] or spec


class RuleRewards:
    """Weighted sum of reward functions; `__call__` also returns each function's raw values."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float] = ()):
        if weights and len(weights) != len(specs):
            raise ConfigError(
                f"{len(weights)} reward weights for {len(specs)} reward functions: give one weight each"
            )
        self.specs = list(specs)
        self.weights = [float(w) for w in weights] or [1.0] * len(specs)
        self.fns = [resolve(s) for s in self.specs]

    @property
    def needs_answers(self) -> list[str]:
        """The built-ins among the specs that compare against each record's `answer`."""
        return [s for s in self.specs if s in NEEDS_ANSWER]

    @property
    def names(self) -> list[str]:
        """Short metric names: the function name of each spec (`my.py:polite` -> `polite`)."""
        return [short_name(s) for s in self.specs]

    def __call__(
        self, prompts: list[str], responses: list[str], answers: list
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per response, {spec: raw values}) for a batch."""
        total = [0.0] * len(responses)
        parts = {}
        for spec, fn, w in zip(self.specs, self.fns, self.weights):
            try:
                values = fn(list(prompts), list(responses), list(answers))
            except Exception as e:
                raise ChatforgeError(f"reward function '{spec}' raised {type(e).__name__}: {e}") from e
            values = _check(spec, values, len(responses))
            parts[spec] = values
            total = [t + w * v for t, v in zip(total, values)]
        return total, parts


def _check(spec: str, values, n: int) -> list[float]:
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ChatforgeError(f"reward function '{spec}' must return a list of numbers") from None
    if len(values) != n:
        raise ChatforgeError(f"reward function '{spec}' returned {len(values)} values for {n} responses")
    if not all(math.isfinite(v) for v in values):
        raise ChatforgeError(f"reward function '{spec}' returned a NaN or infinite value")
    return values


class ModelReward:
    """A reward model's scalar score per sequence, (score - mean) / std with its saved statistics.

    `model` is a `ScalarHeadModel`; `adapter` (lean layout) is the name of its LoRA adapter on a
    shared base, switched on while scoring by the `switch` context manager the layout provides.
    `ModelReward.from_dir(path)` loads a `chatforge rm` output on its own (a separate model with its
    own tokenizer); `score_texts` then scores decoded responses, so the policy's tokenizer may differ.
    """

    def __init__(self, model, meta: dict | None = None, switch=None, tokenizer=None, max_length: int = 1024):
        self.model = model
        self.switch = switch
        self.tokenizer = tokenizer
        self.max_length = max_length
        meta = meta or {}
        self.mean = float(_first(meta, ("reward_mean", "mean", "score_mean"), 0.0))
        self.std = float(_first(meta, ("reward_std", "std", "score_std"), 1.0)) or 1.0

    @classmethod
    def from_dir(cls, path: str | Path, device=None, dtype=None, max_length: int = 1024) -> ModelReward:
        """Load a reward model dir: a peft adapter dir or a full model dir, plus score_head.* files."""
        from chatforge.models.adapters import is_adapter_dir, load_adapter_model
        from chatforge.models.heads import ScalarHeadModel, disable_dropout, load_head
        from chatforge.models.load import load_model, load_tokenizer, pick_device

        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"reward model {path} does not exist (give a `chatforge rm` final/ dir)")
        if not (path / "score_head.safetensors").is_file():
            raise ConfigError(f"reward model {path}: no score_head.safetensors (not a `chatforge rm` output)")
        device = device or pick_device()
        head, meta = load_head(path, "score")
        if is_adapter_dir(path):
            lm = load_adapter_model(path, dtype=dtype, device=device)
        else:
            lm = load_model(str(path), dtype=dtype, device=device)
        lm.eval().requires_grad_(False)
        disable_dropout(lm)
        model = ScalarHeadModel(lm, head.to(device), name="score").eval()
        return cls(model, meta, tokenizer=load_tokenizer(str(path)), max_length=max_length)

    def score(self, input_ids, attention_mask, position_ids=None):
        """Normalised scores (B,) fp32 read at each row's last real token."""
        import contextlib

        import torch

        from chatforge.models.heads import last_token_index

        with torch.no_grad(), self.switch() if self.switch else contextlib.nullcontext():
            device = next(self.model.parameters()).device
            values = self.model(input_ids.to(device), attention_mask.to(device), _opt(position_ids, device))
            raw = values.gather(1, last_token_index(attention_mask.to(device))[:, None]).squeeze(1)
        return ((raw.float() - self.mean) / self.std).to(input_ids.device)

    def score_texts(
        self, conversations: list[list[dict]], responses: list[str], batch_size: int = 16
    ) -> list[float]:
        """Normalised scores of each prompt conversation answered by `responses[i]`, via this model's tokenizer."""
        from chatforge.data.collate import pad_batch
        from chatforge.data.templates import tokenize_prompt_response

        if self.tokenizer is None:
            raise ChatforgeError(
                "score_texts needs the reward model's tokenizer (load it with ModelReward.from_dir)"
            )
        rows = []
        for conv, text in zip(conversations, responses):
            # an empty reply still gets a score: the template's end-of-turn alone
            reply = [{"role": "assistant", "content": text if text.strip() else " "}]
            ids, _, _ = tokenize_prompt_response(self.tokenizer, conv, reply, self.max_length)
            rows.append({"input_ids": ids})
        out: list[float] = []
        for s in range(0, len(rows), batch_size):
            b = pad_batch(rows[s : s + batch_size], self.tokenizer.pad_token_id)
            out += self.score(b["input_ids"], b["attention_mask"], b["position_ids"]).tolist()
        return out


def _opt(t, device):
    return None if t is None else t.to(device)


def _first(meta: dict, keys: tuple[str, ...], default):
    for k in keys:
        if isinstance(meta.get(k), (int, float)):
            return meta[k]
    return default


@dataclass
class Scorer:
    """Rule rewards and/or a reward model -> one total per completion and the parts for logging."""

    rules: RuleRewards | None
    model: ModelReward | None
    model_weight: float = 1.0

    def __call__(self, prompts, responses) -> tuple[list[float], dict[str, float]]:
        """prompts: the PromptItem of each completion; responses: decoded texts."""
        total = [0.0] * len(responses)
        means = {}
        if self.rules is not None:
            total, parts = self.rules([p.text for p in prompts], responses, [p.answer for p in prompts])
            for name, values in zip(self.rules.names, parts.values()):
                means[f"reward/{name}"] = sum(values) / len(values)
        if self.model is not None:
            scores = self.model.score_texts([p.messages for p in prompts], responses)
            means["reward/model"] = sum(scores) / len(scores)
            total = [t + self.model_weight * s for t, s in zip(total, scores)]
        return total, means
