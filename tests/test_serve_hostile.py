"""`chatforge serve` against hostile requests by class, over raw HTTP: sizes, types, ranges,
encodings, framing, foreign pages and hosts, what reaches the log. One server per module on a tiny
random model (tests/serve_live.py)."""

import json

import pytest

pytest.importorskip("fastapi")

from serve_live import CHAT, HI, ask, connect, live_server, raw  # noqa: E402


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    yield from live_server(tiny_model_dir)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": HI, "n": "two"}, "n"),  # types
        ({"messages": HI, "max_tokens": 1e9}, "max_tokens"),
        ({"messages": HI, "temperature": True}, "temperature"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": HI, "top_p": 5}, "top_p"),  # ranges
        ({"messages": HI, "n": 0}, "n"),
        ({"messages": HI, "max_tokens": -1}, "max_tokens"),
        ({"messages": HI, "seed": -3}, "seed"),
        ({"messages": HI, "top_logprobs": 99, "logprobs": True}, "top_logprobs"),
        ({"messages": HI, "tools": [{"type": "function"}]}, "tools"),  # refused, not ignored
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": HI, "response_format": {"type": "json_schema"}}, "response_format.type"),
        ({"messages": HI, "frequency_penalty": 1}, "frequency_penalty"),
        ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": HI, "no_such_field": 1}, "no_such_field"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_fields_get_a_400_naming_them(live, body, param):
    status, err = ask(connect(live), "POST", CHAT, json.dumps(body))
    assert (
        status == 400 and err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b"\xff\xfe{",
        b"",
        b'{"messages": NaN',
        b"[" * 2000 + b"]" * 2000,
        b'{"a": 1e999999}',
    ],
)
def test_bodies_that_are_not_a_json_object_get_a_400(live, raw):
    status, err = ask(connect(live), "POST", CHAT, raw)
    assert status == 400 and "message" in err["error"]


@pytest.mark.parametrize(
    "content,param",
    [("\ud800 lone surrogate", None), ("nul \u0000 byte", "ok"), ("\U0001f600" * 40, "messages")],
)
def test_odd_text_gets_an_answer_not_a_crash(live, content, param):
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1})
    status, r = ask(connect(live), "POST", CHAT, body)
    if param == "ok":
        assert status == 200 and "choices" in r
    else:
        assert status == 400 and r["error"]["param"] == param


def test_n_null_means_the_default(live):
    status, r = ask(connect(live), "POST", CHAT, json.dumps({"messages": HI, "n": None, "max_tokens": 2}))
    assert status == 200 and len(r["choices"]) == 1


def test_keep_alive_survives_a_404_with_a_body_and_a_chunked_body_works(live):
    conn = connect(live)
    status, err = ask(conn, "POST", "/v1/nothing", json.dumps({"messages": HI}))
    assert status == 404 and err["error"]["code"] == "not_found"
    status, r = ask(conn, "POST", CHAT, json.dumps({"messages": HI, "max_tokens": 2}))  # same connection
    assert status == 200 and r["object"] == "chat.completion"
    body = json.dumps({"messages": HI, "max_tokens": 2}).encode()
    conn.request(
        "POST", CHAT, iter([body[:7], body[7:]]), {"Content-Type": "application/json"}, encode_chunked=True
    )
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "chat.completion"


def test_oversize_bodies_get_413_declared_or_chunked(live):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    assert ask(connect(live), "POST", CHAT, big)[0] == 413
    conn = connect(live)
    conn.request(
        "POST",
        CHAT,
        iter([big[:3000], big[3000:]]),
        {"Content-Type": "application/json"},
        encode_chunked=True,
    )
    assert conn.getresponse().status == 413


def test_bad_framing_gets_an_answer_and_slow_bodies_time_out(live):
    bad = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n{}"
    assert raw(live, bad).startswith(b"HTTP/1.1 400")
    slow = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"
    answer = raw(live, slow)  # the body never comes: 408 after the server's 2 s timeout
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer
    assert raw(live, b"POST /v1/chat/completions HTTP/1.1\r\nHost: loc") == b""  # head never ends: closed


def test_foreign_pages_and_hosts_are_refused_local_ones_allowed(live):
    text_plain = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    body = json.dumps({"messages": HI, "max_tokens": 1})
    status, err = ask(connect(live), "POST", CHAT, body, text_plain)
    assert status == 403 and "Origin" in err["error"]["message"]
    assert ask(connect(live), "GET", "/v1/models", headers={"Host": "rebound.example:8000"})[0] == 403
    conn = connect(live)
    preflight = {
        "Origin": "http://localhost:5173",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    conn.request("OPTIONS", CHAT, headers=preflight)
    r = conn.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("access-control-allow-origin") == "http://localhost:5173"
    assert ask(connect(live), "POST", CHAT, body, {"Origin": "http://localhost:5173"})[0] == 200


def test_log_lines_escape_what_the_client_sent(live):
    # h11 refuses raw control bytes in the request line (400); an escape sent percent-encoded is logged
    # as sent, never decoded into the terminal (`server.printable` escapes the rest)
    answer = raw(live, b"GET /v1/%1b[31mred HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")
    assert raw(live, b"GET /v1/\x1b[31m HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.1 400")
    line = next(x for x in live["logs"] if "31mred" in x)
    assert line.isprintable() and "/v1/%1b[31mred 404" in line
