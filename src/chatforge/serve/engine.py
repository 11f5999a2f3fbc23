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

Each answer's state (tokens, text sent, its RNG, JSON mode) is a `Reply`; `next_tokens` picks the
next token of a batch of replies from their rows of logits, so one request alone (`sample`) and a
batch of requests (`serve.batch.Batched`, continuous batching) draw the same tokens. A server hands
its `Job`s to a scheduler: `OneAtATime` (one worker thread, arrival order, `sample` per choice) or
`serve.batch.Batched`; both take `submit(job)`.
"""

from __future__ import annotations

import inspect
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from chatforge.models.attention import use_decode_attention
from chatforge.models.packed import pack_linears
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
        pack_linears(lm)  # bf16 on a CPU: weights laid out once for oneDNN (models.packed), for good
        use_decode_attention(lm)  # bf16 on a CPU: a decoding step's attention, fast (models.attention)

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

    def token_text(self, token: int) -> str:
        """A token's text alone (cached: JSON mode asks for many)."""
        if token not in self.texts:
            self.texts[token] = self.tok.decode([token])
        return self.texts[token]

    def top(self, logprobs, k: int) -> list[tuple[str, float]]:
        """The `k` most likely (token text, log-prob) of a row of log-probs (V,)."""
        if k <= 0:
            return []
        values, ids = logprobs.topk(k)
        return [(self.tok.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]

    def sample(
        self, prompt_ids: list[int], s: Sampling, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Step]:
        """Yield one `Step` per generated token (see the module docstring for how it ends)."""
        import torch

        reply = Reply(self, s)
        if s.max_tokens == 0 or should_stop():
            return
        logits, past = self._forward(prompt_ids, 1)
        while True:
            (token,) = next_tokens(logits[-1:], [reply])
            if token is None:  # JSON mode: nothing can continue the object
                return
            step = reply.advance(token, torch.log_softmax(logits[-1], -1))
            yield step
            if step.finish or should_stop():
                return
            logits, past = self._forward([*prompt_ids, *reply.ids], 1, past)

    def prompt_logprobs(self, prompt_ids: list[int], k: int) -> list[tuple[float, list[tuple[str, float]]]]:
        """For each prompt token after the first: (its log-prob given the tokens before, top `k`
        alternatives there). One forward pass; what /v1/completions `echo` reports."""
        import torch

        if len(prompt_ids) < 2:
            return []
        logits, _ = self._forward(prompt_ids, len(prompt_ids))
        logprobs = torch.log_softmax(logits[:-1], -1)
        got = logprobs.gather(1, torch.tensor(prompt_ids[1:], device=logits.device)[:, None])[:, 0].tolist()
        return [(lp, self.top(row, k)) for lp, row in zip(got, logprobs)]


class Reply:
    """One answer on its way: its settings, its own RNG (seeded: the same answer whatever runs beside
    it), the tokens so far and how much of their text was sent."""

    def __init__(self, engine: Engine, s: Sampling):
        import torch

        from chatforge.rl.engine import Sampling as Law

        self.engine, self.s = engine, s
        self.gen = torch.Generator()
        if s.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(s.seed)
        self.law = Law(greedy=True) if s.temperature == 0 else Law(temperature=s.temperature, top_p=s.top_p)
        self.ids: list[int] = []
        self.text, self.sent, self.json_state = "", 0, json_mode.START

    def uniform(self):
        """(1,) float64: the number behind this reply's next draw."""
        import torch

        return torch.rand(1, dtype=torch.float64, generator=self.gen)

    def json_token(self, logits) -> int | None:
        """JSON mode's pick from logits (1, V): Gumbel-max over the warped scores (the plain scores when
        greedy), the first that keeps the object valid; None when nothing can."""
        import torch

        keys = logits[0]
        if not self.law.greedy:
            uniform = torch.rand(keys.shape, generator=self.gen).clamp_(1e-12, 1 - 1e-12).to(keys.device)
            keys = torch.log_softmax(self.law.warp(logits)[0], -1) - torch.log(-torch.log(uniform))
        token, self.json_state = json_mode.choose(
            keys, self.json_state, self.engine.stop_ids, self.engine.token_text
        )
        return token

    def advance(self, token: int, logprobs) -> Step:
        """Take `token` (logprobs (V,): the model's log-probs where it was drawn); the `Step` it makes."""
        s, tok = self.s, self.engine.tok
        self.ids.append(token)
        finish = None
        if token in self.engine.stop_ids:
            finish = "stop"
        elif s.json and json_mode.complete(self.json_state):
            self.text, finish = tok.decode(self.ids, skip_special_tokens=True), "stop"
        else:
            self.text = tok.decode(self.ids, skip_special_tokens=True)
            cut = first_stop(self.text, s.stop)
            if cut >= 0:
                self.text, finish = self.text[:cut], "stop"
            elif len(self.ids) >= s.max_tokens:
                finish = "length"
        text = self.text
        ready = len(text) if finish else len(text) - held_back(text, s.stop)
        if not finish and text.endswith("\ufffd"):  # an incomplete UTF-8 character
            ready = min(ready, len(text) - 1)
        piece, self.sent = text[self.sent : ready] if ready > self.sent else "", max(self.sent, ready)
        top = self.engine.top(logprobs, s.top_logprobs)
        return Step(token, piece, float(logprobs[token]), top, finish)


def next_tokens(logits, replies: list[Reply]) -> list[int | None]:
    """Each reply's next token from its row of float32 logits (B, V): one draw from its own RNG
    (`rl.engine.pick_tokens`, per-row settings), JSON-mode replies by `Reply.json_token`."""
    import torch

    from chatforge.rl.engine import pick_tokens

    out: list[int | None] = [None] * len(replies)
    plain = [b for b, r in enumerate(replies) if not r.s.json]
    if plain:
        uniform = torch.stack([replies[b].uniform() for b in plain]).to(logits.device)
        picked = pick_tokens(logits[plain], [replies[b].law for b in plain], uniform)
        for b, token in zip(plain, picked.tolist()):
            out[b] = token
    for b, r in enumerate(replies):
        if r.s.json:
            out[b] = r.json_token(logits[b : b + 1])
    return out


@dataclass
class Job:
    """The answers one request wants: `prompts` [(prompt ids, one Sampling per choice)], choices
    numbered across prompts. A scheduler calls `emit((choice, Step))` per token, first `emit((choice,
    Engine.prompt_logprobs))` for each choice when `prompt_top` is set, `emit(exception)` if the model
    failed, and `emit(None)` last. `cancelled` is set by the submitter when nobody waits any more."""

    prompts: list[tuple[list[int], list[Sampling]]]
    emit: Callable[[object], None]
    prompt_top: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


def run_alone(engine: Engine, job: Job) -> None:
    """Sample every choice of `job` in turn with `Engine.sample`."""
    try:
        index = 0
        for ids, samplings in job.prompts:
            scores = None if job.prompt_top is None else engine.prompt_logprobs(ids, job.prompt_top)
            for s in samplings:
                if job.cancelled.is_set():
                    return
                if scores is not None:
                    job.emit((index, scores))
                for step in engine.sample(ids, s, job.cancelled.is_set):
                    job.emit((index, step))
                index += 1
    except Exception as e:  # noqa: BLE001 - handed to the request, which answers 500
        job.emit(e)
    finally:
        job.emit(None)


class Worker:
    """A scheduler's frame: submitted jobs queue up for one worker thread running `_work`, which
    ends at `close()` (a None on the queue). Subclasses set their state, then call `_start`."""

    def _start(self, name: str) -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        raise NotImplementedError


class OneAtATime(Worker):
    """A worker thread that runs submitted jobs one after another, in arrival order.

    Jobs already cancelled when their turn comes are skipped, so clients that left free the queue.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._start("chatforge-generate")

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                job.emit(None)
            else:
                run_alone(self.engine, job)
