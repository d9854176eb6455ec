"""OpenAI's Responses API (service/responses_api.py, the /v1/responses route): the input's conversion to
chat messages, the output items and stream events, and the endpoint over HTTP with the official `openai`
client on a random tiny chat model, checked against the chat endpoint's answers to the same requests."""

from __future__ import annotations

import itertools
import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.app import _Choice, _Reasoning, _ResponsesFormat
from service.engine import StepOutput
from service.openai_api import APIError, error_body
from service.responses_api import ResponsesRequest, renamed
from service.tools import ToolSetup
from tests.service.test_app import MODEL, _start_engine, served
from tests.service.test_reasoning import THINKING_TEMPLATE
from tests.service.test_text import build_tokenizer
from tests.service.test_tools import MIXED, SCHEMAS, WEATHER

TOOLS = [{"type": "function", "name": name, "description": f"the {name} function", "parameters": schema}
         for name, schema in SCHEMAS.items()]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}} for tool in TOOLS]
ASK = "What is the weather in Paris?"


# --- the input as chat messages ---------------------------------------------------------------------------


def _messages(**body) -> list[dict]:
    return ResponsesRequest.model_validate({"model": MODEL, **body}).chat_messages()


def test_a_string_input_is_a_user_message_after_the_instructions():
    assert _messages(input="Hi") == [{"role": "user", "content": "Hi"}]
    assert _messages(input="Hi", instructions="Be brief.") == [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hi"}]


def test_output_items_sent_back_become_one_assistant_turn_and_tool_messages():
    items = [
        {"role": "developer", "content": "Use tools."},  # an "easy" message: no type
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"},
                                                        {"type": "input_text", "text": "Be brief."}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Look."}],
         "encrypted_content": None, "status": "completed"},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "phase": None,
         "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "now", "arguments": '{"zone": 1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "22 C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "13:00"},
                                                                            {"type": "input_text", "text": "UTC"}]},
        {"type": "function_call", "call_id": "call_3", "name": "now", "arguments": "{}"},  # a turn of calls alone
    ]
    assert _messages(input=items) == [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?\nBe brief."},  # parts joined with newlines, as vLLM's
        {"role": "assistant", "content": "Checking.", "reasoning": "Look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": '{"zone": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "13:00\nUTC"},
        {"role": "assistant", "content": None, "reasoning": None, "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    ]


def test_history_items_keep_apart_what_was_apart():
    """Two assistant messages of one turn are a line apart (as a message's parts), a reasoning item's summary parts
    paragraphs apart (both were glued together: "Let me think.It is 4."); a reasoning item with no answer after it
    (a turn cut off) does not carry over to a later assistant turn (the responses audit: a template then rendered
    the cut-off turn's thoughts into the next call's turn)."""
    def message(text: str) -> dict:
        return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}

    summary = [{"type": "summary_text", "text": "**Plan** First idea."}, {"type": "summary_text", "text": "Check."}]
    assert _messages(input=[{"role": "user", "content": "Q"}, {"type": "reasoning", "summary": summary},
                            message("Let me think."), message("It is 4.")])[1:] == [
        {"role": "assistant", "content": "Let me think.\nIt is 4.", "reasoning": "**Plan** First idea.\n\nCheck."}]
    cut_off = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "thoughts about Q1"}]}
    for between in ({"role": "user", "content": "Q2"},
                    {"type": "function_call_output", "call_id": "c", "output": "x"}):
        turns = _messages(input=[{"role": "user", "content": "Q1"}, cut_off, between, message("A2")])
        assert turns[-1] == {"role": "assistant", "content": "A2", "reasoning": None}


def test_errors_name_the_responses_parameters_and_failed_responses_use_openais_codes():
    from service.responses_api import ResponseBuilder, renamed, response_usage

    error = renamed(APIError(400, "min_tokens 50 exceeds max_tokens 5", param="min_tokens"))
    assert (error.param, error.message) == ("min_tokens", "min_tokens 50 exceeds max_output_tokens 5")
    events = ResponseBuilder(MODEL, {}).failed("request_timeout", "the request ran past request_timeout_s")
    assert [e["type"] for e in events] == ["error", "response.failed"] and events[0]["code"] == "request_timeout"
    assert events[1]["response"]["error"] == {"code": "server_error", "message": "the request ran past request_timeout_s"}
    # the message a timeout cut is incomplete in the failed response, not left in progress (a walkthrough)
    builder = ResponseBuilder(MODEL, {})
    builder._text("Partial", [])
    events = builder.failed("request_timeout", "the request ran past request_timeout_s")
    failed = events[-1]["response"]
    assert [item["status"] for item in failed["output"]] == ["incomplete"]
    # and its done events come before the error (a client rebuilding items from them kept it open; a review)
    assert [e["type"] for e in events] == ["response.output_text.done", "response.content_part.done",
                                           "response.output_item.done", "error", "response.failed"]
    assert events[2]["item"]["status"] == "incomplete" and events[0]["text"] == "Partial"
    # the error event names the responses parameter at fault (structured outputs: text.format; it said null)
    assert ResponseBuilder(MODEL, {}).failed("structured_output_failed", "x", "text.format")[0]["param"] == "text.format"
    assert _format().param("response_format") == "text.format" and _format().param("seed") == "seed"
    from openai.types.responses import ResponseUsage

    ResponseUsage.model_validate(response_usage(10, 4, 3, 1, 6))  # the client's types require cache_write_tokens


def test_the_request_converts_to_the_chat_request_it_means():
    body = {"model": MODEL, "input": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "name": "now"},
            "parallel_tool_calls": False, "max_output_tokens": 7, "temperature": 0.5, "top_logprobs": 2,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}},
            "reasoning": {"effort": "low"}, "seed": 3, "stop": ["x"], "chat_template_kwargs": {"think": True}}
    chat = ResponsesRequest.model_validate(body).chat_request()
    assert [t.model_dump(exclude_none=True) for t in chat.tools] == CHAT_TOOLS
    assert chat.tool_choice.function.name == "now" and chat.parallel_tool_calls is False
    assert (chat.max_completion_tokens, chat.temperature, chat.logprobs, chat.top_logprobs) == (7, 0.5, True, 2)
    assert chat.response_format.json_schema.json_schema == WEATHER and chat.seed == 3 and chat.stop == ["x"]
    assert chat.reasoning_effort == "low" and chat.template_variables() == {"think": True, "reasoning_effort": "low"}


@pytest.mark.parametrize("body, param, message", [
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input.0.message.content.0.type", "'input_text' or 'output_text'"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0", "item_reference and hosted tools' calls "
                                                                        "are not supported"),
    ({"input": ["hi", 5]}, "input.0", "input items are objects of type message, function_call"),  # (was pydantic's
    # "Unable to extract tag using discriminator _item_type()")
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "'function'"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format", "needs name and schema"),
    ({"frobnicate": 1}, "frobnicate", "unknown parameter"),
    ({"top_k": "many"}, "top_k", "integer"),  # vLLM's sampling extensions are the chat request's fields
    ({"prompt_cache_retention": "forever"}, "prompt_cache_retention", "'in_memory' or '24h'"),  # (any string was)
    ({"temperature": True}, "temperature", "valid number"), ({"top_p": "1"}, "top_p", "valid number"),
    ({"safety_identifier": "s" * 65}, "safety_identifier", "64"),  # OpenAI's limits, as chat's (any length was)
    ({"prompt_cache_key": "k" * 1025}, "prompt_cache_key", "1024"),
])
def test_bad_requests_fail_validation_naming_the_field(body, param, message):
    with pytest.raises(pydantic.ValidationError) as info:
        ResponsesRequest.model_validate({"model": MODEL, "input": "Hi", **body})
    error = openai_error(info.value)
    assert error.param == param and message in error.message, (error.param, error.message)


def openai_error(exc: pydantic.ValidationError) -> APIError:
    from service.openai_api import validation_error

    return validation_error(exc.errors())


@pytest.mark.parametrize("body, param, message", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stores no responses"),
    ({"conversation": "conv_1"}, "conversation", "stores no responses"),
    ({"background": True}, "background", "not supported"),
    ({"truncation": "auto"}, "truncation", "not supported"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options", "only allowed when stream is true"),
    # the client's newer parameters: named, not "unknown parameter"
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation", "not supported"),
    ({"context_management": [{"type": "compaction"}]}, "context_management", "not supported"),
    ({"context_management": False}, "context_management", "not supported"),  # (any falsy value was taken)
    ({"background_options": {"completion_window": "2h"}}, "background_options", "not supported"),
    ({"access_programs": {"x": 1}}, "access_programs", "not supported"),
    ({"image": {"quality": "low"}}, "image", "not supported"),
    # refused as chat refuses them (responses took any string and ignored it; a review)
    ({"service_tier": "priority"}, "service_tier", "service_tier='priority' is not supported"),
    ({"service_tier": "no-such-tier"}, "service_tier", "not supported"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "verbosity='low' is not supported"),
    ({"service_tier": "auto", "text": {"verbosity": "medium"}, "stream": None, "prompt_cache_retention": "24h",
      "max_output_tokens": 1}, None, None),
    ({"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}, "moderation": None, "context_management": [],
      "max_output_tokens": 1}, None, None),
    ({"input": []}, "input", "no messages"),
    ({"tools": TOOLS * 2}, "tools", "unique"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "function_call_output", "call_id": "c", "output": "x"},
                {"role": "assistant", "content": ""}], "tools": TOOLS, "tool_choice": "none", "top_p": 0.5,
      "text": {"format": {"type": "json_object"}}, "max_output_tokens": 1}, None, None),
])
def test_what_the_chat_request_or_this_server_refuses_names_the_responses_parameter(body, param, message):
    request = ResponsesRequest.model_validate({"model": MODEL, "input": "Hi", **body})
    if message is None:
        assert request.chat_request().max_completion_tokens == 1  # converts
        return
    with pytest.raises(APIError) as info:
        request.chat_request()
    assert info.value.param == param and message in info.value.message, (info.value.param, info.value.message)


@pytest.mark.parametrize("extra, param", [
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "\ud800"}]},
     "input.0.function_call.arguments"),
    ({"tools": [{"type": "function", "name": "f", "description": "\ud800"}]}, "tools.0.description"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"enum": ["\ud800"]}}]}, "tools.0.parameters"),
    ({"text": {"format": {"type": "json_schema", "name": "n", "schema": {"enum": ["\ud800"]}}}}, "text.format.schema"),
    ({"metadata": {"k": "\ud800"}}, "metadata.k"),  # echoed in the response, as user is
    ({"user": "\ud800"}, "user"),
])
def test_lone_surrogates_outside_the_messages_text_are_a_400_naming_the_field(extra, param):
    with pytest.raises(pydantic.ValidationError) as info:
        ResponsesRequest.model_validate({"model": MODEL, "input": "hi", **extra})
    status, body = error_body(info.value)
    assert status == 400 and body["error"]["param"] == param and "lone surrogate" in body["error"]["message"]


@pytest.mark.parametrize("extra, param, message", [
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[" * 100_000 + "]" * 100_000}]},
     "input.0.function_call.arguments", "nested deeper than 128 levels"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[" * 600 + "]" * 600}]},
     "input.0.function_call.arguments", "nested deeper than 128 levels"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"maximum": float("inf")}}]}, "tools.0.parameters",
     "maximum: inf is not a finite number"),
    ({"text": {"format": {"type": "json_schema", "name": "n", "schema": {"minimum": float("nan")}}}},
     "text.format.schema", "minimum: nan is not a finite number"),
])
def test_json_the_chat_endpoint_refuses_is_refused_naming_the_responses_field(extra, param, message):
    """A call's arguments nested too deep (RecursionError in json.loads, or a chat template overflowing: 500s) and a
    NaN or infinity in a schema (a response that could not be written as JSON once generated) are 400s naming the
    field, as they are on the chat endpoint."""
    with pytest.raises(pydantic.ValidationError) as info:
        ResponsesRequest.model_validate({"model": MODEL, "input": "hi", **extra})
    status, body = error_body(info.value)
    assert status == 400 and body["error"]["param"] == param and message in body["error"]["message"], body


def test_chat_parameters_in_errors_are_renamed():
    assert renamed(APIError(400, "max_tokens 9 exceeds", param="max_tokens")).param == "max_output_tokens"
    assert renamed(APIError(400, "the prompt has 9 tokens", param="messages")).param == "input"
    assert renamed(APIError(400, "messages.3: bad", param="messages.3")).message == "input: bad"
    assert renamed(APIError(400, "response_format: bad", param="response_format")).param == "text.format"
    assert renamed(APIError(400, "x", param="tools")).param == "tools"


# --- output items and stream events -----------------------------------------------------------------------


def _outputs(pieces: list[str], reason: str) -> list[StepOutput]:
    return [StepOutput("r", (i,), piece, i == len(pieces) - 1, reason if i == len(pieces) - 1 else None, 5, i + 1)
            for i, piece in enumerate(pieces)]


def _format(tools=None, reasoning=None) -> _ResponsesFormat:
    fmt = _ResponsesFormat(MODEL, None, ResponsesRequest(model=MODEL, input="x").echo(), tools=tools,
                           reasoning=reasoning)
    fmt.prompt_tokens = 5
    return fmt


def _strip_ids(output: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in output]


THOUGHT_AND_CALLS = "I should call.</think>\n\n" + MIXED


_CLOSED = THOUGHT_AND_CALLS.index("</think>") + len("</think>")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(THOUGHT_AND_CALLS)), max_size=12))
@example([_CLOSED, _CLOSED + 1, _CLOSED + 2])  # the close, then one newline at a time
@example([len(THOUGHT_AND_CALLS) - 1])  # the close and the answer in one output, then a newline alone: not the gap
def test_streamed_events_build_the_output_the_whole_text_gives(cuts):
    """Reasoning, text and calls in any chunking: the events tell the items in order, each delta adds to
    its item, and the last event's response equals the non-streamed one."""
    cuts = sorted({0, *cuts, len(THOUGHT_AND_CALLS)})
    pieces = [THOUGHT_AND_CALLS[a:b] for a, b in zip(cuts, cuts[1:])] or [""]
    setup = ToolSetup(SCHEMAS, "auto")
    streamed = _format(setup, _Reasoning(True, True))
    events = streamed.start_chunks()
    outs = _outputs(pieces, "stop")
    for out in outs:
        events += streamed.chunks(0, out)
    events += streamed.end_chunks(outs[-1:], False)
    (one,) = _outputs([THOUGHT_AND_CALLS], "stop")
    whole = _format(setup, _Reasoning(True, True)).response([_Choice([one])])
    final = events[-1]["response"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert _strip_ids(final["output"]) == _strip_ids(whole["output"])
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "function_call", "function_call"]
    reasoning, message, *calls = final["output"]
    assert reasoning["content"][0]["text"] == "I should call." and message["content"][0]["text"] == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("now", {"zone": 1})]
    # the outputs up to the one that closes the block (one token each here), and those of whitespace alone
    # after it while no answer text came (the gap), are reasoning
    thought = next(k for k, piece in enumerate(pieces) if "</think>" in "".join(pieces[:k + 1])) + 1
    if not "".join(pieces[:thought]).split("</think>", 1)[1].strip():
        thought += len(list(itertools.takewhile(lambda piece: not piece.strip(), pieces[thought:])))
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == thought
    # every delta adds up to its item, and every item is added before and done after its deltas
    texts: dict[int, str] = {}
    for event in events:
        if event["type"].endswith(".delta"):
            texts[event["output_index"]] = texts.get(event["output_index"], "") + event["delta"]
    assert texts == {0: "I should call.", 1: "Let me check.", 2: calls[0]["arguments"], 3: calls[1]["arguments"]}
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == done == [0, 1, 2, 3]


_CALL = '<tool_call>\n{{"name": "now", "arguments": {{"zone": {}}}}}\n</tool_call>'
CALL_THEN_TEXT = _CALL.format(1) + "\nDone, it is 1."
CALLS_AND_TEXT_BETWEEN = _CALL.format(1) + "\nDone." + _CALL.format(2) + "\nBye."


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([CALL_THEN_TEXT, CALLS_AND_TEXT_BETWEEN]), st.lists(st.floats(0, 1), max_size=8))
@example(CALL_THEN_TEXT, [CALL_THEN_TEXT.index("Done") / len(CALL_THEN_TEXT)])  # the call's end, the text apart
@example(CALL_THEN_TEXT, [])  # both in one output: the message came first (a review)
@example(CALLS_AND_TEXT_BETWEEN, [0.5, 0.7])  # text between the calls streamed at once: two messages (a review)
def test_text_after_the_calls_with_none_before_is_one_message_after_them_whatever_the_chunking(text, fractions):
    cuts = sorted({0, *(round(f * len(text)) for f in fractions), len(text)})
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    streamed = _format(ToolSetup(SCHEMAS, "auto"))
    outs = _outputs(pieces, "stop")
    events = [e for out in outs for e in streamed.chunks(0, out)] + streamed.end_chunks(outs[-1:], False)
    final = events[-1]["response"]
    calls = text.count("<tool_call>")
    assert [item["type"] for item in final["output"]] == ["function_call"] * calls + ["message"]
    assert final["output"][-1]["content"][0]["text"] == ("Done, it is 1." if calls == 1 else "Done.\nBye.")
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == done == list(range(calls + 1))


def test_a_named_call_streams_its_arguments_and_an_empty_completion_is_an_empty_message():
    fmt = _format(ToolSetup(SCHEMAS, "named", "now"))
    outs = _outputs(['{"zone"', ": 3}"], "length")
    events = [e for out in outs for e in fmt.chunks(0, out)] + fmt.end_chunks(outs[-1:], False)
    assert [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"] == ['{"zone"', ": 3}"]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["arguments"] == '{"zone": 3}' and final["output"][0]["status"] == "incomplete"
    (out,) = _outputs([""], "stop")
    empty = _format().response([_Choice([out])])
    assert [(i["type"], i["content"][0]["text"]) for i in empty["output"]] == [("message", "")]


# --- over HTTP --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    with served(_start_engine(tokenizer, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512),
                reasoning_parser="qwen3") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _respond(client, **kwargs):
    return client.responses.create(**{"model": MODEL, "input": ASK, "max_output_tokens": 16, "temperature": 0,
                                      **kwargs})


def _chat(client, messages, **kwargs):
    return client.chat.completions.create(**{"model": MODEL, "messages": messages, "max_tokens": 16,
                                             "temperature": 0, **kwargs})


def _streamed(client, **kwargs):
    events = list(_respond(client, stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_a_response_is_the_chat_completions_answer(client):
    chat = _chat(client, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": ASK}])
    reply = _respond(client, instructions="Answer briefly.")
    choice = chat.choices[0]
    assert reply.output_text == choice.message.content and reply.object == "response" and reply.id.startswith("resp_")
    assert reply.status == ("incomplete" if choice.finish_reason == "length" else "completed")
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                    chat.usage.completion_tokens)
    assert reply.usage.input_tokens_details.cached_tokens > 0  # the chat request's prompt, cached
    details = reply.usage.input_tokens_details  # the rest of the prompt: written to the prefix cache
    assert details.cache_write_tokens == reply.usage.input_tokens - details.cached_tokens
    assert reply.instructions == "Answer briefly." and reply.max_output_tokens == 16 and reply.store is False
    events = _streamed(client, instructions="Answer briefly.")
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == f"response.{reply.status}"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply.output_text
    assert events[-1].response.output_text == reply.output_text
    assert events[-1].response.usage.output_tokens == reply.usage.output_tokens
    # the client's stream helper, on a response that completes (it needs response.completed)
    with client.responses.stream(model=MODEL, input=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                 parallel_tool_calls=False, max_output_tokens=200) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and [item.type for item in final.output] == ["function_call"]

def test_log_probabilities_are_the_chat_endpoints(client):
    reply = _respond(client, top_logprobs=2, include=["message.output_text.logprobs"])
    chat = _chat(client, [{"role": "user", "content": ASK}], logprobs=True, top_logprobs=2)
    (part,) = reply.output[0].content
    # the same tokens and alternatives; log-probabilities equal to float32 rounding (the two requests run in
    # batches of different shapes: one prefilled, the other from the prefix cache)
    assert [(p.token, [t.token for t in p.top_logprobs]) for p in part.logprobs] == [
        (p.token, [t.token for t in p.top_logprobs]) for p in chat.choices[0].logprobs.content]
    assert [p.logprob for p in part.logprobs] == pytest.approx([p.logprob for p in chat.choices[0].logprobs.content],
                                                               abs=1e-4)
    streamed = _streamed(client, top_logprobs=2, include=["message.output_text.logprobs"])
    entries = [p.token for e in streamed if e.type == "response.output_text.delta" for p in e.logprobs]
    assert entries == [p.token for p in part.logprobs]


def test_tool_calls_round_trip_with_their_outputs(client, server):
    reply = _respond(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_output_tokens=200)
    (call,) = reply.output
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    events = _streamed(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_output_tokens=200)
    (streamed,) = events[-1].response.output
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)  # greedy: the same call
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [call.arguments]
    # the next turn: the output sent back with the call's result, as the chat endpoint's history
    follow = [{"role": "user", "content": ASK}, *reply.output,
              {"type": "function_call_output", "call_id": call.call_id, "output": "22 C, sunny"}]
    second = _respond(client, input=follow, tools=TOOLS, max_output_tokens=5)
    history = [{"role": "user", "content": ASK},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "22 C, sunny"}]
    chat = _chat(client, history, tools=CHAT_TOOLS, max_tokens=5)
    assert second.usage.input_tokens == chat.usage.prompt_tokens and second.output_text == chat.choices[0].message.content
    named = _respond(client, tools=TOOLS, tool_choice={"type": "function", "name": "now"}, max_output_tokens=60)
    assert [(o.type, o.name) for o in named.output] == [("function_call", "now")]
    jsonschema.validate(json.loads(named.output[0].arguments), SCHEMAS["now"])


class Verdict(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=12)
    sunny: bool


def test_structured_outputs_with_the_clients_parse(client):
    parsed = client.responses.parse(model=MODEL, input=ASK, text_format=Verdict, max_output_tokens=80, temperature=0)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Verdict)
    assert parsed.text.format.type == "json_schema"
    # with tools the model may call, the format constrains the answer given instead of a call
    for seed in range(3):
        reply = _respond(client, tools=TOOLS, temperature=1.0, max_output_tokens=120, extra_body={"seed": seed},
                         text={"format": {"type": "json_schema", "name": "verdict",
                                          "schema": Verdict.model_json_schema()}}, parallel_tool_calls=False)
        assert reply.status == "completed"
        if reply.output[0].type == "function_call":
            jsonschema.validate(json.loads(reply.output[0].arguments), SCHEMAS[reply.output[0].name])
        else:
            Verdict.model_validate_json(reply.output_text)


def test_reasoning_is_its_own_item(client):
    think = {"extra_body": {"chat_template_kwargs": {"think": True}}}
    thinking = _respond(client, **think)
    chat = _chat(client, [{"role": "user", "content": ASK}], **think)
    (item,) = thinking.output  # the random model never closes its block: all of it is reasoning
    assert item.type == "reasoning" and item.content[0].text == chat.choices[0].message.reasoning
    assert item.summary == [] and thinking.output_text == "" and thinking.status == "incomplete"
    assert thinking.usage.output_tokens_details.reasoning_tokens == 16  # every token, in the block
    events = _streamed(client, **think)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == item.content[0].text
    # sent back, the reasoning goes with the assistant turn after it
    follow = [{"role": "user", "content": ASK}, *thinking.output, {"role": "assistant", "content": "9.8"},
              {"role": "user", "content": "Sure?"}]
    again = _respond(client, input=follow, max_output_tokens=2)
    history = [{"role": "user", "content": ASK}, {"role": "assistant", "content": "9.8",
                                                  "reasoning": item.content[0].text}, {"role": "user", "content": "Sure?"}]
    assert again.usage.input_tokens == _chat(client, history, max_tokens=2).usage.prompt_tokens


@pytest.mark.parametrize("body, status, param, message", [
    ({"previous_response_id": "resp_1"}, 400, "previous_response_id", "stores no responses"),
    ({"max_output_tokens": 5000}, 400, "max_output_tokens", "context"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400,
     "input.0.message.content.0.type", "'input_text' or 'output_text'"),
    ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, 400, "tools.0.type", "'function'"),
    ({"model": "gpt-5"}, 404, "model", "does not exist"),
])
def test_bad_requests_are_openai_errors(server, body, status, param, message):
    response = httpx.post(f"{server}/v1/responses", json={"model": MODEL, "input": ASK, **body})
    error = response.json()["error"]
    assert response.status_code == status and error["param"] == param and message in error["message"], error


def test_no_response_is_stored(server, client):
    response = httpx.get(f"{server}/v1/responses/resp_123")
    assert response.status_code == 404 and "stores no responses" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_123")
