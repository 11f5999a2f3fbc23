"""Who may talk to `chatforge serve`, checked before any route runs (an ASGI middleware).

A local model server is reachable by every web page the user opens: a page elsewhere could POST to
http://127.0.0.1:8000 (a "simple" text/plain request needs no CORS preflight) or rebind its own DNS
name to 127.0.0.1. So a request must come with a loopback Host (or the bind address, or one listed),
any browser Origin must be loopback, this server itself or listed, and `--api-key` is checked as a
bearer token. Bodies are limited in size (413) and in the time they may take to arrive (408). Each
request gets one log line with what the client sent escaped.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field

from chatforge.serve.protocol import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass
class Guard:
    """Who may talk to the server: Host names, browser Origins and the API key."""

    hosts: set[str] = field(default_factory=set)  # extra Host names (no port); "*" = any
    origins: set[str] = field(default_factory=set)  # extra origins, "scheme://host[:port]"
    api_key: str = ""
    max_body: int = 1 << 20
    timeout: float = 30.0

    def host_ok(self, host: str) -> bool:
        """`host` is a Host header: loopback, listed, or anything under "*".

        >>> g = Guard()
        >>> g.host_ok("localhost:8000"), g.host_ok("127.0.0.1"), g.host_ok("evil.example:8000")
        (True, True, False)
        """
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return "*" in self.hosts or name.lower() in (*LOOPBACK_NAMES, *self.hosts)

    def origin_ok(self, origin: str, host: str) -> bool:
        """A browser Origin is allowed when it is loopback, this server itself, or listed.

        >>> g = Guard(origins={"https://app.example"})
        >>> [g.origin_ok(o, "10.0.0.2:8000") for o in
        ...  ("http://localhost:3000", "http://10.0.0.2:8000", "https://app.example", "null", "http://evil")]
        [True, True, True, False, False]
        """
        if origin in self.origins or origin == f"http://{host}" or origin == f"https://{host}":
            return True
        scheme, _, rest = origin.partition("://")
        name = rest.rsplit(":", 1)[0] if not rest.endswith("]") else rest
        return scheme in ("http", "https") and name.lower() in LOOPBACK_NAMES


def printable(text: str) -> str:
    r"""`text` with control and other unprintable characters escaped, for one honest log line.

    >>> printable("GET /\x1b[31m\r\nfake")
    'GET /\\x1b[31m\\r\\nfake'
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def plain_error(status: int, message: str, code: str | None = None) -> tuple[int, dict]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return status, ApiError(message, status, None, code, kind).body()


class GuardMiddleware:
    """ASGI middleware: Host/Origin/API-key checks, body size and read time limits, one log line per
    request. A rejected request is answered here, after its body has been drained (up to the size
    limit) so a kept-alive connection stays in step."""

    def __init__(self, app, guard: Guard, log=print):
        self.app, self.guard, self.log = app, guard, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status_box = [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        guarded = self._limited(receive, headers)
        refusal = self._refusal(scope, headers)
        try:
            if refusal:
                await self._drain(guarded)
                await self._send_json(send_logged, *refusal)
            else:
                await self.app(scope, guarded, send_logged)
        except ApiError as e:  # the body broke a limit before the app read it all
            if not status_box[0]:
                await self._send_json(send_logged, e.status, e.body(), close=True)
        finally:
            client = scope.get("client") or ("-", 0)
            line = f"{scope['method']} {scope.get('raw_path', b'').decode('latin-1') or scope['path']}"
            self.log(f"chatforge serve: {client[0]} {printable(line)} {status_box[0] or '-'}")

    def _refusal(self, scope, headers) -> tuple[int, dict] | None:
        g = self.guard
        host = headers.get("host", "")
        if not g.host_ok(host):
            return plain_error(403, f"Host {printable(host)!r} is not allowed (see --allow-host)")
        origin = headers.get("origin")
        if origin is not None and not g.origin_ok(origin, host):
            return plain_error(403, f"Origin {printable(origin)!r} is not allowed (see --allow-origin)")
        public = scope["method"] == "OPTIONS" or scope["path"] in ("/", "/health")
        if g.api_key and not public:
            token = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(token.encode(), g.api_key.encode()):
                return 401, ApiError(
                    "missing or wrong API key (Authorization: Bearer KEY)", 401, None, "invalid_api_key"
                ).body()
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > g.max_body:
            return plain_error(413, f"body of {length} bytes is over the {g.max_body}-byte limit")
        return None

    def _limited(self, receive, headers):
        """`receive` with the body limits: the whole body within `timeout` of the request head (408)
        and at most `max_body` bytes (413). Once the body is in, later receives (a streaming
        response waiting for the client to leave) wait as long as they need."""
        import time

        g, seen, deadline, done = self.guard, [0], time.monotonic() + self.guard.timeout, [False]

        async def guarded():
            if done[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise ApiError(f"the request body did not arrive within {g.timeout:g} s", 408) from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > g.max_body:
                    raise ApiError(f"body over the {g.max_body}-byte limit", 413)
                done[0] = not message.get("more_body", False)
            return message

        return guarded

    @staticmethod
    async def _drain(receive) -> None:
        message = {"more_body": True}
        while message.get("more_body") and message.get("type", "http.request") == "http.request":
            message = await receive()

    @staticmethod
    async def _send_json(send, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
