"""GPT-OSS's harmony format (service/harmony.py): the parser, its forced calls and answers, the history its
chat template reads, and the chat endpoint over HTTP (plain, streamed, Responses API) on a random tiny
model whose tokenizer has harmony's special tokens and whose template renders harmony."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import _ChatFormat, _Choice, _Harmony, _ResponsesFormat, create_app
from service.async_engine import AsyncEngine
from service.engine import Engine, EngineConfig
from service.harmony import TAGS, HarmonyStream, history
from service.openai_api import ChatCompletionRequest
from service.responses_api import ResponsesRequest
from service.structured import Grammars
from service.tools import ToolSetup, answer_grammar, detect_format, special_tags
from tests.service.test_app import MODEL, served
from tests.service.test_text import build_chat_model, build_tokenizer
from tests.service.test_tools import ASK, SCHEMAS, TOOLS, _outputs, _random_walk

ANALYSIS = "<|channel|>analysis<|message|>The user wants the weather. Call get_weather.<|end|>"
CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Tokyo", "unit": "C"}<|call|>'
FINAL = "<|start|>assistant<|channel|>final<|message|>It is 22 C in Tokyo.<|return|>"
TOKYO = ("get_weather", {"city": "Tokyo", "unit": "C"})


def _feed(stream: HarmonyStream, pieces: list[str], truncated: bool = False) -> tuple[str, str, list]:
    reasoning, content, calls = [], [], []
    for i, piece in enumerate(pieces):
        r, c, new = stream.push(piece, final=i == len(pieces) - 1, truncated=truncated)
        reasoning.append(r)
        content.append(c)
        calls += new
    return "".join(reasoning), "".join(content), calls


def _split(text: str, truncated: bool = False, parallel: bool = True, drop=()) -> tuple[str, str, list]:
    reasoning, content, calls = _feed(HarmonyStream(SCHEMAS, parallel, drop), [text], truncated)
    return reasoning, content, [(call.name, json.loads(call.arguments)) for call in calls]


# --- the parser ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (ANALYSIS + "<|start|>assistant<|channel|>final<|message|>It is 22 C.",
     ("The user wants the weather. Call get_weather.", "It is 22 C.", [])),
    (ANALYSIS + CALL, ("The user wants the weather. Call get_weather.", "", [TOKYO])),
    # no <|constrain|>, the content type after the channel; the call's <|call|> left out (an end-of-text token)
    ('<|channel|>commentary to=functions.now json<|message|>{"zone": 2}', ("", "", [("now", {"zone": 2})])),
    # the recipient before the channel, in the first message (the prompt wrote "<|start|>assistant")
    (' to=functions.now<|channel|>commentary json<|message|>{"zone": 2}<|call|>', ("", "", [("now", {"zone": 2})])),
    ('<|start|>assistant to=functions.now<|channel|>commentary <|constrain|>json<|message|>{"zone": 2}<|call|>',
     ("", "", [("now", {"zone": 2})])),
    # a preamble (commentary without a recipient) is content, then the call
    ("<|channel|>commentary<|message|>Let me check.<|end|>" + CALL, ("", "Let me check.", [TOKYO])),
    # two calls (a completion that went on past <|call|>)
    (CALL[len("<|start|>assistant"):] + '<|start|>assistant<|channel|>commentary to=functions.now<|message|>{"zone": 1}',
     ("", "", [TOKYO, ("now", {"zone": 1})])),
    (ANALYSIS + FINAL, ("The user wants the weather. Call get_weather.", "It is 22 C in Tokyo.", [])),
    # the model ignoring the format: its text is content as it is
    ("Just an answer, <|no tag|> and all.", ("", "Just an answer, <|no tag|> and all.", [])),
    ("", ("", "", [])),
    # calls that are not calls of offered functions: their text is content; a built-in tool's is reasoning
    ('<|channel|>commentary to=functions.rm <|constrain|>json<|message|>{"path": "/"}<|call|>', ("", '{"path": "/"}', [])),
    ("<|channel|>commentary to=functions.now<|message|>zone two<|call|>", ("", "zone two", [])),
    ('<|channel|>analysis to=browser.search<|message|>{"query": "Tokyo"}<|call|>', ('{"query": "Tokyo"}', "", [])),
])
def test_reasoning_content_and_calls(text, expected):
    assert _split(text) == expected


def test_a_completion_cut_off_keeps_its_reasoning_and_makes_no_call():
    assert _split("<|channel|>analysis<|message|>We need to", truncated=True) == ("We need to", "", [])
    cut = ANALYSIS + '<|start|>assistant<|channel|>commentary to=functions.now<|message|>{"zone": 1}'
    assert _split(cut, truncated=True) == ("The user wants the weather. Call get_weather.", '{"zone": 1}', [])
    assert _split(cut)[2] == [("now", {"zone": 1})]  # ended of its own accord (<|call|> is end of text)
    assert _split(ANALYSIS + "<|start|>assistant<|channel|>fin", truncated=True)[1:] == ("", [])  # a half header


def test_one_call_without_parallel_calls_and_other_special_tokens_dropped():
    two = ANALYSIS + CALL + '<|start|>assistant<|channel|>commentary to=functions.now<|message|>{"zone": 1}<|call|>'
    assert _split(two, parallel=False)[2] == [TOKYO]
    text = "<|channel|>final<|message|>It is<|endoftext|> warm.<|return|><|endoftext|>"
    assert _split(text, drop={"<|endoftext|>", "<|call|>"}) == ("", "It is warm.", [])


def test_arguments_nested_too_deep_to_parse_are_content_not_a_call():
    """A call whose arguments Python's parser cannot read (nested 5,000 deep: RecursionError) is the model's text, as
    in the other tool formats: a non-streamed harmony completion answered 500 with it."""
    body = '{"city": ' + "[" * 5000 + "]" * 5000 + "}"
    deep = f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{body}<|call|>"
    assert _split(ANALYSIS + deep) == ("The user wants the weather. Call get_weather.", body, [])


TEXT = (ANALYSIS + "<|start|>assistant<|channel|>commentary<|message|>Checking <|chan it.<|end|>" + CALL
        + '<|start|>assistant to=functions.rm<|channel|>commentary json<|message|>{}<|call|>'
        + "<|start|>assistant<|channel|>final<|message|>Done<|endoftext|>.<|return|> "
        + "<|start|>assistant<|channel|>commentary to=functions.now<|message|>{\"zone\"")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, len(TEXT)), max_size=14), st.booleans())
def test_any_chunking_gives_what_the_whole_text_gives(cuts, truncated):
    bounds = [0, *sorted(cuts), len(TEXT)]
    pieces = [TEXT[a:b] for a, b in zip(bounds, bounds[1:])]
    whole = _feed(HarmonyStream(SCHEMAS, drop={"<|endoftext|>"}), [TEXT], truncated)
    chunked = _feed(HarmonyStream(SCHEMAS, drop={"<|endoftext|>"}), pieces, truncated)
    assert chunked[:2] == whole[:2] == ("The user wants the weather. Call get_weather.",
                                        'Checking <|chan it.{}Done.{"zone"')
    assert [(c.name, c.arguments) for c in chunked[2]] == [(c.name, c.arguments) for c in whole[2]] == [
        ("get_weather", '{"city": "Tokyo", "unit": "C"}')]


def test_text_that_could_be_a_tag_is_held_back():
    stream = HarmonyStream(SCHEMAS)
    assert stream.push("<|chan") == ("", "", [])  # may open a header
    assert stream.push("nel|>final<|mess") == ("", "", [])
    assert stream.push("age|>It is <|") == ("", "It is ", [])
    assert stream.push("x|> warm") == ("", "<|x|> warm", [])
    assert stream.push("<|end", final=True) == ("", "<|end", [])
    raw = HarmonyStream(SCHEMAS)
    assert raw.push(" t") == ("", "", []) and raw.push("he") == ("", " the", [])  # " to=" was possible


def test_analysis_left_out_leaves_its_tokens_log_probabilities_out_too():
    """``include_reasoning: false`` dropped the analysis text while its tokens' log-probability entries still
    spelled it out (a review): they go too, the header that named the channel included, streamed or not; the final
    message's entries stay."""
    from service.engine import StepOutput
    from service.sampling import TokenLogprobs
    from service.text import TokenPieces
    from tests.service.test_text import build_tokenizer

    pieces = [ANALYSIS[i:i + 6] for i in range(0, len(ANALYSIS), 6)]
    first_final = len(pieces)
    pieces += [FINAL[i:i + 6] for i in range(0, len(FINAL), 6)]
    outs = [StepOutput("r", (k,), piece, k == len(pieces) - 1, "stop" if k == len(pieces) - 1 else None, 5, k + 1,
                       logprobs=(TokenLogprobs(k, -0.5),)) for k, piece in enumerate(pieces)]
    tokenizer = build_tokenizer()
    for include in (True, False):
        def fmt(include=include):
            return _ChatFormat(MODEL, TokenPieces(tokenizer), harmony=_Harmony(frozenset(), include))

        choice = fmt().response([_Choice(outs)]).choices[0]
        streaming = fmt()
        streamed = [entry.token for out in outs for chunk in streaming.chunks(0, out) for c in chunk.choices
                    if c.logprobs is not None for entry in c.logprobs.content]
        kept = [entry.token for entry in choice.logprobs.content]
        assert choice.message.content == "It is 22 C in Tokyo." and streamed == kept
        expected = range(len(pieces)) if include else range(first_final, len(pieces))
        assert kept == [TokenPieces(tokenizer).text(k) for k in expected]


def test_the_chat_format_splits_harmony_in_responses_and_chunks():
    text = ANALYSIS + "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>" + CALL[:-len("<|call|>")]
    outs = _outputs([text[i:i + 6] for i in range(0, len(text), 6)], "stop")

    auto = ToolSetup(SCHEMAS, "auto", format="openai")

    def fmt(include=True, tools=auto):
        return _ChatFormat(MODEL, tools=tools, harmony=_Harmony(frozenset(), include))

    response = fmt().response([_Choice(outs)])
    message = response.choices[0].message
    assert (message.reasoning, message.content) == ("The user wants the weather. Call get_weather.", "Let me check.")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [TOKYO]
    assert response.choices[0].finish_reason == "tool_calls"
    streaming = fmt()
    deltas = [chunk.model_dump(mode="json")["choices"][0] for out in outs for chunk in streaming.chunks(0, out)]
    assert "".join(d["delta"].get("reasoning") or "" for d in deltas) == message.reasoning
    assert "".join(d["delta"]["content"] or "" for d in deltas) == message.content
    assert [c["function"]["name"] for d in deltas for c in d["delta"].get("tool_calls", [])] == ["get_weather"]
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert fmt(include=False).response([_Choice(outs)]).choices[0].message.reasoning is None
    # without tools: no call (its text is content), the reasoning still apart
    plain = fmt(tools=None).response([_Choice(outs)]).choices[0]
    assert plain.message.content == 'Let me check.{"city": "Tokyo", "unit": "C"}' and plain.finish_reason == "stop"
    cut = fmt().response([_Choice(_outputs([text], "length"))]).choices[0]
    assert cut.message.tool_calls is None and cut.finish_reason == "length"


# --- history: what GPT-OSS's chat template reads ------------------------------------------------------------


@pytest.mark.parametrize("pieces, reasoning", [
    (["<|channel|>", "final", "<|message|>", "Hello", " world", "<|return|>"], 0),  # no analysis: none
    # the analysis message, its header and end included; the answer's header after it is not
    (["<|channel|>", "analysis", "<|message|>", "Think", "ing", "<|end|>", "<|start|>", "assistant", "<|channel|>",
      "final", "<|message|>", "Hello", " world", "<|return|>"], 6),
    # a call after an analysis: the call's header and arguments are not reasoning
    (["<|channel|>analysis<|message|>", "Hm", "<|end|>", "<|start|>assistant<|channel|>commentary to=functions.f ",
      "<|constrain|>json<|message|>", '{"a": 1}', "<|call|>"], 3),
    (["<|channel|>", "analysis", "<|message|>", "cut", " off"], 5),  # cut off in the analysis: all of it
    # a preamble (commentary, content) between two analyses: its end is not the second analysis' (it was counted)
    (["<|channel|>", "analysis", "<|message|>", "Think", "<|end|>", "<|start|>", "assistant", "<|channel|>",
      "commentary", "<|message|>", "Checking.", "<|end|>", "<|start|>", "assistant", "<|channel|>", "analysis",
      "<|message|>", "x", "<|end|>", "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "22."], 5 + 7),
])
def test_responses_count_the_reasoning_messages_tokens_as_reasoning(pieces, reasoning):
    """usage.output_tokens_details.reasoning_tokens: every token before the answer's body was counted, headers and
    the closing token too, so an answer without any analysis reported 4 of its 6 tokens as reasoning (a review)."""
    fmt = _ResponsesFormat(MODEL, None, ResponsesRequest(model=MODEL, input="x").echo(),
                           harmony=_Harmony(frozenset(), True))
    fmt.prompt_tokens = 5
    usage = fmt.response([_Choice(_outputs(pieces, "length" if reasoning == len(pieces) else "stop"))])["usage"]
    assert usage["output_tokens"] == len(pieces)
    assert usage["output_tokens_details"]["reasoning_tokens"] == reasoning


def test_history_gives_thinking_and_one_call_per_message_each_before_its_result():
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": args}}
             for i, (name, args) in enumerate([("get_weather", {"city": "Tokyo"}), ("now", {"zone": 9})])]
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "Two calls.", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "noon"},
                {"role": "tool", "tool_call_id": "c0", "content": "22 C"},
                {"role": "assistant", "content": "Noon, 22 C.", "reasoning_content": "Done."}]
    assert history(messages) == [
        messages[0],
        {"role": "assistant", "content": "", "thinking": "Two calls.", "tool_calls": [calls[0]]},
        messages[3],
        {"role": "assistant", "content": "", "tool_calls": [calls[1]]},
        messages[2],
        {"role": "assistant", "content": "Noon, 22 C.", "thinking": "Done."}]


# --- forced calls and answers ---------------------------------------------------------------------------------

# the relevant parts of GPT-OSS's chat template (chat_template.jinja): tools in the developer message, a
# call's analysis from "thinking", one call per message, a result named by the call before it
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.<|end|>"
    "{%- if tools %}<|start|>developer<|message|># Tools\n{%- for tool in tools %}\n"
    "type {{ tool.function.name }} = {{ tool.function.parameters|tojson }}{%- endfor %}<|end|>{%- endif %}"
    "{%- set last = namespace(name=none) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- if 'tool_calls' in message %}"
    "{%- set tool_call = message.tool_calls[0] %}{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message.content and message.thinking %}{{ raise_exception('Cannot pass both content and thinking') }}"
    "{%- elif message.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking }}<|end|>{%- endif %}"
    "<|start|>assistant to=functions.{{ tool_call.name }}<|channel|>commentary json<|message|>"
    "{{ tool_call.arguments|tojson }}<|call|>{%- set last.name = tool_call.name %}"
    "{%- else %}<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>{%- endif %}"
    "{%- elif message.role == 'tool' %}<|start|>functions.{{ last.name }} to=assistant<|channel|>commentary<|message|>"
    "{{ message.content|tojson }}<|end|>"
    "{%- else %}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start|>assistant{%- endif %}")


@pytest.fixture(scope="module")
def harmony_tokenizer():
    """The test tokenizer with harmony's special tokens and a harmony chat template."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(TAGS)})
    tokenizer.chat_template = HARMONY_TEMPLATE
    return tokenizer


def _ends(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(tag) for tag in ("<|return|>", "<|call|>")]  # GPT-OSS's end of text


def test_the_format_is_taken_from_a_harmony_template_and_its_tags_are_special(harmony_tokenizer):
    assert detect_format(HARMONY_TEMPLATE) == "openai"
    assert set(special_tags("openai", harmony_tokenizer)) == set(TAGS)


def _walks(tokenizer, grammar: str, seeds=range(8)) -> list[str]:
    grammars = Grammars(tokenizer, len(tokenizer), _ends(tokenizer))
    # eos_bonus: the test walk's end token (<|im_end|> here) is no end of this grammar
    texts = [_random_walk(grammars, tokenizer, grammar, seed, 300, ends=("<|end|>",), skip_special_tokens=False,
                          eos_bonus=0.0) for seed in seeds]
    return [text for text in texts if text is not None]


def test_forced_calls_are_harmony_calls_after_an_optional_analysis(harmony_tokenizer):
    special = special_tags("openai", harmony_tokenizer)
    for choice, name in (("required", None), ("named", "now")):
        grammar = ToolSetup(SCHEMAS, choice, name, format="openai", special=special).grammar()
        assert f"<[{special['<|call|>']}]>" in grammar
        texts = _walks(harmony_tokenizer, grammar)
        assert len(texts) >= 5, choice
        for text in texts:
            assert text.startswith("<|channel|>") and text.endswith("<|call|>"), text
            _, content, calls = _feed(HarmonyStream(SCHEMAS), [text])
            (call,) = calls
            assert content == "" and (name is None or call.name == name), text
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_a_json_answer_is_the_final_message_after_an_optional_analysis(harmony_tokenizer):
    special = special_tags("openai", harmony_tokenizer)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    texts = _walks(harmony_tokenizer, answer_grammar("openai", schema, special))
    assert len(texts) >= 5 and answer_grammar("hermes", schema, {}) is None
    for text in texts:
        _, content, calls = _feed(HarmonyStream(SCHEMAS), [text])
        assert calls == [] and isinstance(json.loads(content)["n"], int), text


# --- over HTTP -------------------------------------------------------------------------------------------


def _start_harmony_engine(tokenizer) -> AsyncEngine:
    model = build_chat_model(tokenizer)
    model.generation_config.eos_token_id = _ends(tokenizer)
    engine = AsyncEngine(Engine(model, EngineConfig(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512),
                                tokenizer=tokenizer))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def harmony_server(harmony_tokenizer):
    with served(_start_harmony_engine(harmony_tokenizer), reasoning_parser="openai_gptoss") as url:
        yield url


def _bias(tokenizer) -> dict[str, float]:
    """A short analysis message, if the model writes one (the seeds below do): its end favoured."""
    return {str(tokenizer.convert_tokens_to_ids("<|end|>")): 5.0}


def _streamed(client, **body) -> tuple[str, str, list[tuple[str, str]], str]:
    reasoning, content, calls, finish = [], [], {}, None
    for chunk in client.chat.completions.create(**body, stream=True):
        choice = chunk.choices[0]
        reasoning.append(getattr(choice.delta, "reasoning", None) or "")
        content.append(choice.delta.content or "")
        for delta in choice.delta.tool_calls or ():
            name, arguments = calls.get(delta.index, (None, ""))
            calls[delta.index] = (delta.function.name or name, arguments + (delta.function.arguments or ""))
        finish = choice.finish_reason or finish
    return "".join(reasoning), "".join(content), [calls[i] for i in sorted(calls)], finish


def test_a_harmony_model_reasons_calls_and_answers_over_http(harmony_server, harmony_tokenizer):
    """Forced calls and a JSON answer (the random model writes no harmony of its own accord): reasoning,
    content and calls apart, streamed and not and through the Responses API; the call and its result sent
    back render as GPT-OSS's template renders them."""
    client = openai.OpenAI(base_url=f"{harmony_server}/v1", api_key="unused", max_retries=0, timeout=120)
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200,
            "temperature": 1.0, "seed": 3, "extra_body": {"logit_bias": _bias(harmony_tokenizer)}}
    reply = client.chat.completions.create(**body).choices[0]
    (call,) = reply.message.tool_calls
    assert reply.finish_reason == "tool_calls" and reply.message.content is None and reply.message.reasoning, reply
    assert "<|" not in reply.message.reasoning
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    reasoning, content, calls, finish = _streamed(client, **body)
    assert (reasoning, content, finish) == (reply.message.reasoning, "", "tool_calls") and len(calls) == 1
    # a named call comes whole, after the analysis
    named = client.chat.completions.create(**{**body, "tool_choice": {"type": "function", "function": {"name": "now"}}})
    assert named.choices[0].finish_reason == "stop" and named.choices[0].message.tool_calls[0].function.name == "now"
    # a JSON answer is the final message's content
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    answer = {**body, "tools": None, "tool_choice": None,
              "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    del answer["tools"], answer["tool_choice"]
    reply_json = client.chat.completions.create(**answer).choices[0]
    assert reply_json.finish_reason == "stop", reply_json
    assert 0 <= json.loads(reply_json.message.content)["n"] <= 99
    thought = getattr(reply_json.message, "reasoning", None) or ""
    assert _streamed(client, **answer)[:2] == (thought, reply_json.message.content)
    # the Responses API on the same pipeline: a reasoning item, then the call
    response = client.responses.create(model=MODEL, input=ASK[0]["content"], max_output_tokens=200, temperature=1.0,
                                       tools=[{"type": "function", "name": t["function"]["name"],
                                               "parameters": t["function"]["parameters"]} for t in TOOLS],
                                       tool_choice="required", extra_body={"seed": 3, "logit_bias": _bias(harmony_tokenizer)})
    assert [item.type for item in response.output] == ["reasoning", "function_call"], response.output
    # the next turn: the call, its reasoning and its result render as harmony
    sent = {"role": "assistant", "content": None, "reasoning_content": reply.message.reasoning,
            "tool_calls": [call.model_dump()]}
    history_ = [*ASK, sent, {"role": "tool", "tool_call_id": call.id, "content": "22 C, sunny"}]
    tokenized = httpx.post(f"{harmony_server}/tokenize", json={"messages": history_, "tools": TOOLS}).json()
    rendered = httpx.post(f"{harmony_server}/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    assert (f"<|start|>assistant<|channel|>analysis<|message|>{reply.message.reasoning}<|end|>"
            f"<|start|>assistant to=functions.{call.function.name}<|channel|>commentary json<|message|>{arguments}<|call|>"
            f'<|start|>functions.{call.function.name} to=assistant<|channel|>commentary<|message|>"22 C, sunny"<|end|>'
            "<|start|>assistant") in rendered
    nxt = client.chat.completions.create(model=MODEL, messages=history_, tools=TOOLS, max_tokens=3)
    assert nxt.usage.prompt_tokens == tokenized["count"]


def test_text_outside_harmony_is_content_without_special_tokens(harmony_server, harmony_tokenizer):
    """The random model's own text is no harmony: content as it is, the special tokens that are not
    harmony's (kept by decoding, which harmony needs) left out."""
    client = openai.OpenAI(base_url=f"{harmony_server}/v1", api_key="unused", max_retries=0, timeout=120)
    start = harmony_tokenizer.convert_tokens_to_ids("<|im_start|>")
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0,
                                           extra_body={"logit_bias": {str(start): 100}}).choices[0]
    assert reply.message.content == "" and reply.finish_reason == "length"
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0).choices[0]
    prompt = httpx.post(f"{harmony_server}/tokenize", json={"messages": ASK}).json()["tokens"]
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert plain.message.content == text and getattr(plain.message, "reasoning", None) is None


def test_the_harmony_reasoning_parser_needs_the_harmony_tool_format(harmony_tokenizer):
    class _Engine:
        tokenizer = build_tokenizer()

    with pytest.raises(ValueError, match="openai tool call parser"):
        create_app(_Engine(), served_model_name=MODEL, reasoning_parser="openai_gptoss", tool_call_parser="hermes")
    request = ChatCompletionRequest(model=MODEL, messages=ASK).use_tool_format("openai", {"<|channel|>": 5})
    from service.openai_api import sampling_params

    assert sampling_params(request, 10, 100).skip_special_tokens is False  # tools or not
