"""OpenAI request models -> vLLM SamplingParams, and the OpenAI error body (serve.protocol)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from vllm.sampling_params import RequestOutputKind

from unlearnd.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    error_body,
)

MSG = [{"role": "user", "content": "hi"}]
VOCAB = 300


def chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MSG, **kw})


def params(req: ChatCompletionRequest | CompletionRequest, *, max_tokens: int = 10,
           extra: dict | None = None, stream: bool = False):
    return req.to_sampling_params(max_tokens=max_tokens, logprobs=req.logprobs_k,
                                  vocab_size=VOCAB, extra_args=extra, stream=stream)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=7).requested_max_tokens == 7
    assert chat(max_completion_tokens=9).requested_max_tokens == 9
    assert chat(max_tokens=7, max_completion_tokens=9).requested_max_tokens == 9
    assert chat().requested_max_tokens is None


def test_completion_max_tokens_defaults_to_16_like_openai() -> None:
    assert CompletionRequest(prompt="x").requested_max_tokens == 16
    assert CompletionRequest(prompt="x", max_tokens=3).requested_max_tokens == 3
    assert CompletionRequest.model_validate(
        {"prompt": "x", "max_tokens": None}).requested_max_tokens is None


def test_sampling_fields_are_carried_over() -> None:
    req = chat(n=3, seed=1234, temperature=0.3, top_p=0.8, presence_penalty=0.5,
               frequency_penalty=-0.5, stop="END")
    p = params(req, max_tokens=12, extra={"unlearnd_version": "acme@abc"})
    assert (p.n, p.seed, p.max_tokens) == (3, 1234, 12)
    assert p.temperature == pytest.approx(0.3) and p.top_p == pytest.approx(0.8)
    assert p.presence_penalty == pytest.approx(0.5)
    assert p.frequency_penalty == pytest.approx(-0.5)
    assert p.stop == ["END"]
    assert p.extra_args == {"unlearnd_version": "acme@abc"}


def test_empty_extra_args_become_none() -> None:
    assert params(chat(), extra={}).extra_args is None
    assert params(chat(), extra=None).extra_args is None


def test_stream_selects_delta_output() -> None:
    assert params(chat(), stream=True).output_kind == RequestOutputKind.DELTA
    assert params(chat(), stream=False).output_kind == RequestOutputKind.FINAL_ONLY


def test_stop_list_limits() -> None:
    assert params(chat(stop=["a", "b"])).stop == ["a", "b"]
    with pytest.raises(ValidationError, match="at most 4"):
        chat(stop=["a", "b", "c", "d", "e"])
    with pytest.raises(ValidationError, match="non-empty"):
        chat(stop=["a", ""])


def test_chat_logprobs_mapping() -> None:
    assert chat().logprobs_k is None
    assert chat(logprobs=True).logprobs_k == 0
    assert chat(logprobs=True, top_logprobs=4).logprobs_k == 4
    assert params(chat(logprobs=True, top_logprobs=4)).logprobs == 4
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs"):
        chat(top_logprobs=2)
    with pytest.raises(ValidationError):
        chat(logprobs=True, top_logprobs=21)


def test_completion_logprobs_mapping() -> None:
    assert CompletionRequest(prompt="x").logprobs_k is None
    assert params(CompletionRequest(prompt="x", logprobs=3)).logprobs == 3
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", logprobs=6)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", 2.01), ("top_p", 0.0), ("top_p", 1.5),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("n", 0), ("n", 129),
    ("max_tokens", 0), ("max_completion_tokens", 0)])
def test_out_of_range_values_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as info:
        chat(**{field: value})
    assert field in str(info.value)


@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_temperature_bounds_are_inclusive(temperature: float) -> None:
    assert params(chat(temperature=temperature)).temperature == temperature


def test_logit_bias_is_converted_to_int_keys() -> None:
    p = params(chat(logit_bias={"5": 10, "299": -100}))
    assert p.logit_bias == {5: 10.0, 299: -100.0}


@pytest.mark.parametrize("bias,needle", [({"abc": 1.0}, "'abc' is not a token id"),
                                         ({"5": 100.5}, "100.5"), ({"5": -101}, "-101")])
def test_logit_bias_rejected_at_validation(bias: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        chat(logit_bias=bias)


@pytest.mark.parametrize("tok", [VOCAB, VOCAB + 1000, -1])
def test_logit_bias_out_of_vocab_names_the_id(tok: int) -> None:
    req = chat(logit_bias={str(tok): 1.0})
    with pytest.raises(ValueError, match=rf"token id {tok} is outside the vocabulary"):
        params(req)


def test_messages_must_not_be_empty() -> None:
    with pytest.raises(ValidationError, match="at least one message"):
        ChatCompletionRequest(messages=[])


def test_unknown_role_rejected() -> None:
    with pytest.raises(ValidationError):
        ChatMessage(role="tool", content="x")


def test_message_text_parts() -> None:
    m = ChatMessage(role="user", content=[{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}])
    assert m.text() == "ab"
    assert ChatMessage(role="assistant", content=None).text() == ""
    with pytest.raises(ValueError, match="only text"):
        ChatMessage(role="user", content=[{"type": "image_url", "image_url": {}}]).text()


def test_completion_unsupported_fields() -> None:
    with pytest.raises(ValidationError, match="suffix"):
        CompletionRequest(prompt="x", suffix="y")
    with pytest.raises(ValidationError, match="echo"):
        CompletionRequest(prompt="x", echo=True)
    with pytest.raises(ValidationError, match="must not be empty"):
        CompletionRequest(prompt=[])


def test_prompt_scores_are_refused_not_ignored() -> None:
    """`prompt_logprobs` would return the model's scores of the prompt (before any guard):
    a 400 naming it, on both endpoints; absent or null is fine."""
    for make in (lambda **k: CompletionRequest(prompt="x", **k),
                 lambda **k: ChatCompletionRequest(
                     messages=[{"role": "user", "content": "x"}], **k)):
        with pytest.raises(ValidationError, match="prompt_logprobs"):
            make(prompt_logprobs=5)
        make(prompt_logprobs=None)


def test_error_body_shape_and_types() -> None:
    assert error_body("bad", param="n") == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
    for status, kind in [(400, "invalid_request_error"), (401, "authentication_error"),
                         (403, "permission_error"), (404, "not_found_error"),
                         (500, "server_error"), (503, "service_unavailable")]:
        e = APIError(status, "m", code="c")
        assert e.body()["error"]["type"] == kind
        assert e.body()["error"]["code"] == "c"
