"""OpenAI-compatible HTTP server: `chatforge serve MODEL_DIR [--host 127.0.0.1] [--port 8000]`.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "stream"}
    GET  /v1/models             the one model served

Responses have the OpenAI shapes (`chat.completion`, and `chat.completion.chunk` server-sent events
ending with `data: [DONE]` when `stream` is true), so the `openai` client and tools built on it work:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="chatforge", messages=[{"role": "user", "content": "hi"}])

Standard library `http.server`, one request generates at a time (a lock around the model); long
conversations are trimmed to the context window like `chatforge chat`. No authentication: bind to
localhost or put it behind a proxy.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and an OpenAI-style error body."""


def parse_request(body: bytes, default_max_tokens: int) -> dict:
    """Validated generation settings from a /v1/chat/completions body.

    >>> parse_request(b'{"messages": [{"role": "user", "content": "hi"}]}', 64)["max_tokens"]
    64
    >>> parse_request(b'{"messages": []}', 64)
    Traceback (most recent call last):
    ...
    chatforge.serve.server.RequestError: messages must be a non-empty list
    """
    try:
        req = json.loads(body or b"{}")
    except ValueError as e:
        raise RequestError(f"body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError("body must be a JSON object")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string")
        clean.append({"role": m["role"], "content": content})
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens")) or default_max_tokens
    temperature = req.get("temperature", 1.0)
    top_p = req.get("top_p", 1.0)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise RequestError(f"{name} must be a non-negative number")
    if int(req.get("n", 1)) != 1:
        raise RequestError("only n=1 is supported")
    return {
        "messages": clean,
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p) or 1.0,
        "stream": bool(req.get("stream", False)),
    }


class Engine:
    """The model, its tokenizer and a lock: one generation at a time."""

    def __init__(self, lm, tok, name: str, max_context: int = 0, default_max_tokens: int = 256):
        self.lm, self.tok, self.name = lm, tok, name
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()
        self.created = int(time.time())

    def stream(self, req: dict, stats):
        from chatforge.serve.chat import context_window, fit_context, stream_reply

        window = context_window(self.lm, self.max_context)
        ids, _ = fit_context(self.tok, req["messages"], window, req["max_tokens"])
        with self.lock:
            yield from stream_reply(
                self.lm, self.tok, ids, req["max_tokens"], req["temperature"], req["top_p"], stats
            )


def _completion(engine: Engine, cid: str, text: str, stats) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": engine.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": stats.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        },
    }


def _chunk(engine: Engine, cid: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": engine.name,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def make_handler(engine: Engine):
    from chatforge.serve.chat import ReplyStats

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one short line per request
            print(f"chatforge serve: {self.address_string()} {fmt % args}", flush=True)

        def _json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._json(status, {"error": {"message": message, "type": kind, "code": None}})

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                model = {
                    "id": engine.name,
                    "object": "model",
                    "created": engine.created,
                    "owned_by": "chatforge",
                }
                self._json(200, {"object": "list", "data": [model]})
            elif path in ("", "/health"):
                self._json(200, {"status": "ok", "model": engine.name})
            else:
                self._error(404, f"no route GET {self.path}", "not_found")

        def do_POST(self):  # noqa: N802
            if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route POST {self.path}", "not_found")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                req = parse_request(body, engine.default_max_tokens)
            except RequestError as e:
                self._error(400, str(e))
                return
            cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            stats = ReplyStats()
            if not req["stream"]:
                try:
                    text = "".join(engine.stream(req, stats)).strip()
                except Exception as e:  # noqa: BLE001 - the client gets the reason, the server lives
                    self._error(500, f"generation failed: {e}", "server_error")
                    return
                self._json(200, _completion(engine, cid, text, stats))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def send(obj) -> None:
                payload = obj if isinstance(obj, str) else json.dumps(obj)
                self.wfile.write(f"data: {payload}\n\n".encode())
                self.wfile.flush()

            try:
                send(_chunk(engine, cid, {"role": "assistant", "content": ""}, None))
                for piece in engine.stream(req, stats):
                    if piece:
                        send(_chunk(engine, cid, {"content": piece}, None))
                send(_chunk(engine, cid, {}, stats.finish_reason))
                send("[DONE]")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away

    return Handler


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A ready server (port 0 picks a free one: see `server.server_address`)."""
    server = ThreadingHTTPServer((host, port), make_handler(engine))
    server.daemon_threads = True
    return server


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="chatforge serve", description="OpenAI-compatible HTTP server.")
    p.add_argument("model", help="model dir, adapter dir, .gguf file or 'default'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="", help="model id reported to clients (default: the dir name)")
    p.add_argument("--max-tokens", type=int, default=256, help="default reply length limit")
    p.add_argument("--max-context", type=int, default=0, help="context window; 0 = the model's")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    from pathlib import Path

    from chatforge.evaluate import load_inference_model

    lm, tok = load_inference_model(args.model, args.dtype)
    name = args.name or Path(args.model.rstrip("/")).name or "chatforge"
    engine = Engine(lm, tok, name, args.max_context, args.max_tokens)
    server = make_server(engine, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"chatforge serve: {name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
