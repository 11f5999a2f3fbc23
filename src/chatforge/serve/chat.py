"""Chat with a model in the terminal: `chatforge chat MODEL_DIR [--system TEXT] [--temperature T]`.

MODEL_DIR is a full model dir, an adapter dir (LoRA, prefix, prompt tuning), a .gguf file or
`default`. Tokens stream as they are generated. The conversation is kept as multi-turn history; when
it no longer fits the context window (minus room for the reply) the oldest turns are dropped, the
system prompt never. Commands: `/reset` clears the history, `/exit` (or end of input) quits.

Generation runs token by token in this thread (`chatforge.serve.engine`), so Ctrl-C mid-reply stops
the reply at once and keeps the session: the interrupted turn is forgotten, the chat goes on. Line
editing and history come from `readline` where Python has it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from chatforge.serve.engine import Engine, Sampling, context_window


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
    engine: Engine | None = None

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
        self.engine = self.engine or Engine(self.lm, self.tok, max_context=self.max_context)
        s = Sampling(self.max_new_tokens, self.temperature, self.top_p)
        pieces = []
        try:
            for step in self.engine.sample(ids, s):
                pieces.append(step.text)
                yield step.text
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
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    from chatforge.evaluate import load_inference_model

    lm, tok = load_inference_model(args.model, args.dtype)
    session = Session(
        lm, tok, args.system, args.max_new_tokens, args.temperature, args.top_p, args.max_context
    )
    return repl(session)
