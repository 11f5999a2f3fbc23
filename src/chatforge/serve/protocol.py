"""The OpenAI request bodies `chatforge serve` accepts, as strict pydantic models.

Every field OpenAI defines for these endpoints is either honoured or refused with a 400 naming the
field: a field not listed here is an unknown field (400), a wrong type is never coerced (`"n": "two"`
and `"n": 1.5` are refused), numbers are range-checked, and `null` means "the default" as in OpenAI's
schema. Refused on purpose (nothing here could honour them): tools and function calling, the `tool`
role, `response_format` `json_schema` (`json_object` is honoured), `logit_bias`, non-zero frequency/presence penalties,
`suffix`, `best_of` other than `n`, non-text content parts, a message's `name` (the chat template
has no place for it).

    >>> req = parse(ChatRequest, b'{"messages": [{"role": "developer", "content": "be brief"}]}')
    >>> req.messages[0].role, req.n
    ('developer', None)
    >>> parse(ChatRequest, b'{"messages": [{"role": "user", "content": "hi"}], "n": "two"}')
    Traceback (most recent call last):
    ...
    chatforge.serve.protocol.ApiError: n: Input should be a valid integer
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 8
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object"]


Stops = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)]


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: Stops | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: Literal[0] | None = None  # only the no-op value: other values are refused
    presence_penalty: Literal[0] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v):
        if v == "":
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a batch: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def _param(loc: tuple) -> str:
    """'messages[0].role' from pydantic's location, dropping its union-branch labels."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (part.startswith(("list[", "str", "int", "function-", "constrained-")) or "[" in part):
            out += f".{part}" if out else part
    return out


def parse(model: type[BaseModel], body: bytes):
    """The validated request, or ApiError(400) naming the first bad field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError("body must be a JSON object")
    try:  # JSON may spell a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can take
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise ApiError(f"body holds text that is not valid Unicode: {e.reason}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # the innermost problem is the most precise
        param = _param(err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown or unsupported field"
        elif err["type"] == "literal_error" and param in ("frequency_penalty", "presence_penalty"):
            msg = "only 0 is supported"
        elif param == "response_format.type":
            msg = "only 'text' and 'json_object' are supported (no json_schema)"
        elif param and param.endswith(".role"):
            msg = "role must be system, developer, user or assistant (tools are not supported)"
        raise ApiError(f"{param}: {msg}" if param else msg, param=param) from None
