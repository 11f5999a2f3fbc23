"""`chatforge serve` over real HTTP with the official `openai` client: completions, streaming,
logprobs, JSON mode, the context window, a client that leaves, the API key, the chat page (in a
real browser too). One server per module on a tiny random model (tests/serve_live.py); hostile
requests are in tests/test_serve_hostile.py."""

import json
import socket
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_live import CHAT, HI, WINDOW, ask, connect, live_server, server, start  # noqa: E402


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    yield from live_server(tiny_model_dir)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{live['port']}/v1", api_key="unused", max_retries=0)


def test_chat_completion_and_stream_with_usage(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and 0 < r.usage.completion_tokens <= 5
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "developer", "content": "be brief"}, *HI],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 5
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text and chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_stop_seed_n_top_p_zero_and_max_tokens_zero(client):
    def chat(**kw):
        args = {"model": "tiny", "messages": HI, "max_tokens": 10, **kw}
        return client.chat.completions.create(**args)

    greedy = chat(temperature=0).choices[0].message.content
    stop = greedy[3:5]
    cut = chat(temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == greedy[: greedy.find(stop)] and cut.finish_reason == "stop"
    # seed: the same answers again; n: one choice each, drawn differently
    a, b = chat(temperature=1, seed=7, n=3), chat(temperature=1, seed=7, n=3)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    assert chat(temperature=1, top_p=0).choices[0].message.content == greedy  # top_p 0: the top token only
    zero = chat(max_tokens=0)
    assert zero.choices[0].message.content == "" and zero.usage.completion_tokens == 0


def test_logprobs_match_the_model(client, live):
    import torch

    lm, tok = live["lm"], live["tok"]
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = tok("hello world")["input_ids"]
    assert (
        r.choices[0].text == tok.decode(ids) and lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
    )
    with torch.no_grad():
        want = torch.log_softmax(lm(torch.tensor([ids])).logits[0, :-1].float(), -1)
    want = want.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp.token_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4)
    # top 2 per position (fewer keys where two tokens decode to the same text), the best first
    assert all(
        0 < len(t) <= 2 and max(t.values()) >= x for t, x in zip(lp.top_logprobs[1:], lp.token_logprobs[1:])
    )
    # lm-evaluation-harness: token-id prompts, a batch, echo with one generated token
    r = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=1, echo=True, logprobs=1)
    assert [len(c.logprobs.tokens) for c in r.choices] == [len(ids) + 1, 3]
    chat = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob >= t.top_logprobs[-1].logprob for t in content)  # greedy took the top token


def test_json_mode_writes_only_json(client):
    from chatforge.serve.json_mode import START, advance

    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=HI, max_tokens=40, seed=seed, response_format={"type": "json_object"}
        )
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.lstrip().startswith("{") and advance(START, text) is not None  # a valid JSON prefix
        if finish == "stop":
            assert isinstance(json.loads(text), dict)


def test_models_and_unknown_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"] and client.models.retrieve("tiny").id == "tiny"
    for call in (
        lambda: client.models.retrieve("gpt-9"),
        lambda: client.chat.completions.create(model="gpt-9", messages=HI),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found"


def test_context_window_is_refused_never_cut(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=WINDOW)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * (WINDOW + 1), max_tokens=0)
    assert e.value.body["code"] == "context_length_exceeded"


def test_a_client_leaving_mid_stream_stops_its_generation(live, monkeypatch):
    engine = live["engine"]
    counted = engine.sample

    def slow(*args, **kwargs):  # a slower model, so the stream is surely mid-way when the client leaves
        for step in counted(*args, **kwargs):
            time.sleep(0.03)
            yield step

    monkeypatch.setattr(engine, "sample", slow)
    body = json.dumps({"messages": HI, "max_tokens": 100, "temperature": 1, "seed": 3, "stream": True})
    ends = live["scheduler"].ends
    before = len(ends)
    with socket.create_connection(("127.0.0.1", live["port"]), timeout=30) as s:
        head = f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())
        seen = b""
        while b"chat.completion.chunk" not in seen:  # the first token is out: generation has begun
            seen += s.recv(4096)
        assert seen.startswith(b"HTTP/1.1 200")  # leave now
    status, r = ask(connect(live), "POST", CHAT, json.dumps({"messages": HI, "max_tokens": 1}))
    assert status == 200  # the worker is free again
    stopped = ends[before]
    assert stopped.finish is None  # ended from outside: neither its length limit nor a stop token


def test_api_key_is_required_when_set(tiny_model_dir, live):
    engine = live["engine"]
    srv, thread, port, _, _ = start(engine, server.Guard(api_key="s3cret"))
    try:
        base = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
    finally:
        srv.should_exit = True
        thread.join(10)


def test_chat_page_is_served(live):
    status, page = ask(connect(live), "GET", "/")
    assert status == 200 and b"/v1/chat/completions" in page and b"<script" in page


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4: no websocket)."""

    def __init__(self, tmp):
        import os
        import subprocess

        self.to_browser, theirs_in = os.pipe()[::-1]
        self.from_browser, theirs_out = os.pipe()
        cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe"]
        cmd += [f"--user-data-dir={tmp}", "about:blank"]
        self.proc = subprocess.Popen(
            cmd,
            pass_fds=(3, 4),
            preexec_fn=lambda: (os.dup2(theirs_in, 3), os.dup2(theirs_out, 4)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(theirs_in)
        os.close(theirs_out)
        self.next_id, self.buffer, self.session = 0, b"", None
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)[
            "sessionId"
        ]

    def send(self, method: str, **params) -> dict:
        import os

        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                self.buffer += os.read(self.from_browser, 1 << 20)
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.05)
        return value

    def type(self, text: str) -> None:
        self.send("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                text="\r",
            )

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="needs Debian's chromium")
def test_chat_page_in_a_real_browser(live, tmp_path):
    browser = Browser(tmp_path)
    try:
        browser.send("Page.navigate", url=f"http://127.0.0.1:{live['port']}/")
        browser.wait_for("document.getElementById('model').textContent === 'tiny'")
        browser.js(
            "document.getElementById('system').value = 'be brief';"
            "document.getElementById('temperature').value = '0';"
            "document.getElementById('stop').value = '###';"
            "window.updates = 0; new MutationObserver(() => updates++).observe("
            "  document.getElementById('log'), {subtree: true, characterData: true, childList: true});"
            "document.getElementById('input').focus()"
        )
        calls = live["scheduler"].calls
        before = len(calls)
        browser.type("hello there")
        done = "!document.getElementById('send').disabled && document.querySelectorAll('.assistant').length"
        browser.wait_for(done + " === 1")
        first = browser.js("document.querySelector('.assistant').textContent")
        assert first and browser.js("updates") > 3  # the reply arrived in pieces, not at once
        browser.js("document.getElementById('input').focus()")
        browser.type("and again")
        browser.wait_for(done + " === 2")
        assert browser.js("history.length") == 4 and not browser.js("document.querySelector('.error')")
        (_, s1), (ids2, s2) = calls[before], calls[before + 1]
        assert s1.temperature == s2.temperature == 0 and s1.stop == s2.stop == ["###"]
        second = live["tok"].decode(ids2)
        assert "be brief" in second and "hello there" in second and first in second and "and again" in second
    finally:
        browser.close()


def test_a_stream_may_outlast_the_body_timeout(live, monkeypatch):
    engine = live["engine"]
    counted = engine.sample

    def slow(*args, **kwargs):  # 3 tokens over 3 s, past the server's 2 s body timeout
        for step in counted(*args, **kwargs):
            time.sleep(1.0)
            yield step

    monkeypatch.setattr(engine, "sample", slow)
    body = json.dumps({"messages": HI, "max_tokens": 3, "temperature": 1, "seed": 0, "stream": True})
    status, raw = ask(connect(live), "POST", CHAT, body)
    assert status == 200 and raw.decode().endswith("data: [DONE]\n\n") and b'"error"' not in raw


def test_a_failure_mid_stream_ends_it_with_an_error_event(live, monkeypatch):
    engine = live["engine"]
    real = engine.sample

    def broken(*args, **kwargs):
        yield from real(*args, **kwargs)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "sample", broken)
    body = json.dumps({"messages": HI, "max_tokens": 2, "stream": True})
    status, raw = ask(connect(live), "POST", CHAT, body)
    events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]
    assert status == 200 and "out of memory" in json.loads(events[-1])["error"]["message"]
