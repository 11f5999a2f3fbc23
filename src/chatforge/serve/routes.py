"""The endpoints of `chatforge serve` and the OpenAI response shapes they return.

Each generating endpoint: parse and validate the body (`protocol.parse`), turn it into prompt ids and
one `Sampling` per choice (`app.chat_job` / `app.completion_jobs`, which refuse what cannot
run), then consume `(choice index, Step)` pairs from the scheduler (`app.run_on`) into one JSON
response or a stream of server-sent events ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from chatforge.serve.engine import Step
from chatforge.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse


def _token_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(engine, step: Step) -> dict:
    """One entry of a chat choice's `logprobs.content`."""
    entry = _token_entry(engine.tok.decode([step.token_id]), step.logprob)
    entry["top_logprobs"] = [_token_entry(t, lp) for t, lp in step.top]
    return entry


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _error_as_event(events):
    """A failure after a stream has begun (the status is already sent) becomes a last `error` event."""
    try:
        async for event in events:
            yield event
    except ApiError as e:
        yield _sse(e.body())


def add_routes(app) -> None:
    from chatforge.serve.app import chat_job, completion_jobs, run_on
    from chatforge.serve.server import PAGE

    def model_card(engine) -> dict:
        return {"id": engine.name, "object": "model", "created": app.state.created, "owned_by": "chatforge"}

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": app.state.engine.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(app.state.engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        engine = app.state.engine
        if model_id != engine.name:
            raise ApiError(f"model {model_id!r} is not served here", 404, "model", "model_not_found")
        return model_card(engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine = app.state.engine
        req = parse(ChatRequest, await request.body())
        ids, samplings = chat_job(engine, req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        steps = run_on(app.state.scheduler, [(ids, samplings)], None, request.is_disconnected)
        head = {"id": cid, "created": created, "model": engine.name}
        want_logprobs = bool(req.logprobs)

        if not req.stream:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(len(samplings))
            ]
            n_tokens = 0
            async for i, step in steps:
                n_tokens += 1
                choices[i]["message"]["content"] += step.text
                if want_logprobs:
                    choices[i]["logprobs"] = choices[i]["logprobs"] or {"content": []}
                    choices[i]["logprobs"]["content"].append(chat_logprobs(engine, step))
                choices[i]["finish_reason"] = step.finish
            for c, s in zip(choices, samplings):
                c["finish_reason"] = c["finish_reason"] or ("length" if s.max_tokens == 0 else "stop")
                if want_logprobs and c["logprobs"] is None:
                    c["logprobs"] = {"content": []}
            return JSONResponse(
                {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(ids), n_tokens)}
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, delta: dict, finish=None, logprobs=None) -> str:
            c = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            body = {**head, "object": "chat.completion.chunk", "choices": [c]}
            return _sse({**body, "usage": None} if include_usage else body)

        async def events():
            n_tokens, started = 0, set()
            async for i, step in steps:
                if i not in started:
                    started.add(i)
                    yield chunk(i, {"role": "assistant", "content": ""})
                n_tokens += 1
                lp = {"content": [chat_logprobs(engine, step)]} if want_logprobs else None
                if step.text or lp:
                    yield chunk(i, {"content": step.text}, None, lp)
                if step.finish:
                    yield chunk(i, {}, step.finish)
            for i, s in enumerate(samplings):  # max_tokens 0: no steps at all
                if i not in started and s.max_tokens == 0:
                    yield chunk(i, {"role": "assistant", "content": ""})
                    yield chunk(i, {}, "length")
            if include_usage:
                yield _sse(
                    {
                        **head,
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": _usage(len(ids), n_tokens),
                    }
                )
            yield _sse("[DONE]")

        return StreamingResponse(
            _error_as_event(events()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine = app.state.engine
        req = parse(CompletionRequest, await request.body())
        jobs = completion_jobs(engine, req)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": engine.name}
        k, echo = req.logprobs, bool(req.echo)
        choice_prompts = [ids for ids, samplings in jobs for _ in samplings]
        prompt_tokens = sum(len(ids) for ids, _ in jobs)
        scored = k if echo and k is not None else None
        steps = run_on(app.state.scheduler, jobs, scored, request.is_disconnected)

        def fresh(i: int, scores=None) -> dict:
            """A choice before its first generated token: empty, or the prompt with `echo`."""
            lp = (
                None
                if k is None
                else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            )
            text = ""
            if echo:
                ids = choice_prompts[i]
                text = engine.tok.decode(ids)
                if lp is not None:  # each prompt token's score given the ones before it (first: None)
                    for tid, (logprob, top) in zip(ids, [(None, None), *scores]):
                        add(lp, lp_text(lp), engine.tok.decode([tid]), logprob, top)
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": None}

        def lp_text(lp: dict) -> str:
            return "".join(lp["tokens"])

        def add(lp: dict, text_so_far: str, token: str, logprob, top) -> None:
            lp["tokens"].append(token)
            lp["token_logprobs"].append(logprob)
            lp["top_logprobs"].append(None if top is None else dict(top))
            lp["text_offset"].append(len(text_so_far))

        if not req.stream:
            choices: dict[int, dict] = {}
            n_tokens = 0
            async for i, item in steps:
                if not isinstance(item, Step):  # the prompt's scores come first
                    choices[i] = fresh(i, item)
                    continue
                if i not in choices:
                    choices[i] = fresh(i)
                c = choices[i]
                n_tokens += 1
                if k is not None:
                    add(c["logprobs"], c["text"], engine.tok.decode([item.token_id]), item.logprob, item.top)
                c["text"] += item.text
                c["finish_reason"] = item.finish
            out = [choices.get(i) or fresh(i) for i in range(len(choice_prompts))]
            for c in out:
                c["finish_reason"] = c["finish_reason"] or "length"
            return JSONResponse({**head, "choices": out, "usage": _usage(prompt_tokens, n_tokens)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(c: dict) -> str:
            return _sse({**head, "choices": [c], **({"usage": None} if include_usage else {})})

        async def events():
            n_tokens, started, finished = 0, set(), set()
            async for i, item in steps:
                if not isinstance(item, Step):
                    started.add(i)
                    yield chunk(fresh(i, item))
                    continue
                if i not in started and echo:
                    yield chunk(fresh(i))
                started.add(i)
                n_tokens += 1
                lp = None
                if k is not None:
                    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                    add(lp, "", engine.tok.decode([item.token_id]), item.logprob, item.top)
                if item.finish:
                    finished.add(i)
                yield chunk({"index": i, "text": item.text, "logprobs": lp, "finish_reason": item.finish})
            for i in range(len(choice_prompts)):  # choices that generated nothing (max_tokens 0)
                if i not in started:
                    yield chunk({**fresh(i), "finish_reason": "length"})
                elif i not in finished:
                    yield chunk({"index": i, "text": "", "logprobs": None, "finish_reason": "length"})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, n_tokens)})
            yield _sse("[DONE]")

        return StreamingResponse(
            _error_as_event(events()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
