"""Request and response bodies of the OpenAI-compatible HTTP API, and their SamplingParams.

Requests accept OpenAI's fields plus the sampling extras that vLLM users know (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, min_tokens, priority). Fields this server does not
know are ignored, as OpenAI's own API and clients expect.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.runtime.sampling_params import SamplingParams

MAX_N = 16
MAX_STOP = 16


class ProtocolError(ValueError):
    """A request that is well-formed JSON but cannot be served as asked."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JsonSchemaSpec(_Model):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is 'json_schema'")
        return self

    def to_engine(self) -> dict | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        schema = self.json_schema.schema_ if self.json_schema.schema_ is not None else {"type": "object"}
        return {"type": "json_schema", "json_schema": {"name": self.json_schema.name, "schema": schema}}


class _SamplingRequest(_Model):
    """Fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0, le=(1 << 63) - 1)
    user: str | None = None
    response_format: ResponseFormat | None = None
    # extras beyond OpenAI's API
    top_k: int | None = Field(None, ge=-1, le=1 << 20)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = Field(None, ge=0)
    skip_special_tokens: bool | None = True
    speculative: bool | None = True
    include_stop_str_in_output: bool | None = False
    priority: int | None = Field(None, ge=-(1 << 31), le=(1 << 31) - 1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        fields: dict[str, Any] = {
            "n": self.n,
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k or 0,
            "min_p": self.min_p or 0.0,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids or [],
            "ignore_eos": bool(self.ignore_eos),
            "include_stop_str_in_output": bool(self.include_stop_str_in_output),
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "repetition_penalty": self.repetition_penalty or 1.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "skip_special_tokens": True if self.skip_special_tokens is None else self.skip_special_tokens,
            "speculative": self.speculative is not False,
            "min_tokens": self.min_tokens or 0,
            "logit_bias": self.logit_bias or None,
            "response_format": self.response_format.to_engine() if self.response_format else None,
        }
        try:
            return SamplingParams(**fields)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__") or None
            raise ProtocolError(f"invalid {loc or 'request'}: {err.get('msg', 'invalid value')}", param=loc) from None


class CompletionRequest(_SamplingRequest):
    """A legacy completion. ``echo`` puts the prompt before the output; with ``logprobs`` the
    prompt's tokens come first in ``logprobs`` too (the first with null values), and
    ``max_tokens: 0`` with ``echo`` only scores the prompt."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], list) and any(not p for p in v):
                raise ValueError("prompt token lists must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise ProtocolError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError("best_of must equal n when given", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ProtocolError("max_tokens must be at least 1 (0 is allowed only with echo, to score the prompt)",
                                param="max_tokens")
        max_tokens = 16 if self.max_tokens is None else max(self.max_tokens, 1)  # a prompt-only score still runs one step
        prompt_logprobs = self.logprobs if self.echo else None
        return self._sampling(max_tokens, self.logprobs, prompt_logprobs)

    @property
    def score_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: the answer holds the prompt only, no generated tokens."""
        return bool(self.echo) and self.max_tokens == 0


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def conversation(self) -> list[dict]:
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text()})
        return out

    def to_sampling_params(self) -> SamplingParams:
        if self.tools and self.tool_choice not in (None, "none"):
            raise ProtocolError("tool calling is not supported", param="tools")
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs set to true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, logprobs)


# --- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(_Model):
    id: str
    object: str = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "kiln"
    max_model_len: int | None = None


class ModelList(_Model):
    object: str = "list"
    data: list[ModelCard]


class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorInfo


__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ErrorInfo", "ErrorResponse", "ModelCard",
    "ModelList", "ProtocolError", "ResponseFormat", "StreamOptions", "UsageInfo", "new_id", "now",
]
