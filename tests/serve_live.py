"""A live `chatforge serve` on a tiny random model for the HTTP tests (tests/test_serve_api.py and
tests/test_serve_hostile.py), and raw-HTTP helpers to talk to it."""

import http.client
import json
import socket
import threading
import time

from chatforge.evaluate import load_inference_model
from chatforge.serve import app as server
from chatforge.serve.engine import Engine, OneAtATime

WINDOW = 128
HI = [{"role": "user", "content": "hi"}]


class CountingScheduler(OneAtATime):
    """Records each `Engine.sample` call: its (prompt ids, Sampling) in `calls`, its last Step in `ends`."""

    def __init__(self, engine):
        super().__init__(engine)
        self.ends, self.calls = [], []
        real = engine.sample

        def sample(prompt_ids, s, *args, **kwargs):
            self.calls.append((prompt_ids, s))
            last = None
            for last in real(prompt_ids, s, *args, **kwargs):
                yield last
            self.ends.append(last)

        engine.sample = sample


def start(engine, guard):
    scheduler = CountingScheduler(engine)
    logs = []
    app = server.create_app(engine, guard, scheduler, log=logs.append)
    srv, sock = server.make_server(app, "127.0.0.1", 0, timeout=guard.timeout)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    return srv, thread, sock.getsockname()[1], scheduler, logs


def live_server(tiny_model_dir):
    """A module fixture's body: a server on the tiny model, yielded as a dict, stopped after."""
    lm, tok = load_inference_model(tiny_model_dir, "float32", "cpu")
    engine = Engine(lm, tok, "tiny", max_context=WINDOW, default_max_tokens=8)
    srv, thread, port, scheduler, logs = start(engine, server.Guard(max_body=4096, timeout=2.0))
    yield {"port": port, "scheduler": scheduler, "logs": logs, "engine": engine, "lm": lm, "tok": tok}
    srv.should_exit = True
    thread.join(10)


def connect(live):
    return http.client.HTTPConnection("127.0.0.1", live["port"], timeout=30)


def ask(connection, method, path, body=b"", headers=None):
    connection.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
    r = connection.getresponse()
    data = r.read()
    return r.status, (
        json.loads(data) if r.getheader("content-type", "").startswith("application/json") else data
    )


CHAT = "/v1/chat/completions"


def raw(live, data: bytes, wait: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", live["port"]), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
