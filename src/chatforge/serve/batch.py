"""Continuous batching for `chatforge serve`: concurrent requests share one batch of the model.

    scheduler = Batched(engine, max_batch=8)    # what `chatforge serve --max-batch 8` runs
    scheduler.submit(job)                       # an `engine.Job`, as `OneAtATime` takes

Every choice of every request is a row of one running `rl.engine.Rows` batch. Each tick of the
worker thread: rows waiting (new requests, in arrival order) are prefilled together, up to
`max_batch` rows in all, and `join` the running batch; every row's next token is picked from its
own logits with its own settings and RNG (`engine.next_tokens`: temperature, top_p, seed, JSON mode
as when it runs alone) and emitted to its request at once (streaming is per row); then rows that
finished (stop token, stop string, max_tokens) or whose client left leave the batch (`Rows.keep`)
and one forward (`Rows.step`) advances all the others. A client that disconnects frees its row at
the next tick, and the first waiting request takes it.

Prompt- and prefix-tuning adapters add virtual tokens on every forward (no KV cache to share):
`make_scheduler` serves them one request at a time (`OneAtATime`), as `--max-batch 1` does.
"""

from __future__ import annotations

import queue
from collections import deque
from dataclasses import dataclass

from chatforge.serve.engine import Engine, Job, OneAtATime, Reply, Worker, next_tokens


@dataclass
class _Request:
    """A submitted job and how many of its choices are not finished yet."""

    job: Job
    left: int
    ended: bool = False


@dataclass
class _Row:
    """One choice: its request, choice index, prompt ids and reply state."""

    request: _Request
    index: int
    prompt: list[int]
    reply: Reply


def can_batch(engine: Engine) -> bool:
    """Whether `Batched` can serve this model: it decodes with a KV cache (no prompt learning)."""
    return engine.use_cache


def make_scheduler(engine: Engine, max_batch: int = 8, log=print):
    """`Batched(engine, max_batch)`, or `OneAtATime` for max_batch 1 or a model `can_batch` refuses."""
    if max_batch > 1 and not can_batch(engine):
        log("chatforge serve: a prompt-learning adapter has no KV cache to batch: one request at a time")
    if max_batch <= 1 or not can_batch(engine):
        return OneAtATime(engine)
    return Batched(engine, max_batch)


class Batched(Worker):
    """A worker thread decoding up to `max_batch` choices at once (see the module docstring)."""

    def __init__(self, engine: Engine, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        self.waiting: deque[_Row] = deque()
        self.live: dict[int, _Row] = {}  # row id (in `rows.rows`) -> its row
        self.rows = None  # the running rl.engine.Rows, None when nothing runs
        self.next_id = 0
        self._start("chatforge-batch")

    def _work(self) -> None:
        import torch

        with torch.inference_mode():  # the batch lives in this thread only: no autograd bookkeeping
            while self._take(block=not self.live and not self.waiting):
                try:
                    self._admit()
                    if self.live:
                        self._tick()
                except Exception as e:  # noqa: BLE001 - every running request answers 500
                    for row in list(self.live.values()):
                        self._end(row.request, e)
                    self.live, self.rows = {}, None

    def _take(self, block: bool) -> bool:
        """Queue the choices of newly submitted jobs (waiting for one when `block`); False on close."""
        while True:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            block = False
            request = _Request(job, sum(len(samplings) for _, samplings in job.prompts))
            try:
                self._queue(request)
            except Exception as e:  # noqa: BLE001 - scoring its prompt failed: that request answers 500
                self._end(request, e)

    def _queue(self, request: _Request) -> None:
        """Each choice of the request waits for a row (its prompt's scores emitted first, if asked)."""
        job, index = request.job, 0
        for ids, samplings in job.prompts:
            scores = None
            if job.prompt_top is not None and not job.cancelled.is_set():
                scores = self.engine.prompt_logprobs(ids, job.prompt_top)
            for s in samplings:
                if scores is not None:
                    job.emit((index, scores))
                if s.max_tokens == 0:
                    self._finish(request)
                else:
                    self.waiting.append(_Row(request, index, ids, Reply(self.engine, s)))
                index += 1

    def _admit(self) -> None:
        """Prefill waiting rows (up to `max_batch` running) and join them to the running batch."""
        from chatforge.rl.engine import Rows

        new: list[_Row] = []
        while self.waiting and len(self.live) + len(new) < self.max_batch:
            row = self.waiting.popleft()
            if row.request.job.cancelled.is_set():
                self._finish(row.request)
            else:
                new.append(row)
        if not new:
            return
        first: dict[tuple, int] = {}  # n choices of one prompt: prefilled once, the cache shared
        source = [first.setdefault(tuple(r.prompt), len(first)) for r in new]
        ids = list(range(self.next_id, self.next_id + len(new)))
        self.next_id += len(new)
        capacity = max(len(r.prompt) + r.reply.s.max_tokens for r in new)
        self.live.update(zip(ids, new))  # before the forward: a failure there answers them too
        batch = Rows.prefill(self.engine.lm, [list(p) for p in first], source, capacity, ids)
        if self.rows is None:
            self.rows = batch
        else:
            self.rows.join(batch)

    def _tick(self) -> None:
        """Pick, emit and check one token per running row; the rows still wanted take one step."""
        import torch

        ids = self.rows.rows.tolist()
        rows = [self.live[i] for i in ids]
        logits = self.rows.logits
        tokens = next_tokens(logits, [r.reply for r in rows])
        logprobs = torch.log_softmax(logits, -1)
        wanted = []
        for row_id, row, token, lp in zip(ids, rows, tokens, logprobs):
            job = row.request.job
            going = token is not None and not job.cancelled.is_set()
            if going:
                step = row.reply.advance(token, lp)
                job.emit((row.index, step))
                going = step.finish is None and not job.cancelled.is_set()
            wanted.append(going)
            if not going:
                self._release(row_id)
        keep = torch.tensor(wanted, device=logits.device)
        self.rows.keep(keep)
        if not len(self.rows):
            self.rows = None
            return
        self.rows.step(torch.tensor(tokens, device=logits.device)[keep])

    def _release(self, row_id: int) -> None:
        """A row leaves the batch (finished, or its client left): its request may be complete."""
        self._finish(self.live.pop(row_id).request)

    def _finish(self, request: _Request) -> None:
        request.left -= 1
        if request.left == 0:
            self._end(request)

    def _end(self, request: _Request, error: Exception | None = None) -> None:
        if request.ended:
            return
        request.ended = True
        if error is not None:
            request.job.emit(error)
            request.job.cancelled.set()  # its rows still waiting are dropped at admission
        request.job.emit(None)
