"""Terminal chat and the sampling engine behind chat and serve, on a tiny random model (the HTTP
server: tests/test_serve_api.py)."""

import io

import pytest

from chatforge.evaluate import load_inference_model
from chatforge.serve import chat
from chatforge.serve.engine import Engine, Sampling


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


def test_ctrl_c_mid_reply_stops_it_and_the_chat_goes_on(tiny_lm, monkeypatch):
    lm, tok = tiny_lm
    session = chat.Session(lm, tok, max_new_tokens=50, temperature=1.0)
    lines = iter(["first", "second", "/exit"])
    written = []

    def write(text):
        written.append(text)
        if len(written) == 4:  # "assistant> " and two pieces of the first reply: the user presses Ctrl-C
            raise KeyboardInterrupt

    assert chat.repl(session, read=lambda _prompt: next(lines), write=write) == 0
    assert " [stopped]" in written
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["second"]


def test_engine_stops_on_a_stop_string_and_never_streams_it(tiny_lm):
    lm, tok = tiny_lm
    engine = Engine(lm, tok)
    prompt = tok("hello")["input_ids"]
    free = "".join(s.text for s in engine.sample(prompt, Sampling(max_tokens=12, temperature=0)))
    assert len(free) > 4
    stop = free[3:5]  # a stop string that greedy decoding produces mid-reply
    steps = list(engine.sample(prompt, Sampling(max_tokens=12, temperature=0, stop=[stop])))
    text = "".join(s.text for s in steps)
    assert text == free[: free.find(stop)] and steps[-1].finish == "stop"


def test_engine_seed_and_should_stop(tiny_lm):
    lm, tok = tiny_lm
    engine = Engine(lm, tok)
    prompt = tok("hello")["input_ids"]

    def ids(**kw):
        return [s.token_id for s in engine.sample(prompt, Sampling(max_tokens=10, temperature=1.0, **kw))]

    assert ids(seed=1) == ids(seed=1)
    assert len({tuple(ids(seed=s)) for s in range(4)}) > 1
    calls = []
    steps = list(engine.sample(prompt, Sampling(max_tokens=10), lambda: calls.append(1) or len(calls) > 3))
    assert len(steps) == 3 and steps[-1].finish is None  # stopped from outside, not by the model


def test_serve_off_loopback_needs_an_api_key(capsys):
    from chatforge.serve import server

    assert server.main(["no-model-loaded", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_engine_samples_prompt_learning_adapters_as_the_training_forward_scores(method, tiny_model_dir):
    # peft adds the virtual tokens on every forward, so the engine re-reads the whole sequence (no KV
    # cache); each greedy token is the argmax of the plain forward (what training computes). On
    # transformers 5.24 + peft, `lm.generate` differs here (prefix: its `cache` replaces peft's prefix).
    import torch

    from chatforge.config import PeftConfig
    from chatforge.models.adapters import apply_peft
    from chatforge.models.load import load_model, load_tokenizer

    torch.manual_seed(0)
    model = apply_peft(
        load_model(tiny_model_dir, device="cpu"), PeftConfig(method=method, num_virtual_tokens=4)
    )
    tok = load_tokenizer(tiny_model_dir)
    engine = Engine(model.eval(), tok)
    prompt = tok("hello there")["input_ids"]
    got = [s.token_id for s in engine.sample(prompt, Sampling(max_tokens=4, temperature=0))]
    with torch.no_grad():
        want = [
            int(model(input_ids=torch.tensor([prompt + got[:t]])).logits[0, -1].argmax())
            for t in range(len(got))
        ]
    assert got == want
