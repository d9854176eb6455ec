"""Tool calling (service/tools.py): the Hermes parser, forced calls on the engine, and the chat endpoint
over HTTP with the official `openai` client, on a random tiny chat model."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import _ChatFormat, create_app
from service.engine import StepOutput
from service.sampling import SamplingParams
from service.text import apply_chat_template
from service.tools import NamedCallStream, ToolCallStream, ToolSetup
from tests.service.test_app import MODEL, _start_engine, served
from tests.service.test_structured import _engine, _run, _text
from tests.service.test_text import build_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
         "required": ["zone"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "now": CLOCK}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} function", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MIXED = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {"zone": 1}}\n</tool_call>\n')


def _feed(parser, pieces: list[str]) -> tuple[str, list]:
    content, calls = [], []
    for i, piece in enumerate(pieces):
        text, new = parser.push(piece, final=i == len(pieces) - 1)
        content.append(text)
        calls += new
    return "".join(content), calls


def _calls(text: str, names=tuple(SCHEMAS), parallel: bool = True) -> tuple[str, list[tuple[str, dict]]]:
    content, calls = _feed(ToolCallStream(dict.fromkeys(names, {}), parallel), [text])
    return content, [(call.name, json.loads(call.arguments)) for call in calls]


# --- the parser ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, content", [
    ("Before.\n{C}\nAfter.", "Before.\nAfter."), ("{C}\nAfter.", "After."), ("A {C} B", "A B"), ("A{C}B", "AB"),
    ("A{C}\nB", "A\nB"), ("A\n{C}\n{C}\nB", "A\nB"), ("A\n{C}\nB\n{C}\nC", "A\nB\nC"), ("A\n{C}\n", "A")])
def test_content_on_both_sides_of_a_call_is_joined_by_the_whitespace_the_model_wrote(text, content):
    """Whitespace next to a call is dropped, so "Before.\n" + call + "\nAfter." was "Before.After." on the chat
    endpoint and in a Responses message (a review): the content is joined by the whitespace before the calls (or after
    them, if none), in any chunking."""
    text = text.replace("{C}", '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    for size in (len(text), 1, 3):
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        assert _feed(ToolCallStream(SCHEMAS), pieces)[0] == content


def test_content_and_calls_of_a_hermes_completion():
    content, calls = _calls(MIXED)
    assert content == "Let me check."
    assert calls == [("get_weather", {"city": "Paris", "unit": "C"}), ("now", {"zone": 1})]
    assert _calls("no call at all, <tool> or <tool_call") == ("no call at all, <tool> or <tool_call", [])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(MIXED) + 40), max_size=12))
def test_any_chunking_gives_what_the_whole_text_gives(cuts):
    text = MIXED + 'And <tool_call>{"name": "nope"}</tool_call> done. <tool_call>{"name"'
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    whole_content, whole_calls = _feed(ToolCallStream(SCHEMAS), [text])
    content, calls = _feed(ToolCallStream(SCHEMAS), pieces)
    # (the content on both sides of the calls joined by the newline before them: it was "Let me check.And", a review)
    assert content == whole_content == ('Let me check.\nAnd <tool_call>{"name": "nope"}</tool_call> done. '
                                        '<tool_call>{"name"')
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("block", [
    "not json", '["get_weather", {}]', '{"name": "rm", "arguments": {}}', '{"name": "now", "arguments": "zone=1"}',
    '{"name": ["now"], "arguments": {}}', '{"arguments": {}}',
])
def test_blocks_that_are_not_calls_of_offered_functions_stay_content(block):
    text = f"a <tool_call>{block}</tool_call> b"
    assert _calls(text) == (text, [])


def test_a_partial_tag_is_held_back_until_it_cannot_be_a_call():
    parser = ToolCallStream(SCHEMAS)
    assert parser.push("It is <tool") == ("It is", [])  # the space too: a call would drop it
    assert parser.push("s here") == (" <tools here", [])
    assert parser.push(" <tool_c") == ("", [])
    assert parser.push("", final=True) == (" <tool_c", [])


def test_parameters_key_and_one_call_without_parallel_calls():
    text = '<tool_call>{"name": "now", "parameters": {"zone": 3}}</tool_call>' + MIXED
    assert _calls(text, parallel=False) == ("Let me check.", [("now", {"zone": 3})])


def test_a_named_call_streams_its_arguments():
    parser = NamedCallStream("now")
    assert [c.arguments for c in _feed(parser, ['{"zo', 'ne":', "", "2}"])[1]] == ['{"zo', 'ne":', "2}"]
    assert parser.calls[0].arguments == '{"zone":2}' and parser.calls[0].name == "now"


# --- forced calls on the engine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def grammars(tokenizer):
    from service.structured import Grammars

    return Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


# what ends a free string in each tagged-text format's forced calls: its closing tag; and a tag's "<" and a newline
TEXT_ENDS = {fmt: ("\n", "<", end) for fmt, end in (("qwen3_coder", "\n</parameter>"), ("glm45", "</arg_value>"),
                                                   ("glm47", "</arg_value>"), ("minimax_m2", "</parameter>"))}


def _random_walk(grammars, tokenizer, grammar: str, seed: int, max_tokens: int, ends: tuple[str, ...] = (),
                 skip_special_tokens: bool = True, eos_bonus: float = 3.0) -> str | None:
    """A completion drawn by argmax of random logits through ``grammar`` (the end token made likely by
    ``eos_bonus``, to end nested lists and objects early, and ``ends`` too, to end free strings: an end's first
    token made likely, and one begun carried on to its last, where the grammar takes it), or None if it did not finish
    within ``max_tokens``."""
    torch.manual_seed(seed)
    matcher, ids = grammars.matcher(grammar), []
    encoded = [tokenizer.encode(end) for end in ends]
    while not matcher.is_stopped() and len(ids) < max_tokens:
        logits = torch.randn(1, len(tokenizer))
        logits[0, tokenizer.eos_token_id] += eos_bonus
        for tokens in encoded:  # (an end the grammar can take whole from here: not a "<" that begins another tag)
            begun = next((k for k in range(len(tokens) - 1, 0, -1) if ids[-k:] == tokens[:k]), 0)
            if matcher.validate_tokens(tokens[begun:]) == len(tokens) - begun:
                logits[0, tokens[begun]] += 10.0 if begun else 2.0
        grammars.mask(logits, [matcher])
        ids.append(int(logits.argmax()))
        assert matcher.consume_token(ids[-1])
    if not matcher.is_stopped():
        return None
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_forced_calls_follow_the_schemas_greedy_and_sampled(tokenizer):
    prompt = apply_chat_template(tokenizer, ASK)
    setups = {"required": ToolSetup(SCHEMAS, "required"), "single": ToolSetup(SCHEMAS, "required", parallel=False),
              "named": ToolSetup(SCHEMAS, "named", "now")}
    requests = {f"{kind}-{seed}": (prompt, SamplingParams(max_tokens=200, temperature=0.0 if seed < 0 else 1.0,
                                                          seed=seed if seed >= 0 else None, grammar=setup.grammar()))
                for kind, setup in setups.items() for seed in (-1, 1, 2, 3)}
    outputs = _run(_engine(tokenizer), requests)
    for request_id, outs in outputs.items():
        kind, text = request_id.split("-")[0], _text(outs)
        if kind == "required" and outs[-1].finish_reason == "length":
            # parallel calls: the random model may go on calling until max_tokens; every finished call counts
            text = text[:text.rindex("</tool_call>") + len("</tool_call>")]
        else:
            assert outs[-1].finish_reason == "stop", (request_id, text)  # complete: ended by the grammar
        if kind == "named":
            jsonschema.validate(json.loads(text), CLOCK)
            continue
        content, calls = _calls(text)
        assert content == "" and calls and (kind == "required" or len(calls) == 1), text
        for name, arguments in calls:
            jsonschema.validate(arguments, SCHEMAS[name])
    assert any(outs[-1].finish_reason == "stop" and _text(outs).count("<tool_call>") > 1
               for request_id, outs in outputs.items() if request_id.startswith("required")), "no parallel calls"


ADDRESS = {"$defs": {"Address": {"type": "object", "properties": {
    "zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
    "next": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]}}, "required": ["zip", "next"],
    "additionalProperties": False}}, "type": "object", "properties": {"home": {"$ref": "#/$defs/Address"}},
    "required": ["home"], "additionalProperties": False}
TREE = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"},
                                                                              "maxItems": 2}},
        "required": ["v", "kids"], "additionalProperties": False}


def test_required_calls_keep_each_schemas_references(tokenizer, grammars):
    """Pydantic's schemas keep nested models in $defs: each function's move into the one call schema."""
    schemas = {"move": ADDRESS, "tree": TREE}
    grammar = ToolSetup(schemas, "required", parallel=False).grammar()
    called = set()
    for seed in range(8):
        text = _random_walk(grammars, tokenizer, grammar, seed, 400)
        if text is None:
            continue
        content, calls = _feed(ToolCallStream(schemas), [text])
        assert content == "" and len(calls) == 1
        jsonschema.validate(json.loads(calls[0].arguments), schemas[calls[0].name])
        called.add(calls[0].name)
    assert called == {"move", "tree"}


def test_a_forced_call_needs_a_compilable_schema(grammars):
    for setup in (ToolSetup({"f": {"type": "strin"}}, "required"), ToolSetup({"f": {"type": "strin"}}, "named", "f")):
        with pytest.raises(ValueError, match="invalid structured output"):
            grammars.matcher(setup.grammar())


def test_auto_with_a_response_format_calls_or_answers_in_the_format(tokenizer, grammars):
    """OpenAI's tools with a JSON response format: the model either calls (Hermes blocks) or answers with
    JSON following the format, nothing else; a forced call ignores the format."""
    answer = {"type": "object", "properties": {"verdict": {"enum": ["yes", "no"]}}, "required": ["verdict"],
              "additionalProperties": False}
    grammar = ToolSetup(SCHEMAS, "auto", parallel=False).grammar(answer)
    kinds = set()
    for seed in range(12):
        text = _random_walk(grammars, tokenizer, grammar, seed, 300)
        if text is None:
            continue
        content, calls = _feed(ToolCallStream(SCHEMAS, parallel=False), [text])
        if calls:
            assert content == "" and len(calls) == 1
            jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(content), answer)
            kinds.add("answer")
    assert kinds == {"call", "answer"}
    assert ToolSetup(SCHEMAS, "auto").grammar() is None
    assert ToolSetup(SCHEMAS, "required").grammar(answer) == ToolSetup(SCHEMAS, "required").grammar()


# --- other models' formats ------------------------------------------------------------------------------


QWEN3_CODER = ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
               "<parameter=unit>\nC\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=now>\n"
               "<parameter=zone>\n1\n</parameter>\n</function>\n</tool_call>\n")
DSV3 = ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris", "unit": "C"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n'
        '```json\n{"zone": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
DSV31 = ('Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "unit": "C"}'
         '<｜tool▁call▁end｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{"zone": 1}<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
KIMI = ('Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris", "unit": "C"}<|tool_call_end|><|tool_call_begin|>functions.now:1<|tool_call_argument_begin|>'
        '{"zone": 1}<|tool_call_end|><|tool_calls_section_end|>')
GLM = ("Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>unit"
       "</arg_key>\n<arg_value>C</arg_value>\n</tool_call>\n<tool_call>now\n<arg_key>zone</arg_key>\n<arg_value>1"
       "</arg_value>\n</tool_call>")
MIXTRAL = ('Let me check.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}, '
           '"id": "a1B2c3D4e"}, {"name": "now", "arguments": "{\\"zone\\": 1}"}]')  # arguments as a JSON string too
MISTRAL_V11 = 'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}[TOOL_CALLS]now[ARGS]{"zone": 1}'
MINIMAX = ('Let me check.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
           '<parameter name="unit">C</parameter>\n</invoke>\n<invoke name="now">\n<parameter name="zone">1</parameter>\n'
           '</invoke>\n</minimax:tool_call>')
GLM47 = ("Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>unit</arg_key>"
         "<arg_value>C</arg_value></tool_call><tool_call>now<arg_key>zone</arg_key><arg_value>1</arg_value></tool_call>")
FORMAT_TEXTS = {"hermes": MIXED, "minimax_m2": MINIMAX, "glm47": GLM47, "glm45.4.7": GLM47, "qwen3_coder": QWEN3_CODER, "deepseek_v3": DSV3, "deepseek_v3.1": DSV31,
                "kimi_k2": KIMI, "glm45": GLM, "mistral": MIXTRAL, "mistral_v11": MISTRAL_V11}


def _format_calls(fmt: str, pieces: list[str], parallel: bool = True) -> tuple[str, list[tuple[str, dict]]]:
    content, calls = _feed(ToolCallStream(SCHEMAS, parallel, fmt.split(".")[0]), pieces)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(sorted(FORMAT_TEXTS)), st.lists(st.floats(0, 1), max_size=10))
def test_every_format_gives_content_and_calls_in_any_chunking(fmt, fractions):
    text = FORMAT_TEXTS[fmt]
    cuts = sorted({0, len(text), *(int(f * len(text)) for f in fractions)})
    expected = ("Let me check.", [("get_weather", {"city": "Paris", "unit": "C"}), ("now", {"zone": 1})])
    assert _format_calls(fmt, [text]) == expected
    assert _format_calls(fmt, [text[a:b] for a, b in zip(cuts, cuts[1:])]) == expected
    assert _format_calls(fmt, [text], parallel=False) == (expected[0], expected[1][:1])


LLAMA_TEXTS = {  # a completion of Llama 3 or 4 with tools, and its (content, calls)
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}':
        ("", [("get_weather", {"city": "Paris", "unit": "C"})]),
    # Llama 4's template writes calls one after another; vLLM's streaming parser reads "; " between them; Llama
    # 3.1 may open with <|python_tag|>; "arguments" is read too
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}{"name": "now", "parameters": {"zone": 1}}':
        ("", [("get_weather", {"city": "Paris", "unit": "C"}), ("now", {"zone": 1})]),
    ' \n<|python_tag|>{"name": "now", "arguments": {"zone": 1}}; {"name": "now", "parameters": "{\\"zone\\": 2}"}':
        ("", [("now", {"zone": 1}), ("now", {"zone": 2})]),
    # not calls: text first (a call must open the completion), JSON that is not a call (a JSON answer), a call
    # with text after it, a function not offered, both keys, one cut off
    'It is {"name": "now", "parameters": {"zone": 1}}': ('It is {"name": "now", "parameters": {"zone": 1}}', []),
    ' {"city": "Paris"}': (' {"city": "Paris"}', []),
    '{"name": "now", "parameters": {"zone": 1}} and more': ('{"name": "now", "parameters": {"zone": 1}} and more', []),
    '{"name": "rm", "parameters": {}}': ('{"name": "rm", "parameters": {}}', []),
    '{"name": "now", "parameters": {}, "arguments": {}}': ('{"name": "now", "parameters": {}, "arguments": {}}', []),
    '<|python_tag|>{"name": "now", "parameters": {"zone"': ('<|python_tag|>{"name": "now", "parameters": {"zone"', []),
    "<|python": ("<|python", []),
    "  ": ("  ", []),
}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(LLAMA_TEXTS)), st.lists(st.floats(0, 1), max_size=10))
def test_llama_calls_are_the_whole_completion_in_any_chunking(text, fractions):
    """``llama3_json`` (vLLM's llama3_json and llama4_json): Llama's templates render a call as bare JSON, so the
    calls are the completion when it opens with one (after whitespace); otherwise it is all content. A review found
    no Llama format: ``auto`` took Hermes for Llama 4, whose calls then reached the client as content."""
    cuts = sorted({0, len(text), *(int(f * len(text)) for f in fractions)})
    for fmt in ("llama3_json", "llama4_json"):
        assert _format_calls(fmt, [text]) == LLAMA_TEXTS[text]
        assert _format_calls(fmt, [text[a:b] for a, b in zip(cuts, cuts[1:])] or [""]) == LLAMA_TEXTS[text]
    content, calls = LLAMA_TEXTS[text]
    assert _format_calls("llama3_json", [text], parallel=False) == (content, calls[:1])


@pytest.mark.parametrize("fmt, block", [
    ("qwen3_coder", "<tool_call>\n<function=rm>\n</function>\n</tool_call>"),  # not offered
    ("qwen3_coder", "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>"),  # Hermes, not XML
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{bad\n```"
                    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    ("deepseek_v3", "<｜tool▁calls▁begin｜>prose<｜tool▁calls▁end｜>"),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{}<｜tool▁call▁end｜>"),  # unterminated
    ("kimi_k2", "<|tool_calls_section_begin|><|tool_call_begin|>get_weather<|tool_call_argument_begin|>{}"
                "<|tool_call_end|><|tool_calls_section_end|>"),  # no functions.NAME:INDEX
    ("glm45", "<tool_call>now\n<arg_key>zone</arg_key>\n</tool_call>"),  # a key without its value
    ("minimax_m2", '<minimax:tool_call>\n<invoke name="now">\nzone=1\n</invoke>\n</minimax:tool_call>'),  # untagged
    ("minimax_m2", '<minimax:tool_call>\n{"name": "now", "arguments": {}}\n</minimax:tool_call>'),  # Hermes'
    ("mistral", '[TOOL_CALLS] [{"name": "rm", "arguments": {}}]'),  # not offered
    ("mistral", "[TOOL_CALLS] [not a call] and more"),
    ("mistral_v11", '[TOOL_CALLS]now[ARGS]{"zone": 1'),  # cut off
])
def test_blocks_that_are_not_calls_stay_content_in_every_format(fmt, block):
    assert _format_calls(fmt, ["Hi " + block]) == ("Hi " + block, [])


@pytest.mark.timeout(60)  # (a bound on the work, not a measurement: each of these takes milliseconds now)
@pytest.mark.parametrize("fmt, block", [
    ("glm45", "<tool_call>f" + " " * 32_000 + "x</tool_call>"),
    ("glm45", "<tool_call>f" + "<arg_key>a</arg_key><arg_value>" * 2000 + "</tool_call>"),
    ("deepseek_v3", "<｜tool▁calls▁begin｜>" + "<｜tool▁call▁begin｜>" * 8000 + "<｜tool▁calls▁end｜>"),
    ("kimi_k2", "<|tool_calls_section_begin|>" + "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>" * 4000
     + "<|tool_calls_section_end|>"),
    ("qwen3_coder", "<tool_call><function=f>" + "<parameter=a>" * 6000 + "</function></tool_call>"),
    ("minimax_m2", '<minimax:tool_call><invoke name="f">' + '<parameter name="a">' * 6000
     + "</invoke></minimax:tool_call>"),
])
def test_unclosed_tags_a_model_repeats_are_read_in_one_pass(fmt, block):
    """The parsers' regular expressions backtracked over every opening tag to the end of the text, holding the GIL:
    2,000 GLM argument tags without their closing ones (31 KB) took 83 s, 2,000 spaces in a name 15 s, and each format
    had such a text (an adversarial review). They are read in one pass now: the block stays content, at once."""
    assert _format_calls(fmt, ["Hi " + block]) == ("Hi " + block, [])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["<function=", "f", "a", ">", "\n", " ", "</function>", "<parameter=",
                                 "</parameter>", "1", "<"]), max_size=16))
def test_qwen3_coder_blocks_read_in_one_pass_as_the_tags_say(pieces):
    """Any text of Qwen3-Coder's pieces: read as calls exactly when it is functions and whitespace, each function's
    parameters found anywhere in it, a value less one newline at each end (what the regular expressions read)."""
    from service.tools import _qwen3_coder_parse

    text = "".join(pieces)
    calls = _qwen3_coder_parse(text, {"f": {"type": "object", "properties": {"a": {"type": "string"}}}})
    functions = re.findall(r"<function=([^>\n]+)>(.*?)</function>", text, re.DOTALL)
    whole = bool(functions) and not re.sub(r"<function=([^>\n]+)>(.*?)</function>", "", text, flags=re.DOTALL).strip()
    assert (calls is not None) == whole
    if whole:
        parameters = [re.findall(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", body, re.DOTALL)
                      for _, body in functions]
        assert [name for name, _ in calls] == [name.strip() for name, _ in functions]
        assert [list(arguments) for _, arguments in calls] == [list(dict((k.strip(), v) for k, v in found))
                                                              for found in parameters]


_DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError


@pytest.mark.parametrize("fmt, block", [
    ("hermes", f"<tool_call>\n{_DEEP}\n</tool_call>"),
    ("hermes", f'<tool_call>\n{{"name": "now", "arguments": {{"zone": {_DEEP}}}}}\n</tool_call>'),
    ("deepseek_v3", f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{_DEEP}<｜tool▁call▁end｜>"
                    "<｜tool▁calls▁end｜>"),
    ("kimi_k2", f"<|tool_calls_section_begin|><|tool_call_begin|>functions.now:0<|tool_call_argument_begin|>{_DEEP}"
                "<|tool_call_end|><|tool_calls_section_end|>"),
    ("mistral", f"[TOOL_CALLS] {_DEEP}"),
    ("mistral_v11", f'[TOOL_CALLS]now[ARGS]{{"zone": {_DEEP}}}'),
])
def test_json_too_deep_to_parse_is_not_a_call(fmt, block):
    """The model's JSON nested past Python's recursion limit (a random model can write ``[`` 1,100 times) is not a
    call: json.loads raised RecursionError, which ended the stream with no error event and no ``[DONE]``."""
    assert _format_calls(fmt, ["Hi " + block]) == ("Hi " + block, [])


def test_a_tagged_text_parameters_value_too_deep_to_parse_stays_text():
    text = f"<tool_call>\n<function=now>\n<parameter=zone>\n{_DEEP}\n</parameter>\n</function>\n</tool_call>"
    assert _format_calls("qwen3_coder", [text]) == ("", [("now", {"zone": _DEEP})])


BOOLEAN_SCHEMAS = {"f": {"type": "object", "properties": {"any": True, "never": False, "n": {"type": "integer"}},
                         "required": ["any"]}}


@pytest.mark.parametrize("fmt", ["qwen3_coder", "glm45", "glm47", "minimax_m2"])
def test_boolean_parameter_schemas_in_the_tagged_text_formats(tokenizer, grammars, fmt):
    """JSON Schema's boolean schemas (``true``: any value, ``false``: none) were 500s in the tagged-text formats,
    whose grammar and parser read every parameter's schema as an object: a ``true`` parameter takes any JSON
    value, a ``false`` one is left out of the grammar (a 400 if it is required, `test_openai_api`)."""
    grammar = ToolSetup(BOOLEAN_SCHEMAS, "required", parallel=False, format=fmt).grammar()
    assert "any" in grammar and "never" not in grammar
    written = 0
    for seed in range(6):
        text = _random_walk(grammars, tokenizer, grammar, seed, 300)
        if text is None:
            continue
        content, calls = _feed(ToolCallStream(BOOLEAN_SCHEMAS, False, fmt), [text])
        assert content == "" and len(calls) == 1, text
        arguments = json.loads(calls[0].arguments)
        assert "any" in arguments and "never" not in arguments and set(arguments) <= {"any", "n"}
        written += 1
    assert written
    # the parser takes any shape of schema (with tool_choice auto no grammar checks it)
    block = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>"
    for properties in ({"a": True}, {"a": False}, [1], None):
        stream = ToolCallStream({"f": {"type": "object", "properties": properties}}, fmt="qwen3_coder")
        assert [(call.name, json.loads(call.arguments)) for call in stream.push(block, final=True)[1]] == [
            ("f", {"a": 1})]


def test_qwen3_coder_values_take_their_schemas_types():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"},
                                               "ok": {"type": "boolean"}, "s": {"type": "string"},
                                               "tags": {"type": "array"}, "o": {"type": "object"}}}
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in [
        ("n", "3"), ("x", "2.5"), ("ok", "True"), ("s", "42"), ("tags", '["a", "b"]'), ("o", '{"k": 1}'),
        ("other", "free text"), ("bad", "[unclosed")])
    (call,) = _feed(ToolCallStream({"f": schema}, fmt="qwen3_coder"),
                    [f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>"])[1]
    assert json.loads(call.arguments) == {"n": 3, "x": 2.5, "ok": True, "s": "42", "tags": ["a", "b"], "o": {"k": 1},
                                          "other": "free text", "bad": "[unclosed"}


def test_a_qwen3_coder_block_with_two_functions_is_two_calls():
    """One match ran across both functions: one call, to the first function with the second's arguments (a review;
    vLLM's parser reads every function of a block)."""
    functions = {"read_file": {"type": "object", "properties": {"path": {"type": "string"}}},
                 "delete_file": {"type": "object", "properties": {"path": {"type": "string"},
                                                                  "force": {"type": "boolean"}}}}
    text = ("<tool_call>\n<function=read_file>\n<parameter=path>\nnotes.txt\n</parameter>\n</function>\n"
            "<function=delete_file>\n<parameter=path>\n/tmp/x\n</parameter>\n<parameter=force>\ntrue\n"
            "</parameter>\n</function>\n</tool_call>")
    content, calls = _feed(ToolCallStream(functions, fmt="qwen3_coder"), [text])
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("read_file", {"path": "notes.txt"}), ("delete_file", {"path": "/tmp/x", "force": True})]
    assert _feed(ToolCallStream(functions, fmt="qwen3_coder"), [text.replace("</function>\n<function", "</function>"
                                                                             "\nhm<function")])[1] == []


# strings only, or null too: Pydantic's Optional[str], a type list, an enum, a const (their text is the string)
TEXT_VALUED = {"type": "object", "properties": {
    "zip": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}, "version": {"type": ["string", "null"]},
    "op": {"type": "string", "enum": ["<", "<=", "=="]}, "unit": {"const": "celsius"}, "n": {"type": "integer"},
    "any": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}, "required": ["zip", "op", "unit"]}
TAGGED = {"qwen3_coder": ("<tool_call>\n<function=f>\n", "<parameter={}>\n{}\n</parameter>\n", "</function>\n</tool_call>"),
          "glm45": ("<tool_call>f\n", "<arg_key>{}</arg_key>\n<arg_value>{}</arg_value>\n", "</tool_call>"),
          "minimax_m2": ('<minimax:tool_call>\n<invoke name="f">\n', '<parameter name="{}">{}</parameter>\n',
                         "</invoke>\n</minimax:tool_call>")}


def _tagged(fmt: str, values: dict[str, str]) -> str:
    head, parameter, tail = TAGGED[fmt]
    return head + "".join(parameter.format(k, v) for k, v in values.items()) + tail


@pytest.mark.parametrize("fmt", sorted(TAGGED))
def test_a_tagged_text_value_is_the_string_where_the_schema_allows_strings_only(fmt):
    """The templates write a string bare and anything else as JSON; the parsers read a value as JSON unless the
    schema said exactly "type": "string", so Optional[str]'s "94103" was 94103 and "3.10" 3.1 (a review)."""
    values = {"zip": "94103", "version": "3.10", "op": "<=", "unit": "celsius", "n": "7", "any": "12"}
    (call,) = _feed(ToolCallStream({"f": TEXT_VALUED}, fmt=fmt), [_tagged(fmt, values)])[1]
    assert json.loads(call.arguments) == {**values, "n": 7, "any": 12}
    (call,) = _feed(ToolCallStream({"f": TEXT_VALUED}, fmt=fmt), [_tagged(fmt, {"zip": "null", "version": "null",
                                                                                 "op": "<", "unit": "celsius"})])[1]
    assert json.loads(call.arguments) == {"zip": None, "version": None, "op": "<", "unit": "celsius"}


@pytest.mark.parametrize("fmt", sorted(TAGGED))
def test_a_forced_call_writes_such_strings_bare_as_the_parser_reads_them(grammars, tokenizer, fmt):
    """A string const, or an enum with "<", was forced as JSON, quotes and all, which the parser (a string's text is
    the string) kept: {"op": "\"<=\""} (a review). Now bare, as the template writes them."""
    grammar = ToolSetup({"f": TEXT_VALUED}, "required", parallel=False, format=fmt).grammar()

    def accepts(text: str) -> bool:
        matcher = grammars.matcher(grammar)
        return all(matcher.consume_token(t) for t in tokenizer.encode(text)) and matcher.is_accepting()

    assert accepts(_tagged(fmt, {"zip": "94103", "op": "<=", "unit": "celsius"}))
    assert accepts(_tagged(fmt, {"zip": "null", "version": "3.10", "op": "<", "unit": "celsius", "n": "7"}))
    assert not accepts(_tagged(fmt, {"zip": "94103", "op": '"<="', "unit": "celsius"}))
    assert not accepts(_tagged(fmt, {"zip": "94103", "op": "<=", "unit": '"celsius"'}))


CODE = {"type": "object", "properties": {"path": {"type": "string"}, "code": {"type": "string"}},
        "required": ["path", "code"], "additionalProperties": False}


@pytest.mark.parametrize("fmt", sorted(TAGGED))
def test_a_forced_calls_bare_string_may_be_code_lines_and_tags_too(grammars, tokenizer, fmt):
    """A forced call's bare string was one line without "<": Qwen3-Coder forced to write a file wrote one line of it
    (a review). Any text now, up to its closing tag, which it cannot hold, nor one that ends the call or its block:
    the parser reads the value back whole."""
    grammar = ToolSetup({"f": CODE}, "required", parallel=False, format=fmt).grammar()

    def accepts(values: dict) -> bool:
        matcher = grammars.matcher(grammar)
        return all(matcher.consume_token(t) for t in tokenizer.encode(_tagged(fmt, values))) and matcher.is_accepting()

    code = "def f(a, b):\n    if a < b:\n        return '<p>'\n\n    return b"  # (MiniMax's parser strips newlines at
    # a value's ends)
    assert accepts({"path": "f.py", "code": code}) and accepts({"path": "", "code": "<"})
    (call,) = _feed(ToolCallStream({"f": CODE}, fmt=fmt), [_tagged(fmt, {"path": "f.py", "code": code})])[1]
    assert json.loads(call.arguments) == {"path": "f.py", "code": code}
    ends = {"qwen3_coder": ("</parameter>", "</function>", "</tool_call>"), "glm45": ("</arg_value>", "</tool_call>"),
            "minimax_m2": ("</parameter>", "</invoke>", "</minimax:tool_call>")}[fmt]
    for inside in ends:
        assert not accepts({"path": "f.py", "code": f"a {inside} b"}), inside


PATTERNED = {"type": "object", "properties": {
    "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},  # anchored
    "path": {"type": "string", "pattern": "/tmp/", "maxLength": 12},  # a search: anywhere in the value, with its slash
    "code": {"type": ["string", "null"], "pattern": "^(?:AB|CD)[0-9]$"},  # alternation inside a group
    "tag": {"type": "string", "pattern": "^x|y$", "maxLength": 6}},  # alternatives, each anchored at one end
# (bounded: a random walk could write on for good where only its last character can meet the pattern)
    "required": ["date", "path", "code", "tag"], "additionalProperties": False}


@pytest.mark.parametrize("fmt", sorted(TAGGED))
def test_a_forced_calls_bare_strings_follow_their_patterns(grammars, tokenizer, fmt):
    """A string parameter's ``pattern`` (JSON Schema's: a search unless anchored) holds in the tagged-text formats'
    forced calls, as in the JSON formats' (llguidance's JSON schemas): it was left out, so a forced date could be
    any line (a review)."""
    grammar = ToolSetup({"f": PATTERNED}, "required", parallel=False, format=fmt).grammar()

    def accepts(values: dict) -> bool:
        matcher = grammars.matcher(grammar)
        return all(matcher.consume_token(t) for t in tokenizer.encode(_tagged(fmt, values))) and matcher.is_accepting()

    good = {"date": "2026-12-02", "path": "a/tmp/b", "code": "CD7", "tag": "x1"}
    assert accepts(good) and accepts({**good, "path": "/tmp/"}) and accepts({**good, "code": "null"})  # (None)
    assert accepts({**good, "tag": "1y"}) and accepts({**good, "tag": "xy"})
    for key, bad in [("date", "2026-12-2"), ("date", "x2026-12-02"), ("path", "/var/"), ("path", "/home/xy/tmp/"),
                     ("code", "CD77"), ("code", "AD7"), ("code", "nul"), ("tag", "1x"), ("tag", "y1")]:
        assert not accepts({**good, key: bad}), (key, bad)
    walked = 0
    for seed in range(6):
        text = _random_walk(grammars, tokenizer, grammar, seed, 400, ends=TEXT_ENDS.get(fmt, ("\n", "<")))
        if text is None:
            continue
        walked += 1
        (call,) = _feed(ToolCallStream({"f": PATTERNED}, False, fmt), [text])[1]
        jsonschema.validate(json.loads(call.arguments), PATTERNED)
    assert walked


@pytest.mark.parametrize("pattern", ["(?<=a)b", "a(^b)"])
def test_a_pattern_the_grammar_cannot_hold_is_a_400_not_ignored(grammars, pattern):
    grammar = ToolSetup({"f": {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}}},
                        "required", format="qwen3_coder").grammar()
    with pytest.raises(ValueError, match="invalid structured output"):
        grammars.matcher(grammar)


CODER_SCHEMAS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}, "days": {"type": "integer", "minimum": 1},
        "hourly": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["rain", "sun"]}, "maxItems": 2}},
        "required": ["city", "unit"], "additionalProperties": False},
    "now": CLOCK}


@pytest.mark.parametrize("fmt, schemas", [("qwen3_coder", CODER_SCHEMAS), ("deepseek_v3", SCHEMAS),
                                          ("kimi_k2", SCHEMAS), ("glm45", CODER_SCHEMAS), ("glm47", CODER_SCHEMAS),
                                          ("minimax_m2", CODER_SCHEMAS),
                                          ("mistral", SCHEMAS),
                                          ("mistral_v11", SCHEMAS), ("llama3_json", SCHEMAS)])
def test_forced_calls_in_other_formats_parse_and_follow_the_schemas(tokenizer, grammars, fmt, schemas):
    """``required`` in the model's own format: random logits through the grammar give calls that the
    format's parser reads, valid against their schemas, single and parallel."""
    called, parallel_seen = set(), False
    for parallel in (False, True):
        grammar = ToolSetup(schemas, "required", parallel=parallel, format=fmt).grammar()
        for seed in range(8):
            # free strings end at a newline (Qwen3-Coder) or a tag (GLM-4.5)
            # (Mistral's later form ends its calls with the end of text: made likely, it would end every walk
            # after one call)
            text = _random_walk(grammars, tokenizer, grammar, seed + 100 * parallel, 500, ends=TEXT_ENDS.get(fmt, ("\n", "<")),
                                eos_bonus=0.0 if fmt in ("mistral_v11", "llama3_json") else 3.0)
            if text is None:
                continue
            content, calls = _feed(ToolCallStream(schemas, parallel, fmt), [text])
            assert content == "" and calls and (parallel or len(calls) == 1), text
            for call in calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
                called.add(call.name)
            parallel_seen |= len(calls) > 1
    assert called == set(schemas) and parallel_seen


# --- the chat format -----------------------------------------------------------------------------------


def _outputs(pieces: list[str], reason: str) -> list[StepOutput]:
    return [StepOutput("r", (i,), piece, i == len(pieces) - 1, reason if i == len(pieces) - 1 else None, 5, i + 1)
            for i, piece in enumerate(pieces)]


@pytest.mark.parametrize("reason, expected", [("stop", "tool_calls"), ("length", "length")])
def test_chat_format_splits_calls_from_content_in_responses_and_chunks(reason, expected):
    from service.app import _Choice

    pieces = [MIXED[i:i + 7] for i in range(0, len(MIXED), 7)]
    outs = _outputs(pieces, reason)
    response = _ChatFormat(MODEL, tools=ToolSetup(SCHEMAS, "auto")).response([_Choice(outs)])
    message = response.choices[0].message
    assert (message.content, response.choices[0].finish_reason) == ("Let me check.", expected)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == _calls(MIXED)[1]
    stream_format = _ChatFormat(MODEL, tools=ToolSetup(SCHEMAS, "auto"))
    chunks = [chunk.model_dump(mode="json") for out in outs for chunk in stream_format.chunks(0, out)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d["content"] or "" for d in deltas) == "Let me check."
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], c["id"] == m.id) for c, m in zip(calls, message.tool_calls)] == [
        (0, "get_weather", False), (1, "now", False)]  # fresh ids per format, each call announced once, whole
    assert chunks[-1]["choices"][0]["finish_reason"] == expected
    plain = _ChatFormat(MODEL).response([_Choice(outs)])
    assert plain.choices[0].message.content == MIXED and "tool_calls" not in plain.model_dump(mode="json")["choices"][0]


# --- over HTTP -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tokenizer):
    with served(_start_engine(tokenizer, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, **kwargs):
    return client.chat.completions.create(**{"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 200,
                                             "temperature": 0, **kwargs})


def _streamed(client, **kwargs) -> tuple[str | None, list[tuple[str, str]], str]:
    """Content, calls (name, arguments) and finish reason of a streamed request, assembled from deltas."""
    content, calls, finish = [], {}, None
    for chunk in _chat(client, stream=True, **kwargs):
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        for delta in choice.delta.tool_calls or ():
            name, arguments = calls.get(delta.index, (None, ""))
            calls[delta.index] = (delta.function.name or name, arguments + (delta.function.arguments or ""))
        finish = choice.finish_reason or finish
    return "".join(content) or None, [calls[i] for i in sorted(calls)], finish


def test_required_calls_over_http_streamed_and_not(client):
    reply = _chat(client, tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    for (name, arguments), call in zip(calls, choice.message.tool_calls):
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        assert call.id.startswith("call_") and call.type == "function"
    assert _streamed(client, tool_choice="required", parallel_tool_calls=False) == (None, calls, "tool_calls")
    several = _chat(client, tool_choice="required", n=3, temperature=1.0, seed=7, parallel_tool_calls=False)
    assert [len(c.message.tool_calls) for c in several.choices] == [1, 1, 1]
    assert all(c.finish_reason == "tool_calls" for c in several.choices)


def test_a_named_call_over_http_streams_its_arguments(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = _chat(client, tool_choice=choice).choices[0]
    (call,) = reply.message.tool_calls
    assert reply.finish_reason == "stop" and reply.message.content is None and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert _streamed(client, tool_choice=choice) == (None, [("get_weather", call.function.arguments)], "stop")


def test_auto_passes_text_through_when_the_model_calls_nothing(client, server):
    tokens = httpx.post(f"{server}/tokenize", json={"messages": ASK, "tools": TOOLS}).json()["tokens"]
    plain = client.completions.create(model=MODEL, prompt=tokens, max_tokens=40, temperature=0).choices[0]
    reply = _chat(client, max_tokens=40).choices[0]  # tool_choice defaults to auto with tools
    assert "<tool_call>" not in plain.text  # the random model writes no call of its own accord
    assert (reply.message.content, reply.message.tool_calls, reply.finish_reason) == (plain.text, None,
                                                                                     plain.finish_reason)


def test_a_conversation_sends_calls_and_results_back(client, server):
    response = _chat(client, tool_choice="required", parallel_tool_calls=False)
    first, first_usage = response.choices[0].message, response.usage
    history = [*ASK, first, {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "22 C, sunny"}]
    reply = _chat(client, messages=history, max_tokens=5)
    sent = [*ASK, first.model_dump(), history[-1]]  # every field of the response message, nulls too
    tokenized = httpx.post(f"{server}/tokenize", json={"messages": sent, "tools": TOOLS}).json()
    assert reply.usage.prompt_tokens == tokenized["count"]
    rendered = httpx.post(f"{server}/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    call = first.tool_calls[0].function
    arguments = json.dumps(json.loads(call.arguments), ensure_ascii=False)  # the template renders the dict
    assert f'<tool_call>\n{{"name": "{call.name}", "arguments": {arguments}}}\n</tool_call>' in rendered
    assert "<tool_response>\n22 C, sunny\n</tool_response>" in rendered
    # the first turn's prompt and the start of its call come from the prefix cache: the template renders the
    # call's text as it was generated (the random model's forced tokens are not always BPE's own, so the
    # re-tokenised call parts from them somewhere)
    assert reply.usage.prompt_tokens_details.cached_tokens > first_usage.prompt_tokens


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt(client):
    without = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0)
    assert _chat(client, tool_choice="none", max_tokens=3).usage.prompt_tokens == without.usage.prompt_tokens
    assert _chat(client, max_tokens=3).usage.prompt_tokens > without.usage.prompt_tokens + 100


@pytest.mark.parametrize("fmt", ["qwen3_coder", "deepseek_v3", "kimi_k2", "glm45", "glm47", "minimax_m2", "llama3_json"])
def test_the_servers_tool_call_parser_reads_and_forces_its_format(tokenizer, fmt):
    engine = _start_engine(tokenizer, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512)
    with served(engine, tool_call_parser=fmt) as url:
        _forced_calls_are_valid(openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120))


def _forced_calls_are_valid(client):
    """A required single call, plain, streamed and through the Responses API, follows its schema; returns
    the plain reply's message and the Responses API's call item. (Valid calls, not equal ones: a repeated
    prompt comes from the prefix cache, whose logits differ in the last bits, and the random model's
    near-ties can then break the other way.)"""
    # (a free string can run to max_tokens with a random model: the city's is bounded)
    reply = _chat(client, tool_choice="required", parallel_tool_calls=False).choices[0]
    (call,) = reply.message.tool_calls
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    content, calls, finish = _streamed(client, tool_choice="required", parallel_tool_calls=False)
    assert content is None and len(calls) == 1 and finish == "tool_calls"
    jsonschema.validate(json.loads(calls[0][1]), SCHEMAS[calls[0][0]])
    response = client.responses.create(model=MODEL, input=ASK[0]["content"], max_output_tokens=200, temperature=0,
                                       tools=[{"type": "function", "name": t["function"]["name"],
                                               "parameters": t["function"]["parameters"]} for t in TOOLS],
                                       tool_choice="required", parallel_tool_calls=False)
    (item,) = response.output
    assert item.type == "function_call" and response.status == "completed"
    jsonschema.validate(json.loads(item.arguments), SCHEMAS[item.name])
    return reply.message, item


def test_auto_takes_the_format_the_chat_template_renders_calls_in(tokenizer):
    from deploy.build_default_model import CHAT_TEMPLATE as DEFAULT_TEMPLATE
    from service.tools import detect_format

    templates = {  # the lines of each family's template that render a call
        "deepseek_v3": "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']}}",
        "kimi_k2": "<|tool_calls_section_begin|>{%- for tc in message.tool_calls %}<|tool_call_begin|>{{ tc.id }}",
        "glm45": "<tool_call>{{ tc.name }}\n{% for k, v in tc.arguments.items() %}<arg_key>{{ k }}</arg_key>",
        "qwen3_coder": "<tool_call>\n<function={{ tool_call.name }}>\n<parameter={{ args_name }}>\n",
        "glm47": "<tool_call>{{ tc.name }}{% for k, v in tc.arguments.items() %}<arg_key>{{ k }}</arg_key><arg_value>",
        "minimax_m2": '<minimax:tool_call>\n{%- for tc in message.tool_calls %}<invoke name="{{ tc.name }}">',
        "mistral": MISTRAL_TEMPLATE,
        "mistral_v11": "{{- '[TOOL_CALLS]' + tool.function.name + '[ARGS]' + arguments }}",
        "hermes": DEFAULT_TEMPLATE,
        # Llama 3.1's (Llama 4's differs around it)
        "llama3_json": "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}"
                       "{{- tool_call.arguments | tojson }}",
    }
    assert {name: detect_format(template) for name, template in templates.items()} == {n: n for n in templates}
    assert detect_format(None) == detect_format("{{ messages }}") == "hermes"  # no tools: the default
    assert detect_format({"default": "x", "tool_use": templates["glm45"]}) == "glm45"
    # (every served app in these tests runs with auto: the test template is Hermes')


def test_the_deploy_arguments_name_every_tool_call_parser():
    from typing import get_args

    from deploy.app import AppArgs
    from service.tools import FORMATS

    assert set(get_args(AppArgs.model_fields["tool_call_parser"].annotation)) == {"auto", *FORMATS}


def test_an_unknown_tool_call_parser_is_refused(tokenizer):
    class _Engine:
        pass

    _Engine.tokenizer = tokenizer
    with pytest.raises(ValueError, match="unknown tool call parser"):
        create_app(_Engine(), served_model_name=MODEL, tool_call_parser="pythonic")


@pytest.mark.parametrize("body, param, message", [
    ({"tool_choice": {"type": "function", "function": {"name": "rm"}}}, "tool_choice", "not in tools"),
    ({"tools": TOOLS * 2}, "tools", "unique"),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "tools", "cannot be combined"),
    ({"tool_choice": "required", "min_tokens": 3}, "min_tokens", "forced tool call"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools", "invalid structured output"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$defs": None}}}],
      "tool_choice": "required"}, "tools", "$defs must be an object"),  # (a 500: the call grammar hoists $defs)
    ({"messages": [{"role": "tool", "content": "22 C"}]}, "messages.0", "tool_call_id"),
])
def test_bad_tool_requests_are_400s_naming_the_problem(server, body, param, message):
    response = httpx.post(f"{server}/v1/chat/completions",
                          json={"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 5, **body})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and message in error["message"], error


# --- Mistral: tags that are special tokens, nine-character call ids ----------------------------------------

# Mixtral-8x22B's way of rendering calls and results (its template refuses call ids that are not nine long)
_NINE = "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS] {{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}[INST] {{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS] ["
    "{%- for tc in m.tool_calls %}{%- if tc.id|length != 9 %}" + _NINE + "{%- endif %}"
    "{{ (tc.function|tojson)[:-1] }}, \"id\": \"{{ tc.id }}\"}{{ ', ' if not loop.last }}{%- endfor %}]{{ eos_token }}"
    "{%- elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}"
    "{%- elif m.role == 'tool' %}{%- if m.tool_call_id|length != 9 %}" + _NINE + "{%- endif %}"
    "[TOOL_RESULTS] {\"content\": {{ m.content|tojson }}, \"call_id\": \"{{ m.tool_call_id }}\"}[/TOOL_RESULTS]"
    "{%- endif %}{%- endfor %}")


@pytest.fixture(scope="module")
def mistral_tokenizer():
    """The test tokenizer with Mistral's control tokens as special tokens (as Mixtral's has them)."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]", "[ARGS]", "[CALL_ID]"]})
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def test_tags_that_are_special_tokens_are_forced_by_id_and_kept_in_the_text(mistral_tokenizer, tokenizer):
    """A special token matches no text literal in a grammar and decodes to nothing by default: the grammar
    names Mistral's tags by id, and the completion's text keeps them, so its calls parse."""
    from service.structured import Grammars
    from service.tools import special_tags

    special = special_tags("mistral", mistral_tokenizer)
    assert set(special) == {"[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"}
    assert special_tags("mistral", tokenizer) == {} and special_tags("hermes", mistral_tokenizer) == {}
    grammars = Grammars(mistral_tokenizer, len(mistral_tokenizer), [mistral_tokenizer.eos_token_id])
    for fmt in ("mistral", "mistral_v11"):
        grammar = ToolSetup(SCHEMAS, "required", format=fmt, special=special).grammar()
        assert f"<[{special['[TOOL_CALLS]']}]>" in grammar
        walked = 0
        for seed in range(6):
            text = _random_walk(grammars, mistral_tokenizer, grammar, seed, 400, skip_special_tokens=False,
                                eos_bonus=0.0 if fmt == "mistral_v11" else 3.0)
            if text is None:
                continue
            walked += 1
            content, calls = _feed(ToolCallStream(SCHEMAS, True, fmt), [text])
            assert content == "" and calls, text
            for call in calls:
                jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
                assert len(call.id) == 9 and call.id.isalnum()  # as Mistral's templates want them
            # decoded the default way, the tag is gone and so are the calls
            dropped = text.replace("[TOOL_CALLS]", "").replace("[ARGS]", "")
            assert _feed(ToolCallStream(SCHEMAS, True, fmt), [dropped])[1] == []
        assert walked >= 3, fmt


def test_call_ids_are_rendered_as_mistrals_templates_want_them():
    from service.openai_api import ChatCompletionRequest

    call = {"id": "call_0123456789abcdef01234567", "type": "function",
            "function": {"name": "now", "arguments": '{"zone": 1}'}}
    messages = [*ASK, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "noon"},
                {"role": "assistant", "tool_calls": [{**call, "id": "a1B2c3D4e"}]},
                {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "noon"}]
    request = ChatCompletionRequest(model=MODEL, messages=messages, tools=TOOLS)
    mistral = ChatCompletionRequest(model=MODEL, messages=messages, tools=TOOLS).use_tool_format("mistral")
    assert request.template_messages()[1]["tool_calls"][0]["id"] == call["id"]  # other formats: as sent
    rendered = mistral.template_messages()
    first, second = rendered[1]["tool_calls"][0]["id"], rendered[3]["tool_calls"][0]["id"]
    assert len(first) == 9 and first.isalnum() and rendered[2]["tool_call_id"] == first  # the call and its result
    assert second == rendered[4]["tool_call_id"] == "a1B2c3D4e"  # already Mistral's: kept


def test_a_mistral_model_calls_and_gets_its_results_over_http(mistral_tokenizer):
    """Served with a Mixtral-style template and tokenizer (the format taken from the template): forced calls
    in Mixtral's form, streamed and not and through the Responses API, with nine-character ids; the call
    and its result sent back render (the template refuses other ids), billed as /tokenize bills them."""
    engine = _start_engine(mistral_tokenizer, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512)
    with served(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        message, item = _forced_calls_are_valid(client)
        (call,) = message.tool_calls
        assert len(call.id) == 9 and call.id.isalnum() and len(item.call_id) == 9
        # the next turn, with this server's id and with another client's
        for call_id in (call.id, "call_from_elsewhere"):
            sent = {**message.model_dump(), "tool_calls": [{**call.model_dump(), "id": call_id}]}
            history = [*ASK, sent, {"role": "tool", "tool_call_id": call_id, "content": "22 C, sunny"}]
            answer = _chat(client, messages=history, max_tokens=3)
            tokenized = httpx.post(f"{url}/tokenize", json={"messages": history, "tools": TOOLS}).json()
            assert answer.usage.prompt_tokens == tokenized["count"]
            rendered = httpx.post(f"{url}/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
            # the call and its result name one id of nine letters and digits: this server's as it is
            (rendered_id,) = re.findall(r'"id": "([^"]*)"', rendered)
            assert re.findall(r'"call_id": "([^"]*)"', rendered) == [rendered_id]
            assert len(rendered_id) == 9 and rendered_id.isalnum() and (rendered_id == call_id) == (call_id == call.id)
        # vLLM's skip_special_tokens on any request: special tokens in the text, or not (the default)
        inst = mistral_tokenizer.convert_tokens_to_ids("[INST]")
        texts = [client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0,
                                           extra_body={"logit_bias": {str(inst): 100}, **extra}).choices[0].text
                 for extra in ({}, {"skip_special_tokens": False})]
        assert texts == ["", "[INST][INST]"]
