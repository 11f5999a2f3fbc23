"""OpenAI-compatible HTTP server and web chat page: `chatforge serve MODEL [--host H] [--port P]`.

    GET  /                          a chat page (streaming, multi-turn, system prompt, temperature, stop)
    POST /v1/chat/completions       chat; `stream`, `n`, `seed`, `stop`, `logprobs`, `top_logprobs`
    POST /v1/completions            raw text; `echo` + `logprobs` score a prompt (lm-evaluation-harness)
    GET  /v1/models, /v1/models/ID  the one model served

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])

FastAPI on uvicorn does the HTTP (keep-alive, chunked bodies, bad framing): an optional extra,
`pip install 'chatforge[serve]'`, imported only here in `main` (a missing one is a one-line error).
On top of it: requests are validated field by field (`chatforge.serve.protocol`:
honoured or refused with a 400, never ignored); a prompt that does not fit the context window with
its `max_tokens` is refused, never cut; bodies over `--max-body` get 413 and bodies that trickle in
slower than `--timeout` get 408; Host and Origin must be loopback, the server's own or listed
(`--allow-origin`, `--allow-host`), so a web page elsewhere cannot drive it; `--api-key` (required
off loopback) is checked as a bearer token; every error is OpenAI's JSON error shape. Concurrent
requests share one batch of the model (`batch.Batched`, continuous batching, up to `--max-batch`
answers at once; `--max-batch 1`: one at a time), each streamed token by token; an answer stops when
its client leaves. The pieces: `app.py` (request -> model work), `routes.py` (endpoints, response
shapes), `guard.py` (who may ask), `protocol.py` (request fields), `engine.py` (sampling), `batch.py`
(the batching scheduler), `chat.html`. docs/serving.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

PAGE = Path(__file__).with_name("chat.html")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="chatforge serve", description="OpenAI-compatible HTTP server and chat page."
    )
    p.add_argument("model", help="model dir, adapter dir, .gguf file or 'default'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; off loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="", help="model id reported to clients (default: the dir name)")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length when a request gives none")
    p.add_argument("--max-context", type=int, default=0, help="context window; 0 = the model's")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument(
        "--api-key", default="", help="require 'Authorization: Bearer KEY' (or env CHATFORGE_API_KEY)"
    )
    p.add_argument(
        "--allow-origin", action="append", default=[], help="extra browser origin allowed (repeat)"
    )
    p.add_argument(
        "--allow-host", action="append", default=[], help="extra Host name allowed (repeat; * = any)"
    )
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a client may take to send a body")
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="answers decoded together (continuous batching); 1 = one at a time",
    )
    args = p.parse_args(argv)
    if args.max_batch < 1:
        print(f"chatforge serve: --max-batch must be at least 1 (got {args.max_batch})", file=sys.stderr)
        return 2
    import os

    api_key = args.api_key or os.environ.get("CHATFORGE_API_KEY", "")
    if not is_loopback(args.host) and not api_key:
        print(f"chatforge serve: binding {args.host} (not loopback) needs --api-key KEY", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("chatforge serve: needs FastAPI and uvicorn: pip install 'chatforge[serve]'", file=sys.stderr)
        return 2
    from chatforge.evaluate import load_inference_model
    from chatforge.serve.app import create_app, make_server
    from chatforge.serve.batch import make_scheduler
    from chatforge.serve.engine import Engine
    from chatforge.serve.guard import Guard

    lm, tok = load_inference_model(args.model, args.dtype)
    name = args.name or Path(args.model.rstrip("/")).name or "chatforge"
    engine = Engine(lm, tok, name, args.max_context, args.max_tokens)
    hosts = set(args.allow_host) | ({"*"} if args.host in ("0.0.0.0", "::") else {args.host})
    guard = Guard(hosts, set(args.allow_origin), api_key, args.max_body, args.timeout)
    app = create_app(engine, guard, make_scheduler(engine, args.max_batch))
    server, sock = make_server(app, args.host, args.port, args.timeout)
    host, port = sock.getsockname()[:2]
    print(f"chatforge serve: {name} on http://{host}:{port}/ (chat page) and /v1 (Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0
