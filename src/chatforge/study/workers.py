"""How a scaling study's runs are trained: one after another in this process, or `jobs` at a time.

`run_study` asks for runs through two calls, `submit(runs)` and then `result(run)`:

- `Serial` (`jobs: 1`) trains a run in this process when its result is asked for, as always;
- `Pool` (`jobs` > 1) starts worker processes ("spawn": no forked torch state), each pinned to its
  own core(s) with `os.sched_setaffinity` where the OS has it, with `threads` torch threads (0: 1).
  Submitted runs wait in one queue, longest first (`grid.longest_first`); each is still
  `runner.run_one` in its own folder, so a finished run is skipped and an interrupted one resumes
  exactly as in serial mode. A worker's output comes back here line by line, prefixed `[RUN] `.
  `result(run)` waits for that run alone and reads its result.json from disk: the caller decides
  when a run's loss is read. A check run's log lines, its loss among them, are held back until
  then too (`run_study` asks for it only after the fit has written its prediction).

A run that fails stops the study: the other workers are interrupted (SIGTERM, which a worker turns
into the KeyboardInterrupt that makes the trainer save a checkpoint, as Ctrl-C does), and the
run's one-line error is raised here. A bug in a worker is raised with the worker's traceback.
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback

from chatforge.errors import ChatforgeError
from chatforge.study.grid import GridRun, StudyConfig, longest_first
from chatforge.study.runner import run_dir, run_one

STOP_WAIT_S = 60.0  # how long interrupted workers get to save their checkpoint before a kill


class Serial:
    """`jobs: 1`: each run trained in this process when its result is asked for."""

    def __init__(self, cfg: StudyConfig, tok, tok_path: str, blocks: list, held: list):
        self.args = (cfg, tok, tok_path, blocks, held)

    def submit(self, runs: list[GridRun]) -> None:
        """Nothing runs ahead of its `result` call."""

    def result(self, run: GridRun) -> dict:
        cfg, tok, tok_path, blocks, held = self.args
        return run_one(cfg, run, tok, tok_path, blocks, held)[0]

    def __enter__(self) -> Serial:
        return self

    def __exit__(self, *exc) -> None:
        pass


def worker_cores(index: int, threads: int, cpus: list[int]) -> set[int]:
    """The cores worker `index` is pinned to: `threads` of them (at least 1), in turn.

    >>> [worker_cores(i, 1, [0, 1]) for i in range(3)], worker_cores(1, 2, [0, 1, 2, 3])
    ([{0}, {1}, {0}], {2, 3})
    """
    t = max(1, threads)
    return {cpus[(index * t + k) % len(cpus)] for k in range(t)}


class Pool:
    """`jobs` > 1: runs trained by worker processes, started as runs are submitted (at most `jobs`)."""

    def __init__(self, cfg: StudyConfig, tok_path: str, blocks: list, held: list):
        import multiprocessing

        self.cfg = cfg
        self.data = (tok_path, blocks, held)
        self.ctx = multiprocessing.get_context("spawn")
        self.tasks = self.ctx.Queue()
        self.messages = self.ctx.Queue()
        self.procs: list = []
        self.submitted: set[str] = set()
        self.pending: set[str] = set()  # queued or training, not finished
        self.running: dict[int, str] = {}  # worker index -> the run it trains
        self.sealed: dict[str, list] = {}  # check run -> its log lines, shown when its result is read
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpus = cpus or list(range(os.cpu_count() or 1))

    def submit(self, runs: list[GridRun]) -> None:
        """Queue the runs not yet finished on disk, longest first, and start workers for them."""
        for run in longest_first([r for r in runs if r.name not in self.submitted]):
            self.submitted.add(run.name)
            if run.kind == "check":
                self.sealed[run.name] = []
            if not (run_dir(self.cfg.output_dir, run.name) / "result.json").is_file():
                self.tasks.put(run)
                self.pending.add(run.name)
        while len(self.procs) < min(self.cfg.jobs, len(self.pending) + len(self.running)):
            i = len(self.procs)
            cores = worker_cores(i, self.cfg.threads, self.cpus)
            p = self.ctx.Process(
                target=_work,
                args=(i, cores, max(1, self.cfg.threads), self.cfg, *self.data, self.tasks, self.messages),
                name=f"chatforge-study-{i}",
                daemon=True,
            )
            p.start()
            self.procs.append(p)

    def result(self, run: GridRun) -> dict:
        """Wait for `run` (submitting it if needed), then read its result.json."""
        if run.name not in self.submitted:
            self.submit([run])
        for msg in self.sealed.pop(run.name, []):
            self._handle(msg)
        while run.name in self.pending:
            self._handle(self._next())
        return json.loads((run_dir(self.cfg.output_dir, run.name) / "result.json").read_text())

    def _next(self) -> tuple:
        """The next message from a worker; a worker that died holding a run stops the study."""
        quiet = 0
        while True:
            try:
                return self.messages.get(timeout=1.0)
            except queue.Empty:
                pass
            dead = [i for i, p in enumerate(self.procs) if not p.is_alive()]
            lost = [i for i in dead if i in self.running]
            idle = len(dead) == len(self.procs) and self.pending
            quiet = quiet + 1 if lost or idle else 0
            if quiet >= 2:  # dead for two timeouts: whatever it sent has been read
                self.stop()
                if lost:
                    i = lost[0]
                    raise ChatforgeError(
                        f"{run_dir(self.cfg.output_dir, self.running[i])}: its worker process died "
                        f"(exit code {self.procs[i].exitcode}); rerun the study to resume it"
                    )
                raise ChatforgeError("every study worker exited with runs still to train")

    def _handle(self, msg: tuple) -> None:
        kind, index, name, *rest = msg
        if kind == "log" and name in self.sealed:  # not even its log lines before the prediction
            self.sealed[name].append(msg)
        elif kind == "log":
            stream, line = rest
            print(line, file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)
        elif kind == "start":
            self.running[index] = name
        elif kind == "done":
            self.running.pop(index, None)
            self.pending.discard(name)
        elif kind == "interrupted":
            self.stop()
            raise KeyboardInterrupt
        elif kind == "failed":
            message, tb = rest
            self.stop()
            if tb is None:
                raise ChatforgeError(message)
            raise RuntimeError(f"study worker {index} ({name or 'no run'}) failed:\n{tb}")

    def stop(self) -> None:
        """Interrupt every worker (each saves its checkpoint), wait for them, kill what is left."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        self._join(STOP_WAIT_S, show=True)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        self.running.clear()
        self.tasks.cancel_join_thread()  # runs left in the queue are dropped, not waited for

    def close(self) -> None:
        """Tell the workers there is nothing more to train and wait for them to exit."""
        for _ in self.procs:
            self.tasks.put(None)
        self._join(STOP_WAIT_S, show=True)
        self.stop()

    def _join(self, timeout: float, show: bool) -> None:
        """Wait for the workers to exit, reading their messages meanwhile (a worker whose queue is
        not read cannot exit); log lines are shown, every other message is dropped."""
        end = time.monotonic() + timeout
        while any(p.is_alive() for p in self.procs) and time.monotonic() < end:
            try:
                msg = self.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if show and msg[0] == "log":
                self._handle(msg)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()


def executor(cfg: StudyConfig, tok, tok_path: str, blocks: list, held: list) -> Serial | Pool:
    """`Serial` for `jobs: 1`, else a `Pool` of `jobs` workers."""
    if cfg.jobs > 1:
        return Pool(cfg, tok_path, blocks, held)
    return Serial(cfg, tok, tok_path, blocks, held)


# ---- inside a worker process -------------------------------------------------------------------


class _Lines(io.TextIOBase):
    """A worker's stdout or stderr: each complete line goes to the main process, prefixed."""

    encoding = "utf-8"

    def __init__(self, messages, index: int, stream: str):
        self.messages, self.index, self.stream = messages, index, stream
        self.prefix, self.name, self.buf = f"[worker {index}] ", None, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        *lines, self.buf = (self.buf + s).split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]  # a progress bar's last state, not its redraws
            if line.strip():
                self.messages.put(("log", self.index, self.name, self.stream, self.prefix + line))
        return len(s)

    def start(self, name: str | None) -> None:
        """Lines from now on belong to run `name` (None: to no run)."""
        if self.buf:
            self.write("\n")
        self.name = name
        self.prefix = f"[{name}] " if name else f"[worker {self.index}] "


def _interrupt_once(signum, frame) -> None:
    """SIGTERM (the pool stopping) or SIGINT (Ctrl-C) -> one KeyboardInterrupt; later ones are
    ignored so that the checkpoint it triggers is saved whole.

    Python swallows an exception raised inside a finaliser (it prints "Exception ignored in
    __del__" and goes on training), so a signal that lands in one is sent again 50 ms later."""
    if _in_finaliser(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _in_finaliser(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _work(index, cores, threads, cfg, tok_path, blocks, held, tasks, messages) -> None:
    """A worker: train the runs from `tasks` until None, reporting to `messages`."""
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    out, err = _Lines(messages, index, "stdout"), _Lines(messages, index, "stderr")
    sys.stdout, sys.stderr = out, err
    name = None
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)  # before torch starts its thread pool
        import torch

        from chatforge.models.load import load_tokenizer

        torch.set_num_threads(threads)
        tok = load_tokenizer(tok_path)
        while (run := tasks.get()) is not None:
            name = run.name
            out.start(name), err.start(name)
            messages.put(("start", index, name))
            run_one(cfg, run, tok, tok_path, blocks, held)
            out.start(None), err.start(None)
            messages.put(("done", index, name))
            name = None
    except KeyboardInterrupt:
        messages.put(("interrupted", index, name))
    except ChatforgeError as e:
        messages.put(("failed", index, name, str(e), None))
    except Exception:
        messages.put(("failed", index, name, "", traceback.format_exc()))
    finally:
        out.start(None), err.start(None)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        # the pool may stop this worker while it exits: a signal now would break its atexit hooks
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
