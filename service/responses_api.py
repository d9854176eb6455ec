"""OpenAI's Responses API (``POST /v1/responses``) on the chat pipeline: the request schema, its
conversion to a chat completion request, and the response object and stream events built from a
completion's reasoning, answer text and tool calls.

Stateless, as OpenAI's ``store: false``: no response is kept (``store`` is reported false), so
``previous_response_id`` and ``conversation`` are 400s and a client sends the earlier output items back
in ``input`` (the official client: ``input=[*history, *response.output, ...]``). Text input only;
function tools only. A response's output is the reasoning (one ``reasoning`` item, with a reasoning
parser), the text (one ``message`` item) and the calls (one ``function_call`` item each), in this order
(text written after a call, which Hermes models do not write, joins the message: before the calls when there
was text before them, else in one message item after all of them, held until the completion ends, however the
engine's outputs split it); with harmony, an
analysis after a commentary preamble opens a reasoning item after that message (items as the messages were
written). Streamed or not, the output is the same. Ignores routing, tokenisation and the engine (`service.app`
runs the converted request and feeds `ResponseBuilder`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from service.openai_api import (
    MAX_LOGPROBS,
    MAX_TOOLS,
    APIError,
    Arguments,
    CacheRetention,
    ChatCompletionRequest,
    Flag,
    FunctionName,
    Int,
    Items,
    JSONObject,
    Metadata,
    Number,
    PromptCacheOptions,
    ReasoningEffort,
    SamplingControls,
    SchemaName,
    ShortText,
    Stream,
    StrictModel,
    TemplateKwargs,
    Text,
    TokenLogprob,
    validation_error,
)
from service.tools import ToolCall

# where a chat request's parameter came from in a responses request (errors name what the client sent)
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text.format", "logprobs": "include", "verbosity": "text.verbosity"}


# --- the request -------------------------------------------------------------------------------------------


class TextPart(StrictModel):
    """Text of an input message; ``output_text`` is an earlier response's, sent back."""

    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


def _parts(value: Any) -> Any:
    """Text given as a string is one text part (a validation error then names the part at fault, not
    the string alternative)."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


Parts = Annotated[Items[TextPart], BeforeValidator(_parts)]


class InputMessage(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Parts
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        """The content as one string: several parts are joined with newlines (as `ChatMessage.text`, vLLM's)."""
        return "\n".join(part.text for part in self.content)


class FunctionCallInput(StrictModel):
    """A call of an earlier response, sent back."""

    type: Literal["function_call"]
    call_id: Text = Field(min_length=1)
    name: Text
    arguments: Arguments  # (JSON in them no deeper than the chat endpoint takes)
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(StrictModel):
    """A call's result."""

    type: Literal["function_call_output"]
    call_id: Text = Field(min_length=1)
    output: Parts
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return "\n".join(part.text for part in self.output)  # (as a message's parts)


class ReasoningPart(StrictModel):
    type: Literal["reasoning_text", "summary_text"]
    text: Text


class ReasoningInput(StrictModel):
    """An earlier response's reasoning, sent back: it goes with the assistant turn that follows it."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: Items[ReasoningPart] = []
    content: Items[ReasoningPart] | None = None
    encrypted_content: str | None = None
    status: str | None = None

    def text(self) -> str:
        """Its reasoning text: the content parts, else the summary's parts as paragraphs."""
        if self.content is not None:
            return "".join(part.text for part in self.content)
        return "\n\n".join(part.text for part in self.summary)


def _item_type(item: Any) -> str | None:
    """An input item's kind; a message may leave out ``type`` (OpenAI's "easy" input message)."""
    if isinstance(item, dict):
        return item.get("type", "message")
    return getattr(item, "type", None)


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")] | Annotated[ReasoningInput, Tag("reasoning")],
    Discriminator(_item_type, custom_error_type="invalid_input_item",
                  custom_error_message="input items are objects of type message, function_call, function_call_output "
                                       "or reasoning (item_reference and hosted tools' calls are not supported)")]


class FunctionTool(StrictModel):
    """A function tool in the Responses API's flat form (the chat endpoint's ``function`` with ``type``;
    ``type`` first, so that a hosted tool's error names it)."""

    type: Literal["function"]
    name: FunctionName
    description: Text | None = None
    parameters: JSONObject | None = None
    strict: Flag | None = None  # always honoured when the call is forced


class FunctionChoice(StrictModel):
    type: Literal["function"]
    name: str


class TextFormat(StrictModel):
    """``text.format``: plain text, any JSON object, or JSON following a named schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: SchemaName | None = None
    description: Text | None = None
    json_schema: JSONObject | None = Field(default=None, alias="schema")
    strict: Flag | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> TextFormat:
        named = self.name is not None and self.json_schema is not None
        if self.type == "json_schema" and not named:
            raise ValueError("type 'json_schema' needs name and schema")
        if self.type != "json_schema" and (self.name, self.json_schema, self.description) != (None, None, None):
            raise ValueError("name, schema and description are only allowed with type 'json_schema'")
        return self

    def response_format(self) -> dict[str, Any]:
        """The chat request's ``response_format``."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": {"name": self.name, "description": self.description,
                                                       "schema": self.json_schema, "strict": self.strict}}


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # chat's verbosity (its default, medium, only)


class ReasoningConfig(StrictModel):
    effort: ReasoningEffort = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # no summaries are written: summary is []
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(StrictModel):
    include_obfuscation: Flag | None = None  # nothing is obfuscated


class ResponsesRequest(SamplingControls):
    """``POST /v1/responses``: OpenAI's fields that a stateless text server can honour, and vLLM's
    sampling extensions (``seed``, ``stop``, ``top_k``, ...) and ``chat_template_kwargs``.

    ``reasoning.effort`` reaches the chat template as the variable ``reasoning_effort`` (as vLLM passes
    it; templates that do not read it ignore it). Log-probabilities are returned with
    ``include: ["message.output_text.logprobs"]`` or ``top_logprobs``.
    """

    model: str
    input: Annotated[Items[InputItem], BeforeValidator(lambda v: [{"role": "user", "content": v}] if isinstance(v, str)
                                                      else v)]
    instructions: Text | None = None
    max_output_tokens: Int | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Number | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: Flag | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include: Items[Literal["message.output_text.logprobs", "reasoning.encrypted_content"]] | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    stream: Stream = False
    stream_options: StreamOptions | None = None
    metadata: Metadata = None
    store: Flag | None = None  # nothing is stored, whatever it says: the response reports false
    truncation: Literal["disabled", "auto"] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: Flag | None = None
    max_tool_calls: Int | None = None
    prompt: Any = None
    user: Text | None = None  # these three are echoed in the response
    safety_identifier: ShortText[64] | None = None  # (OpenAI's limits, as chat's)
    prompt_cache_key: ShortText[1024] | None = None
    prompt_cache_retention: CacheRetention = None
    prompt_cache_options: PromptCacheOptions | None = None
    moderation: Any = None  # OpenAI's features this server does not have: refused by name unless null
    context_management: Any = None
    background_options: Any = None
    access_programs: Any = None
    image: Any = None
    service_tier: str | None = None  # chat's (auto and default only; the response reports default)
    chat_template_kwargs: TemplateKwargs = None

    def check_supported(self) -> None:
        """What needs stored state, or a feature this server does not have, is refused by name.

        Raises:
            APIError: 400 naming the parameter.
        """
        stored = "this server stores no responses or conversations: send the earlier output items in input"
        refused = {
            "previous_response_id": (self.previous_response_id is not None, stored),
            "conversation": (self.conversation is not None, stored),
            "background": (bool(self.background), "background responses are not supported (no response is stored)"),
            "prompt": (self.prompt is not None, "stored prompt templates are not supported"),
            "max_tool_calls": (self.max_tool_calls is not None, "not supported (parallel_tool_calls: false allows "
                               "one call)"),
            "truncation": (self.truncation == "auto", "'auto' is not supported: an input longer than the context "
                           "is a 400"),
            "stream_options": (self.stream_options is not None and not self.stream,
                               "only allowed when stream is true (as on the chat endpoint)"),
            "moderation": (self.moderation is not None, "moderation is not supported by this server"),
            "context_management": (self.context_management not in (None, []), "context management (compaction) is "
                                   "not supported: an input longer than the context is a 400"),
            "background_options": (self.background_options is not None, "background responses are not supported"),
            "access_programs": (self.access_programs is not None, "access programs are not supported"),
            "image": (self.image is not None, "image options are not supported: this server generates text"),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise APIError(400, f"{name}: {why}", param=name)

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None or "message.output_text.logprobs" in (self.include or ())

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages: ``instructions`` as the first system message; an assistant
        message and the calls after it as one assistant turn (with the reasoning item before it); a call's
        output as a tool message."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        reasoning, turn = None, None  # the reasoning waiting for its turn; the assistant turn calls join
        for item in self.input:
            if isinstance(item, ReasoningInput):
                reasoning, turn = item.text() or None, None
            elif isinstance(item, InputMessage) and item.role == "assistant" or isinstance(item, FunctionCallInput):
                if turn is None:
                    turn = {"role": "assistant", "content": None, "reasoning": reasoning}
                    messages.append(turn)
                    reasoning = None
                if isinstance(item, InputMessage):  # (several messages in one turn: as one's parts, a line apart)
                    turn["content"] = item.text() if turn["content"] is None else f"{turn['content']}\n{item.text()}"
                else:
                    turn.setdefault("tool_calls", []).append({"id": item.call_id, "type": "function", "function": {
                        "name": item.name, "arguments": item.arguments}})
            elif isinstance(item, FunctionCallOutput):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
                turn = reasoning = None  # (a reasoning item with no turn after it, a cut-off one, stays there)
            else:
                messages.append({"role": item.role, "content": item.text()})
                turn = reasoning = None
        if not messages:
            raise APIError(400, "input has no messages", param="input")
        return messages

    def chat_request(self) -> ChatCompletionRequest:
        """The same request on the chat endpoint.

        Raises:
            APIError: 400 naming the responses parameter at fault.
        """
        self.check_supported()
        fields: dict[str, Any] = {
            "model": self.model, "messages": self.chat_messages(), "stream": self.stream,
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "parallel_tool_calls": self.parallel_tool_calls,
            **self.model_dump(include=set(SamplingControls.model_fields), exclude_unset=True)}
        if self.tools:
            fields["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                               for tool in self.tools]
        if isinstance(self.tool_choice, FunctionChoice):
            fields["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            fields["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            fields["response_format"] = self.text.format.response_format()
        if self.wants_logprobs:
            fields.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.chat_template_kwargs:
            fields["chat_template_kwargs"] = self.chat_template_kwargs
        if self.reasoning is not None and self.reasoning.effort is not None:
            fields["reasoning_effort"] = self.reasoning.effort
        # accepted at their neutral values only, by the chat request's own check (responses took any and ignored it)
        if self.service_tier is not None:
            fields["service_tier"] = self.service_tier
        if self.text is not None and self.text.verbosity is not None:
            fields["verbosity"] = self.text.verbosity
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as exc:
            raise renamed(validation_error(exc.errors())) from None

    def echo(self) -> dict[str, Any]:
        """The request's settings as a response object repeats them."""
        tools = [tool.model_dump(exclude_none=True) for tool in self.tools or ()]
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, FunctionChoice) else self.tool_choice
        fmt = self.text.format if self.text is not None and self.text.format is not None else TextFormat(type="text")
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata or {}, "parallel_tool_calls": self.parallel_tool_calls is not False,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "tools": tools,
                "tool_choice": choice or "auto", "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)},
                "reasoning": self.reasoning.model_dump() if self.reasoning is not None else None,
                "top_logprobs": self.top_logprobs, "truncation": "disabled", "store": False, "background": False,
                "user": self.user, "safety_identifier": self.safety_identifier,
                "prompt_cache_key": self.prompt_cache_key, "service_tier": "default"}


def responses_param(param: str | None) -> str | None:
    """The responses parameter a parameter of the converted chat request came from."""
    if param is None:
        return None
    head, _, rest = param.partition(".")
    if head not in _PARAMS:
        return param
    return _PARAMS[head] + (f".{rest}" if rest and head != "messages" else "")


def renamed(error: APIError) -> APIError:
    """``error`` of the converted chat request, naming the responses parameter it came from."""
    param = responses_param(error.param)
    if param is None:
        return error
    message = error.message if param == error.param else error.message.replace(error.param, param, 1)
    return APIError(error.status, _responses_names(message), type=error.type, param=param, code=error.code)


def _responses_names(message: str) -> str:
    """``message`` with the chat parameters it names as the responses parameters they came from (an error about
    min_tokens named max_tokens, which a responses client never sent)."""
    return re.sub(r"\b(max_completion_tokens|max_tokens|response_format)\b", lambda m: _PARAMS[m.group(1)], message)


# --- the response ------------------------------------------------------------------------------------------


_RESPONSE_ERROR_CODES = ("server_error", "rate_limit_exceeded", "invalid_prompt")  # of a failed response's error


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """One response: its output items, built as the completion's pieces arrive, and the stream events
    that tell them (each a dict with ``type`` and ``sequence_number``).

    Reasoning and text stream as they come; the calls' items follow the text, once it has ended (with
    the completion, unless the text is empty: then as each call completes), so the output has the same
    order streamed or not; a named call's arguments stream as they are generated.
    """

    def __init__(self, model: str, settings: dict[str, Any]) -> None:
        self.id = _new_id("resp")
        self.model = model
        self.settings = settings
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []
        self._sequence = 0
        self._open: dict[str, Any] | None = None  # the item being streamed: reasoning, message or a named call
        self._text_done = False  # the message has ended (no text may follow), or no text came before a call
        self._calls: dict[str, dict[str, Any]] = {}  # call id -> its function_call item
        self._waiting: list[ToolCall] = []  # calls whose items wait for the text to end
        self._held: list[tuple[str, list[TokenLogprob]]] = []  # text after calls with none before: one message at the end

    def snapshot(self, status: str, usage: dict[str, Any] | None = None, *,
                 incomplete: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object with the output so far."""
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None,
                "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
                "model": self.model, "output": _copy(self.output), "usage": usage, "previous_response_id": None,
                **self.settings}

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.snapshot("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def push(self, reasoning: str, text: str, calls: Sequence[ToolCall], logprobs: Sequence[TokenLogprob] = (),
             *, named: bool = False, text_after_calls: bool = False) -> list[dict[str, Any]]:
        """Events for the completion's next reasoning, text (with the log-probabilities of the tokens
        generated since the last text: they go with the text) and calls completed (a named call: its next
        arguments). ``text_after_calls``: the text came after the calls (the tool parser saw none before the
        first): with no message yet, the calls' items come first, as when the text comes in a later push."""
        events = []
        if reasoning:
            events += self._reasoning(reasoning)
        if text_after_calls and not named and not self._has("message"):
            # no text before the calls: they come as they complete, and the text after them (which the chat endpoint
            # joins into one content) waits for the completion's end, to be one message after them all: written
            # between two calls and streamed at once, it made a message between them and another after them, as the
            # outputs happened to split the text (a review)
            for call in calls:
                self._text_done = True
                events += self._close() + self._call(call)
            if text or logprobs:
                self._held.append((text, list(logprobs)))
            return events
        if text:
            events += self._text(text, logprobs)
        for call in calls:
            if named:
                events += self._named(call)
            elif self._text_done or not self._has("message"):
                self._text_done = True
                events += self._close() + self._call(call)
            else:
                self._waiting.append(call)
        return events

    def finish(self, usage: dict[str, Any], incomplete: str | None = None,
               logprobs: Sequence[TokenLogprob] = ()) -> list[dict[str, Any]]:
        """Events that end the response: the last tokens' log-probabilities (if there is text), the open
        item, calls waiting for the text, an empty message if there is no output at all, then
        ``response.completed`` (or ``response.incomplete``, with ``incomplete`` the reason)."""
        events = []
        if self._held:  # the text after the calls, as one message after them
            held, self._held = self._held, []
            events += self._text("".join(text for text, _ in held), [entry for _, entries in held for entry in entries])
        if logprobs and self._open is not None and self._open["type"] == "message":
            events += self._text("", logprobs)
        if not self.output:
            events += self._text("", ())
        events += self._close(incomplete is not None)
        for call in self._waiting:
            events += self._call(call)
        self._waiting = []
        status = "incomplete" if incomplete else "completed"
        return [*events, self._event(f"response.{status}", response=self.snapshot(status, usage, incomplete=incomplete))]

    def failed(self, code: str, message: str, param: str | None = None) -> list[dict[str, Any]]:
        """The ``error`` event with the error's own code, then ``response.failed`` with a code of OpenAI's list
        (the client's types take only those: a request_timeout or device_unavailable there is a server_error)."""
        error = {"code": code if code in _RESPONSE_ERROR_CODES else "server_error", "message": message}
        # the item the failure cut ends incomplete, with its done events (a client rebuilding items from the events
        # kept one that never closed); calls waiting for the text to end are left out, as from the output
        events = self._close(incomplete=True)
        self._waiting, self._held = [], []
        return [*events, self._event("error", code=code, message=message, param=param),
                self._event("response.failed", response=self.snapshot("failed", error=error))]

    # --- items ---

    def _has(self, kind: str) -> bool:
        return any(item["type"] == kind for item in self.output)

    def _reasoning(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self._open is None or self._open["type"] != "reasoning":
            events += self._close()
            item = self._add({"type": "reasoning", "id": _new_id("rs"), "summary": [], "content": [],
                              "encrypted_content": None, "status": "in_progress"})
            events += [self._event("response.output_item.added", output_index=self._index(), item=_copy(item)),
                       *self._part({"type": "reasoning_text", "text": ""})]
        self._open["content"][0]["text"] += delta
        return [*events, self._event("response.reasoning_text.delta", item_id=self._open["id"],
                                     output_index=self._index(), content_index=0, delta=delta)]

    def _text(self, delta: str, logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        """Events for the next text and its tokens' log-probabilities (a message opened if none is)."""
        events = []
        if self._open is None or self._open["type"] != "message":
            events += self._close()
            item = self._add({"type": "message", "id": _new_id("msg"), "role": "assistant", "status": "in_progress",
                              "content": []})
            events += [self._event("response.output_item.added", output_index=self._index(), item=_copy(item)),
                       *self._part({"type": "output_text", "text": "", "annotations": [], "logprobs": []})]
        part = self._open["content"][0]
        entries = [entry.model_dump(mode="json") for entry in logprobs]
        part["text"] += delta
        part["logprobs"] += entries
        if not delta and not entries:
            return events
        return [*events, self._event("response.output_text.delta", item_id=self._open["id"],
                                     output_index=self._index(), content_index=0, delta=delta, logprobs=entries)]

    def _call(self, call: ToolCall) -> list[dict[str, Any]]:
        item = self._add({"type": "function_call", "id": _new_id("fc"), "call_id": call.id, "name": call.name,
                          "arguments": call.arguments, "status": "in_progress"})
        self._open = None
        index = len(self.output) - 1
        item["status"] = "completed"
        added = {**item, "arguments": "", "status": "in_progress"}
        return [self._event("response.output_item.added", output_index=index, item=added),
                self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=call.arguments),
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=call.arguments, name=call.name),
                self._event("response.output_item.done", output_index=index, item=_copy(item))]

    def _named(self, call: ToolCall) -> list[dict[str, Any]]:
        """The next piece of a named call's arguments (its item opened on the first)."""
        events = []
        if call.id not in self._calls:
            events += self._close()
            self._calls[call.id] = self._add({"type": "function_call", "id": _new_id("fc"), "call_id": call.id,
                                              "name": call.name, "arguments": "", "status": "in_progress"})
            events.append(self._event("response.output_item.added", output_index=self._index(),
                                      item=_copy(self._open)))
        self._open["arguments"] += call.arguments
        return [*events, self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                     output_index=self._index(), delta=call.arguments)]

    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        self.output.append(item)
        self._open = item
        return item

    def _index(self) -> int:
        return self.output.index(self._open)

    def _part(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        self._open["content"].append(part)
        return [self._event("response.content_part.added", item_id=self._open["id"], output_index=self._index(),
                            content_index=0, part=_copy(part))]

    def _close(self, incomplete: bool = False) -> list[dict[str, Any]]:
        """Events that end the open item, if any."""
        item, self._open = self._open, None
        if item is None:
            return []
        index = self.output.index(item)
        item["status"] = "incomplete" if incomplete else "completed"
        events = []
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            events += [self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=text),
                       self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=_copy(item["content"][0]))]
        elif item["type"] == "message":
            self._text_done = True
            part = item["content"][0]
            events += [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=part["logprobs"]),
                       self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=_copy(part))]
        else:
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"], name=item["name"]))
        return [*events, self._event("response.output_item.done", output_index=index, item=_copy(item))]

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event


def _copy(value: Any) -> Any:
    """A deep copy of JSON data (an event must not change as the item it shows grows)."""
    if isinstance(value, dict):
        return {key: _copy(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def response_usage(input_tokens: int, cached_tokens: int, output_tokens: int, reasoning_tokens: int,
                   cache_write_tokens: int = 0) -> dict[str, Any]:
    """The response's ``usage`` (``cache_write_tokens``: prompt tokens the prefix cache took in, which the
    official client's types require)."""
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": cache_write_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}
