"""Chat with a model in the terminal: `chatforge chat MODEL_DIR [--system TEXT] [--temperature T]`.

MODEL_DIR is a full model dir, an adapter dir (LoRA, prefix, prompt tuning), a .gguf file or
`default`. Tokens stream as they are generated. The conversation is kept as multi-turn history; when
it no longer fits the context window (minus room for the reply) the oldest turns are dropped, the
system prompt never. Commands: `/reset` clears the history, `/exit` (or end of input) quits.

The same pieces serve the HTTP server (`chatforge.serve.server`): `fit_context` builds the prompt
ids inside the window, `stream_reply` yields text pieces and records how generation ended.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class ReplyStats:
    """How one reply ended: token counts and 'stop' (end of turn) or 'length' (token limit)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


def context_window(lm, override: int = 0) -> int:
    """Tokens the model attends to: `override`, else the model config's, else 2048."""
    if override:
        return override
    cfg = lm.config
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def fit_context(tok, messages: list[dict], max_context: int, max_new_tokens: int) -> tuple[list[int], int]:
    """(prompt ids, number of leading non-system messages dropped) so prompt + reply fit the window.

    Whole turns are dropped oldest first, system messages kept; if the newest message alone is too
    long, its beginning is cut.
    """
    from chatforge.data.templates import tokenize_prompt

    budget = max(max_context - max_new_tokens, 1)
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    dropped = 0
    while True:
        ids = tokenize_prompt(tok, system + rest)
        if len(ids) <= budget or len(rest) <= 1:
            return ids[-budget:], dropped
        # Drop the oldest user turn with the replies that follow it, so history starts with a user.
        cut = 1
        while cut < len(rest) - 1 and rest[cut]["role"] != "user":
            cut += 1
        rest, dropped = rest[cut:], dropped + cut


def stream_reply(
    lm,
    tok,
    prompt_ids: list[int],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stats: ReplyStats | None = None,
) -> Iterator[str]:
    """Yield the reply's text as it is generated (greedy when temperature is 0); fills `stats`."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    from chatforge.data.templates import stop_token_ids

    stats = stats if stats is not None else ReplyStats()
    device = next(lm.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sample = (
        dict(do_sample=True, temperature=temperature, top_p=top_p)
        if temperature > 0
        else {"do_sample": False}
    )
    stops = stop_token_ids(tok)
    result: dict = {}

    def work() -> None:
        try:
            with torch.no_grad():
                result["out"] = lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=tok.pad_token_id,
                    streamer=streamer,
                    **sample,
                )
        except BaseException as e:  # surfaced in the caller's thread below
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if "error" in result:
        raise result["error"]
    new = result["out"][0, ids.shape[1] :].tolist()
    stopped = bool(new) and new[-1] in stops
    stats.prompt_tokens = len(prompt_ids)
    stats.completion_tokens = len(new)
    stats.finish_reason = "stop" if stopped or len(new) < max_new_tokens else "length"


@dataclass
class Session:
    """A conversation with one model: history, system prompt and generation settings."""

    lm: object
    tok: object
    system: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    max_context: int = 0
    history: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; both turns join the history when the answer is complete."""
        self.history.append({"role": "user", "content": text})
        window = context_window(self.lm, self.max_context)
        ids, dropped = fit_context(self.tok, self.messages(), window, self.max_new_tokens)
        if dropped:
            self.history = self.history[dropped:]
        pieces = []
        try:
            for piece in stream_reply(
                self.lm, self.tok, ids, self.max_new_tokens, self.temperature, self.top_p
            ):
                pieces.append(piece)
                yield piece
        except BaseException:
            self.history.pop()  # an interrupted turn is forgotten
            raise
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})


def repl(session: Session, read=input, write=None) -> int:
    """The terminal loop; `read(prompt)` returns a line (EOFError ends), `write(text)` prints."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    write("chatforge chat: /reset clears the history, /exit quits.\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}: use /reset or /exit\n")
            continue
        write("assistant> ")
        try:
            for piece in session.reply(line):
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="chatforge chat", description="Chat with a model in the terminal.")
    p.add_argument("model", help="model dir, adapter dir, .gguf file or 'default'")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-context", type=int, default=0, help="context window; 0 = the model's")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    from chatforge.evaluate import load_inference_model

    lm, tok = load_inference_model(args.model, args.dtype)
    session = Session(
        lm, tok, args.system, args.max_new_tokens, args.temperature, args.top_p, args.max_context
    )
    return repl(session)
