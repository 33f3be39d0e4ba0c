"""OpenAI protocol models (pydantic, at the HTTP edge only) and the OpenAI error body.

Fields follow the order of the OpenAI API reference. Unknown fields are accepted and
ignored, as OpenAI does, except where a client could believe they had an effect.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error that becomes an OpenAI error body with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The one place the OpenAI error body is built."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------- chat


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who wrote the message.")
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or a list of text parts.")
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


PROMPT_SCORE_FIELDS = ("prompt_logprobs", "return_tokens_as_token_ids")
"""Request fields refused with a 400 (vLLM's names): they expose the model's scores of
the prompt or raw token ids, outside the policy."""


class SamplingFields(BaseModel):
    """Fields shared by chat and completions; converts itself to vLLM SamplingParams."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="Informational: the tenant's policy decides "
                              "what serves the request; it cannot select an adapter.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in "
                                                "[-100, 100].")
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_prompt_scores(cls, data: Any) -> Any:
        """Fields that would return scores of text the policy did not produce (the
        prompt's own logprobs, computed before any guard) are refused, never ignored."""
        if isinstance(data, dict):
            for key in PROMPT_SCORE_FIELDS:
                if data.get(key) not in (None, False, 0):
                    raise ValueError(f"{key} is not supported: it returns scores of the "
                                     "prompt, which this tenant's policy does not govern")
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("stop accepts at most 4 sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        for k, val in v.items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias key {k!r} is not a token id")
            if not -100 <= val <= 100:
                raise ValueError(f"logit_bias value {val} for token {k} is outside [-100, 100]")
        return v

    def to_sampling_params(self, *, max_tokens: int, logprobs: int | None, vocab_size: int,
                           extra_args: dict[str, Any] | None, stream: bool) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        bias = None
        if self.logit_bias:
            bias = {}
            for k, val in self.logit_bias.items():
                tok = int(k)
                if not 0 <= tok < vocab_size:
                    raise ValueError(f"logit_bias token id {tok} is outside the vocabulary "
                                     f"(0..{vocab_size - 1})")
                bias[tok] = float(val)
        return SamplingParams(
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
            max_tokens=max_tokens,
            logprobs=logprobs,
            logit_bias=bias,
            extra_args=extra_args or None,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(description="The conversation so far.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must contain at least one message")
        return v

    @model_validator(mode="after")
    def _lp(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def top_alternatives(self) -> int:
        """How many top alternatives per token the client asked for."""
        return (self.top_logprobs or 0) if self.logprobs else 0

    top_alternatives_param: ClassVar[str] = "top_logprobs"


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(description="Text, or token ids.")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if "max_tokens" in self.model_fields_set else 16

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs

    @property
    def top_alternatives(self) -> int:
        return self.logprobs or 0

    top_alternatives_param: ClassVar[str] = "logprobs"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
