"""Tool calling: what a chat completion may call, the grammar that forces a call, and the calls in the
model's text.

Owns the request's tool setup (`ToolSetup`: the functions offered and ``tool_choice``), the grammar of a
forced call (``required``: one or more calls in the model's format; a named function: its arguments
alone, as vLLM does), and `ToolCallStream`, which splits a completion's text, as it streams, into
content and tool calls. The formats (`FORMATS`, vLLM's parser names) are the Hermes format that Qwen2.5
and Qwen3 (and this repo's default model's chat template) are trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Qwen3-Coder's (``qwen3_coder``: parameters as XML, their values as text converted by the schema's types)::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

and DeepSeek-V3's (``deepseek_v3``: every call in one section; V3.1's form, without ``function`` and the
fenced JSON, is read too)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Kimi-K2's (``kimi_k2``)::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>
    {"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

GLM-4.5's (``glm45``: values as Qwen3-Coder's)::

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    </tool_call>

GLM-4.7's (``glm47``) is GLM-4.5's without the newlines (each reads both). MiniMax-M2's (``minimax_m2``:
values as Qwen3-Coder's)::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    </invoke>
    </minimax:tool_call>

and Mixtral's (``mistral``: to the end of the completion; ids of nine letters and digits, which Mistral's
templates require) and later Mistral models' (``mistral_v11``), each reading both::

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}

and GPT-OSS's harmony (``openai``: reasoning, answer and calls in one format, read by
`service.harmony.HarmonyStream`; a forced call, named too, is written whole, after an optional analysis
message)::

    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>

and Llama's (``llama3_json``, Llama 3.1 to 4: the calls are the whole completion, which opens with them,
one after another or separated by ``;``)::

    {"name": "get_weather", "parameters": {"city": "Paris"}}

A tag that is a special token of the served tokenizer (`special_tags`) is forced by its id, which is how
llguidance matches special tokens.

A block that does not parse as calls of offered functions stays content, as does an unterminated one.
Ignores HTTP and the response schemas (`service.openai_api` builds them from `ToolCall`s) and the chat
template (the model's own renders the tools).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service import harmony
from service.structured import JSON_DEFAULTS, check_properties
from service.text import partial_tag

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# Forced calls are written as chat templates render calls (Jinja's tojson is json.dumps: ", " and ": "):
# what Hermes-trained models saw, and a conversation's next turn re-renders the call token for token (the
# prefix cache covers it). No free whitespace, which a weak model could emit until max_tokens.
CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    @staticmethod
    def new(name: str, arguments: str, make_id: Callable[[], str] | None = None) -> ToolCall:
        """A call with a fresh id: OpenAI's form (``call_`` and 24 hex digits) unless ``make_id`` gives one."""
        return ToolCall(name, arguments, make_id() if make_id is not None else f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ToolSetup:
    """What one request lets the model call.

    Attributes:
        parameters: function name -> its parameters' JSON schema, in the order offered.
        choice: "auto" (the model decides), "required" (at least one call) or "named" (exactly ``name``).
        name: the forced function, when ``choice`` is "named".
        parallel: whether more than one call is allowed.
        format: how the model writes calls, one of `FORMATS`.
        special: the format's tags that are special tokens of the served tokenizer, with their ids
            (`special_tags`): a grammar names them by id, and the completion's text must keep them.
    """

    parameters: Mapping[str, dict]
    choice: str
    name: str | None = None
    parallel: bool = True
    format: str = "hermes"
    special: Mapping[str, int] = field(default_factory=dict)

    def grammar(self, answer: dict | None = None) -> str | None:
        """llguidance grammar text that forces the call(s); None for "auto" without ``answer``.

        With ``answer`` (the JSON schema of the request's response format), "auto" lets the model either
        call (one or more calls in its format, as with "required") or answer with JSON following the schema,
        nothing else (OpenAI's tools together with a JSON response format). A forced call ignores it.

        A schema llguidance cannot compile shows when the grammar is compiled for a tokenizer
        (`service.structured.Grammars.matcher` raises ValueError); schemas of more object properties than
        `check_properties` allows are refused here.
        """
        import llguidance

        if self.choice == "auto" and answer is None:
            return None
        check_properties([*self.parameters.values(), answer])
        fmt, lit = FORMATS[self.format], _Literals(self.special)
        if self.choice == "named":
            if not fmt.whole_named:
                return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(self.parameters[self.name]),
                                                                     defaults=CALL_JSON)
            lark = fmt.grammar({self.name: self.parameters[self.name]}, False, lit)
            return llguidance.grammar_from("grammar", f"start: calls\n{lark}")
        lark = fmt.grammar(self.parameters, self.parallel, lit)
        if self.choice == "auto":  # a JSON answer is written as structured outputs write one
            answer_json = json.dumps({**answer, "x-guidance": JSON_DEFAULTS})
            prefix = fmt.answer_prefix(lit) + " " if fmt.answer_prefix is not None else ""
            return llguidance.grammar_from("grammar", f"start: calls | answer\n{lark}answer: {prefix}%json {answer_json}\n")
        return llguidance.grammar_from("grammar", f"start: calls\n{lark}")

    def stream(self) -> ToolCallStream | NamedCallStream:
        """A fresh parser for one choice's text (harmony's, ``openai``, is `service.harmony.HarmonyStream`,
        which the chat endpoint makes itself: it splits reasoning off too)."""
        if self.choice == "named" and not FORMATS[self.format].whole_named:
            return NamedCallStream(self.name, FORMATS[self.format].call_id)
        return ToolCallStream(self.parameters, self.parallel, self.format)


class ToolCallStream:
    """Content and tool calls of one completion, fed its text as it streams.

    Text that could still begin a block of calls is held back, calls are returned once their block
    closes, and whitespace next to a block is dropped; feeding the whole text at once gives what the
    pieces give.

    Args:
        functions: the functions the model may call, by name: their parameters' JSON schemas (a block
            naming another stays content).
        parallel: False keeps only the first call (later ones are dropped).
        fmt: how the model writes calls, a name in `FORMATS`.
    """

    def __init__(self, functions: Mapping[str, dict], parallel: bool = True, fmt: str = "hermes") -> None:
        self._functions = functions
        self._parallel = parallel
        self._format = FORMATS[fmt]
        self._buffer = ""          # text not decided yet
        self._in_call = False      # the buffer is inside a block of calls (without its opening tag)
        self._opening = ""         # the text that opened the block (content again if it is not calls)
        # where a block may open: anywhere, only here at the completion's start (Llama's), or never again
        self._opens = "leading" if self._format.leading else "anywhere"
        self._searched = 0         # inside a block: where the search for its end resumes
        self._space = ""           # whitespace held back: dropped if a call follows
        self._after_call = False   # drop leading whitespace after a call
        self._spoken = False       # some content was sent
        self._gap = ""             # what joins content before a call to content after it (None: no content before)
        self._after_space = ""     # whitespace after the last call so far
        self.calls: list[ToolCall] = []
        # whether content came before the first call (None: no call yet): content that a push returns beside that
        # call came after it when none came before (the Responses API orders its items so)
        self.text_before_calls: bool | None = None

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """Add ``text``; returns (content to send now, calls completed now). ``final`` flushes."""
        self._buffer += text
        content, calls = [], []
        start_tag, end_tag = self._format.start, self._format.end
        while True:
            if self._in_call:
                if end_tag:
                    end = self._buffer.find(end_tag, self._searched)
                else:  # the block runs to the end of the completion
                    end = len(self._buffer) if final else -1
                if end < 0:
                    if final:  # unterminated: the block is content
                        content.append(self._content(self._opening + self._buffer, final))
                        self._buffer, self._in_call = "", False
                    else:  # a long block is searched once, not once per piece
                        self._searched = max(0, len(self._buffer) - len(end_tag) + 1)
                    break
                block, self._buffer = self._buffer[:end], self._buffer[end + len(end_tag):]
                self._in_call = False
                parsed = self._parse(block)
                if parsed is None:
                    content.append(self._content(self._opening + block + end_tag, False))
                else:  # whitespace around a block is dropped; content on both sides is joined by the whitespace
                    # before it (or, if none, after it): "Before.\n" + call + "\nAfter." was "Before.After."
                    if not self._after_call:
                        self._gap = self._space if self._spoken else None
                    self._space, self._after_call, self._after_space = "", True, ""
                    if self.text_before_calls is None:
                        self.text_before_calls = self._spoken
                    for call in parsed:
                        if self._parallel or not self.calls:
                            self.calls.append(call)
                            calls.append(call)
                continue
            if self._opens == "leading":  # does the completion open with a block (after whitespace)?
                text = self._buffer.lstrip()
                opening = next((tag for tag in (start_tag, self._format.leading) if text.startswith(tag)), None)
                if opening is None and not final and start_tag.startswith(text):
                    break  # not decided yet (whitespace, or a partial tag)
                self._opens = "never"  # (a block that opens here is the rest of the completion)
                if opening is not None:
                    content.append(self._content(self._buffer[:len(self._buffer) - len(text)], False))
                    # (the leading text, unlike the tag, is the block's own)
                    self._opening = start_tag if opening == start_tag else ""
                    self._buffer, self._in_call, self._searched = text[len(self._opening):], True, 0
                    continue
            start = -1 if self._opens == "never" else self._buffer.find(start_tag)
            if start >= 0:
                content.append(self._content(self._buffer[:start], False))
                self._buffer, self._in_call = self._buffer[start + len(start_tag):], True
                self._opening, self._searched = start_tag, 0
                continue
            keep = 0 if final or self._opens == "never" else partial_tag(self._buffer, start_tag)
            content.append(self._content(self._buffer[:len(self._buffer) - keep], final))
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return "".join(content), calls

    def _content(self, text: str, final: bool) -> str:
        """``text`` as content, holding back trailing whitespace (a call may follow it)."""
        if self._after_call:
            body = text.lstrip()
            self._after_space += text[:len(text) - len(body)]
            if body:
                if self._gap is not None:
                    body = (self._gap or self._after_space) + body
                self._after_call, self._after_space = False, ""
            text = body
        text = self._space + text
        body = text.rstrip()
        self._space = "" if final else text[len(body):]
        self._spoken |= bool(body)
        return text if final else body

    def _parse(self, block: str) -> list[ToolCall] | None:
        """The calls of one block, or None if it is not calls of offered functions. JSON nested too deep for
        Python's parser (``[`` 1,100 times: RecursionError, which ended the stream with no error event) is not a
        call either."""
        try:
            calls = self._format.parse(block, self._functions)
            if not calls or any(name not in self._functions or not isinstance(arguments, dict)
                                for name, arguments in calls):
                return None
            return [ToolCall.new(name, json.dumps(arguments, ensure_ascii=False), self._format.call_id)
                    for name, arguments in calls]
        except RecursionError:
            return None


class NamedCallStream:
    """The forced call of a named ``tool_choice``: the whole completion is the function's arguments. The call
    exists from its first piece of arguments on: a completion cut off before any (inside a thinking block) has no
    call, streamed or not (it had one with arguments "", not JSON, where the stream had none)."""

    def __init__(self, name: str, make_id: Callable[[], str] | None = None) -> None:
        self._name, self._make_id = name, make_id
        self.calls: list[ToolCall] = []

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """No content; the text is the next piece of the call's arguments."""
        if not text:
            return "", []
        if not self.calls:
            self.calls = [ToolCall.new(self._name, "", self._make_id)]
        call = self.calls[0]
        self.calls[0] = ToolCall(call.name, call.arguments + text, call.id)
        return "", [ToolCall(call.name, text, call.id)]


def _hoisted(function: str, schema: dict, defs: dict[str, Any]) -> dict:
    """``schema`` to embed in the call grammar's one schema: its ``$defs`` (or ``definitions``) move into
    ``defs`` as ``<function>.<name>`` (function names have no dots), and its references follow them (a
    reference to its root, ``#``, to ``defs[function]``)."""
    uses_root = False

    def moved(node):
        nonlocal uses_root
        if isinstance(node, list):
            return [moved(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                uses_root |= value == "#"
                value = f"#/$defs/{function}" if value == "#" else next(
                    (f"#/$defs/{function}.{value[len(local):]}" for local in ("#/$defs/", "#/definitions/")
                     if value.startswith(local)), value)
            out[key] = moved(value)
        return out

    for key in ("definitions", "$defs"):
        if not isinstance(schema.get(key, {}), dict):
            raise ValueError(f"function {function!r}: {key} must be an object of schemas, got "
                             f"{type(schema[key]).__name__}")
    for name, definition in {**schema.get("definitions", {}), **schema.get("$defs", {})}.items():
        defs[f"{function}.{name}"] = moved(definition)
    body = moved({key: value for key, value in schema.items() if key not in ("$defs", "definitions")})
    if uses_root:
        defs[function] = body
    return body



# --- formats -----------------------------------------------------------------------------------------------


class _Literals:
    """Lark literals for one tokenizer: a tag that is one of its special tokens is named by id (``<[5]>``),
    since llguidance matches special tokens only that way; the rest of the text is a string literal."""

    def __init__(self, special: Mapping[str, int]) -> None:
        self._special = dict(special)
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")") if special else None

    def __call__(self, text: str) -> str:
        pieces = self._split.split(text) if self._split is not None else [text]
        return " ".join(f"<[{self._special[piece]}]>" if piece in self._special else _lark(piece)
                        for piece in pieces if piece)


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes calls: a block of calls between ``start`` and ``end`` (an empty ``end``:
    the block runs to the end of the completion); ``parse`` reads a block's text (without the tags) as
    (name, arguments) pairs, or None; ``grammar`` gives the Lark rules of ``calls``, one or more calls of
    the functions (one unless parallel) as the model writes them, its tags written by the literal maker it
    is given. ``tags`` are the texts that may be single special tokens; ``call_id`` makes a call's id
    (None: OpenAI's form), and ``template_id`` the id a call in the history is rendered with (None: its own)."""

    start: str
    end: str
    parse: Callable[[str, Mapping[str, dict]], list[tuple[str, Any]] | None]
    grammar: Callable[[Mapping[str, dict], bool, Callable[[str], str]], str]
    tags: tuple[str, ...] = ()
    call_id: Callable[[], str] | None = None
    template_id: Callable[[str], str] | None = None
    # harmony's: a named call is forced in the format's own form (not as its arguments alone), a JSON answer
    # comes after this Lark text, and the history's messages are rewritten for the format's template
    whole_named: bool = False
    answer_prefix: Callable[[Callable[[str], str]], str] | None = None
    history: Callable[[list[dict]], list[dict]] | None = None
    # Llama's: a block opens only the completion (after whitespace), with ``start`` or with this text, which
    # is the block's own (``end`` is empty: the calls are the whole completion); later text never opens one
    leading: str = ""


def _lark(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def answer_grammar(fmt: str, schema: dict, special: Mapping[str, int]) -> str | None:
    """llguidance grammar text of a JSON answer following ``schema`` in format ``fmt``'s form (harmony's: an
    optional analysis message, then the final channel's), or None when the format writes it bare."""
    import llguidance

    form = FORMATS[fmt]
    if form.answer_prefix is None:
        return None
    check_properties([schema])
    lit = _Literals(special)
    rules = form.grammar({}, False, lit)  # (the analysis rule the prefix names)
    answer = json.dumps({**schema, "x-guidance": JSON_DEFAULTS})
    return llguidance.grammar_from("grammar", f"start: {form.answer_prefix(lit)} %json {answer}\n{rules}")


def special_tags(fmt: str, tokenizer) -> dict[str, int]:
    """The tags of format ``fmt`` that are special tokens of ``tokenizer`` (one token each, which decoding
    drops unless told to keep special tokens), with their ids."""
    found = {}
    for tag in FORMATS[fmt].tags:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if len(ids) == 1 and not tokenizer.decode(ids, skip_special_tokens=True):
            found[tag] = ids[0]
    return found


def _tagged(text: str, opening: str, closing: str, named: str | None = None, *, only: bool = True,
            empty_ok: bool = False) -> list | None:
    """The elements ``opening [NAME named] BODY closing`` of ``text``, each BODY up to the nearest ``closing`` (as a
    lazy regex reads them): BODY alone, or (NAME, BODY) with ``named`` (the text that ends a name, which is one
    line, not empty, and holds no character ``named`` begins with). With ``only``, the text must be those elements
    and whitespace, else None (None too when there is none, unless ``empty_ok``); without it, the elements found
    anywhere. Linear in the text: the regular expressions this replaces backtracked over every opening tag to the
    end of the text (a model writing 2,000 argument tags without their closing ones took 83 s of GIL to parse; an
    adversarial review)."""
    found: list = []
    pos = 0
    ends = newline = -1  # (cached: the next ``named`` and newline at or after a name's start)
    while True:
        start = text.find(opening, pos)
        if only and text[pos:len(text) if start < 0 else start].strip():
            return None
        if start < 0:
            break
        head = start + len(opening)
        name = None
        if named is not None:
            if ends < head:
                ends = text.find(named[0], head)
            if ends < 0:  # (no later element can be whole either)
                return None if only else found
            if newline < head:
                newline = text.find("\n", head)
            if ends == head or head <= newline < ends or not text.startswith(named, ends):  # (no element here)
                if only:
                    return None
                pos = head
                continue
            name, head = text[head:ends], ends + len(named)
        end = text.find(closing, head)
        if end < 0:
            return None if only else found
        found.append(text[head:end] if named is None else (name, text[head:end]))
        pos = end + len(closing)
    return found if found or empty_ok or not only else None


def _hermes_parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
        return None
    return [(call["name"], call.get("arguments", call.get("parameters", {})))]


def _call_json(parameters: Mapping[str, dict], key: str = "arguments") -> str:
    """The JSON schema of ``{"name": ..., "arguments": ...}`` (``key`` names the arguments) for every function
    (``anyOf`` over them, each schema's references moved into it), with the call's JSON settings."""
    defs: dict[str, Any] = {}
    calls = [{"type": "object", "properties": {"name": {"const": name}, key: _hoisted(name, schema, defs)},
              "required": ["name", key], "additionalProperties": False}
             for name, schema in parameters.items()]
    root = {"anyOf": calls} if len(calls) > 1 else calls[0]
    return json.dumps({**root, **({"$defs": defs} if defs else {}), "x-guidance": CALL_JSON})


def _hermes_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    """One %json of every function."""
    call = _call_json(parameters)
    body = 'call ("\\n" call)*' if parallel else "call"
    return f'calls: {body}\ncall: {lit(TOOL_CALL_START + chr(10))} %json {call} {lit(chr(10) + TOOL_CALL_END)}\n'


def _qwen3_coder_parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    """Every function of a block, each its own call (as vLLM's parser reads them): one match across both of two
    functions was one call, to the first function with the second's arguments. A parameter's value loses one
    newline at each end."""
    found = _tagged(block, "<function=", "</function>", ">")
    if found is None:
        return None
    calls = []
    for name, body in found:
        properties = _properties(functions.get(name.strip()))
        arguments = {}
        for key, value in _tagged(body, "<parameter=", "</parameter>", ">", only=False):
            value = value[1:] if value.startswith("\n") else value
            arguments[key.strip()] = _typed(value[:-1] if value.endswith("\n") else value,
                                            properties.get(key.strip(), {}))
        calls.append((name.strip(), arguments))
    return calls


def _properties(schema: Any) -> dict:
    """A function's ``properties`` as the XML formats' parsers read them: none unless they are an object (with
    tool_choice auto no grammar checks the schema, and ``.get`` of a list failed mid-stream)."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return properties if isinstance(properties, dict) else {}


_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null", list: "array",
               dict: "object"}


def _types(schema: Any, depth: int = 0) -> set[str] | None:
    """The JSON types a parameter's schema allows, from its ``type`` (a name or a list), its ``anyOf`` / ``oneOf``
    members' and its ``enum`` and ``const`` values'; None where it does not say (no schema, a ``$ref``, a member
    that says nothing)."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    found: set[str] = set()
    kind = schema.get("type")
    if isinstance(kind, str):
        found.add(kind)
    elif isinstance(kind, list):
        found.update(k for k in kind if isinstance(k, str))
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            for member in schema[key]:
                types = _types(member, depth + 1)
                if types is None:
                    return None
                found |= types
    values = ([schema["const"]] if "const" in schema else []) + (
        schema["enum"] if isinstance(schema.get("enum"), list) else [])
    found.update(_JSON_TYPES.get(type(v), "object") for v in values)
    return found or None


def _text_valued(types: set[str] | None) -> bool:
    """Whether a tagged-text format writes a parameter of these `_types` as bare text: strings and nothing else but
    null (Pydantic's Optional[str] is ``anyOf: [string, null]``). The chat templates write a string bare and anything
    else as JSON, so its text is the string (a forced call's grammar writes it so too)."""
    return types is not None and "string" in types and types <= {"string", "null"}


def _typed(value: str, schema: Any) -> Any:
    """A Qwen3-Coder parameter's text as its schema's type says (text when it does not parse as that); a boolean
    schema (JSON Schema's ``true``, any value) says nothing of the type. A string's text is the string, also where
    null is allowed too (``null`` is then None): it was parsed as JSON, so "94103" was 94103 and "3.10" 3.1."""
    if not isinstance(schema, dict):
        schema = {}
    types = _types(schema)
    if _text_valued(types):
        return None if "null" in types and value.strip() == "null" else value
    kind = schema.get("type")
    if kind == "boolean" and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if kind == "null" and value.strip() == "null":
        return None
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return value
    if kind == "integer" and isinstance(parsed, float) and parsed.is_integer():
        return int(parsed)
    return parsed


def _qwen3_coder_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    return _xml_grammar(parameters, parallel, lambda name: f"{TOOL_CALL_START}\n<function={name}>\n",
                        f"</function>\n{TOOL_CALL_END}", lambda key: (f"<parameter={key}>\n", "\n</parameter>\n"), lit)


def _xml_grammar(parameters: Mapping[str, dict], parallel: bool, head: Callable[[str], str], tail: str,
                 tags: Callable[[str], tuple[str, str]], lit: Callable[[str], str] = _lark,
                 block: tuple[str, str] = ("", "")) -> str:
    """Calls whose parameters are tagged text (Qwen3-Coder's, GLM-4.5's, MiniMax-M2's): each function's
    parameters in its schema's order (the required ones always, the others optional); a value following
    its schema: a string as text (any text up to its closing tag, lines and ``<`` too, without a tag that ends the
    call or its block; within its length bounds and its pattern; an enum: one of its strings), anything else as JSON (a number's or a boolean's JSON is its text). Without ``block`` the
    calls are one per line; with it they follow each other between its opening and closing text (a
    separator is the head's: a literal of its own would end where the closing text begins, since the
    lexer takes the longest literal)."""
    newline = _lark("\n")
    if block != ("", ""):
        calls = f"{lit(block[0])} call{'+' if parallel else ''} {lit(block[1])}"
    else:
        calls = f"call ({newline} call)*" if parallel else "call"
    rules = [f"calls: {calls}",
             "call: " + " | ".join(f"call{i}" for i in range(len(parameters)))]
    # the closing tags a free value may not hold: the call's and its block's (a parser ends there)
    ends = sorted(set(re.findall(r"</[^>]+>", tail + block[1])))
    for i, (name, schema) in enumerate(parameters.items()):
        properties, required = _xml_parameters(name, schema)
        params = []
        for j, (key, sub) in enumerate(properties.items()):
            choices = [sub["const"]] if "const" in sub else sub.get("enum")
            types = _types(sub)
            text_valued = _text_valued(types)
            opening, closing = tags(key)
            if text_valued and choices is not None:  # bare, as the parser reads it (a JSON string's quotes
                # were kept: {"op": "\"<=\""})
                value = "(" + " | ".join(_lark("null" if v is None else v) for v in choices) + ")"
            elif text_valued:  # any text up to its closing tag (its text may be "null": None where null is allowed)
                low, high = _length(name, key, sub, "minLength"), _length(name, key, sub, "maxLength")
                if high is not None and low is not None and low > high:
                    raise ValueError(f"function {name!r}: parameter {key!r} has minLength {low} > maxLength {high}")
                # one terminal, the value and its closing tag: the value holds no such tag, nor one that ends the call
                # or its block, so it ends at the first (as the parser reads it; a literal of its own would end
                # where the closing text begins, since the lexer takes the longest match)
                stop = closing.strip()
                lead, trail = closing[:closing.index(stop)], closing[closing.index(stop) + len(stop):]
                text = (f"/(?s:.{{{low or 0},{'' if high is None else high}}})/ & "
                        f"~/{_containing(sorted({stop, *ends}))}/")
                if "pattern" in sub:  # (the pattern holds for strings, not for null where null is allowed)
                    text += f" & /{_whole_value(name, key, sub['pattern'])}/"
                either = f'(T{i}_{j} | "null")' if "null" in types else f"T{i}_{j}"
                rules += [f"T{i}_{j}: {text}", f"V{i}_{j}: {either} {_lark(lead + stop)}"]
                value, closing = f"V{i}_{j}", trail
            else:
                value = f"%json {json.dumps({**sub, 'x-guidance': CALL_JSON})}"
            rules.append(f"p{i}_{j}: {lit(opening)} {value}" + (f" {lit(closing)}" if closing else ""))
            params.append(f"p{i}_{j}" if key in required else f"p{i}_{j}?")
        rules.append(f"call{i}: {lit(head(name))} {' '.join(params)} {lit(tail)}")
    return "\n".join(rules) + "\n"


def _containing(texts: list[str]) -> str:
    """A regex of any text that contains one of ``texts``, its slashes escaped for a Lark regex literal."""
    return "(?s:.*)(?:" + "|".join(re.escape(text).replace("/", "\\/") for text in texts) + ")(?s:.*)"


def _whole_value(name: str, key: str, pattern: Any) -> str:
    """Parameter ``key``'s JSON Schema ``pattern`` (a search: each of its top-level alternatives anchored only by a
    leading ``^`` or a trailing ``$``) as a regex of the whole value, its slashes escaped for a Lark regex literal.
    What llguidance's lexer cannot take (lookarounds, an anchor inside) is a 400 naming the regex."""
    if not isinstance(pattern, str):
        raise ValueError(f"function {name!r}: parameter {key!r}'s pattern must be a string")
    alternatives, out, escaped, depth, bracket = [], [], False, 0, False
    for ch in pattern:
        if not escaped:
            if bracket:
                bracket = ch != "]"
            elif ch == "[":
                bracket = True
            elif ch in "()":
                depth += 1 if ch == "(" else -1
            elif ch == "|" and depth == 0:
                alternatives.append("".join(out))
                out = []
                continue
        out.append("\\/" if ch == "/" and not escaped else ch)
        escaped = ch == "\\" and not escaped
    whole = []
    for body in [*alternatives, "".join(out)]:
        start = body.startswith("^")
        body = body[start:]
        end = body.endswith("$") and (len(body) - 1 - len(body[:-1].rstrip("\\"))) % 2 == 0
        body = body[:len(body) - end]
        whole.append(f"{'' if start else '(?s:.*)'}(?:{body}){'' if end else '(?s:.*)'}")
    return "|".join(whole)


def _xml_parameters(name: str, schema: dict) -> tuple[dict[str, dict], set[str]]:
    """Function ``name``'s parameters as the tagged-text grammar writes them, and the required ones. A parameter's
    schema may be a boolean, as JSON Schema allows: ``true`` takes any JSON value, ``false`` none, so the parameter
    is left out of the grammar (a 400 if it is required: no call could be valid).

    Raises:
        ValueError: ``properties``, ``required`` or a parameter's schema or ``enum`` is not of its JSON Schema
            type (they were read as they were: a 500 for ``"properties": {"a": true}``).
    """
    properties, required = schema.get("properties", {}), schema.get("required", [])
    if not isinstance(properties, dict):
        raise ValueError(f"function {name!r}: properties must be an object, got {type(properties).__name__}")
    if not (isinstance(required, list) and all(isinstance(key, str) for key in required)):
        raise ValueError(f"function {name!r}: required must be a list of strings")
    kept = {}
    for key, sub in properties.items():
        if sub is False:
            if key in required:
                raise ValueError(f"function {name!r}: parameter {key!r} is required, but its schema is false")
            continue
        if sub is True:
            sub = {}
        if not isinstance(sub, dict):
            raise ValueError(f"function {name!r}: the schema of parameter {key!r} must be an object or a boolean, "
                             f"got {type(sub).__name__}")
        if "enum" in sub and not isinstance(sub["enum"], list):
            raise ValueError(f"function {name!r}: parameter {key!r}'s enum must be a list")
        kept[key] = sub
    return kept, set(required)


def _length(name: str, key: str, schema: dict, keyword: str) -> int | None:
    """``schema``'s ``keyword`` (minLength or maxLength), a non-negative integer (``2.0`` too, as JSON Schema counts
    it), or None if absent; another value is a ValueError (``int([1])`` and ``int(inf)`` were 500s)."""
    if keyword not in schema:
        return None
    value = schema[keyword]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"function {name!r}: parameter {key!r}'s {keyword} must be a non-negative integer, "
                         f"got {value!r}")
    return value


DSV3_CALLS_BEGIN, DSV3_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DSV3_CALL_BEGIN, DSV3_CALL_END, DSV3_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_DSV3_FENCED = re.compile(r"([^\n]+)\n```(?:json)?\n(.*)\n```", re.DOTALL)


def _deepseek_v3_parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    found = _tagged(block, DSV3_CALL_BEGIN, DSV3_CALL_END)
    if found is None:
        return None
    calls = []
    for call in found:
        head, sep, rest = call.partition(DSV3_SEP)
        if not sep:
            return None
        if head.strip() == "function":  # V3: name, then the arguments fenced as JSON
            fenced = _DSV3_FENCED.fullmatch(rest.strip())
            if fenced is None:
                return None
            name, arguments = fenced.group(1).strip(), fenced.group(2)
        else:  # V3.1: name<sep>arguments
            name, arguments = head.strip(), rest
        try:
            calls.append((name, json.loads(arguments)))
        except ValueError:
            return None
    return calls


def _deepseek_v3_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    rules = [f"calls: {lit(DSV3_CALLS_BEGIN)} call{'+' if parallel else ''} {lit(DSV3_CALLS_END)}",
             "call: " + " | ".join(f"call{i}" for i in range(len(parameters)))]
    for i, (name, schema) in enumerate(parameters.items()):
        head, tail = lit(f"{DSV3_CALL_BEGIN}function{DSV3_SEP}{name}\n```json\n"), lit(f"\n```{DSV3_CALL_END}")
        arguments = json.dumps({**schema, "x-guidance": CALL_JSON})
        rules.append(f"call{i}: {head} %json {arguments} {tail}")
    return "\n".join(rules) + "\n"


KIMI_CALLS_BEGIN, KIMI_CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KIMI_CALL_BEGIN, KIMI_ARGUMENTS, KIMI_CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
_KIMI_HEAD = re.compile(r"\s*functions\.([^:\s]+):\d+\s*" + re.escape(KIMI_ARGUMENTS), re.DOTALL)


def _kimi_k2_parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    found = _tagged(block, KIMI_CALL_BEGIN, KIMI_CALL_END)
    if found is None:
        return None
    calls = []
    for call in found:
        head = _KIMI_HEAD.match(call)
        if head is None:
            return None
        try:
            calls.append((head.group(1), json.loads(call[head.end():])))
        except ValueError:
            return None
    return calls


def _kimi_k2_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    """Calls numbered as Kimi-K2 numbers them (``functions.NAME:INDEX``; any index is accepted)."""
    rules = [f"calls: {lit(KIMI_CALLS_BEGIN)} call{'+' if parallel else ''} {lit(KIMI_CALLS_END)}",
             "call: " + " | ".join(f"call{i}" for i in range(len(parameters)))]
    for i, (name, schema) in enumerate(parameters.items()):
        arguments = json.dumps({**schema, "x-guidance": CALL_JSON})
        rules.append(f"call{i}: {lit(f'{KIMI_CALL_BEGIN}functions.{name}:')} /[0-9]{{1,2}}/ {lit(KIMI_ARGUMENTS)} "
                     f"%json {arguments} {lit(KIMI_CALL_END)}")
    return "\n".join(rules) + "\n"


_KIMI_ID = re.compile(r"functions\.[^:\s]+:\d+")


def _kimi_k2_history(messages: list[dict]) -> list[dict]:
    """The history's call ids in Kimi-K2's form, ``functions.NAME:INDEX`` with the calls numbered through the
    conversation from 0 (its template renders a call's and a result's id as they are: the model was trained on
    that form, not OpenAI's ``call_...``); a result gets its call's; ids already in that form are kept."""
    renamed: dict[str, str] = {}
    calls = (call for message in messages for call in message.get("tool_calls", ()))
    for index, call in enumerate(calls):
        if not _KIMI_ID.fullmatch(call["id"]):
            kimi_id = f"functions.{call['function']['name']}:{index}"
            renamed[call["id"]], call["id"] = kimi_id, kimi_id
    for message in messages:
        if "tool_call_id" in message:
            message["tool_call_id"] = renamed.get(message["tool_call_id"], message["tool_call_id"])
    return messages


def _glm45_parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    """The function's name up to the first newline or tag (GLM-4.5 writes a newline, 4.7 none), then
    ``<arg_key>KEY</arg_key>`` and ``<arg_value>VALUE</arg_value>`` pairs, whitespace between (read by `_tagged`,
    each pair an element from its key's tag to its value's closing one: the regular expressions this replaces
    backtracked quadratically over a long name's spaces, cubically over unclosed tags; an adversarial review)."""
    text = block.lstrip()
    cut = min((i for i in (text.find("\n"), text.find("<")) if i >= 0), default=len(text))
    name = text[:cut].rstrip()
    pairs = _tagged(text[cut:], "<arg_key>", "</arg_value>", empty_ok=True)
    if not name or pairs is None:
        return None
    arguments = []
    for pair in pairs:
        key, closed, value = pair.partition("</arg_key>")
        value = value.lstrip()
        if not closed or not value.startswith("<arg_value>"):
            return None
        arguments.append((key, value[len("<arg_value>"):]))
    properties = _properties(functions.get(name))
    return [(name, {key.strip(): _typed(value, properties.get(key.strip(), {})) for key, value in arguments})]


def _glm45_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    """As Qwen3-Coder's, with GLM-4.5's tags: ``<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>``."""
    return _xml_grammar(parameters, parallel, lambda name: f"{TOOL_CALL_START}{name}\n", f"{TOOL_CALL_END}",
                        lambda key: (f"<arg_key>{key}</arg_key>\n<arg_value>", "</arg_value>\n"), lit)


MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_MISTRAL_CALL = re.compile(r"\s*([^\s\[\]{}]+)\s*(?:\[CALL_ID\]\s*[A-Za-z0-9]+\s*)?(?:\[ARGS\])?\s*(\{.*\})\s*", re.DOTALL)
_ALPHANUMERIC = string.ascii_letters + string.digits


def _decoded(arguments: Any) -> Any:
    """A call's arguments, the JSON in a string if written as one (as an OpenAI message carries them); ValueError if
    that string is not JSON."""
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def _mistral_parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    """Mistral's calls after ``[TOOL_CALLS]``: Mixtral's JSON list of ``{"name", "arguments"}`` (an ``id`` is
    ignored), or the later form, ``NAME[ARGS]{...}`` calls separated by ``[TOOL_CALLS]``."""
    text = block.strip()
    try:
        if text.startswith("["):
            calls = json.loads(text)
            if not (isinstance(calls, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls)):
                return None
            found = [(c["name"], c.get("arguments", {})) for c in calls]
        else:
            matches = [_MISTRAL_CALL.fullmatch(part) for part in text.split(MISTRAL_CALLS)]
            if not all(matches):
                return None
            found = [(match.group(1), json.loads(match.group(2))) for match in matches]
        return [(name, _decoded(args)) for name, args in found]
    except ValueError:
        return None


def _mistral_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    """Mixtral's form, as its chat template renders calls: ``[TOOL_CALLS] [{"name": ..., "arguments": ...}]``."""
    more = ' (", " call)*' if parallel else ""
    return f'calls: {lit(MISTRAL_CALLS + " [")} call{more} "]"\ncall: %json {_call_json(parameters)}\n'


def _mistral_v11_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    """The later Mistral form (tokenizer v11 on): ``[TOOL_CALLS]NAME[ARGS]{...}`` per call."""
    rules = [f"calls: call{'+' if parallel else ''}", "call: " + " | ".join(f"call{i}" for i in range(len(parameters)))]
    for i, (name, schema) in enumerate(parameters.items()):
        arguments = json.dumps({**schema, "x-guidance": CALL_JSON})
        rules.append(f"call{i}: {lit(f'{MISTRAL_CALLS}{name}{MISTRAL_ARGS}')} %json {arguments}")
    return "\n".join(rules) + "\n"


def _mistral_id() -> str:
    """Nine letters and digits: Mistral's chat templates refuse any other call id."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


def _mistral_template_id(call_id: str) -> str:
    """The id a call of the history is rendered with for Mistral's templates: its own when it is nine letters
    and digits, else nine hex digits of its hash (the same for the call and its result)."""
    if len(call_id) == 9 and call_id.isascii() and call_id.isalnum():
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


LLAMA_PYTHON_TAG = "<|python_tag|>"
_JSON = json.JSONDecoder()


def _llama3_json_parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    """Llama's calls, the whole completion: ``{"name": ..., "parameters": ...}`` objects (``arguments`` is read
    too, not both), one after another or separated by ``;`` (vLLM's streaming parser writes ``; ``)."""
    calls, text, at = [], block.strip(), 0
    try:
        while at < len(text):
            call, at = _JSON.raw_decode(text, at)
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                    and ("parameters" in call) != ("arguments" in call)):
                return None
            arguments = call.get("parameters", call.get("arguments"))
            calls.append((call["name"], _decoded(arguments)))
            at = len(text) - len(text[at:].lstrip().removeprefix(";").lstrip())
    except ValueError:
        return None
    return calls


def _llama3_json_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    """As Llama's templates render calls: ``{"name": ..., "parameters": ...}``, Llama 4's several one after
    another (Llama 3's render one only)."""
    return f"calls: call{'+' if parallel else ''}\ncall: %json {_call_json(parameters, 'parameters')}\n"


MINIMAX_CALLS_BEGIN, MINIMAX_CALLS_END = "<minimax:tool_call>", "</minimax:tool_call>"


def _minimax_m2_parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    found = _tagged(block, '<invoke name="', "</invoke>", '">')
    if found is None:
        return None
    calls = []
    for name, body in found:
        arguments = _tagged(body, '<parameter name="', "</parameter>", '">', empty_ok=True)
        if arguments is None:
            return None
        properties = _properties(functions.get(name))
        calls.append((name, {key: _typed(value.strip("\n"), properties.get(key, {})) for key, value in arguments}))
    return calls


def _minimax_m2_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    """One block of ``<invoke name="NAME">`` calls, values as Qwen3-Coder's."""
    return _xml_grammar(parameters, parallel, lambda name: f'\n<invoke name="{name}">\n', "</invoke>",
                        lambda key: (f'<parameter name="{key}">', "</parameter>\n"), lit,
                        (MINIMAX_CALLS_BEGIN, "\n" + MINIMAX_CALLS_END))


def _glm47_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str] = _lark) -> str:
    """GLM-4.7's: GLM-4.5's without the newlines, ``<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>``."""
    return _xml_grammar(parameters, parallel, lambda name: f"{TOOL_CALL_START}{name}", f"{TOOL_CALL_END}",
                        lambda key: (f"<arg_key>{key}</arg_key><arg_value>", "</arg_value>"), lit)


# what a chat template that renders calls in each format contains (the specific ones first: Qwen3-Coder's
# and GLM-4.5's templates also write <tool_call>)
_MARKERS = (("openai", (harmony.CHANNEL, harmony.MESSAGE)), ("deepseek_v3", (DSV3_CALLS_BEGIN,)), ("kimi_k2", (KIMI_CALLS_BEGIN,)),
            ("glm47", ("</arg_key><arg_value>",)), ("glm45", ("<arg_key>",)),
            ("minimax_m2", (MINIMAX_CALLS_BEGIN,)),
            ("qwen3_coder", ("<function=", "<parameter=")), ("mistral_v11", (MISTRAL_CALLS, MISTRAL_ARGS)),
            ("mistral", (MISTRAL_CALLS,)), ("hermes", (TOOL_CALL_START,)),
            # (after Hermes: Qwen's templates write '{"name": "' too)
            ("llama3_json", ('{"name": "', '"parameters": ')))


def detect_format(chat_template: str | dict | None) -> str:
    """The format a model's chat template renders tool calls in (a name in `FORMATS`); Hermes when the
    template shows none of them (or has no tool support)."""
    text = "\n".join(chat_template.values()) if isinstance(chat_template, dict) else chat_template or ""
    return next((name for name, markers in _MARKERS if all(marker in text for marker in markers)), "hermes")


_HERMES_TAGS = (TOOL_CALL_START, TOOL_CALL_END)
_MISTRAL_TAGS = (MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID)
FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat(TOOL_CALL_START, TOOL_CALL_END, _hermes_parse, _hermes_grammar, _HERMES_TAGS),
    "qwen3_coder": ToolFormat(TOOL_CALL_START, TOOL_CALL_END, _qwen3_coder_parse, _qwen3_coder_grammar, _HERMES_TAGS),
    "deepseek_v3": ToolFormat(DSV3_CALLS_BEGIN, DSV3_CALLS_END, _deepseek_v3_parse, _deepseek_v3_grammar,
                              (DSV3_CALLS_BEGIN, DSV3_CALLS_END, DSV3_CALL_BEGIN, DSV3_CALL_END, DSV3_SEP)),
    "kimi_k2": ToolFormat(KIMI_CALLS_BEGIN, KIMI_CALLS_END, _kimi_k2_parse, _kimi_k2_grammar,
                          (KIMI_CALLS_BEGIN, KIMI_CALLS_END, KIMI_CALL_BEGIN, KIMI_ARGUMENTS, KIMI_CALL_END),
                          history=_kimi_k2_history),
    "glm45": ToolFormat(TOOL_CALL_START, TOOL_CALL_END, _glm45_parse, _glm45_grammar, _HERMES_TAGS),
    "glm47": ToolFormat(TOOL_CALL_START, TOOL_CALL_END, _glm45_parse, _glm47_grammar, _HERMES_TAGS),
    "minimax_m2": ToolFormat(MINIMAX_CALLS_BEGIN, MINIMAX_CALLS_END, _minimax_m2_parse, _minimax_m2_grammar,
                             (MINIMAX_CALLS_BEGIN, MINIMAX_CALLS_END)),
    # Mistral's calls run to the end of the completion (the model ends it there)
    "mistral": ToolFormat(MISTRAL_CALLS, "", _mistral_parse, _mistral_grammar, _MISTRAL_TAGS, _mistral_id,
                          _mistral_template_id),
    "mistral_v11": ToolFormat(MISTRAL_CALLS, "", _mistral_parse, _mistral_v11_grammar, _MISTRAL_TAGS, _mistral_id,
                              _mistral_template_id),
    # GPT-OSS's harmony: calls, reasoning and answer in one format, read by `service.harmony.HarmonyStream`
    # (this parse reads the text from the first <|channel|> on, for `ToolCallStream`)
    "openai": ToolFormat(harmony.CHANNEL, "", harmony.parse, harmony.call_grammar, harmony.TAGS,
                         whole_named=True, answer_prefix=harmony.answer_prefix, history=harmony.history),
    # Llama 3.1 to 3.3 and Llama 4: the completion is the calls, JSON from its first character (or after
    # <|python_tag|>); vLLM's llama3_json and llama4_json, one parser
    "llama3_json": ToolFormat(LLAMA_PYTHON_TAG, "", _llama3_json_parse, _llama3_json_grammar, (LLAMA_PYTHON_TAG,),
                              leading="{"),
}
FORMATS["llama4_json"] = FORMATS["llama3_json"]
