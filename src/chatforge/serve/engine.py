"""The model side of `chatforge chat` and `chatforge serve`: token-by-token sampling and prompt scores.

    engine = Engine(lm, tok)
    for step in engine.sample(prompt_ids, Sampling(max_tokens=32, temperature=0.7, seed=1)):
        print(step.text, end="")            # text pieces; `step.logprob`, `step.top` for logprobs

`sample` is a plain generator in the caller's thread: one forward per token with the KV cache, so
the caller stops generation by not asking for the next token (a client that went away, Ctrl-C in
`chatforge chat`), and `should_stop()` is checked before every forward (a stopping criterion a
server thread can flip). It ends at an end-of-turn token, `max_tokens`, or a `stop` string (the text
is cut before it and pieces that could begin one are held back, so a stop string is never streamed).

Log-probs are the model's own (temperature 1, before top-p), as OpenAI reports them. `seed` draws
from a private generator: the same request gives the same answer whatever ran before it.

`OneAtATime` runs jobs on a single worker thread in arrival order; a batching scheduler (issue 17)
can take its place behind the same `submit(job)`.
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from chatforge.serve import json_mode


@dataclass
class Sampling:
    """Validated settings of one answer (ranges are checked by the caller)."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 0 keeps only the most likely token
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0  # alternatives reported per token
    json: bool = False  # JSON mode: only tokens that keep the reply a valid JSON object (json_mode.py)


@dataclass
class Step:
    """One generated token: its id, the text it adds (may be '' while held back), its log-prob and the
    `top` alternatives [(token text, log-prob)]; `finish` is set on the last step: 'stop' or 'length'."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[str, float]]
    finish: str | None = None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string.

    >>> held_back("hello wor", ["world"]), held_back("hello", ["world"]), held_back("ab", [])
    (3, 0, 0)
    """
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def first_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop string starts in `text`, or -1.

    >>> first_stop("a, b. c", [".", ","]), first_stop("abc", ["x"])
    (1, -1)
    """
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def context_window(lm, override: int = 0) -> int:
    """Tokens the model attends to: `override`, else the model config's, else 2048."""
    if override:
        return override
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(lm.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class Engine:
    """A model and its tokenizer, ready to sample and to score prompts."""

    def __init__(self, lm, tok, name: str = "chatforge", max_context: int = 0, default_max_tokens: int = 256):
        from chatforge.data.templates import stop_token_ids

        self.lm, self.tok, self.name = lm, tok, name
        self.window = context_window(lm, max_context)
        self.default_max_tokens = default_max_tokens
        self.stop_ids = set(stop_token_ids(tok))
        self.texts: dict[int, str] = {}  # token id -> its text, for JSON mode
        # Prompt and prefix tuning (peft) add their virtual tokens on every forward: no KV cache there,
        # each step re-reads the whole sequence (slower, correct).
        peft_config = getattr(lm, "active_peft_config", None)
        self.use_cache = not getattr(peft_config, "is_prompt_learning", False)
        params = inspect.signature(lm.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.keep_kw = (
            "logits_to_keep" in params
        )  # logits of the last positions only: no (P, V) prompt logits
        lm.eval()

    def _forward(self, ids: list[int], new: int, past=None):
        """Logits (new, V) of the last `new` positions of `ids`, and the updated cache."""
        import torch

        device = next(self.lm.parameters()).device
        feed = ids[-new:] if self.use_cache and past is not None else ids
        kwargs = {self.cache_kw: past} if past is not None else {}
        if self.keep_kw:
            kwargs["logits_to_keep"] = new
        with torch.no_grad():
            out = self.lm(input_ids=torch.tensor([feed], device=device), use_cache=self.use_cache, **kwargs)
        cache = getattr(out, self.cache_kw, None) if self.use_cache else None
        return out.logits[0, -new:].float(), cache

    @staticmethod
    def _warp(scores, warpers):
        for w in warpers:
            scores = w(None, scores)
        return scores

    def _token_text(self, token: int) -> str:
        if token not in self.texts:
            self.texts[token] = self.tok.decode([token])
        return self.texts[token]

    def _json_token(self, last, warpers, gen, state):
        """JSON mode's draw: Gumbel-max over the warped scores (plain argmax when greedy), first valid."""
        import torch

        keys = last[0]
        if warpers:
            uniform = torch.rand(keys.shape, generator=gen).clamp_(1e-12, 1 - 1e-12).to(keys.device)
            keys = torch.log_softmax(self._warp(last, warpers)[0], -1) - torch.log(-torch.log(uniform))
        return json_mode.choose(keys, state, self.stop_ids, self._token_text)

    def _top(self, logprobs, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        values, ids = logprobs.topk(k)
        return [(self.tok.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]

    def sample(
        self, prompt_ids: list[int], s: Sampling, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Step]:
        """Yield one `Step` per generated token (see the module docstring for how it ends)."""
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        gen = torch.Generator()
        if s.seed is None:
            gen.seed()
        else:
            gen.manual_seed(s.seed)
        warpers = [TemperatureLogitsWarper(s.temperature), TopPLogitsWarper(s.top_p)] if s.temperature else []
        ids: list[int] = []
        text, sent = "", 0
        jstate = json_mode.START
        if s.max_tokens == 0 or should_stop():
            return
        logits, past = self._forward(prompt_ids, 1)
        while True:
            last = logits[-1:]
            logprobs = torch.log_softmax(last[0], -1)
            if s.json:
                token, jstate = self._json_token(last, warpers, gen, jstate)
                if token is None:  # nothing can continue the object: end here
                    return
            elif warpers:
                probs = torch.softmax(self._warp(last, warpers), -1).cpu()
                token = int(torch.multinomial(probs, 1, generator=gen))
            else:
                token = int(last[0].argmax())
            ids.append(token)
            finish = None
            if token in self.stop_ids:
                finish = "stop"
            elif s.json and json_mode.complete(jstate):
                text, finish = self.tok.decode(ids, skip_special_tokens=True), "stop"
            else:
                text = self.tok.decode(ids, skip_special_tokens=True)
                cut = first_stop(text, s.stop)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                elif len(ids) >= s.max_tokens:
                    finish = "length"
            ready = len(text) if finish else len(text) - held_back(text, s.stop)
            if not finish and text.endswith("\ufffd"):  # an incomplete UTF-8 character
                ready = min(ready, len(text) - 1)
            piece, sent = text[sent:ready] if ready > sent else "", max(sent, ready)
            yield Step(token, piece, float(logprobs[token]), self._top(logprobs, s.top_logprobs), finish)
            if finish or should_stop():
                return
            logits, past = self._forward([*prompt_ids, *ids], 1, past)

    def prompt_logprobs(self, prompt_ids: list[int], k: int) -> list[tuple[float, list[tuple[str, float]]]]:
        """For each prompt token after the first: (its log-prob given the tokens before, top `k`
        alternatives there). One forward pass; what /v1/completions `echo` reports."""
        import torch

        if len(prompt_ids) < 2:
            return []
        logits, _ = self._forward(prompt_ids, len(prompt_ids))
        logprobs = torch.log_softmax(logits[:-1], -1)
        got = logprobs.gather(1, torch.tensor(prompt_ids[1:], device=logits.device)[:, None])[:, 0].tolist()
        return [(lp, self._top(row, k)) for lp, row in zip(got, logprobs)]


@dataclass
class Job:
    """Work for the model: `run(engine, cancelled)` is called on the worker thread; `cancelled` is an
    Event the submitter sets when nobody waits for the result any more."""

    run: Callable
    cancelled: threading.Event = field(default_factory=threading.Event)


class OneAtATime:
    """A worker thread that runs submitted jobs one after another, in arrival order.

    Jobs already cancelled when their turn comes are skipped, so clients that left free the queue.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="chatforge-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not job.cancelled.is_set():
                job.run(self.engine, job.cancelled)
