"""Per-request sampling settings, as users of vLLM and the OpenAI API know them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


MAX_LOGIT_BIAS = 1024
"""Token ids one request may bias."""


class SamplingParams(BaseModel):
    """How to pick each next token and when to stop.

    ``temperature=0`` is greedy. ``top_k=0`` or ``-1`` and ``top_p=1`` disable those filters.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n: int = Field(1, ge=1, le=128, description="independent completions per prompt")
    max_tokens: int | None = Field(16, ge=1, le=1 << 20, description="new tokens at most; None: up to the context length")
    min_tokens: int = Field(0, ge=0, le=1 << 20, description="new tokens before EOS or a stop token may end the output")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass kept")
    top_k: int = Field(0, ge=-1, le=1 << 20, description="tokens kept; 0 or -1 keeps all")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below min_p x the top probability")
    seed: int | None = Field(None, ge=0, le=(1 << 63) - 1, description="per-request generator seed")
    stop: list[str] = Field(default_factory=list, description="strings that end the output (not included)")
    stop_token_ids: list[int] = Field(default_factory=list, description="token ids that end the output")
    ignore_eos: bool = Field(False, description="keep going past the end-of-sequence token")
    include_stop_str_in_output: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top log-probabilities returned per token")
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="CTRL-style penalty on seen tokens")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(
        None, description="added to these token ids' logits before anything else (OpenAI's -100..100)"
    )
    skip_special_tokens: bool = True
    speculative: bool = Field(True, description="may speculate when the engine does (False opts this request out)")
    response_format: dict | None = Field(
        None,
        description='structured output: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}',
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} token ids")
        for tok, b in v.items():
            if not 0 <= tok < 1 << 31:
                raise ValueError("logit_bias keys must be token ids (0 to 2^31 - 1)")
            if not -100.0 <= b <= 100.0:
                raise ValueError("logit_bias values must be in -100..100")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v is None or v.get("type") == "text":
            return None
        kind = v.get("type")
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            js = v.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise ValueError("response_format.json_schema must be an object with a 'schema' object")
            return {"type": "json_schema", "json_schema": js}
        raise ValueError("response_format.type must be 'text', 'json_object' or 'json_schema'")

    @model_validator(mode="after")
    def _check(self) -> "SamplingParams":
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
