"""Tool calling: what a chat completion may call, the grammar that forces a call, and the calls in the
model's text.

Owns the request's tool setup (`ToolSetup`: the functions offered and ``tool_choice``), the grammar of a
forced call (``required``: one or more calls in the Hermes format; a named function: its arguments
alone, as vLLM does), and `ToolCallStream`, which splits a completion's text, as it streams, into
content and tool calls. Calls use the Hermes format that Qwen2.5 and Qwen3 (and this repo's default
model's chat template) are trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block that is not valid JSON naming an offered function stays content, as does an unterminated one.
Ignores HTTP and the response schemas (`service.openai_api` builds them from `ToolCall`s) and the chat
template (the model's own renders the tools).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.structured import JSON_DEFAULTS
from service.text import partial_tag

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# Forced calls are written as chat templates render calls (Jinja's tojson is json.dumps: ", " and ": "):
# what Hermes-trained models saw, and a conversation's next turn re-renders the call token for token (the
# prefix cache covers it). No free whitespace, which a weak model could emit until max_tokens.
CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CHOICES = ("none", "auto", "required")  # tool_choice's string values; a dict names one function


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    @staticmethod
    def new(name: str, arguments: str) -> ToolCall:
        return ToolCall(name, arguments, f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ToolSetup:
    """What one request lets the model call.

    Attributes:
        parameters: function name -> its parameters' JSON schema, in the order offered.
        choice: "auto" (the model decides), "required" (at least one call) or "named" (exactly ``name``).
        name: the forced function, when ``choice`` is "named".
        parallel: whether more than one call is allowed.
    """

    parameters: Mapping[str, dict]
    choice: str
    name: str | None = None
    parallel: bool = True

    def grammar(self, answer: dict | None = None) -> str | None:
        """llguidance grammar text that forces the call(s); None for "auto" without ``answer``.

        With ``answer`` (the JSON schema of the request's response format), "auto" lets the model either
        call (one or more Hermes blocks, as with "required") or answer with JSON following the schema,
        nothing else (OpenAI's tools together with a JSON response format). A forced call ignores it.

        A schema llguidance cannot compile shows when the grammar is compiled for a tokenizer
        (`service.structured.Grammars.matcher` raises ValueError).
        """
        import llguidance

        if self.choice == "auto" and answer is None:
            return None
        if self.choice == "named":
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(self.parameters[self.name]),
                                                                 defaults=CALL_JSON)
        defs: dict[str, Any] = {}
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": _hoisted(name, schema, defs)},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for name, schema in self.parameters.items()]
        root = {"anyOf": calls} if len(calls) > 1 else calls[0]
        call = json.dumps({**root, **({"$defs": defs} if defs else {}), "x-guidance": CALL_JSON})
        body = 'call ("\\n" call)*' if self.parallel else "call"
        lark = f'calls: {body}\ncall: "{TOOL_CALL_START}\\n" %json {call} "\\n{TOOL_CALL_END}"\n'
        if self.choice == "auto":  # a JSON answer is written as structured outputs write one
            answer_json = json.dumps({**answer, "x-guidance": JSON_DEFAULTS})
            return llguidance.grammar_from("grammar", f"start: calls | answer\n{lark}answer: %json {answer_json}\n")
        return llguidance.grammar_from("grammar", f"start: calls\n{lark}")

    def stream(self) -> ToolCallStream | NamedCallStream:
        """A fresh parser for one choice's text."""
        if self.choice == "named":
            return NamedCallStream(self.name)
        return ToolCallStream(self.parameters, self.parallel)


class ToolCallStream:
    """Content and Hermes tool calls of one completion, fed its text as it streams.

    Text that could still begin ``<tool_call>`` is held back, a call is returned once its block closes,
    and whitespace next to a call is dropped; feeding the whole text at once gives what the pieces give.

    Args:
        functions: the names the model may call (a block naming another stays content).
        parallel: False keeps only the first call (later blocks are dropped).
    """

    def __init__(self, functions: Sequence[str], parallel: bool = True) -> None:
        self._functions = frozenset(functions)
        self._parallel = parallel
        self._buffer = ""          # text not decided yet
        self._in_call = False      # the buffer is inside a <tool_call> block (without the tag)
        self._searched = 0         # inside a block: where the search for its end resumes
        self._space = ""           # whitespace held back: dropped if a call follows
        self._after_call = False   # drop leading whitespace after a call
        self.calls: list[ToolCall] = []

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """Add ``text``; returns (content to send now, calls completed now). ``final`` flushes."""
        self._buffer += text
        content, calls = [], []
        while True:
            if self._in_call:
                end = self._buffer.find(TOOL_CALL_END, self._searched)
                if end < 0:
                    if final:  # unterminated: the block is content
                        content.append(self._content(TOOL_CALL_START + self._buffer, final))
                        self._buffer, self._in_call = "", False
                    else:  # a long block is searched once, not once per piece
                        self._searched = max(0, len(self._buffer) - len(TOOL_CALL_END) + 1)
                    break
                block, self._buffer = self._buffer[:end], self._buffer[end + len(TOOL_CALL_END):]
                self._in_call = False
                call = self._parse(block)
                if call is None:
                    content.append(self._content(TOOL_CALL_START + block + TOOL_CALL_END, False))
                else:  # whitespace around a call is dropped
                    self._space, self._after_call = "", True
                    if self._parallel or not self.calls:
                        self.calls.append(call)
                        calls.append(call)
                continue
            start = self._buffer.find(TOOL_CALL_START)
            if start >= 0:
                content.append(self._content(self._buffer[:start], False))
                self._buffer, self._in_call = self._buffer[start + len(TOOL_CALL_START):], True
                self._searched = 0
                continue
            keep = 0 if final else partial_tag(self._buffer, TOOL_CALL_START)
            content.append(self._content(self._buffer[:len(self._buffer) - keep], final))
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return "".join(content), calls

    def _content(self, text: str, final: bool) -> str:
        """``text`` as content, holding back trailing whitespace (a call may follow it)."""
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        text = self._space + text
        body = text.rstrip()
        self._space = "" if final else text[len(body):]
        return text if final else body

    def _parse(self, block: str) -> ToolCall | None:
        try:
            call = json.loads(block)
        except ValueError:
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"] in self._functions):
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        return ToolCall.new(call["name"], json.dumps(arguments, ensure_ascii=False))


class NamedCallStream:
    """The forced call of a named ``tool_choice``: the whole completion is the function's arguments."""

    def __init__(self, name: str) -> None:
        self.calls = [ToolCall.new(name, "")]

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """No content; the text is the next piece of the call's arguments."""
        call = self.calls[0]
        self.calls[0] = ToolCall(call.name, call.arguments + text, call.id)
        return "", [ToolCall(call.name, text, call.id)] if text else []


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

    for name, definition in {**schema.get("definitions", {}), **schema.get("$defs", {})}.items():
        defs[f"{function}.{name}"] = moved(definition)
    body = moved({key: value for key, value in schema.items() if key not in ("$defs", "definitions")})
    if uses_root:
        defs[function] = body
    return body

