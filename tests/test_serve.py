"""Terminal chat and the OpenAI-compatible server on a tiny random model."""

import io
import json
import threading
import urllib.request

import pytest

from chatforge.evaluate import load_inference_model
from chatforge.serve import chat, server


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from chatforge.models.tiny import save_tiny

    path = save_tiny(tmp_path_factory.mktemp("tiny-serve"), "llama")
    lm, tok = load_inference_model(path, "float32", "cpu")
    return lm, tok


def test_chat_resets_and_exits_from_stdin(tiny_lm, monkeypatch, capsys):
    lm, tok = tiny_lm
    session = chat.Session(lm, tok, system="be brief", max_new_tokens=4, temperature=0.0)
    prompts = []
    real = chat.fit_context

    def spy(tok_, messages, window, max_new):
        prompts.append([m["role"] for m in messages])
        return real(tok_, messages, window, max_new)

    monkeypatch.setattr(chat, "fit_context", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n/reset\nfresh\n/exit\nnever read\n"))
    assert chat.repl(session) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 3  # "never read" after /exit got no answer
    assert "(history cleared)" in out
    # Turn 2 sees turn 1; after /reset the history holds only the system prompt and the new turn.
    assert prompts == [
        ["system", "user"],
        ["system", "user", "assistant", "user"],
        ["system", "user"],
    ]
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["fresh"]


def test_history_is_trimmed_to_the_context_window(tiny_lm):
    _, tok = tiny_lm
    turns = []
    for i in range(20):
        turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "ok"}]
    messages = [{"role": "system", "content": "sys"}, *turns, {"role": "user", "content": "last"}]
    ids, dropped = chat.fit_context(tok, messages, max_context=120, max_new_tokens=20)
    assert len(ids) <= 100 and dropped > 0 and dropped % 2 == 0
    text = tok.decode(ids)
    assert text.count("system") == 1 and "last" in text and "question 0 " not in text


def _serve(lm, tok):
    engine = server.Engine(lm, tok, "tiny", default_max_tokens=5)
    srv = server.make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=60)


def test_server_answers_in_the_openai_shapes(tiny_lm):
    lm, tok = tiny_lm
    srv, base = _serve(lm, tok)
    try:
        models = json.load(urllib.request.urlopen(f"{base}/v1/models", timeout=30))
        assert models["object"] == "list" and models["data"][0]["id"] == "tiny"

        msgs = [{"role": "user", "content": "hi"}]
        body = {"model": "tiny", "messages": msgs, "temperature": 0, "max_tokens": 5}
        r = json.load(_post(f"{base}/v1/chat/completions", body))
        assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
        choice = r["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        usage = r["usage"]
        assert 0 < usage["completion_tokens"] <= 5
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        # Streaming: role chunk, content chunks, a finish chunk, [DONE]; the same greedy text.
        raw = _post(f"{base}/v1/chat/completions", {**body, "stream": True}).read().decode()
        events = [e[len("data: ") :] for e in raw.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert streamed.strip() == choice["message"]["content"]

        with pytest.raises(urllib.error.HTTPError) as err:
            _post(f"{base}/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
        assert err.value.code == 400
        assert "messages[0].role" in json.load(err.value)["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()
