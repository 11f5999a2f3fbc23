"""The ASGI app of `chatforge serve` (FastAPI on uvicorn) and the steps between a request and the model.

`chat_job` / `completion_jobs` turn a validated request into prompt ids and one `Sampling` per choice,
refusing what cannot run (unknown model: 404; prompt + max_tokens over the context window: 400, never
a cut prompt). `run_on` hands the work to the scheduler (`batch.Batched`, continuous batching, or
`engine.OneAtATime`, one request at a time: `batch.make_scheduler`) and yields what it emits; leaving
early cancels the job.
`create_app` puts the routes (`routes.py`) behind CORS and `guard.GuardMiddleware`.
"""

from __future__ import annotations

import asyncio
import time

from chatforge.serve.engine import Engine, Job, Sampling
from chatforge.serve.guard import Guard, GuardMiddleware, plain_error
from chatforge.serve.protocol import ApiError, ChatRequest, CompletionRequest


def _check_model(engine: Engine, model: str | None) -> None:
    if model is not None and model != engine.name:
        raise ApiError(
            f"model {model!r} is not served here; this server has {engine.name!r}",
            404,
            "model",
            "model_not_found",
        )


def _budget(
    engine: Engine, prompt_len: int, asked: int | None, default: int, param: str, prompt_param: str
) -> int:
    """The reply length: what was asked if prompt + reply fit the window (else 400), or the default
    clamped to what the window leaves. `param`, `prompt_param`: the request fields to name."""
    room = engine.window - prompt_len
    if room < 0 or (room == 0 and asked != 0):
        raise ApiError(
            f"the prompt is {prompt_len} tokens; the context window is {engine.window}",
            param=prompt_param if room < 0 or asked is None else param,
            code="context_length_exceeded",
        )
    if asked is None:
        return min(default, room)
    if asked > room:
        raise ApiError(
            f"prompt ({prompt_len} tokens) + {param} ({asked}) is over the context window ({engine.window})",
            param=param,
            code="context_length_exceeded",
        )
    return asked


def _sampling(req, max_tokens: int, top_logprobs: int, choice: int) -> Sampling:
    seed = None if req.seed is None else (req.seed + choice) % 2**63
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=seed,
        stop=req.stops(),
        top_logprobs=top_logprobs,
    )


def chat_job(engine: Engine, req: ChatRequest) -> tuple[list[int], list[Sampling]]:
    """(prompt ids, one Sampling per choice) of a validated chat request; 4xx ApiError if it cannot run."""
    from chatforge.data.templates import tokenize_prompt

    _check_model(engine, req.model)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
    ]
    ids = tokenize_prompt(engine.tok, messages)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    budget = _budget(engine, len(ids), asked, engine.default_max_tokens, param, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else 0
    samplings = [_sampling(req, budget, k, i) for i in range(req.n or 1)]
    if req.response_format is not None and req.response_format.type == "json_object":
        for s in samplings:
            s.json = True
    return ids, samplings


def completion_jobs(engine: Engine, req: CompletionRequest) -> list[tuple[list[int], list[Sampling]]]:
    """For each prompt of a validated completions request: (prompt ids, one Sampling per choice)."""
    _check_model(engine, req.model)
    vocab = len(engine.tok)
    out = []
    for i, p in enumerate(req.prompts()):
        ids = list(engine.tok(p)["input_ids"]) if isinstance(p, str) else p
        if not ids:
            raise ApiError(f"prompt[{i}] is empty", param="prompt")
        if max(ids) >= vocab:
            raise ApiError(f"prompt[{i}] has token id {max(ids)}; the vocabulary has {vocab}", param="prompt")
        budget = _budget(engine, len(ids), req.max_tokens, 16, "max_tokens", "prompt")
        k = req.logprobs or 0
        out.append((ids, [_sampling(req, budget, k, c) for c in range(req.n or 1)]))
    return out


async def run_on(scheduler, prompts, prompt_top: int | None = None, is_disconnected=None):
    """Sample `prompts` [(prompt ids, one Sampling per choice)] on the scheduler (an `engine.Job`);
    yield the (choice index, Step or prompt scores) pairs it emits, as they come.

    Leaving the loop early (a client gone, an error) cancels the job: its generation stops at the
    next token. `is_disconnected` (an async callable) is polled at least once a second."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def emit(item) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is going down
            pass

    job = Job(prompts, emit, prompt_top)
    scheduler.submit(job)
    checked = time.monotonic()
    try:
        while True:
            if is_disconnected is not None and time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if await is_disconnected():
                    return
            try:
                item = await asyncio.wait_for(items.get(), 1.0)
            except asyncio.TimeoutError:
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise ApiError(f"generation failed: {item}", 500, kind="server_error")
            yield item
    finally:
        job.cancelled.set()


def create_app(engine: Engine, guard: Guard, scheduler=None, log=print):
    """The ASGI app: routes (`chatforge.serve.routes`) behind CORS and `GuardMiddleware`; `scheduler`
    default: `batch.make_scheduler(engine)`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.middleware.cors import CORSMiddleware

    from chatforge.serve.batch import make_scheduler
    from chatforge.serve.routes import add_routes

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler = engine, scheduler or make_scheduler(engine)
    app.state.created = int(time.time())
    add_routes(app)

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(plain_error(e.status_code, str(e.detail), code)[1], e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e: RequestValidationError):
        return JSONResponse(ApiError(str(e.errors()[0]["msg"])).body(), 400)

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):
        return JSONResponse(plain_error(500, f"internal error: {type(e).__name__}: {e}")[1], 500)

    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?",
        allow_origins=sorted(guard.origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["authorization", "content-type"],
    )
    return GuardMiddleware(app, guard, log)


def head_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline on request heads: a connection that has not sent a whole
    request line and headers within `seconds` of opening (or of its last response) is closed, so a
    client trickling bytes cannot hold one of the connection slots forever. Bodies have their own
    limit (`guard.Guard.timeout`)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


def make_server(app, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0):
    """(uvicorn server, bound socket): `server.run(sockets=[sock])` serves; port 0 picks a free port."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    config = uvicorn.Config(
        app,
        http=head_deadline_protocol(timeout),
        access_log=False,  # GuardMiddleware logs each request, escaped
        log_level="warning",
        timeout_keep_alive=max(1, int(timeout)),
        limit_concurrency=64,
        h11_max_incomplete_event_size=64 * 1024,
        server_header=False,
        lifespan="off",
    )
    return uvicorn.Server(config), sock
