"""OpenAI wire format: request and response schemas, and the one place errors become OpenAI error JSON.

Owns the pydantic v2 models of ``/v1/completions``, ``/v1/chat/completions`` (requests with their
messages, tools and tool history, responses, stream chunks, log-probabilities, tool calls, reasoning),
``/tokenize`` and ``/detokenize``, their conversion to `SamplingParams` (OpenAI's fields, vLLM's
sampling extensions, and the grammar of a structured output or a forced tool call), and
`error_response`, which maps every exception to ``{"error": {"message", "type", "param", "code"}}`` with
its HTTP status. Unknown fields are rejected; known OpenAI fields this server does not implement are
accepted only at their neutral values. Ignores routing, tokenisation and the engine.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException

from service.async_engine import (
    DeviceUnavailable,
    EngineError,
    EngineStopped,
    RequestTimeout,
    StructuredOutputFailed,
)
from service.engine import QueueFull
from service.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRINGS,
    SamplingParams,
)
from service.structured import grammar_from_spec
from service.tools import FORMATS as TOOL_FORMATS
from service.tools import ToolCall, ToolSetup, answer_grammar

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
MAX_N = 16  # choices per prompt (each its own engine request, sharing the first one's prefill)
MAX_PROMPTS = 32  # prompts in one completions request
MAX_CHOICES = 64  # prompts x n: engine requests one HTTP request may start
MAX_TOOLS = 128  # functions one request may offer (OpenAI's limit)
# apply_chat_template's own arguments, which chat_template_kwargs may not set
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "self"})


def _template_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """vLLM's ``chat_template_kwargs``: variables for the chat template (``enable_thinking``, ...)."""
    for key in value or {}:
        if not key.isidentifier() or key in _RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"{key!r} cannot be set: keys are template variables, not apply_chat_template's "
                             "own arguments")
    return _utf8_json(value)


TemplateKwargs = Annotated[dict[str, Any] | None, Field(max_length=32), AfterValidator(_template_kwargs)]
# Accepted for compatibility only at these values (anything else is a 400 naming the field).
_NEUTRAL: dict[str, tuple] = {
    "best_of": (None, 1), "suffix": (None, ""),
    "functions": (None, []), "function_call": (None, "none", "auto"),
    "service_tier": (None, "auto", "default"), "store": (None, False),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "web_search_options": (None,),
    "verbosity": (None, "medium"),  # OpenAI's default, which its clients may send explicitly
    "moderation": (None,),
}


class APIError(Exception):
    """An error with its OpenAI type and HTTP status, raised by route code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


# booleans and integers as JSON writes them: pydantic's lax mode took "true" and "yes" for true, true for 1 and "5" for
# 5 (prompt token ids [true, 2] generated from [1, 2], a review); OpenAI refuses them
Flag = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]  # an integer or a number, as JSON's (true and "0.5" were taken as 1.0 and 0.5)


class StrictModel(BaseModel):
    """A request model: unknown fields are rejected, and so are NaN and infinities where a number is asked for
    (Python's JSON reads `NaN`, which every bound then refused as out of range)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _utf8(text: str) -> str:
    """`text`, if it is valid Unicode: JSON's "\\ud800" escapes decode to lone surrogates, which the
    tokenizer and the UTF-8 response encoder refuse (a 500 instead of this 400)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: lone surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class ShortText:
    """``ShortText[n]``: Text of at most n characters (Text with pydantic's max_length said "at most 64 items")."""

    def __class_getitem__(cls, length: int):
        def at_most(value: str) -> str:
            if len(value) > length:
                raise ValueError(f"at most {length} characters, got {len(value)}")
            return value

        return Annotated[str, AfterValidator(_utf8), AfterValidator(at_most)]


_T = TypeVar("_T")
# A list whose validation stops at its first bad item (one error, where the handler reports one anyway): every item of
# a 1 MiB list failing made pydantic list 1.4M errors, which FastAPI turned into dicts on the event loop (one body of
# 340,000 empty content parts stalled every client 11 s and took 2.4 GB; a review).
Items = Annotated[list[_T], Field(fail_fast=True)]


MAX_JSON_DEPTH = 128  # nesting of a tool's schema, a structured output's, template variables, a call's arguments


def _utf8_json(value: Any, *, finite: bool = True) -> Any:
    """`value`, a JSON value, if all of its strings (object keys too) are valid Unicode (`_utf8`): a tool's
    schema, a structured output's, template variables are rendered into the prompt or a grammar, which refuse
    lone surrogates with errors that name neither the field nor the cause. The error names where the string is.
    Nested deeper than MAX_JSON_DEPTH it is refused too: rendering tools nested 400 deep (a 20 KB body) overflowed
    the template's recursion, a 500 with a 3,000-line traceback logged twice. With ``finite``, NaN and infinities
    are refused as well: Python's JSON reads them (``NaN``, ``1e400``), StrictModel refuses them only in number
    fields, and one in a tool's schema got through to a grammar that could not read it back (after 30 s) or to a
    response that could not be written as JSON once the completion was generated."""
    _check_json(value, None, 0, finite)
    return value


# A place in a JSON value: None (the value itself), or (the place holding it, its key or index). The dotted path is
# written only for an error: written for every item, a long key over a long list cost the event loop 3-6 s for one
# 1 MiB body (a review).
_Place = tuple[Any, str | int] | None


def _dotted(place: _Place) -> str:
    keys: list[str] = []
    while place is not None:
        place, key = place
        keys.append(str(key))
    return ".".join(reversed(keys))


def _check_json(value: Any, place: _Place, depth: int, finite: bool) -> None:
    def refused(problem: str) -> ValueError:
        where = _dotted(place)
        return ValueError(f"{where}: {problem}" if where else problem)

    if depth > MAX_JSON_DEPTH:
        raise refused(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        try:
            _utf8(value)
        except ValueError as exc:
            raise refused(str(exc)) from None
    elif isinstance(value, float):
        if finite and not math.isfinite(value):
            raise refused(f"{value} is not a finite number (JSON has no NaN or infinities)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, place, depth + 1, finite)
            _check_json(item, (place, key), depth + 1, finite)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, (place, index), depth + 1, finite)


def _json_in_text(text: str, *, finite: bool = True) -> Any:
    """The JSON value ``text`` holds (None when it is not JSON), checked as `_utf8_json` checks a JSON field: JSON
    sent as a string (a call's arguments, a structured output's schema) is parsed and rendered too. 1,000 levels
    made ``json.loads`` raise RecursionError, and 600 (which parse) overflowed the chat template: 500s, where a
    dict nested as deep is a 400."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        return None
    return _utf8_json(value, finite=finite)


def _arguments(text: str) -> str:
    """A call's arguments sent back: any text, JSON in it checked as `_json_in_text` checks it (a NaN the model
    wrote, which Python's JSON reads, stays allowed: the client sends back what this server returned)."""
    _json_in_text(text, finite=False)
    return text


JSONObject = Annotated[dict[str, Any], AfterValidator(_utf8_json)]  # a JSON object whose strings are Text
# a call's arguments as JSON text (or any text), JSON in it no deeper than a JSONObject
Arguments = Annotated[str, AfterValidator(_utf8), AfterValidator(_arguments)]

MAX_METADATA_KEYS = 16  # OpenAI's limits on metadata: 16 pairs, keys of 64 characters, values of 512
# OpenAI's ``metadata`` tags: checked against its limits, echoed where the API echoes them (responses), not stored
Metadata = Annotated[dict[ShortText[64], ShortText[512]] | None,
                     Field(max_length=MAX_METADATA_KEYS)]


class StreamOptions(StrictModel):
    include_usage: Flag = False
    include_obfuscation: Flag | None = None  # nothing is obfuscated: the chunks carry no padding field either way


# ``stream``: OpenAI's is "boolean or null, defaults to false", and its client sends null for stream=None
Stream = Annotated[Flag, BeforeValidator(lambda value: False if value is None else value)]
# OpenAI's reasoning effort (the official client's values): a chat template variable (chat, and responses' reasoning.effort)
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None
# OpenAI's prompt cache retention: accepted; the prefix cache keeps what fits in memory, whichever is asked for
CacheRetention = Literal["in_memory", "24h"] | None


class PromptCacheOptions(StrictModel):
    """OpenAI's prompt caching options: accepted at the values its API takes, and ignored. Prefix caching here
    needs no breakpoint and keeps a prompt's blocks while memory allows (no lifetime); it never changes an
    output, only the time to its first token."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


SchemaName = Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]  # a response format's name


class JSONSchemaFormat(StrictModel):
    """``response_format.json_schema``: OpenAI's named schema (``strict`` is always honoured: the output
    is constrained to the schema whatever it says)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: SchemaName
    description: Text | None = None
    json_schema: JSONObject = Field(default_factory=dict, alias="schema")
    strict: Flag | None = None


class ResponseFormat(StrictModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and allowed only with it")
        return self


class StructuredOutputs(StrictModel):
    """vLLM's ``structured_outputs``: exactly one of a JSON schema, a regular expression the whole output
    matches, a list of choices, or a Lark (or GBNF) grammar."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_schema: JSONObject | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: Items[Text] | None = None
    grammar: Text | None = None

    @field_validator("json_schema")
    @classmethod
    def _json_text(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        """A schema sent as JSON text is checked as one sent as an object (text that is not JSON is refused when
        the grammar is built, naming structured_outputs)."""
        if isinstance(value, str):
            _json_in_text(value)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if len(self._given()) != 1:
            raise ValueError(f"exactly one of json, regex, choice, grammar is needed, got {len(self._given())}")
        return self

    def _given(self) -> list[tuple[str, Any]]:
        """(kind, value) of every field set, kinds as `service.structured.grammar_from_spec` takes them."""
        values = (("json", self.json_schema), ("regex", self.regex), ("choice", self.choice), ("grammar", self.grammar))
        return [(kind, value) for kind, value in values if value is not None]

    def spec(self) -> tuple[str, Any]:
        """(kind, value) of the one field set."""
        return self._given()[0]


class SamplingControls(StrictModel):
    """Sampling controls beyond temperature and top-p, which every generation endpoint takes (the Responses
    API as vLLM's extensions): OpenAI's stop, seed and penalties, and vLLM's own."""

    stop: Text | Items[Text] | None = Field(default_factory=list)
    seed: Int | None = Field(default=None, ge=-2**63, lt=2**63)  # a signed 64-bit integer, as vLLM takes
    presence_penalty: Number | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: Number | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: Annotated[dict[str, Number], Field(fail_fast=True)] | None = None
    # vLLM's extensions: generate past EOS (benchmarks with fixed output lengths), more sampling controls
    ignore_eos: Flag = False
    top_k: Int | None = Field(default=None, ge=-1)
    min_p: Number | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Number | None = Field(default=None, gt=0.0, le=MAX_REPETITION_PENALTY)
    min_tokens: Int | None = Field(default=None, ge=0)
    stop_token_ids: list[Annotated[Int, Field(ge=0)]] | None = Field(default=None, max_length=64)
    include_stop_str_in_output: Flag = False  # the text ends with the stop string met (by default, before it)
    skip_special_tokens: Flag = True  # special tokens decode to no text

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(value)}")
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit()) or len(key) > 12:  # (no vocabulary has a trillion tokens)
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key[:40]!r}"
                                 + ("..." if len(key) > 40 else ""))
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}")
        return value


class _SamplingFields(SamplingControls):
    """Fields shared by the completions and chat endpoints."""

    model: str
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Number | None = Field(default=None, gt=0.0, le=1.0)
    stream: Stream = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's identifiers of an end user and of a prompt cache: accepted; prefix caching needs no key
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: CacheRetention = None
    prompt_cache_options: PromptCacheOptions | None = None
    n: Int | None = Field(default=None, ge=1, le=MAX_N)
    # structured outputs: OpenAI's response_format (vLLM takes it on completions too) or vLLM's own
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @functools.cached_property
    def grammar_source(self) -> tuple[str | None, str | None]:
        """The structured output, or forced tool call, as grammar text (None: free text), and the parameter it
        comes from (what an error compiling it names); built once per request, whatever its number of prompts.

        Raises:
            APIError: 400 for a grammar that cannot be built or a combination that is not allowed.
        """
        return _grammar(self)

    @property
    def grammar(self) -> str | None:
        """The grammar text of `grammar_source`."""
        return self.grammar_source[0]

    @field_validator(*_NEUTRAL, mode="before", check_fields=False)
    @classmethod
    def _check_neutral(cls, value: Any, info) -> Any:
        if not any(value == neutral and isinstance(value, bool) == isinstance(neutral, bool)
                   for neutral in _NEUTRAL[info.field_name]):
            raise ValueError(f"{info.field_name}={value!r} is not supported by this server")
        return value


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``; ``prompt`` is a string, a list of token ids, or a list of either (a
    batch: ``n`` choices per prompt, indexed ``prompt * n + choice``); validated into a list of prompts.

    ``logprobs``: k reports each completion token's log-probability and the k most likely tokens at its
    position (the chosen one added when it is not among them, as OpenAI's legacy endpoint does).
    """

    prompt: Text | Items[Int] | Items[Text] | Items[Items[Int]]
    # OpenAI's legacy endpoint's default (and vLLM's): 16; null: the rest of the context, as chat's default. 0 with
    # echo scores the prompt, generating nothing
    max_tokens: Int | None = Field(default=16, ge=0)
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: Any = None
    echo: Flag | None = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        batch = isinstance(value, list) and bool(value) and isinstance(value[0], str | list)
        prompts = list(value) if batch else [value]
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        if any(isinstance(p, list) and any(t < 0 for t in p) for p in prompts):
            raise ValueError("prompt token ids must be non-negative")
        return prompts

    @model_validator(mode="after")
    def _choices_in_bounds(self) -> CompletionRequest:
        if len(self.prompt) * (self.n or 1) > MAX_CHOICES:
            raise ValueError(f"n {self.n} x {len(self.prompt)} prompts exceeds {MAX_CHOICES} choices per request")
        return self


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class RefusalPart(StrictModel):
    """An assistant's refusal (OpenAI's content part), sent back as history: rendered as its text."""

    type: Literal["refusal"]
    refusal: Text


class FunctionCallIn(StrictModel):
    name: Text
    arguments: Arguments  # JSON text, as the model wrote it


class ToolCallIn(StrictModel):
    """A tool call of an earlier assistant message, sent back as conversation history."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(StrictModel):
    """One message; ``tool_calls`` only on an assistant message (whose content may then be null), and a
    ``tool`` message (a call's result) names its call in ``tool_call_id``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Items[TextPart | RefusalPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: Text | None = None
    # an assistant's thinking, sent back (vLLM's current and former names); templates read reasoning_content
    reasoning: Text | None = None
    reasoning_content: Text | None = None
    # a response message sent back whole (the openai client's ``message.model_dump()``): null, or an assistant's
    # refusal (its text, when the message has no other content)
    refusal: Text | None = None
    function_call: None = None
    audio: None = None
    annotations: None = None

    @model_validator(mode="after")
    def _tool_fields_by_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls are only allowed on assistant messages")
        if (self.reasoning or self.reasoning_content) and self.role != "assistant":
            raise ValueError("reasoning is only allowed on assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message may have one")
        if self.role != "assistant" and (self.refusal is not None or any(
                isinstance(part, RefusalPart) for part in self.content or ())):
            raise ValueError("a refusal is only allowed on assistant messages")
        # OpenAI's rule (an empty string is content): a message without it was rendered as an empty turn (a review);
        # an assistant's may be left out with tool_calls, a refusal or reasoning (a thinking model's reply cut in
        # its reasoning, sent back whole)
        if self.content is None and not (self.role == "assistant" and (
                self.tool_calls or self.refusal is not None or self.reasoning or self.reasoning_content)):
            raise ValueError("content is required (an assistant message may leave it out when it has tool_calls, "
                             "a refusal or reasoning)")
        return self

    def text(self) -> str:
        """The content as one string: several text parts are joined with newlines (vLLM's chat_utils); a refusal
        part, or the refusal of a message without content, as its text."""
        if isinstance(self.content, list):
            return "\n".join(part.text if isinstance(part, TextPart) else part.refusal for part in self.content)
        return self.content if self.content is not None else self.refusal or ""

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates expect it (``developer`` is a system message; a tool call's
        arguments a dict when they are a JSON object, as Hugging Face templates render them)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _json_object_or_text(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:  # a participant's name (templates that render it tell same-role speakers apart)
            message["name"] = self.name
        if self.reasoning or self.reasoning_content:
            message["reasoning_content"] = self.reasoning or self.reasoning_content
        return message


def _check_continuation(messages: list[ChatMessage], add_generation_prompt: bool, continue_final: bool) -> None:
    if not continue_final:
        return
    if add_generation_prompt:
        raise ValueError("continue_final_message needs add_generation_prompt: false (the prompt ends inside the "
                         "last message, not after a new assistant turn)")
    if not messages or messages[-1].role != "assistant" or not messages[-1].text():
        raise ValueError("continue_final_message needs a last message from the assistant with text to continue")


def _json_object_or_text(text: str) -> dict | str:
    try:
        value = json.loads(text)
    except ValueError:  # (JSON nested deep enough to overflow the parser was refused at validation: `Arguments`)
        return text
    return value if isinstance(value, dict) else text


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule for function names


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: Text | None = None
    parameters: JSONObject | None = None  # a JSON schema; none (or {}) takes no arguments
    strict: Flag | None = None  # always honoured when the call is forced (tool_choice required or named)

    def schema(self) -> dict[str, Any]:
        """The arguments' JSON schema; without ``parameters``, an empty parameter list (OpenAI's rule): the
        object ``{}`` alone (an object schema without ``additionalProperties`` would take any keys)."""
        return self.parameters or {"type": "object", "properties": {}, "additionalProperties": False}


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Items[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: Flag | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Flag | None = None
    chat_template_kwargs: TemplateKwargs = None
    include_reasoning: Flag = True  # with a reasoning parser: False leaves the reasoning out
    # vLLM's: end the prompt inside the last (assistant) message, which the completion continues
    add_generation_prompt: Flag = True
    continue_final_message: Flag = False
    functions: Any = None
    function_call: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Metadata = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    # OpenAI's; the chat template's variable reasoning_effort, as vLLM passes it (templates that read it:
    # GPT-OSS's, some Qwen3 and DeepSeek variants; the others ignore it)
    reasoning_effort: ReasoningEffort = None
    web_search_options: Any = None
    verbosity: Any = None
    moderation: Any = None
    # how the served model writes tool calls (`service.tools.FORMATS`), and which of the format's tags are
    # special tokens of its tokenizer: the server's, set before first use
    _tool_format: str = PrivateAttr(default="hermes")
    _special_tags: Mapping[str, int] = PrivateAttr(default_factory=dict)
    _think_tags: tuple[int, ...] = PrivateAttr(default=())  # special-token tags the server's reasoning parser reads

    def keep_think_tags(self, ids: Sequence[int]) -> ChatCompletionRequest:
        """Decode the special tokens ``ids`` (the others still left out): the thinking tags the server's reasoning
        parser splits at, when they are special tokens of its tokenizer (as the tool tags of `use_tool_format`)."""
        self._think_tags = tuple(ids)
        return self

    def use_tool_format(self, name: str, special: Mapping[str, int] | None = None) -> ChatCompletionRequest:
        """Read and force calls in the format ``name``, whose tags ``special`` are special tokens (with their
        ids, `service.tools.special_tags`); before the tool setup is first used."""
        if "tool_setup" in self.__dict__:
            raise RuntimeError("the tool format must be set before the tool setup is used")
        self._tool_format, self._special_tags = name, dict(special or {})
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("only allowed with logprobs: true")
        return value

    @model_validator(mode="after")
    def _continue_an_assistant_message(self) -> ChatCompletionRequest:
        _check_continuation(self.messages, self.add_generation_prompt, self.continue_final_message)
        return self

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("function names must be unique")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: str | NamedToolChoice | None, info) -> str | NamedToolChoice | None:
        if "tools" not in info.data:  # tools failed validation: that error is reported
            return choice
        names = [tool.function.name for tool in info.data["tools"] or ()]
        if choice == "required" and not names:
            raise ValueError("'required' needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"names the function {choice.function.name!r}, which is not in tools")
        return choice

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.messages, self._tool_format)

    @property
    def harmony(self) -> bool:
        """Whether the served model writes GPT-OSS's harmony format (reasoning, answer and calls in it)."""
        return self._tool_format == "openai"

    def template_variables(self) -> dict[str, Any] | None:
        """Variables for the chat template: ``chat_template_kwargs``, and ``reasoning_effort`` unless they
        set it."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The offered functions for the chat template (none when the model may not call them)."""
        if self.tool_setup is None:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    @functools.cached_property
    def tool_setup(self) -> ToolSetup | None:
        """What the model may call (None: no tools, or ``tool_choice: "none"``)."""
        if not self.tools or self.tool_choice == "none":
            return None
        parameters = {tool.function.name: tool.function.schema() for tool in self.tools}
        parallel = self.parallel_tool_calls is not False
        if isinstance(self.tool_choice, NamedToolChoice):
            return ToolSetup(parameters, "named", self.tool_choice.function.name, parallel, self._tool_format,
                             self._special_tags)
        return ToolSetup(parameters, self.tool_choice or "auto", parallel=parallel, format=self._tool_format,
                         special=self._special_tags)


def sampling_params(request: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int,
                    max_model_len: int, *, at_least: bool = False) -> SamplingParams:
    """Engine sampling parameters; without a limit a completion may fill the rest of the context. ``at_least``: the
    prompt's tokens were counted in part (a lower bound, enough to refuse it; `service.app`)."""
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if num_prompt_tokens >= max_model_len:
        count = f"at least {num_prompt_tokens}" if at_least else num_prompt_tokens
        raise APIError(400, f"the prompt has {count} tokens; this model's context is {max_model_len}",
                       param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    # (named as the request named it: the official client sends max_completion_tokens, max_tokens deprecated)
    name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
    limit = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if limit == 0 and not getattr(request, "echo", False):
        raise APIError(400, "max_tokens 0 is only allowed with echo: true (to score the prompt)", param="max_tokens")
    if limit is not None and num_prompt_tokens + limit > max_model_len:
        raise APIError(400, f"{name} {limit} plus the prompt's {num_prompt_tokens} tokens exceeds this "
                       f"model's context of {max_model_len}", param=name, code="context_length_exceeded")
    max_tokens = limit if limit is not None else max_model_len - num_prompt_tokens
    if (request.min_tokens or 0) > max_tokens:
        bound = f"{name} {max_tokens}" if limit is not None else f"the {max_tokens} tokens the context leaves"
        raise APIError(400, f"min_tokens {request.min_tokens} exceeds {bound}", param="min_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed, stop=tuple(request.stop), ignore_eos=request.ignore_eos, logprobs=_logprobs(request),
        prompt_logprobs=_prompt_logprobs(request),
        presence_penalty=request.presence_penalty or 0.0, frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=tuple((int(token), bias) for token, bias in (request.logit_bias or {}).items()),
        top_k=request.top_k or 0, min_p=request.min_p or 0.0, repetition_penalty=request.repetition_penalty or 1.0,
        min_tokens=request.min_tokens or 0, stop_token_ids=tuple(request.stop_token_ids or ()),
        grammar=request.grammar, skip_special_tokens=request.skip_special_tokens and not _keeps_special(request),
        kept_special_ids=_kept_tags(request), include_stop_str=request.include_stop_str_in_output)


def _keeps_special(request: CompletionRequest | ChatCompletionRequest) -> bool:
    """Whether the completion's text must keep every special token: the model writes harmony (GPT-OSS: its
    messages' headers are special tokens, tools or not; the others are left out by `service.harmony`)."""
    return isinstance(request, ChatCompletionRequest) and request.harmony and bool(request._special_tags)


def _kept_tags(request: CompletionRequest | ChatCompletionRequest) -> tuple[int, ...]:
    """The special tokens a completion's text keeps while leaving out the others: the tags of a tool format that
    are special tokens (Mistral's ``[TOOL_CALLS]``) when the model may call a tool, and thinking tags that are.
    (All special tokens were kept for them, as vLLM's Mistral parser asks: a model's others showed in the text.)"""
    if not isinstance(request, ChatCompletionRequest):
        return ()
    tools = request.tool_setup
    return tuple(sorted({*(tools.special.values() if tools is not None else ()), *request._think_tags}))


def _grammar(request: CompletionRequest | ChatCompletionRequest) -> tuple[str | None, str | None]:
    """The request's structured output, or its forced tool call, as grammar text (None: free text), and the
    parameter it comes from. With tools that the model may call or not, a JSON response format constrains the
    answer it gives instead of a call (OpenAI's tools with ``response_format``)."""
    fmt, structured = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and structured is not None:
        raise APIError(400, "give either response_format or structured_outputs, not both", param="structured_outputs")
    tools = request.tool_setup if isinstance(request, ChatCompletionRequest) else None
    if tools is not None and structured is not None:
        raise APIError(400, "tools cannot be combined with structured_outputs (unless tool_choice is 'none'); "
                       "response_format can constrain an answer given instead of a call", param="tools")
    answer = None
    if fmt is not None and fmt.type != "text":
        answer = fmt.json_schema.json_schema if fmt.json_schema is not None else {"type": "object"}
    if tools is not None and (tools.choice != "auto" or answer is not None):
        if request.min_tokens:
            raise APIError(400, "min_tokens cannot be combined with a forced tool call or tools with a response "
                           "format", param="min_tokens")
        try:
            grammar = tools.grammar(answer if tools.choice == "auto" else None)
        except (ValueError, TypeError) as exc:  # a schema the call grammar cannot take (`$defs` not an object): a 400,
            # as the structured outputs' below, not a 500 (TypeError: a keyword of a type no check foresaw)
            raise APIError(400, f"tools: {exc}", param="tools") from None
        return grammar, "response_format" if tools.choice == "auto" else "tools"
    if structured is not None:
        kind, value = structured.spec()
        param = "structured_outputs"
    elif answer is not None:
        kind, value, param = "json", answer, "response_format"
    else:
        return None, None
    if request.min_tokens:
        raise APIError(400, f"min_tokens cannot be combined with {param}", param="min_tokens")
    try:
        if kind == "json" and isinstance(request, ChatCompletionRequest) and request.harmony:
            # harmony: the JSON is the final message's, after the model's analysis (other kinds stay bare)
            schema = json.loads(value) if isinstance(value, str) else value
            if isinstance(schema, dict):
                return answer_grammar(request._tool_format, schema, request._special_tags), param
        return grammar_from_spec(kind, value), param
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None


def _logprobs(request: CompletionRequest | ChatCompletionRequest) -> int | None:
    """How many alternatives per token the request wants (None: no log-probabilities)."""
    if isinstance(request, ChatCompletionRequest):
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs


def _prompt_logprobs(request: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Alternatives per prompt token: a completion that echoes its prompt with log-probabilities."""
    return request.logprobs if isinstance(request, CompletionRequest) and request.echo else None


# --- responses -----------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache, not prefilled


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @staticmethod
    def of(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(BaseModel):
    """The legacy endpoint's log-probabilities: parallel lists, one entry per completion token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None for the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """Both the full response (``object="text_completion"``) and each stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @staticmethod
    def of(call: ToolCall) -> ToolCallOut:
        return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _unless_none(default=None, **kwargs):
    """A field left out of the JSON when None (OpenAI leaves out what does not apply)."""
    return Field(default=default, exclude_if=lambda value: value is None, **kwargs)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = _unless_none()  # vLLM's field (formerly reasoning_content)
    tool_calls: list[ToolCallOut] | None = _unless_none()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = _unless_none()  # in a call's first delta only
    arguments: str = ""


class DeltaToolCall(BaseModel):
    """A piece of one tool call; the first one of a call carries its id, type and name."""

    index: int
    id: str | None = _unless_none()
    type: Literal["function"] | None = _unless_none()
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = _unless_none()
    tool_calls: list[DeltaToolCall] | None = _unless_none()


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# --- tokenizer endpoints (vLLM's /tokenize and /detokenize) -----------------------------------------


class TokenizeRequest(StrictModel):
    """``POST /tokenize``: a ``prompt`` (with the tokenizer's special tokens unless turned off) or chat
    ``messages`` (through the chat template, with the generation prompt unless turned off)."""

    model: str | None = None
    prompt: Text | None = None
    messages: Items[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: Flag = True
    add_generation_prompt: Flag = True
    return_token_strs: Flag = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    chat_template_kwargs: TemplateKwargs = None
    continue_final_message: Flag = False

    @model_validator(mode="after")
    def _continue_an_assistant_message(self) -> TokenizeRequest:
        _check_continuation(self.messages or [], self.add_generation_prompt, self.continue_final_message)
        return self

    def template_messages(self, tool_format: str = "hermes") -> list[dict[str, Any]]:
        return template_messages(self.messages or (), tool_format)

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


def template_messages(messages: Sequence[ChatMessage], tool_format: str) -> list[dict[str, Any]]:
    """``messages`` as the chat template reads them, call ids as the tool format's template wants them
    (Mistral's: nine letters and digits, the same for a call and its result)."""
    rendered = [m.template_message() for m in messages]
    rename = TOOL_FORMATS[tool_format].template_id
    if rename is not None:
        for message in rendered:
            for call in message.get("tool_calls", ()):
                call["id"] = rename(call["id"])
            if "tool_call_id" in message:
                message["tool_call_id"] = rename(message["tool_call_id"])
    history = TOOL_FORMATS[tool_format].history  # (harmony's: thinking, one call per message)
    return history(rendered) if history is not None else rendered


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    """``POST /detokenize``: token ids back to text (special tokens included)."""

    model: str | None = None
    tokens: Items[Annotated[Int, Field(ge=0)]]  # ids, not "1" or true


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vibe-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- errors --------------------------------------------------------------------------------------------

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable_error"}


def error_body(exc: BaseException) -> tuple[int, dict]:
    """HTTP status and OpenAI error JSON of any exception (internals of 5xx errors are never shown)."""
    err = _as_api_error(exc)
    return err.status, {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for ``exc``; 429 carries ``Retry-After``, 401 the scheme to authenticate with
    (``WWW-Authenticate: Bearer``, which RFC 7235 requires of a 401)."""
    status, body = error_body(exc)
    headers = ({"Retry-After": str(RETRY_AFTER_S)} if status == 429
               else {"WWW-Authenticate": 'Bearer realm="vibe-admin"'} if status == 401 else None)
    return JSONResponse(body, status_code=status, headers=headers)


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError | ValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, QueueFull):
        return APIError(429, f"the server is busy: {exc}; retry later", type="rate_limit_error",
                        code="rate_limit_exceeded")
    if isinstance(exc, ValueError):  # by project convention, bad input that names the bad value (first, if a field)
        return APIError(400, str(exc), param=named_param(str(exc)))
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        return APIError(exc.status_code, str(exc.detail), type=_TYPES.get(exc.status_code, "invalid_request_error"))
    if isinstance(exc, EngineStopped):
        return APIError(503, "the engine is shutting down; retry later", type="service_unavailable_error")
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), type="timeout_error", code="request_timeout")
    if isinstance(exc, DeviceUnavailable):
        return APIError(503, f"expert device {exc.device} failed while serving this request; its experts "
                        "are being moved to the other devices: retry the request", type="service_unavailable_error",
                        code="device_unavailable")
    if isinstance(exc, StructuredOutputFailed):  # (the request's grammar: too large for the parser to follow)
        return APIError(400, f"the structured output could not be followed to its end: {exc}; simplify it",
                        param=exc.param, code="structured_output_failed")
    if isinstance(exc, EngineError):
        return APIError(500, "the model failed while generating this request", type="server_error")
    log.error("internal error", exc_info=exc)
    return APIError(500, "internal server error", type="server_error")


def validation_error(errors: list[dict]) -> APIError:
    """400 for the first validation error, naming the field (``messages.0.role``). A field that may take one of
    several types (``content``: a string or a list of parts) reports an error for each, under a tag naming the
    type (``list[TextPart]``): of those, the one that got furthest into the input (the list's part that is not a
    text part, not "should be a string"), with the tags left out of the name."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type"):
        # (a body sent as text/plain, or JSON that is not an object: pydantic's own words named neither)
        return APIError(400, "the request body must be a JSON object, sent with Content-Type: application/json")
    field = _field(first.get("loc", ()))
    alternatives = [error for error in errors if _field(error.get("loc", ())) == field]
    first = max(alternatives, key=lambda error: len(error.get("loc", ())))  # (the first of the deepest)
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body" and not _type_tag(part)) or None
    message = first["msg"].removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = f"unknown parameter {param!r}"
    elif first.get("type") == "missing":
        message = f"missing required parameter {param!r}" if param else "the request body is missing: send a JSON object"
    elif param:
        message = f"{param}: {message}"
    return APIError(400, message, param=param or named_param(message))


def named_param(message: str) -> str | None:
    """The request parameter an error's message begins with (``logit_bias token ids must be ...``, a check of
    several fields or one made past validation, which carry no location), if it is one; else None."""
    match = re.match(r"[a-z_]+\b", message)
    return match.group() if match and match.group() in _request_params() else None


@functools.cache
def _request_params() -> frozenset[str]:
    from service.responses_api import ResponsesRequest

    models = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest, ResponsesRequest)
    return frozenset(name for model in models for name in model.model_fields)


def _type_tag(part: Any) -> bool:
    """Whether a part of a validation error's location is pydantic's tag of one type of a union (``str``,
    ``list[int]``, ``function-after[_utf8(), str]``, a model's class name), not a field name or an index."""
    return isinstance(part, str) and (any(c in part for c in "[(") or part[:1].isupper()
                                      or part in ("str", "int", "float", "bool", "list", "dict"))


def _field(loc: Sequence[Any]) -> tuple:
    """A validation error's location up to its first type tag (the field whose alternatives it is one of)."""
    parts = []
    for part in loc:
        if _type_tag(part):
            break
        parts.append(part)
    return tuple(parts)
