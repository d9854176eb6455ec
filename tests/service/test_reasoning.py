"""Reasoning outputs (service/reasoning.py): the <think> parser, the chat format, and the chat endpoint over
HTTP with `chat_template_kwargs`, on a random tiny chat model whose template can open a <think> block."""

from __future__ import annotations

import itertools
import json
import re

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import _ChatFormat, _Choice, _Reasoning, _think_tokens, create_app
from service.engine import Engine, EngineConfig, StepOutput
from service.reasoning import THINK_END, THINK_START, ReasoningStream, opens_reasoning
from service.sampling import SamplingParams
from service.structured import grammar_from_spec
from service.text import apply_chat_template
from service.tools import ToolSetup
from tests.service.test_app import MODEL, _start_engine, served
from tests.service.test_structured import _run, _text
from tests.service.test_text import CHAT_TEMPLATE, build_chat_model, build_tokenizer

# The test template, plus what thinking models' templates do: DeepSeek-R1 opens the block in the
# generation prompt ("think"), Qwen3 with enable_thinking false gives an empty one ("no_think").
THINKING_TEMPLATE = "{%- if reasoning_effort is defined %}{{- 'Reasoning: ' + reasoning_effort }}{%- endif %}" + CHAT_TEMPLATE + (
    "{%- if add_generation_prompt and think is defined and think %}{{- '<think>\\n' }}{%- endif %}"
    "{%- if add_generation_prompt and no_think is defined and no_think %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")
ASK = [{"role": "user", "content": "Which is larger, 9.11 or 9.8?"}]


def _feed(stream: ReasoningStream, pieces: list[str]) -> tuple[str, str]:
    reasoning, content = [], []
    for i, piece in enumerate(pieces):
        r, c = stream.push(piece, final=i == len(pieces) - 1)
        reasoning.append(r)
        content.append(c)
    return "".join(reasoning), "".join(content)


@pytest.mark.parametrize("text, in_block, expected", [
    ("<think>\nCompare 9.11 and 9.80.\n</think>\n\n9.8 is larger.", False, ("Compare 9.11 and 9.80.", "9.8 is larger.")),
    ("\n<think></think>answer", False, ("", "answer")),
    ("plain <think>x</think>", False, ("", "plain <think>x</think>")),  # a block that does not open the output
    ("<thin", False, ("", "<thin")),
    ("<think>cut off by max_tokens", False, ("cut off by max_tokens", "")),
    ("Compare.\n</think>\n\n9.8", True, ("Compare.", "9.8")),
    ("never closed", True, ("never closed", "")),
    ("", True, ("", "")),
])
def test_reasoning_and_content(text, in_block, expected):
    assert _feed(ReasoningStream(in_block), [text]) == expected


TEXT = "  <think>\n a < b </thin </think> \n\n and <think> again </think>"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(TEXT)), max_size=10), st.booleans())
def test_any_chunking_gives_what_the_whole_text_gives(cuts, in_block):
    bounds = [0, *sorted(cuts), len(TEXT)]
    pieces = [TEXT[a:b] for a, b in zip(bounds, bounds[1:])]
    whole = _feed(ReasoningStream(in_block), [TEXT])
    assert _feed(ReasoningStream(in_block), pieces) == whole
    assert whole == (("<think>\n a < b </thin", "and <think> again </think>") if in_block
                     else ("a < b </thin", "and <think> again </think>"))


KIMI_CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
             '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
KIMI = "<think>The user wants the weather; I'll call the tool. " + KIMI_CALL


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(KIMI)), max_size=8), st.booleans())
def test_kimi_k2s_calls_begun_inside_the_thinking_block_end_it_and_are_calls(cuts, in_block):
    """Kimi-K2-Thinking may start its calls without closing its block (vLLM's KimiK2ReasoningParser ends the
    reasoning there): the section, raw special tokens and all, was reasoning, and the call was lost (a review)."""
    from service.reasoning import IMPLICIT_ENDS
    from service.tools import ToolCallStream

    text = KIMI[len("<think>"):] if in_block else KIMI
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    reasoning, content = _feed(ReasoningStream(in_block, IMPLICIT_ENDS["kimi_k2"]), pieces)
    assert reasoning == "The user wants the weather; I'll call the tool." and content == KIMI_CALL
    functions = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}}}}
    _, calls = ToolCallStream(functions, True, "kimi_k2").push(content, final=True)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    # the other parsers' blocks end at </think> only
    assert _feed(ReasoningStream(in_block), pieces) == (text.removeprefix("<think>").strip(), "")


def test_the_prompt_tells_whether_a_block_is_open():
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning("<|im_start|>assistant\n")


def _outputs(pieces: list[str], reason: str) -> list[StepOutput]:
    return [StepOutput("r", (i,), piece, i == len(pieces) - 1, reason if i == len(pieces) - 1 else None, 5, i + 1)
            for i, piece in enumerate(pieces)]


@pytest.mark.parametrize("include", [True, False])
def test_chat_format_sends_reasoning_apart_then_tool_calls(include):
    text = ('<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "w", "arguments": {"c": 1}}\n'
            "</tool_call>")
    outs = _outputs([text[i:i + 5] for i in range(0, len(text), 5)], "stop")

    def fmt():
        return _ChatFormat(MODEL, tools=ToolSetup({"w": {}}, "auto"), reasoning=_Reasoning(False, include))

    message = fmt().response([_Choice(outs)]).choices[0].message
    assert message.reasoning == ("The user wants the weather." if include else None) and message.content is None
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("w", '{"c": 1}')]
    streaming = fmt()
    chunks = [chunk.model_dump(mode="json") for out in outs for chunk in streaming.chunks(0, out)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning") or "" for d in deltas) == (message.reasoning or "")
    assert not any(d["content"] for d in deltas) and any("reasoning" in d for d in deltas) == include
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])] == ["w"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("in_block", [False, True])
def test_reasoning_left_out_leaves_its_tokens_log_probabilities_out_too(in_block):
    """``include_reasoning: false`` dropped the reasoning's text while every one of its tokens' log-probability
    entries still spelled it out (the whole block before the answer's first entry, streamed or not; a review),
    a partial ``<think`` held undecided included. Included, every token keeps its entry."""
    from service.sampling import TokenLogprobs
    from service.text import TokenPieces

    tokenizer = build_tokenizer()
    text = ("" if in_block else "<think>") + "\nSECRET PLAN\n</think>\n\nHello."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode(ids[:k + 1]) for k in range(len(ids))]
    pieces = [b[len(a):] for a, b in zip(["", *pieces], pieces)]
    outs = [StepOutput("r", (t,), piece, k == len(ids) - 1, "stop" if k == len(ids) - 1 else None, 5, k + 1,
                       logprobs=(TokenLogprobs(t, -0.5),)) for k, (t, piece) in enumerate(zip(ids, pieces))]
    for include in (False, True):
        def fmt(include=include):
            return _ChatFormat(MODEL, TokenPieces(tokenizer), reasoning=_Reasoning(in_block, include))

        choice = fmt().response([_Choice(outs)]).choices[0]
        streaming = fmt()
        streamed = [entry for out in outs for chunk in streaming.chunks(0, out) for c in chunk.choices
                    if c.logprobs is not None for entry in c.logprobs.content]
        tokens = "".join(entry.token for entry in choice.logprobs.content)
        assert choice.message.content == "Hello." and (choice.message.reasoning is not None) == include
        assert "".join(entry.token for entry in streamed) == tokens
        if include:
            assert len(choice.logprobs.content) == len(ids)
        else:
            assert tokens == "Hello.", tokens


def test_the_chat_format_ends_kimis_block_at_its_calls_and_the_app_gives_it_the_tag():
    from service.reasoning import IMPLICIT_ENDS

    tools = ToolSetup({"get_weather": {"type": "object"}}, "auto", format="kimi_k2")
    outs = _outputs([KIMI[i:i + 7] for i in range(0, len(KIMI), 7)], "stop")
    choice = _ChatFormat(MODEL, tools=tools, reasoning=_Reasoning(False, True, IMPLICIT_ENDS["kimi_k2"])).response(
        [_Choice(outs)]).choices[0]
    assert choice.message.reasoning == "The user wants the weather; I'll call the tool." and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    assert choice.finish_reason == "tool_calls"

    engine = _start_engine(build_tokenizer())
    try:
        for parser, ends in (("kimi_k2", IMPLICIT_ENDS["kimi_k2"]), ("qwen3", ())):
            app = create_app(engine, served_model_name=MODEL, reasoning_parser=parser)
            assert app.state.server.reasoning_ends == ends
    finally:
        engine.shutdown()


# --- over HTTP -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    with served(_start_engine(tokenizer, max_num_seqs=8), reasoning_parser="qwen3") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, **kwargs):
    return client.chat.completions.create(**{"model": MODEL, "messages": ASK, "max_tokens": 24, "temperature": 0,
                                             **kwargs})


def _streamed(client, **kwargs) -> tuple[str, str, str]:
    reasoning, content, finish = [], [], None
    for chunk in _chat(client, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning", None) or "")
        content.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    return "".join(reasoning), "".join(content), finish


def test_a_block_the_template_opened_is_reasoning(client, server):
    plain = _chat(client).choices[0]
    assert plain.message.content and getattr(plain.message, "reasoning", None) is None  # no block: all content
    thinking = _chat(client, extra_body={"chat_template_kwargs": {"think": True}}).choices[0]
    # the random model never writes </think>: everything it wrote is reasoning, cut by max_tokens
    assert thinking.message.reasoning and thinking.message.content is None and thinking.finish_reason == "length"
    tokens = httpx.post(f"{server}/tokenize", json={"messages": ASK, "chat_template_kwargs": {"think": True}}
                        ).json()["tokens"]
    raw = client.completions.create(model=MODEL, prompt=tokens, max_tokens=24, temperature=0).choices[0].text
    assert thinking.message.reasoning == raw.strip()
    assert _streamed(client, extra_body={"chat_template_kwargs": {"think": True}}) == (
        thinking.message.reasoning, "", "length")
    history = [*ASK, thinking.message.model_dump(), {"role": "user", "content": "Sure?"}]  # reasoning included
    assert _chat(client, messages=history, max_tokens=2).usage.prompt_tokens > len(tokens)
    hidden = _chat(client, extra_body={"chat_template_kwargs": {"think": True}, "include_reasoning": False})
    assert getattr(hidden.choices[0].message, "reasoning", None) is None and hidden.choices[0].message.content is None


@pytest.mark.parametrize("question", ["What does the tag <think> do?", "Explain </think> and <think>"])
def test_a_user_who_writes_a_think_tag_opens_no_block(client, question):
    """Whether the template opened a block was read in the prompt's last 16 tokens, the end of the user's message
    included: a question about <think> turned the whole answer into reasoning (and lifted a structured output's
    constraint: the engine waited for a </think> that never came; an audit)."""
    reply = _chat(client, messages=[{"role": "user", "content": question}]).choices[0]
    assert reply.message.content and getattr(reply.message, "reasoning", None) is None
    thinking = _chat(client, messages=[{"role": "user", "content": question}],
                     extra_body={"chat_template_kwargs": {"think": True}}).choices[0]
    assert thinking.message.reasoning and thinking.message.content is None  # the template's own block still counts


def test_the_text_after_the_history_is_what_the_template_adds():
    from service.text import text_after_history

    tokenizer = build_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    ask = [{"role": "user", "content": "What does <think> do?"}]
    assert "<think>" not in text_after_history(tokenizer, ask)
    assert text_after_history(tokenizer, ask, template_kwargs={"think": True}).endswith("<think>\n")
    assert text_after_history(tokenizer, ask, add_generation_prompt=False) == ""
    prefilled = [*ask, {"role": "assistant", "content": "<think>\nHmm"}]
    assert text_after_history(tokenizer, prefilled, add_generation_prompt=False,
                              continue_final_message=True).endswith("<think>\nHmm")


def test_an_empty_block_in_the_prompt_leaves_the_answer_as_content(client, server):
    reply = _chat(client, extra_body={"chat_template_kwargs": {"no_think": True}}).choices[0]
    tokens = httpx.post(f"{server}/tokenize", json={"messages": ASK, "chat_template_kwargs": {"no_think": True}}
                        ).json()["tokens"]
    raw = client.completions.create(model=MODEL, prompt=tokens, max_tokens=24, temperature=0).choices[0].text
    assert reply.message.content == raw and getattr(reply.message, "reasoning", None) is None


def test_a_constrained_completion_is_content_even_in_a_block(client):
    reply = _chat(client, max_tokens=60, extra_body={"chat_template_kwargs": {"think": True},
                                                     "structured_outputs": {"json": {"type": "object", "properties": {
                                                         "n": {"type": "integer"}}, "required": ["n"]}}}).choices[0]
    assert isinstance(json.loads(reply.message.content)["n"], int) and getattr(reply.message, "reasoning", None) is None


def test_reasoning_effort_reaches_the_template(client, server):
    plain = _chat(client, max_tokens=1).usage.prompt_tokens
    low = _chat(client, max_tokens=1, reasoning_effort="low").usage.prompt_tokens
    said = httpx.post(f"{server}/tokenize", json={"messages": ASK, "chat_template_kwargs": {"reasoning_effort": "low"}})
    assert low == said.json()["count"] > plain
    response = client.responses.create(model=MODEL, input=ASK[0]["content"], max_output_tokens=1,
                                       reasoning={"effort": "low"})
    assert response.usage.input_tokens == low


@pytest.mark.parametrize("kwargs", [{"tokenize": False}, {"messages": []}, {"not-an-identifier": 1}])
def test_template_kwargs_cannot_set_apply_chat_templates_own_arguments(server, kwargs):
    response = httpx.post(f"{server}/v1/chat/completions",
                          json={"model": MODEL, "messages": ASK, "max_tokens": 2, "chat_template_kwargs": kwargs})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "chat_template_kwargs", error


def test_an_unknown_reasoning_parser_is_refused():
    class _Engine:
        tokenizer = build_tokenizer()

    with pytest.raises(ValueError, match="unknown reasoning parser"):
        create_app(_Engine(), served_model_name=MODEL, reasoning_parser="gpt")


# --- thinking before a grammar: <think> and </think> as single tokens (Qwen3, DeepSeek-R1) ---------------


def _think_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([THINK_START, THINK_END])
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


DIGITS = "[0-9]{2,4}"


def test_a_grammar_waits_for_the_thinking_block_to_close():
    """The completion thinks freely (its block opened by the prompt, or by its first token), and the
    grammar holds from the token after </think>; a completion that does not open a block follows the
    grammar from its first token."""
    tokenizer = _think_tokenizer()
    opener, closer = _think_tokens(tokenizer).tags
    engine = Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=256), tokenizer=tokenizer)
    grammar = grammar_from_spec("regex", DIGITS)
    prompt = apply_chat_template(tokenizer, ASK)
    bias = {"in": ((closer, 3.0),), "maybe": ((opener, 4.0), (closer, 3.0)), "no": ()}
    requests = {f"{kind}-{seed}": (prompt, SamplingParams(
        max_tokens=120, temperature=1.0, seed=seed, grammar=grammar, reasoning_tokens=(opener, closer),
        in_reasoning=kind == "in", logit_bias=bias[kind])) for kind in bias for seed in range(6)}
    outputs = _run(engine, requests)
    closed = {kind: 0 for kind in bias}
    for request_id, outs in outputs.items():
        kind, text = request_id.split("-")[0], _text(outs)
        _, tag, answer = text.partition(THINK_END)
        opened = kind == "in" or text.startswith(THINK_START)
        if not opened:  # no block: the grammar from the first token
            assert re.fullmatch(DIGITS, text) and outs[-1].finish_reason == "stop", (request_id, text)
        elif tag:
            assert re.fullmatch(DIGITS, answer) and outs[-1].finish_reason == "stop", (request_id, text)
            closed[kind] += 1
    assert closed["in"] >= 4 and closed["maybe"] >= 3, closed  # most blocks closed, then followed the grammar


def test_whitespace_may_come_between_the_thinking_block_and_the_grammar():
    """After </think> the completion may write up to two gap tokens (a newline, a space) before the grammar
    holds, as thinking models write "</think>\\n\\n" before answering; none before an answer that opened no
    block, and none once the answer began."""
    tokenizer = _think_tokenizer()
    (opener, closer), gap, _ = _think_tokens(tokenizer)
    engine = Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=256), tokenizer=tokenizer)
    grammar = grammar_from_spec("regex", DIGITS)
    prompt = apply_chat_template(tokenizer, ASK)
    spaces = tuple((token, 8.0) for token in gap)  # whitespace made likely wherever it is allowed
    bias = {"in": ((closer, 8.0), *spaces), "maybe": ((opener, 4.0), (closer, 8.0), *spaces), "no": spaces}
    requests = {f"{kind}-{seed}": (prompt, SamplingParams(
        max_tokens=120, temperature=1.0, seed=seed, grammar=grammar, reasoning_tokens=(opener, closer),
        reasoning_gap=gap, in_reasoning=kind == "in", logit_bias=bias[kind])) for kind in bias for seed in range(6)}
    outputs = _run(engine, requests)
    gaps = []
    for request_id, outs in outputs.items():
        kind, tokens = request_id.split("-")[0], [t for out in outs for t in out.new_token_ids]
        text = _text(outs)
        if kind != "in" and tokens[0] != opener:  # no block: the grammar from the first token
            assert re.fullmatch(DIGITS, text) and outs[-1].finish_reason == "stop", (request_id, text)
            continue
        if closer not in tokens:
            continue
        after = tokens[tokens.index(closer) + 1:]
        spaced = len(list(itertools.takewhile(lambda t: t in gap, after)))
        assert spaced <= 2 and re.fullmatch(DIGITS, tokenizer.decode(after[spaced:], skip_special_tokens=True)), (request_id, text)
        assert outs[-1].finish_reason == "stop", (request_id, text)
        gaps.append(spaced)
    assert len(gaps) >= 6 and gaps.count(2) >= len(gaps) // 2, gaps  # the likely whitespace was written


@pytest.fixture(scope="module")
def think_server():
    with served(_start_engine(_think_tokenizer(), max_num_seqs=8), reasoning_parser="qwen3") as url:
        yield url


def test_a_thinking_model_thinks_then_answers_in_the_format(think_server):
    client = openai.OpenAI(base_url=f"{think_server}/v1", api_key="unused", max_retries=0, timeout=60)
    closer = httpx.post(f"{think_server}/tokenize", json={"prompt": THINK_END, "add_special_tokens": False}
                        ).json()["tokens"][0]
    eos = httpx.post(f"{think_server}/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False}
                     ).json()["tokens"][0]
    # the closing tag made likely; no end of text while thinking (once the answer is complete, the grammar
    # allows nothing else, so it still ends there)
    bias = {str(closer): 5.0, str(eos): -100}
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
              "additionalProperties": False}
    body = {"model": MODEL, "messages": ASK, "max_tokens": 60, "temperature": 1.0, "seed": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
            "extra_body": {"chat_template_kwargs": {"think": True}, "logit_bias": bias}}
    reply = client.chat.completions.create(**body).choices[0]
    assert reply.message.reasoning and reply.finish_reason == "stop", reply
    assert 0 <= json.loads(reply.message.content)["n"] <= 99
    reasoning, content = [], []
    for chunk in client.chat.completions.create(**body, stream=True):
        reasoning.append(getattr(chunk.choices[0].delta, "reasoning", None) or "")
        content.append(chunk.choices[0].delta.content or "")
    assert ("".join(reasoning), "".join(content)) == (reply.message.reasoning, reply.message.content)
    # the Responses API on the same pipeline: a reasoning item, then the answer
    response = client.responses.create(model=MODEL, input=ASK[0]["content"], max_output_tokens=60, temperature=1.0,
                                       text={"format": {"type": "json_schema", "name": "n", "schema": schema}},
                                       extra_body={"seed": 5, "chat_template_kwargs": {"think": True},
                                                   "logit_bias": bias})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == reply.message.content
    assert response.usage.output_tokens_details.reasoning_tokens == response.usage.output_tokens - len(
        httpx.post(f"{think_server}/tokenize", json={"prompt": reply.message.content, "add_special_tokens": False}
                   ).json()["tokens"])


def test_a_constrained_completion_cannot_end_while_it_thinks(think_server):
    """Nothing was masked inside the thinking block, end of text included: a thinking model could end a json_schema
    request there, no answer and finish_reason "stop" (a review, with the end made likely as here). The completion
    now ends through its grammar (valid JSON, "stop") or its token limit ("length")."""
    client = openai.OpenAI(base_url=f"{think_server}/v1", api_key="unused", max_retries=0, timeout=60)
    eos = httpx.post(f"{think_server}/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False}
                     ).json()["tokens"][0]
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
              "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=1.0, seed=3, n=4,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        extra_body={"chat_template_kwargs": {"think": True}, "logit_bias": {str(eos): 3.0}})
    for choice in reply.choices:
        assert choice.finish_reason in ("stop", "length"), choice
        if choice.finish_reason == "stop":
            assert 0 <= json.loads(choice.message.content)["n"] <= 99, choice


def test_a_named_call_cut_off_while_thinking_has_no_call_streamed_or_not():
    """max_tokens ran out inside the thinking block of a request forcing a named call: the reply had the call with
    arguments "" (not JSON: client code's json.loads raised) while the stream had no call (an audit)."""
    setup = ToolSetup({"now": {"type": "object", "properties": {"zone": {"type": "integer"}}}}, "named", "now")
    outs = [StepOutput("r", (0,), "<think>\nLet me", False, None, 5, 1),
            StepOutput("r", (1,), " think", True, "length", 5, 2)]

    def fmt() -> _ChatFormat:
        return _ChatFormat(MODEL, None, 1, tools=setup, reasoning=_Reasoning(False, True))

    whole = fmt().response([_Choice(outs)]).choices[0]
    assert whole.message.tool_calls is None and whole.message.reasoning == "Let me think"
    assert whole.finish_reason == "length"
    streamed = fmt()
    deltas = [chunk.choices[0].delta for out in outs for chunk in streamed.chunks(0, out)]
    assert not any(delta.tool_calls for delta in deltas)


def test_thinking_tags_that_are_special_tokens_are_kept_for_the_reasoning_parser():
    """A release whose <think> and </think> are special tokens: a chat's text keeps them, as the tool tags of
    Mistral's format are kept (skip_special_tokens, the default, dropped them, so the block the template opened
    swallowed the answer: content None, everything reasoning). The split equals the one with the same tags as
    plain added tokens (same ids, same model, same seed)."""
    replies = []
    for special in (False, True):
        tokenizer = build_tokenizer()
        tokenizer.add_tokens([THINK_START, THINK_END], special_tokens=special)
        tokenizer.chat_template = THINKING_TEMPLATE
        assert _think_tokens(tokenizer).special == special
        closer, eos = tokenizer.convert_tokens_to_ids(THINK_END), tokenizer.convert_tokens_to_ids("<|im_end|>")
        with served(_start_engine(tokenizer, max_num_seqs=4), reasoning_parser="qwen3") as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            reply = client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=24, temperature=1.0, seed=3,
                extra_body={"chat_template_kwargs": {"think": True}, "logit_bias": {str(closer): 2.0, str(eos): -100}})
        message = reply.choices[0].message
        replies.append((getattr(message, "reasoning", None), message.content))
    assert replies[0][1] is not None and replies[1] == replies[0], replies


def test_other_special_tokens_stay_out_of_the_text_when_the_thinking_tags_are_kept():
    """Keeping special thinking tags turned skip_special_tokens off for the whole chat: the model's other special
    tokens (here <|im_start|> and <|endoftext|>, made likely) showed in the reasoning and the content, where the same
    tags as plain added tokens left them out (a review). Now only the tags are kept."""
    replies = []
    for special in (False, True):
        tokenizer = build_tokenizer()
        tokenizer.add_tokens([THINK_START, THINK_END], special_tokens=special)
        tokenizer.chat_template = THINKING_TEMPLATE
        others = [str(tokenizer.convert_tokens_to_ids(token)) for token in ("<|im_start|>", "<|endoftext|>")]
        closer = tokenizer.convert_tokens_to_ids(THINK_END)
        with served(_start_engine(tokenizer, max_num_seqs=2), reasoning_parser="qwen3") as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            for think in (False, True):
                reply = client.chat.completions.create(
                    model=MODEL, messages=ASK, max_tokens=6, temperature=1.0, seed=1,
                    extra_body={"chat_template_kwargs": {"think": think},
                                "logit_bias": {others[0]: 8, others[1]: 8, str(closer): 6}})
                message = reply.choices[0].message
                replies.append((special, think, getattr(message, "reasoning", None), message.content))
    assert [r[2:] for r in replies[2:]] == [r[2:] for r in replies[:2]], replies
    assert not any("<|" in (text or "") for reply in replies for text in reply[2:]), replies
    assert any(reply[2] for reply in replies), replies  # a block was read
