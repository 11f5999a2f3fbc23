"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's Go-template form, the
default system prompt, and the end-of-turn stop tokens.

Supported: ChatML templates (`<|im_start|>ROLE\\nCONTENT<|im_end|>\\n` per message, then
`<|im_start|>assistant\\n`), optionally with a default system prompt when the conversation has
none (SmolLM2, Qwen2/2.5, chatforge's own fallback). The template is checked by rendering probe
conversations with the model's own Jinja template; any other template is refused in one line,
since a Modelfile with a wrong template makes a model that answers badly without any error.

    >>> print(modelfile_text("out.gguf", "", ["<|im_end|>"]).splitlines()[1])
    FROM ./out.gguf
"""

from __future__ import annotations

from chatforge.errors import ChatforgeError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GENERATION_PROMPT = f"{IM_START}assistant\n"

# What Ollama's renderer produces for each message, then for the reply it asks for.
GO_TEMPLATE = (
    f"{{{{- range .Messages }}}}{IM_START}{{{{ .Role }}}}\n{{{{ .Content }}}}{IM_END}\n{{{{ end }}}}"
    + GENERATION_PROMPT
)

_PROBE = [
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
]
_SYSTEM = {"role": "system", "content": "probe system prompt"}


def chatml(messages: list[dict]) -> str:
    """Messages as ChatML text (no generation prompt).

    >>> chatml([{"role": "user", "content": "hi"}])
    '<|im_start|>user\\nhi<|im_end|>\\n'
    """
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def chatml_default_system(tokenizer) -> str:
    """The system prompt the model's ChatML template adds when a conversation has none ("" when it
    adds none); a one-line error when the template is not ChatML."""

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    refusal = ChatforgeError(
        "chat template: export-gguf writes Ollama templates for ChatML "
        "(<|im_start|>role ... <|im_end|>: SmolLM2, Qwen2, chatforge's default) only, and this model's "
        "template renders differently; write the Modelfile's TEMPLATE by hand"
    )
    try:
        with_system, bare = render([_SYSTEM, *_PROBE]), render(_PROBE)
    except Exception as e:  # a template that raises on plain user/assistant turns
        raise refusal from e
    if with_system != chatml([_SYSTEM, *_PROBE]) + GENERATION_PROMPT:
        raise refusal
    want = chatml(_PROBE) + GENERATION_PROMPT
    if bare == want:
        return ""
    head = bare[: -len(want)] if bare.endswith(want) else ""
    start, end = f"{IM_START}system\n", f"{IM_END}\n"
    if not (head.startswith(start) and head.endswith(end)):
        raise refusal
    return head[len(start) : -len(end)]


def stop_tokens(tokenizer) -> list[str]:
    """The end-of-turn token and, when it is another token, the tokenizer's EOS."""
    eos = tokenizer.eos_token
    return [IM_END] + ([eos] if eos and eos != IM_END else [])


def modelfile_text(gguf_name: str, system: str, stops: list[str]) -> str:
    """The Modelfile for `gguf_name` (a file beside it), with `system` as the default system
    prompt when non-empty and one `PARAMETER stop` per entry of `stops`."""
    if '"""' in system:
        raise ChatforgeError(
            'chat template: its default system prompt holds """, which a Modelfile cannot quote'
        )
    lines = [
        "# Ollama Modelfile written by chatforge export-gguf; use: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{GO_TEMPLATE}"""',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
