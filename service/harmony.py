"""GPT-OSS's harmony output format: one completion's reasoning, answer and tool calls, split as it streams.

Owns `HarmonyStream`, which reads the messages a GPT-OSS model writes after its chat template's
``<|start|>assistant`` (special tokens kept in the text), and the harmony grammar pieces that force a
call (`call_grammar`, `answer_prefix`). A completion is one or more messages::

    <|channel|>analysis<|message|>We need the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Tokyo"}<|call|>

or ``...<|start|>assistant<|channel|>final<|message|>The answer.<|return|>``. The first message has no
``<|start|>assistant`` (the prompt wrote it); a recipient (``to=functions.NAME``) may come before or after
the channel; ``<|constrain|>json`` may be absent. Analysis messages are reasoning; final messages, and
commentary without a recipient (a preamble), are content; a message to ``functions.NAME`` is a call of
that function, its body the arguments (JSON). ``<|return|>`` and ``<|call|>`` end the completion (they
are GPT-OSS's end-of-text tokens, so the engine leaves them out of the text), ``<|end|>`` one message.

Ignores HTTP, the chat template (the model's own renders history) and tokenisation; the tool setup and
the other formats live in `service.tools`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"
TAGS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
_ENDS = (END, RETURN, CALL)
# what the first message may open with (the prompt wrote "<|start|>assistant"): anything else is no harmony
_OPENERS = (CHANNEL, CONSTRAIN, MESSAGE, START, " to=")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")


class HarmonyStream:
    """Reasoning, content and tool calls of one completion in the harmony format, fed its text as it
    streams.

    Reasoning and content are sent as they come; a call once its message ends (``<|call|>``, ``<|end|>``,
    the next ``<|start|>``, or the end of a completion that was not cut off: GPT-OSS's ``<|call|>`` is an
    end-of-text token, not in the text). A completion that does not open with a message header is content
    as it is. Text that could still be a tag is held back, so feeding the whole text at once gives what the
    pieces give; special tokens that are not harmony's (``drop``) are left out.

    Args:
        functions: the functions the model may call, by name (their parameters' schemas): a message to
            another function, or whose body is not a JSON object, is not a call (its body is content).
        parallel: False keeps only the first call.
        drop: the texts of the tokenizer's other special tokens, removed from the text.
        make_id: a call's id (None: OpenAI's form).
    """

    def __init__(self, functions: Mapping[str, dict], parallel: bool = True, drop: Collection[str] = (),
                 make_id: Callable[[], str] | None = None) -> None:
        self._functions = functions
        self._parallel = parallel
        self._make_id = make_id
        self._tags, self._pattern, self._prefixes, self._longest = _lexicon(frozenset(drop) - set(TAGS))
        self._buffer = ""
        self._state = "start"      # start, header, body, between (after a message's end)
        self._header = ""          # the message header read so far (tags included)
        self._kind = "content"     # the current message's body: reasoning, content or call
        self._recipient = ""       # the current call's recipient
        self._body = ""            # the current call's body
        self.reasoned = False      # an analysis message was opened
        self.calls: list = []

    @property
    def in_reasoning(self) -> bool:
        """In the body of a reasoning message: an analysis, or a built-in tool's call."""
        return self._state == "body" and self._kind == "reasoning"

    @property
    def framing(self) -> bool:
        """Before a message's body: at the start, in a header or between messages (its channel not read yet)."""
        return self._state in ("start", "header", "between")

    def push(self, text: str, final: bool = False, truncated: bool = False) -> tuple[str, str, list]:
        """Add ``text``; returns (reasoning, content, calls completed now). ``final`` flushes; ``truncated``
        (with it): the completion was cut off (a length limit), so an open call is not one."""
        from service.tools import ToolCall  # (service.tools imports this module)

        self._buffer += text
        out = {"reasoning": [], "content": [], "calls": []}
        if self._state == "start":
            if any(self._buffer.startswith(opener) for opener in _OPENERS):
                self._state = "header"
            elif not final and any(opener.startswith(self._buffer) for opener in _OPENERS):
                return "", "", []  # may still open a header
            else:  # the model ignored the format: its text is content
                self._state, self._kind = "body", "content"
        for piece, is_tag in self._pieces(final):
            if is_tag:
                self._tag(piece, out, ToolCall)
            elif self._state == "header":
                self._header += piece
            elif self._state == "between":
                if piece.strip():  # text outside any message: content
                    self._state, self._kind = "body", "content"
                    out["content"].append(piece.lstrip())
            elif self._kind == "call":
                self._body += piece
            else:
                out[self._kind].append(piece)
        if final:
            if self._state == "body" and self._kind == "call":
                self._end_call(out, ToolCall, complete=not truncated)
            self._state, self._header = "between", ""
        return "".join(out["reasoning"]), "".join(out["content"]), out["calls"]

    def _pieces(self, final: bool):
        """(text, False) and (tag, True) pieces of the buffer, holding back what could still be a tag."""
        while True:
            match = self._pattern.search(self._buffer)
            if match is None:
                keep = 0 if final else self._partial()
                text = self._buffer[:len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep:]
                if text:
                    yield text, False
                return
            if match.start():
                yield self._buffer[:match.start()], False
            self._buffer = self._buffer[match.end():]
            yield match.group(), True

    def _partial(self) -> int:
        """Length of the buffer's longest suffix that is a proper prefix of a tag."""
        tail = len(self._buffer)
        for start in range(max(0, tail - self._longest + 1), tail):
            if self._buffer[start:] in self._prefixes:
                return tail - start
        return 0

    def _tag(self, tag: str, out: dict, call_type) -> None:
        if tag not in self._tags:  # another special token: dropped
            return
        if self._state == "header":
            if tag == START:
                self._header = ""
            elif tag == MESSAGE:
                self._open(self._header)
            elif tag in _ENDS:  # a message without a body
                self._state, self._header = "between", ""
            else:
                self._header += tag
        elif self._state == "body":
            if tag in _ENDS or tag == START:
                if self._kind == "call":
                    self._end_call(out, call_type, complete=True)
                self._state, self._header = ("header" if tag == START else "between"), ""
            # any other tag inside a body is syntax out of place: dropped
        elif self._state == "between":
            if tag in (START, CHANNEL, CONSTRAIN):
                self._state, self._header = "header", "" if tag == START else tag
            elif tag == MESSAGE:
                self._open("")

    def _open(self, header: str) -> None:
        """Start the body of a message with ``header``."""
        recipient = _RECIPIENT.search(header)
        channel = _CHANNEL.search(header)
        channel = channel.group(1) if channel else ""
        self._state, self._body = "body", ""
        if recipient is not None and recipient.group(1) not in ("assistant", "user", "all"):
            # a function's call; a built-in tool's (browser, python) is the model's own work: reasoning
            self._recipient = recipient.group(1)
            self._kind = "call" if self._recipient.startswith("functions.") else "reasoning"
        else:
            self._kind = "reasoning" if channel == "analysis" else "content"
        self.reasoned |= self._kind == "reasoning"

    def _end_call(self, out: dict, call_type, complete: bool) -> None:
        name = self._recipient[len("functions."):]
        arguments = _json_object(self._body) if complete and name in self._functions else None
        if arguments is None:  # not a call: its text is content
            out["content"].append(self._body)
        elif self._parallel or not self.calls:
            call = call_type.new(name, json.dumps(arguments, ensure_ascii=False), self._make_id)
            self.calls.append(call)
            out["calls"].append(call)
        self._body = ""
        self._kind = "content"


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # (nested too deep for Python's parser: text, as the other formats take it)
        return None
    return value if isinstance(value, dict) else None


@functools.lru_cache(maxsize=8)
def _lexicon(drop: frozenset[str]) -> tuple[frozenset[str], re.Pattern, frozenset[str], int]:
    """The harmony tags, a pattern finding them and the ``drop`` texts, every proper prefix of those, and
    the longest one's length."""
    every = sorted({*TAGS, *drop}, key=len, reverse=True)
    prefixes = frozenset(tag[:i] for tag in every for i in range(1, len(tag)))
    return frozenset(TAGS), re.compile("|".join(map(re.escape, every))), prefixes, max(map(len, every))


def parse(block: str, functions: Mapping[str, dict]) -> list[tuple[str, Any]] | None:
    """The calls of a harmony completion's text from its first ``<|channel|>`` on (without it), as
    (name, arguments), or None if it has none or content (`service.tools.ToolFormat`'s parse)."""
    _, content, calls = HarmonyStream(functions).push(CHANNEL + block, final=True)
    if not calls or content.strip():
        return None
    return [(call.name, json.loads(call.arguments)) for call in calls]


def history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages (as `service.openai_api.template_messages` renders them) as GPT-OSS's chat template
    reads them: an assistant's reasoning as ``thinking``; its content dropped when it has both with tool
    calls (the template renders either as the analysis message before the call, and refuses both); one
    call per assistant message, each followed by its result (the template renders only a message's first
    call, and names a result by the call before it), the results of one message's calls matched by id."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        message = dict(messages[i])
        i += 1
        if message.get("role") != "assistant":
            out.append(message)
            continue
        if "reasoning_content" in message:
            message["thinking"] = message.pop("reasoning_content")
            if message.get("tool_calls"):
                message["content"] = ""
        calls = message.get("tool_calls") or []
        if len(calls) < 2:
            out.append(message)
            continue
        results = []
        while i < len(messages) and messages[i].get("role") == "tool":
            results.append(messages[i])
            i += 1
        for k, call in enumerate(calls):
            out.append({**message, "tool_calls": [call]} if k == 0 else
                       {"role": "assistant", "content": "", "tool_calls": [call]})
            mine = [r for r in results if r.get("tool_call_id") == call.get("id")]
            out += mine
            results = [r for r in results if all(r is not m for m in mine)]
        out += results  # results naming no call of the message: as they came
    return out


# --- grammars ------------------------------------------------------------------------------------------


def _analysis(lit: Callable[[str], str]) -> str:
    """Lark rules of an optional analysis message before a forced call or answer: its text runs to
    ``<|end|>`` (any text when that is a special token, which no text lexeme matches; else text without
    ``<``)."""
    end = lit(END)
    text = "/(?s:.*)/" if end.startswith("<[") else "/[^<]*/"
    return (f"analysis: {lit(CHANNEL + 'analysis' + MESSAGE)} analysis_text {end} {lit(START + 'assistant')}\n"
            f"analysis_text: {text}\n")


def call_grammar(parameters: Mapping[str, dict], parallel: bool, lit: Callable[[str], str]) -> str:
    """The Lark rules of ``calls`` for harmony: an optional analysis message, then one call of one of the
    functions, ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>`` (one: a
    GPT-OSS completion ends with its call's ``<|call|>``, whatever ``parallel`` says). Without functions,
    only the analysis message's rules (for `answer_prefix`)."""
    from service.tools import CALL_JSON

    if not parameters:
        return _analysis(lit)
    rules = ["calls: analysis? call", "call: " + " | ".join(f"call{i}" for i in range(len(parameters)))]
    for i, (name, schema) in enumerate(parameters.items()):
        head = lit(f"{CHANNEL}commentary to=functions.{name} {CONSTRAIN}json{MESSAGE}")
        rules.append(f"call{i}: {head} %json {json.dumps({**schema, 'x-guidance': CALL_JSON})} {lit(CALL)}")
    return "\n".join(rules) + "\n" + _analysis(lit)


def answer_prefix(lit: Callable[[str], str]) -> str:
    """What comes before a constrained answer in harmony: an optional analysis message, then the final
    channel's header (the rule ``analysis`` is `call_grammar`'s)."""
    return f"analysis? {lit(CHANNEL + 'final' + MESSAGE)}"
