"""OpenAI request schemas, sampling conversion and the exception-to-error-JSON mapping (service/openai_api.py)."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from service.async_engine import EngineError, EngineStopped
from service.engine import QueueFull
from service.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    error_response,
    sampling_params,
)
from service.responses_api import ResponsesRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _tool(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, **({"parameters": parameters} if parameters else {})}}


def _rejection(model, body: dict) -> tuple[int, dict]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return error_body(info.value)


@pytest.mark.parametrize("extra, param", [
    ({"foo": 1}, "foo"), ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": True}, "n"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}}, "response_format"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"yaml": "a: 1"}}, "structured_outputs"),
    ({"max_tokens": -1}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"stop": ["a"] * 5}, "stop"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f"}}]}]}, "messages.0"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"), ({"tools": [_tool("f"), _tool("f")]}, "tools"),
    ({"tools": [_tool(f"f{i}") for i in range(129)]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"), ({"parallel_tool_calls": "maybe"}, "parallel_tool_calls"),
    ({"tools": [_tool("f")], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"store": True}, "store"), ({"service_tier": "flex"}, "service_tier"), ({"verbosity": "low"}, "verbosity"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"), ({"audio": {"voice": "alloy"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"), ({"modalities": ["text", "audio"]}, "modalities"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"), ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"), ({"metadata": {"k": 1}}, "metadata"),
    ({"safety_identifier": "s" * 65}, "safety_identifier"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    # numbers are JSON's: a boolean or a numeric string was taken as 1.0 or its value (a review)
    ({"temperature": True}, "temperature"), ({"temperature": "0.5"}, "temperature"), ({"top_p": "1"}, "top_p"),
    ({"presence_penalty": "1.5"}, "presence_penalty"), ({"frequency_penalty": False}, "frequency_penalty"),
    ({"min_p": "0.1"}, "min_p"), ({"repetition_penalty": True}, "repetition_penalty"),
    ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"prompt_cache_options": {"ttl": "24h"}}, "prompt_cache_options.ttl"),
    ({"prompt_cache_options": {"breakpoints": 2}}, "prompt_cache_options.breakpoints"),
])
def test_chat_rejections_name_the_parameter(extra, param):
    status, body = _rejection(ChatCompletionRequest, {**CHAT, **extra})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is not None and body["error"]["param"].startswith(param)
    assert param.split(".")[0] in body["error"]["message"]


@pytest.mark.parametrize("model, extra, param", [
    (CompletionRequest, {"prompt": [True, 2]}, "prompt"), (CompletionRequest, {"prompt": [1, "5"]}, "prompt"),
    (CompletionRequest, {"prompt": [[1, True]]}, "prompt"), (CompletionRequest, {"max_tokens": True}, "max_tokens"),
    (CompletionRequest, {"echo": "yes"}, "echo"), (ChatCompletionRequest, {"seed": True}, "seed"),
    (ChatCompletionRequest, {"seed": "5"}, "seed"), (ChatCompletionRequest, {"max_completion_tokens": "9"},
                                                     "max_completion_tokens"),
    (ChatCompletionRequest, {"logprobs": "yes"}, "logprobs"), (ChatCompletionRequest, {"stream": "true"}, "stream"),
    (ChatCompletionRequest, {"stream": 1}, "stream"), (ChatCompletionRequest, {"ignore_eos": "true"}, "ignore_eos"),
    (ChatCompletionRequest, {"parallel_tool_calls": 0}, "parallel_tool_calls"),
    (ChatCompletionRequest, {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
])
def test_booleans_and_integers_are_what_json_writes_them_as(model, extra, param):
    """Pydantic's lax mode took "true", "yes" and 1 for true, true for 1 and "5" for 5: prompt token ids [true, 2]
    generated from [1, 2], max_tokens true was 1 (a review). A 400 naming the field, as OpenAI's."""
    base = CHAT if model is ChatCompletionRequest else {"model": "m", "prompt": "a"}
    status, body = _rejection(model, {**base, **extra})
    assert status == 400 and body["error"]["param"].startswith(param), body


def test_errors_of_max_completion_tokens_name_it():
    """The official client sends max_completion_tokens (max_tokens is deprecated): its errors named max_tokens."""
    for body, param, message in (({"max_completion_tokens": 95}, "max_completion_tokens", "max_completion_tokens 95"),
                                 ({"max_tokens": 95}, "max_tokens", "max_tokens 95"),
                                 ({"max_completion_tokens": 3, "min_tokens": 5}, "min_tokens",
                                  "exceeds max_completion_tokens 3")):
        with pytest.raises(APIError) as info:
            sampling_params(ChatCompletionRequest.model_validate({**CHAT, **body}), 10, 100)
        assert info.value.param == param and message in info.value.message, info.value.message


def test_history_holds_refusals_and_needs_content_as_openai_has_it():
    """An assistant's refusal (a content part, or the refusal field of a message sent back whole) was a 400; a message
    without content (not an assistant's with tool calls, a refusal or reasoning) was rendered as an empty turn (a
    review)."""
    refused = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
               {"role": "assistant", "content": None, "refusal": "No."},
               {"role": "assistant", "content": "Sure.", "refusal": None},
               {"role": "assistant", "content": None, "reasoning": "Thinking..."}, {"role": "user", "content": "ok"}]
    request = ChatCompletionRequest.model_validate({**CHAT, "messages": refused})
    assert [m.text() for m in request.messages] == ["hi", "I can't.", "No.", "Sure.", "", "ok"]
    for messages, param in (([{"role": "user"}], "messages.0"),
                            ([{"role": "system"}, {"role": "user", "content": "hi"}], "messages.0"),
                            ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "messages.1"),
                            ([{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}], "messages.0"),
                            ([{"role": "user", "content": "x", "refusal": "x"}], "messages.0")):
        status, body = _rejection(ChatCompletionRequest, {**CHAT, "messages": messages})
        assert status == 400 and body["error"]["param"] == param, body
    assert ChatCompletionRequest.model_validate({**CHAT, "messages": [{"role": "user", "content": ""}]})  # (content)


def test_chat_template_kwargs_may_not_name_apply_chat_templates_self():
    status, body = _rejection(ChatCompletionRequest, {**CHAT, "chat_template_kwargs": {"self": 1}})
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs"


def test_neutral_values_of_unsupported_fields_are_accepted():
    neutral = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "logit_bias": {},
               "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
               "user": "u", "seed": 3, "stream": True, "stream_options": {"include_usage": True},
               "service_tier": "auto", "modalities": ["text"], "metadata": {f"k{i}": "v" * 512 for i in range(16)},
               "safety_identifier": "user-1234", "prompt_cache_key": "agent-7",
               "verbosity": "medium"}  # OpenAI's default, which a client may send explicitly
    request = ChatCompletionRequest.model_validate({**CHAT, **neutral})
    assert request.n == 1 and request.stream_options.include_usage and len(request.metadata) == 16


@pytest.mark.parametrize("model, base", [(ChatCompletionRequest, CHAT), (CompletionRequest, {"model": "m",
                                                                                             "prompt": "hi"})])
def test_what_openais_client_sends_for_its_defaults_and_hints_is_accepted(model, base):
    """OpenAI's stream is "boolean or null" (its client sends null for stream=None), stream_options takes
    include_obfuscation (false: no padding field, which these chunks never carry) and prompt_cache_retention is a
    hint for the prefix cache: each was a 400 (a review). A retention OpenAI does not name still is."""
    request = model.model_validate({**base, "stream": None, "prompt_cache_retention": "24h",
                                    "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert request.stream is False and request.stream_options.include_usage
    assert model.model_validate({**base, "stream": True, "prompt_cache_retention": "in_memory"}).stream is True
    status, body = _rejection(model, {**base, "prompt_cache_retention": "forever"})
    assert status == 400 and body["error"]["param"] == "prompt_cache_retention"
    # the client's newer caching options and a null moderation (unknown parameters, 400s, before)
    request = model.model_validate({**base, "prompt_cache_options": {"mode": "explicit", "ttl": "30m"},
                                    **({"moderation": None} if model is ChatCompletionRequest else {})})
    assert request.prompt_cache_options.mode == "explicit"


def test_message_content_parts_and_developer_role():
    request = ChatCompletionRequest.model_validate({**CHAT, "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    # several text parts are joined with newlines, as vLLM's chat_utils joins them
    assert request.template_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize("prompt, expected", [
    ("abc", ["abc"]), ([5, 6], [[5, 6]]), (["abc"], ["abc"]), ([[5, 6]], [[5, 6]]), (["a", "b"], ["a", "b"]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == expected


@pytest.mark.parametrize("prompt", [["a"] * 33, [[1], [-2]], [-1], 5])
def test_too_many_or_bad_prompts_are_rejected(prompt):
    status, body = _rejection(CompletionRequest, {"model": "m", "prompt": prompt})
    assert status == 400 and body["error"]["param"].startswith("prompt")


def test_prompts_times_n_is_bounded():
    CompletionRequest.model_validate({"model": "m", "prompt": ["a"] * 4, "n": 16})
    status, body = _rejection(CompletionRequest, {"model": "m", "prompt": ["a"] * 5, "n": 13})
    assert status == 400 and "65" not in body["error"]["message"] and "64" in body["error"]["message"]


@pytest.mark.parametrize("logprobs", [True, -1, 21, "2"])
def test_completion_logprobs_must_be_a_count(logprobs):
    status, body = _rejection(CompletionRequest, {"model": "m", "prompt": "a", "logprobs": logprobs})
    assert status == 400 and body["error"]["param"] == "logprobs"


@pytest.mark.parametrize("endpoint, fields, expected", [
    (ChatCompletionRequest, {}, None), (ChatCompletionRequest, {"logprobs": False, "top_logprobs": 0}, None),
    (ChatCompletionRequest, {"logprobs": True}, 0), (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 20}, 20),
    (CompletionRequest, {}, None), (CompletionRequest, {"logprobs": 0}, 0), (CompletionRequest, {"logprobs": 5}, 5),
])
def test_sampling_params_carry_the_logprobs_count(endpoint, fields, expected):
    base = CHAT if endpoint is ChatCompletionRequest else {"model": "m", "prompt": "a"}
    assert sampling_params(endpoint.model_validate({**base, **fields}), 3, 100).logprobs == expected


def test_echo_with_logprobs_asks_for_the_prompts_logprobs():
    base = {"model": "m", "prompt": "a"}
    assert sampling_params(CompletionRequest.model_validate({**base, "echo": True, "logprobs": 2}), 3, 100
                           ).prompt_logprobs == 2
    assert sampling_params(CompletionRequest.model_validate({**base, "echo": True}), 3, 100).prompt_logprobs is None
    assert sampling_params(CompletionRequest.model_validate({**base, "logprobs": 2}), 3, 100).prompt_logprobs is None


def test_sampling_params_carry_penalties_and_logit_bias():
    body = {**CHAT, "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"7": -100, "12": 2.5}}
    params = sampling_params(ChatCompletionRequest.model_validate(body), 3, 100)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == ((7, -100.0), (12, 2.5)) and params.uses_history
    plain = sampling_params(ChatCompletionRequest.model_validate(CHAT), 3, 100)
    assert (plain.presence_penalty, plain.frequency_penalty, plain.logit_bias, plain.uses_history) == (0, 0, (), False)


def test_sampling_params_defaults_fill_the_context():
    params = sampling_params(ChatCompletionRequest.model_validate({**CHAT, "stop": "END"}), 10, 100)
    assert (params.max_tokens, params.temperature, params.top_p, params.stop) == (90, 1.0, 1.0, ("END",))


def test_completions_default_to_16_tokens_as_openai_and_vllm():
    """The legacy endpoint's max_tokens defaults to 16 (OpenAI's reference, vLLM); null asks for the rest of the
    context, as chat's default does."""
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert sampling_params(request, 10, 100).max_tokens == 16
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": None})
    assert sampling_params(request, 10, 100).max_tokens == 90


@pytest.mark.parametrize("seed", [-1, -2**63, 2**63 - 1])
def test_a_seed_is_any_signed_64_bit_integer(seed):
    params = sampling_params(ChatCompletionRequest.model_validate({**CHAT, "seed": seed, "temperature": 1}), 10, 100)
    assert params.seed == seed and params.make_generator() is not None
    status, body = _rejection(ChatCompletionRequest, {**CHAT, "seed": 2**63})
    assert status == 400 and body["error"]["param"] == "seed"


def test_sampling_params_prefers_max_completion_tokens():
    body = {**CHAT, "max_tokens": 50, "max_completion_tokens": 7, "temperature": 0, "seed": 4, "ignore_eos": True}
    params = sampling_params(ChatCompletionRequest.model_validate(body), 10, 100)
    assert (params.max_tokens, params.greedy, params.seed, params.ignore_eos) == (7, True, 4, True)


@pytest.mark.parametrize("body, prompt_tokens, param", [
    ({"max_tokens": 95}, 10, "max_tokens"), ({}, 100, "prompt"), ({"stream_options": {"include_usage": True}}, 5,
                                                                   "stream_options"),
])
def test_sampling_params_rejections(body, prompt_tokens, param):
    with pytest.raises(APIError) as info:
        sampling_params(CompletionRequest.model_validate({"model": "m", "prompt": "x", **body}), prompt_tokens, 100)
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize("exc, status, type_", [
    (APIError(404, "no such model", param="model", code="model_not_found"), 404, "invalid_request_error"),
    (ValueError("prompt must contain at least one token"), 400, "invalid_request_error"),
    (QueueFull("busy"), 429, "rate_limit_error"),
    (HTTPException(401, "bad key"), 401, "authentication_error"),
    (HTTPException(403, "forbidden"), 403, "permission_error"),
    (HTTPException(404, "Not Found"), 404, "not_found_error"),
    (HTTPException(413, "too big"), 413, "invalid_request_error"),
    (EngineStopped("stopping"), 503, "service_unavailable_error"),
    (EngineError("step failed: CUDA error at /secret/path.py:12"), 500, "server_error"),
    (KeyError("/secret/internal"), 500, "server_error"),
])
def test_error_mapping(exc, status, type_):
    response = error_response(exc)
    body = json.loads(response.body)
    assert response.status_code == status and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert ("Retry-After" in response.headers) == (status == 429)
    if status >= 500:
        assert "secret" not in body["error"]["message"]


@pytest.mark.parametrize("model, body, param, message", [
    # content: a string or a list of text parts; a list with an image part is wrong in that part, not "not a string"
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages.0.content.0", "text"),
    (CompletionRequest, {"model": "m", "prompt": ["a", [1, 2]]}, "prompt.", "prompt."),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content",
     "messages.0.content"),
])
def test_errors_under_a_union_name_the_field_not_the_type_tags(model, body, param, message):
    status, error = _rejection(model, body)
    assert status == 400 and error["error"]["param"].startswith(param) and message in error["error"]["message"]
    assert not any(c in error["error"]["param"] + error["error"]["message"].split(":")[0] for c in "[(")


_CALLED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": "\ud800"}'}}]},
    {"role": "tool", "content": "ok", "tool_call_id": "c1"}]


@pytest.mark.parametrize("model, extra, param, where", [
    (ChatCompletionRequest, {"messages": _CALLED}, "messages.1.tool_calls.0.function.arguments", ""),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi", "name": "a\udfff"}]},
     "messages.0.name", ""),
    (ChatCompletionRequest, {"tools": [{"type": "function", "function": {"name": "f", "description": "d\ud800"}}]},
     "tools.0.function.description", ""),
    (ChatCompletionRequest, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"enum": ["ok", "\ud800"]}}}}}]},
     "tools.0.function.parameters", "properties.a.enum.1: "),
    (ChatCompletionRequest, {"chat_template_kwargs": {"persona": {"name": "\ud800"}}}, "chat_template_kwargs",
     "persona.name: "),
    (ChatCompletionRequest, {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "\ud800": 1}}}}, "response_format.json_schema.schema", ""),
    (CompletionRequest, {"structured_outputs": {"choice": ["a", "\ud800"]}}, "structured_outputs.choice.1", ""),
    (CompletionRequest, {"structured_outputs": {"json": {"enum": ["\ud800"]}}}, "structured_outputs.json",
     "enum.0: "),
])
def test_lone_surrogates_in_any_text_the_prompt_or_a_grammar_takes_are_a_400_naming_the_field(model, extra, param,
                                                                                               where):
    """Not only content, prompt and stop: tool descriptions and schemas, history calls, template variables and
    structured outputs are checked too (they reached the chat template or the grammar, which failed with "chat
    template rejected the messages: TextEncodeInput must be ..." and no param, or a grammar parse error)."""
    base = CHAT if model is ChatCompletionRequest else {"model": "m", "prompt": "a"}
    status, error = _rejection(model, {**base, **extra})
    assert status == 400 and error["error"]["param"] == param
    assert error["error"]["message"].startswith(f"{param}: {where}text is not valid Unicode: lone surrogate")


def test_json_nested_too_deep_is_a_400_naming_the_field():
    """A tool's schema (or template variables, a structured output's schema) nested deeper than MAX_JSON_DEPTH is a
    400 naming it: tools nested 400 deep (a 20 KB body) overflowed the chat template's recursion, a 500 with a
    3,000-line traceback logged twice (isolation audit); 60 levels of schema are still taken."""
    from service.openai_api import MAX_JSON_DEPTH

    def nested(levels: int) -> dict:
        schema: dict = {"type": "string"}
        for _ in range(levels):
            schema = {"type": "object", "required": ["a"], "properties": {"a": schema}}
        return schema

    def tools(levels: int) -> dict:
        return {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": nested(levels)}}]}

    status, error = _rejection(ChatCompletionRequest, tools(400))
    assert status == 400 and error["error"]["param"] == "tools.0.function.parameters"
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in error["error"]["message"]
    deep = []
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    status, error = _rejection(ChatCompletionRequest, {**CHAT, "chat_template_kwargs": {"a": deep}})
    assert status == 400 and error["error"]["param"] == "chat_template_kwargs"
    ChatCompletionRequest.model_validate(tools(60))


def _called(arguments: str) -> list[dict]:
    """A conversation whose assistant called ``f`` with ``arguments``."""
    return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"}]


_TOO_DEEP_TO_PARSE = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError
_PARSES_BUT_TOO_DEEP = '{"a": ' + "[" * 600 + "]" * 600 + "}"  # parsed, it overflowed the chat template


@pytest.mark.parametrize("text", [_TOO_DEEP_TO_PARSE, _PARSES_BUT_TOO_DEEP])
@pytest.mark.parametrize("model, body, param", [
    (ChatCompletionRequest, lambda text: {**CHAT, "messages": _called(text)}, "messages.1.tool_calls.0.function.arguments"),
    (TokenizeRequest, lambda text: {"messages": _called(text)}, "messages.1.tool_calls.0.function.arguments"),
    (ChatCompletionRequest, lambda text: {**CHAT, "structured_outputs": {"json": text}}, "structured_outputs.json"),
    (CompletionRequest, lambda text: {"model": "m", "prompt": "a", "structured_outputs": {"json": text}},
     "structured_outputs.json"),
])
def test_json_nested_too_deep_inside_a_string_is_a_400_naming_the_field(model, body, param, text):
    """JSON sent as a string (a call's arguments sent back, a structured output's schema) is parsed: past some 1,000
    levels json.loads raised RecursionError, and 600 levels parsed but overflowed the chat template, 500s where the
    same JSON sent as an object is a 400 (MAX_JSON_DEPTH); arguments that are not JSON stay text."""
    from service.openai_api import MAX_JSON_DEPTH

    status, error = _rejection(model, body(text))
    assert status == 400 and error["error"]["param"] == param, error
    assert error["error"]["message"].startswith(f"{param}: ") and f"nested deeper than {MAX_JSON_DEPTH} levels" in \
        error["error"]["message"]
    shallow = '{"a": ' + "[" * 60 + "]" * 60 + "}"
    assert model.model_validate(body(shallow)) and model.model_validate(body("[1, 2]"))


def test_arguments_that_are_not_json_or_hold_a_nan_the_model_wrote_are_still_taken():
    """Arguments are any text, sent back as this server returned them (Python's JSON reads a model's NaN, and writes
    it back); only JSON nested too deep is refused."""
    request = ChatCompletionRequest.model_validate({**CHAT, "messages": _called('{"x": NaN}')})
    assert math.isnan(request.template_messages()[1]["tool_calls"][0]["function"]["arguments"]["x"])
    assert ChatCompletionRequest.model_validate({**CHAT, "messages": _called("[[[not json")})


_INFINITE_MAXIMUM = '{"type": "object", "properties": {"a": {"type": "number", "maximum": NUMBER}}}'


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity"])
@pytest.mark.parametrize("model, body, param, where", [
    (ChatCompletionRequest, '"tools": [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]',
     "tools.0.function.parameters", "properties.a.maximum: "),
    (ChatCompletionRequest, '"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}',
     "response_format.json_schema.schema", "properties.a.maximum: "),
    (ChatCompletionRequest, '"chat_template_kwargs": {"limit": NUMBER}', "chat_template_kwargs", "limit: "),
    (CompletionRequest, '"structured_outputs": {"json": SCHEMA}', "structured_outputs.json", "properties.a.maximum: "),
])
def test_a_non_finite_number_inside_a_json_field_is_a_400_naming_where(model, body, param, where, number):
    """Python's JSON reads NaN and infinities (``1e400`` too) anywhere; StrictModel refuses them in number fields
    only. One in a tool's schema reached the grammar, which could not read it (a 400 after 30 s), or, with
    tool_choice auto, a non-streamed response that could not be written as JSON once the completion was generated
    (a stream echoed ``Infinity``, which is not JSON)."""
    base = '"model": "m", "messages": [{"role": "user", "content": "hi"}]' if model is ChatCompletionRequest else \
        '"model": "m", "prompt": "a"'

    def raw(value: str) -> str:
        return "{" + base + ", " + body.replace("SCHEMA", _INFINITE_MAXIMUM).replace("NUMBER", value) + "}"

    with pytest.raises(ValidationError) as info:
        model.model_validate_json(raw(number))
    status, error = error_body(info.value)
    assert status == 400 and error["error"]["param"] == param, error
    assert error["error"]["message"].startswith(f"{param}: {where}") and "not a finite number" in error["error"]["message"]
    assert model.model_validate_json(raw("1"))  # (finite: taken)


def test_a_structured_outputs_schema_sent_as_text_is_checked_as_one_sent_as_an_object():
    """Its NaN reached the grammar, whose error named no place in the schema."""
    status, error = _rejection(CompletionRequest, {"model": "m", "prompt": "a", "structured_outputs": {
        "json": _INFINITE_MAXIMUM.replace("NUMBER", "NaN")}})
    assert status == 400 and error["error"]["param"] == "structured_outputs.json"
    assert "properties.a.maximum: nan is not a finite number" in error["error"]["message"]


def test_errors_of_several_fields_or_past_validation_name_the_parameter_they_begin_with():
    """A check of several fields (a model validator) or one made by the engine carries no location: its 400 said
    param null where one parameter was at fault (a README walkthrough)."""
    status, error = _rejection(CompletionRequest, {"model": "m", "prompt": ["a"] * 32, "n": 3})
    assert status == 400 and error["error"]["param"] == "n" and "n 3 x 32 prompts exceeds 64" in error["error"]["message"]
    status, error = _rejection(ChatCompletionRequest, {**CHAT, "continue_final_message": True})
    assert error["error"]["param"] == "continue_final_message"
    for message, param in [("logit_bias token ids must be in [0, 4096), got 999999", "logit_bias"),
                           ("prompt must contain at least one token", "prompt"),
                           ("prompt token ids must be in [0, 4096), got 0..99999", "prompt"),
                           ("the request asks for too much", None), ("models are many", None)]:
        status, body = error_body(ValueError(message))
        assert status == 400 and body["error"]["param"] == param and body["error"]["message"] == message


def test_a_missing_body_is_named_so():
    error = error_body(RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                                "input": None}]))[1]["error"]
    assert error["param"] is None and error["message"] == "the request body is missing: send a JSON object"


def test_invalid_json_is_a_400():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(b"{not json")
    status, body = error_body(info.value)
    assert status == 400 and "not valid JSON" in body["error"]["message"]


# --- tools -----------------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_tool_history_reaches_the_template_with_dict_arguments():
    request = ChatCompletionRequest.model_validate({**CHAT, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "not json"}}]},
        {"role": "tool", "content": "-3 C", "tool_call_id": "c1"}]})
    assert request.template_messages()[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": {"city": "Oslo"}}},
            {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "not json"}}]},
        {"role": "tool", "content": "-3 C", "tool_call_id": "c1"}]


def test_a_participants_name_reaches_the_template():
    """OpenAI's name tells participants of one role apart; it was validated and dropped before the template (vLLM
    passes it on; a review)."""
    request = ChatCompletionRequest.model_validate({**CHAT, "messages": [
        {"role": "user", "name": "alice", "content": "hi"}, {"role": "user", "name": "bob", "content": "hello"},
        {"role": "assistant", "content": "hey"}]})
    assert request.template_messages() == [{"role": "user", "content": "hi", "name": "alice"},
                                           {"role": "user", "content": "hello", "name": "bob"},
                                           {"role": "assistant", "content": "hey"}]


def test_an_assistants_reasoning_sent_back_reaches_the_template_as_reasoning_content():
    request = ChatCompletionRequest.model_validate({**CHAT, "messages": [
        {"role": "user", "content": "9.11 or 9.8?"},
        {"role": "assistant", "content": "9.8", "reasoning": "Compare the tenths.", "tool_calls": None},
        {"role": "user", "content": "Sure?"}]})
    assert request.template_messages()[1] == {"role": "assistant", "content": "9.8",
                                              "reasoning_content": "Compare the tenths."}
    status, body = _rejection(ChatCompletionRequest, {**CHAT, "messages": [
        {"role": "user", "content": "x", "reasoning_content": "y"}]})
    assert status == 400 and "only allowed on assistant" in body["error"]["message"]


@pytest.mark.parametrize("choice, parallel, expected", [
    (None, None, ("auto", None, True)), ("auto", False, ("auto", None, False)), ("required", None, ("required", None, True)),
    ({"type": "function", "function": {"name": "w"}}, None, ("named", "w", True)),
])
def test_tool_setup_of_each_choice(choice, parallel, expected):
    body = {**CHAT, "tools": [_tool("w", WEATHER), _tool("now")], "tool_choice": choice, "parallel_tool_calls": parallel}
    request = ChatCompletionRequest.model_validate(body)
    setup = request.tool_setup
    assert (setup.choice, setup.name, setup.parallel) == expected
    assert setup.parameters == {"w": WEATHER, "now": {"type": "object", "properties": {}, "additionalProperties": False}}
    assert [t["function"]["name"] for t in request.template_tools()] == ["w", "now"]
    grammar = sampling_params(request, 3, 100).grammar
    assert (grammar is None) == (expected[0] == "auto")


@pytest.mark.parametrize("body", [{}, {"tools": []}, {"tools": [_tool("w")], "tool_choice": "none"}])
def test_no_tool_setup_without_callable_tools(body):
    request = ChatCompletionRequest.model_validate({**CHAT, **body})
    assert request.tool_setup is None and request.template_tools() is None
    assert sampling_params(request, 3, 100).grammar is None


def test_tools_with_a_response_format_constrain_the_answer_unless_a_call_is_forced():
    def grammar(**body):
        request = ChatCompletionRequest.model_validate({**CHAT, "tools": [_tool("w", WEATHER)], **body})
        return sampling_params(request, 3, 100).grammar

    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "properties": {
        "n": {"type": "integer"}}, "required": ["n"]}}}
    assert grammar() is None and "answer" in grammar(response_format=fmt)
    assert grammar(response_format={"type": "json_object"}) != grammar(response_format=fmt)
    assert grammar(tool_choice="required", response_format=fmt) == grammar(tool_choice="required")
    assert grammar(tool_choice="none", response_format=fmt) == sampling_params(
        ChatCompletionRequest.model_validate({**CHAT, "response_format": fmt}), 3, 100).grammar


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
    ({"structured_outputs": {"regex": "a"}}, "tools"),
    ({"tool_choice": "required", "min_tokens": 2}, "min_tokens"),
])
def test_tool_rejections_at_sampling(body, param):
    request = ChatCompletionRequest.model_validate({**CHAT, "tools": [_tool("w", WEATHER)], **body})
    with pytest.raises(APIError) as info:
        sampling_params(request, 3, 100)
    assert info.value.status == 400 and info.value.param == param


_STRING = {"type": "string"}


@pytest.mark.parametrize("fmt, schema, message", [
    ("hermes", {"type": "object", "$defs": None}, "'f': $defs must be an object of schemas, got NoneType"),
    ("hermes", {"type": "object", "definitions": []}, "'f': definitions must be an object of schemas, got list"),
    ("qwen3_coder", {"type": "object", "properties": [1]}, "'f': properties must be an object, got list"),
    ("qwen3_coder", {"type": "object", "properties": {"a": 5}}, "'a' must be an object or a boolean, got int"),
    ("qwen3_coder", {"type": "object", "properties": {"a": False}, "required": ["a"]}, "'a' is required, but its "
     "schema is false"),
    ("qwen3_coder", {"type": "object", "properties": {"a": {"enum": 3}}}, "'a''s enum must be a list"),
    ("glm45", {"type": "object", "properties": {"a": {**_STRING, "minLength": [1]}}},
     "'a''s minLength must be a non-negative integer, got [1]"),
    ("glm47", {"type": "object", "properties": {"a": {**_STRING, "maxLength": -1}}},
     "'a''s maxLength must be a non-negative integer, got -1"),
    ("glm47", {"type": "object", "properties": {"a": {**_STRING, "maxLength": 2.5}}}, "got 2.5"),
    ("minimax_m2", {"type": "object", "properties": {"a": {**_STRING, "minLength": 3, "maxLength": 2}}},
     "'a' has minLength 3 > maxLength 2"),
    ("minimax_m2", {"type": "object", "properties": {"a": _STRING}, "required": [{"x": 1}]},
     "'f': required must be a list of strings"),
])
@pytest.mark.parametrize("choice", ["required", "auto"])
def test_a_tool_schema_the_call_grammar_cannot_take_is_a_400_naming_tools(fmt, schema, message, choice):
    """Valid JSON but not a schema the format's call grammar can be built from (``$defs`` not an object; in the
    tagged-text formats a keyword of another type than JSON Schema's): 500s (TypeError, AttributeError,
    OverflowError) where a schema llguidance cannot compile is a 400. With tool_choice auto, the grammar is built
    when a response format constrains the answer."""
    answer = {"response_format": {"type": "json_object"}} if choice == "auto" else {}
    request = ChatCompletionRequest.model_validate({**CHAT, "tools": [_tool("f", schema)], "tool_choice": choice,
                                                    **answer}).use_tool_format(fmt)
    with pytest.raises(APIError) as info:
        sampling_params(request, 3, 100)
    status, error = error_body(info.value)
    assert status == 400 and error["error"]["param"] == "tools", error
    assert error["error"]["message"].startswith("tools: function 'f'") and message in error["error"]["message"]


def test_a_batched_requests_grammar_is_built_once(monkeypatch):
    import service.openai_api as api

    built = []
    monkeypatch.setattr(api, "grammar_from_spec", lambda kind, value: built.append(kind) or f"grammar of {kind}")
    request = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b", "c"],
                                                "structured_outputs": {"regex": "[0-9]+"}})
    assert [sampling_params(request, 3, 100).grammar for _ in request.prompt] == ["grammar of regex"] * 3
    assert built == ["regex"]


def test_reasoning_effort_is_a_template_variable_unless_the_kwargs_set_it():
    request = ChatCompletionRequest.model_validate({**CHAT, "reasoning_effort": "high"})
    assert request.template_variables() == {"reasoning_effort": "high"}
    both = ChatCompletionRequest.model_validate({**CHAT, "reasoning_effort": "high",
                                                 "chat_template_kwargs": {"reasoning_effort": "low", "x": 1}})
    assert both.template_variables() == {"reasoning_effort": "low", "x": 1}
    assert ChatCompletionRequest.model_validate(CHAT).template_variables() is None
    with pytest.raises(ValidationError, match="reasoning_effort"):
        ChatCompletionRequest.model_validate({**CHAT, "reasoning_effort": "extreme"})


def test_reasoning_effort_takes_every_value_openai_names():
    """The client's ReasoningEffort (openai 3.57) has "max"; it was a 400 here (a review)."""
    for effort in ("none", "minimal", "low", "medium", "high", "xhigh", "max"):
        assert ChatCompletionRequest.model_validate({**CHAT, "reasoning_effort": effort}).reasoning_effort == effort


_MANY = 2000  # bad items of one list


@pytest.mark.parametrize("model, body, param", [
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": [{}] * _MANY}]},
     "messages.0.content.0.type"),
    (ChatCompletionRequest, {"model": "m", "messages": [{}] * _MANY}, "messages.0.role"),
    (ChatCompletionRequest, {**CHAT, "stop": [{}] * _MANY}, "stop.0"),
    (ChatCompletionRequest, {**CHAT, "logit_bias": {str(i): {} for i in range(_MANY)}}, "logit_bias.0"),
    (ChatCompletionRequest, {**CHAT, "structured_outputs": {"choice": [{}] * _MANY}}, "structured_outputs.choice.0"),
    (CompletionRequest, {"model": "m", "prompt": [{}] * _MANY}, "prompt.0"),
    (CompletionRequest, {"model": "m", "prompt": [[1, {}]] * _MANY}, "prompt.0.1"),
    (ResponsesRequest, {"model": "m", "input": [{}] * _MANY}, "input.0.message.role"),
    (ResponsesRequest, {"model": "m", "input": [{"role": "user", "content": [{}] * _MANY}]},
     "input.0.message.content.0.type"),
    (ResponsesRequest, {"model": "m", "input": [{"type": "reasoning", "summary": [{}] * _MANY}]},
     "input.0.reasoning.summary.0.type"),
    (ResponsesRequest, {"model": "m", "input": "x", "include": [{}] * _MANY}, "include.0"),
    (TokenizeRequest, {"messages": [{}] * _MANY}, "messages.0.role"),
    (DetokenizeRequest, {"tokens": [{}] * _MANY}, "tokens.0"),
])
def test_a_list_of_bad_items_is_refused_at_its_first(model, body, param):
    """Validation stops at a list's first bad item: every item failing made pydantic list an error per item and
    union member, which FastAPI turns into dicts on the event loop (one 1 MiB body of 340,000 empty content parts:
    1.4M errors, every client stalled 11 s, 2.4 GB more memory; a review). The 400 names the first, as it did."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    assert info.value.error_count() <= 8
    status, error = error_body(info.value)
    assert status == 400 and error["error"]["param"] == param


def test_json_paths_are_written_only_for_an_error(monkeypatch):
    """A JSON field's dotted path is written when a string in it is refused, not for every item checked: a 480,000
    character key over a list of 280,000 items built as many paths of its length, a 3-6 s stall of the event loop
    from one 1 MiB body (a review)."""
    from service import openai_api

    written = []
    dotted = openai_api._dotted
    monkeypatch.setattr(openai_api, "_dotted", lambda place: written.append(place) or dotted(place))
    key = "k" * 1000
    ChatCompletionRequest.model_validate({**CHAT, "chat_template_kwargs": {key: [0, {"a": ["b"] * 1000}] * 1000}})
    assert written == []
    status, error = _rejection(ChatCompletionRequest, {**CHAT, "chat_template_kwargs": {key: [0, {"a": ["\ud800"]}]}})
    assert status == 400 and error["error"]["message"].startswith(f"chat_template_kwargs: {key}.1.a.0: text is not")
    assert len(written) == 1
