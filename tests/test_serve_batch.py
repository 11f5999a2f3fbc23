"""Continuous batching in `chatforge serve` (`serve.batch.Batched`) over real HTTP: 16 concurrent
clients get the answers a one-at-a-time server gives, and a client that leaves frees its row."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from chatforge.evaluate import load_inference_model  # noqa: E402
from chatforge.serve import app as server  # noqa: E402
from chatforge.serve.batch import Batched, make_scheduler  # noqa: E402
from chatforge.serve.engine import Engine, OneAtATime  # noqa: E402


class Watched(Batched):
    """Records the most rows decoded in one tick, and each row that left: (tokens made, cancelled)."""

    def __init__(self, engine, max_batch, pause=0.0):
        self.widest, self.left, self.pause = 0, [], pause
        super().__init__(engine, max_batch)

    def _tick(self):
        self.widest = max(self.widest, len(self.live))
        time.sleep(self.pause)
        super()._tick()

    def _release(self, row_id):
        row = self.live[row_id]
        self.left.append((len(row.reply.ids), row.request.job.cancelled.is_set()))
        super()._release(row_id)


class FailsOnce(Batched):
    """Its first tick fails, as a model error mid-batch would."""

    failed = False

    def _tick(self):
        if not self.failed:
            self.failed = True
            raise RuntimeError("out of memory")
        super()._tick()


def _serve(engine, scheduler):
    app = server.create_app(engine, server.Guard(), scheduler, log=lambda _line: None)
    srv, sock = server.make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    return srv, thread, sock.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    lm, tok = load_inference_model(tiny_model_dir, "float32", "cpu")
    return Engine(lm, tok, "tiny", max_context=128, default_max_tokens=8)


@pytest.fixture
def serving(engine):
    """serving(scheduler) -> an openai client of a server on it (closed after the test)."""
    started = []

    def start(scheduler):
        started.append(_serve(engine, scheduler))
        return openai.OpenAI(base_url=f"http://127.0.0.1:{started[-1][2]}/v1", api_key="-", max_retries=0)

    yield start
    for srv, thread, _ in started:
        srv.should_exit = True
        thread.join(10)


TOPICS = ["hi", "hello there", "tell me a story", "why is the sky blue", "count to ten", "a poem"]


def _requests() -> list[tuple[str, dict]]:
    """16 requests: greedy and seeded sampling, streamed or not, stop strings, n, logprobs, JSON mode."""
    out = []
    for i in range(12):
        kw = {"messages": [{"role": "user", "content": TOPICS[i % len(TOPICS)]}], "max_tokens": 3 + i}
        if i % 3 == 1:
            kw.update(temperature=0.8, top_p=0.9, seed=i)
        else:
            kw.update(temperature=0)
        if i % 2:
            kw["stream"] = True
        if i % 4 == 2:
            kw["stop"] = ["e", "a"]
        if i == 4:
            kw.update(n=2, temperature=1.0, seed=5)
        if i == 6:
            kw.update(logprobs=True, top_logprobs=2)
        out.append(("chat", kw))
    out.append(("chat", {"messages": [{"role": "user", "content": "json"}], "max_tokens": 10, "seed": 1,
                         "response_format": {"type": "json_object"}}))  # fmt: skip
    out.append(("completion", {"prompt": ["one two", "three"], "max_tokens": 4, "temperature": 0, "n": 2}))
    out.append(
        ("completion", {"prompt": "hello world", "max_tokens": 2, "echo": True, "logprobs": 1, "seed": 3})
    )
    out.append(("completion", {"prompt": "stream me", "max_tokens": 6, "temperature": 0, "stream": True}))
    return out


def _answer(client, kind: str, kw: dict) -> list:
    """Per choice: (text, finish_reason, log-probs rounded), streamed or not."""
    if kind == "chat":
        r = client.chat.completions.create(model="tiny", **kw)
    else:
        r = client.completions.create(model="tiny", **kw)
    if not kw.get("stream"):
        out = []
        for c in r.choices:
            text = c.message.content if kind == "chat" else c.text
            lp = c.logprobs and (
                [round(t.logprob, 3) for t in c.logprobs.content]
                if kind == "chat"
                else [None if x is None else round(x, 3) for x in c.logprobs.token_logprobs]
            )
            out.append((text, c.finish_reason, lp))
        return out
    texts, finish = {}, {}
    for chunk in r:
        for c in chunk.choices:
            piece = (c.delta.content if kind == "chat" else c.text) or ""
            texts[c.index] = texts.get(c.index, "") + piece
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [(texts[i], finish[i], None) for i in sorted(texts)]


def test_sixteen_concurrent_clients_get_the_one_at_a_time_answers(engine, serving):
    requests = _requests()
    alone = serving(OneAtATime(engine))
    want = [_answer(alone, kind, kw) for kind, kw in requests]
    batched = Watched(engine, max_batch=4)
    client = serving(batched)
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: _answer(client, *r), requests))
    assert got == want
    assert batched.widest == 4  # the requests really shared batches (rows joined as others left)
    assert all(text or finish == "length" for answer in got for text, finish, _ in answer)


def test_a_client_leaving_mid_stream_frees_its_row(engine, serving):
    batched = Watched(engine, max_batch=1, pause=0.02)  # one row: the next request waits for it
    client = serving(batched)
    port = client.base_url.port
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True})
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())
        seen = b""
        while b"chat.completion.chunk" not in seen:  # generation has begun; leave now
            seen += s.recv(4096)
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    made, cancelled = batched.left[0]
    assert cancelled and made < 100  # the stream's row left early, so the second request got the slot


def test_a_failure_mid_batch_answers_500_and_the_next_request_runs(engine, serving):
    client = serving(FailsOnce(engine, max_batch=4))
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="tiny", messages=hi, max_tokens=3)
    assert "out of memory" in str(e.value)
    after = client.chat.completions.create(model="tiny", messages=hi, max_tokens=3).choices[0]
    assert after.finish_reason in ("stop", "length")  # the batch was reset, the worker goes on


def test_max_batch_one_and_prompt_learning_run_one_at_a_time(engine, tiny_model_dir):
    from chatforge.config import PeftConfig
    from chatforge.models.adapters import apply_peft
    from chatforge.models.load import load_model, load_tokenizer

    assert isinstance(make_scheduler(engine, 1), OneAtATime)
    assert isinstance(make_scheduler(engine, 8), Batched)
    prompt = apply_peft(
        load_model(tiny_model_dir, device="cpu"), PeftConfig(method="prompt", num_virtual_tokens=2)
    )
    said = []
    scheduler = make_scheduler(Engine(prompt.eval(), load_tokenizer(tiny_model_dir)), 8, log=said.append)
    assert isinstance(scheduler, OneAtATime) and "one request at a time" in said[0]
