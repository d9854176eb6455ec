"""The OpenAI-compatible FastAPI app over an `AsyncEngine` (no Ray: the Serve ingress wraps it).

Owns the routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` with SSE streaming,
OpenAI's Responses API ``/v1/responses`` (run as the chat request it converts to, see
`service.responses_api`), ``/tokenize``, ``/detokenize``, ``/health``, ``/metrics``), fanning a request's
prompts and choices out to engine requests and merging them back, the response formats
(log-probabilities, echo, tool calls, reasoning, the Responses API's items and typed events),
the request body size limit, client-disconnect handling (a request whose client is gone is aborted,
every choice of it) and wiring every error through `openai_api.error_response`. Ignores authentication
and admin routes (an extra router can be mounted), and the engine's internals.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.async_engine import (
    AsyncEngine,
    EngineError,
    EngineStopped,
    RequestTimeout,
    StructuredOutputFailed,
)
from service.engine import QueueFull, StepOutput
from service.harmony import TAGS as HARMONY_TAGS
from service.harmony import HarmonyStream
from service.metrics import RequestTimer, ServingMetrics
from service.openai_api import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DeltaFunctionCall,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    Usage,
    error_body,
    error_response,
    sampling_params,
)
from service.reasoning import HARMONY as HARMONY_REASONING
from service.reasoning import IMPLICIT_ENDS, THINK_END, THINK_START, ReasoningStream, opens_reasoning
from service.reasoning import PARSERS as REASONING_PARSERS
from service.responses_api import ResponseBuilder, ResponsesRequest, renamed, response_usage, responses_param
from service.sampling import SamplingParams, TokenLogprobs
from service.structured import InvalidGrammar
from service.text import TokenPieces, apply_chat_template, render_template, special_ids, text_after_history
from service.tools import FORMATS as TOOL_FORMATS
from service.tools import ToolCall, ToolSetup, special_tags
from service.tools import detect_format as detect_tool_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Seconds a request's body may take to arrive once its headers have (then 408): Serve hands a request to the replica
# on its headers, and the replica reads the body from the proxy; about 325 connections that sent headers and no body
# held every request slot of the replica, /health's too, for as long as they stayed open (a review). A front proxy
# that buffers bodies bounds it better (see the README's deployment notes).
DEFAULT_BODY_TIMEOUT_S = 30.0
# Log-probability entries a response that is not streamed may hold (one per token and alternative, per choice, of
# the echoed prompts and of the generated tokens): 4 prompts of 8,000 tokens, n=16, logprobs 20 (a 119 KB body)
# answered 197 MiB of JSON, built whole in memory (+830 MB) with the GIL held 1 s (an adversarial review). Echoed
# entries are known at admission (a 400 at once); generated ones are counted as they come, and a response past the
# limit is a 400 then, its choices aborted. Streamed, each chunk holds its own few.
MAX_LOGPROB_ENTRIES = 2_000_000
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response
T = TypeVar("T")
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
MIN_LOGPROB = -9999.0  # what a log-probability of -inf is reported as (JSON has no infinity; OpenAI's value)
_THINK_TAIL_TOKENS = 16  # prompt tokens decoded to see whether the template opened a <think> block, when the
# text it adds after the history cannot be told apart (text_after_history)
# A text prompt longer than this many characters per token of the context is first tokenised in part (see
# `_bounded_encode`): above the 3-5 of prose, code and most languages, so a prompt that fits rarely pays for it
_PREFIX_CHARS_PER_TOKEN = 8
_CUT_MARGIN_TOKENS = 64  # tokens a text cut short may have beyond the whole text's (BPE merges across the cut), plus
_CUT_MARGIN_FRACTION = 32  # 1/32 of the context: a prefix refuses a prompt only with this margin past the context


def create_app(engine: AsyncEngine, *, served_model_name: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               extra_router: APIRouter | None = None, health_checks: Sequence[Callable[[], str | None]] = (),
               reasoning_parser: str | None = None, tool_call_parser: str = "auto") -> FastAPI:
    """The app; the caller starts and shuts down ``engine``.

    Args:
        engine: must have a tokenizer (prompts and chat templates are tokenised here).
        served_model_name: the only ``model`` value requests may name.
        max_body_bytes: larger request bodies get 413.
        body_timeout_s: a body not received this long after its request's headers gets 408.
        extra_router: more routes (e.g. admin) mounted as is; their errors use the same JSON.
        health_checks: each returns None when fine or a problem (e.g. "coordinator unreachable for 40 s");
            /health then reports {"status": "degraded", "problems": [...]}, still 200 while the engine
            serves (a 503 would take a replica that can answer out of rotation).
        reasoning_parser: one of `service.reasoning.PARSERS` for a thinking model: chat completions then
            return its ``<think>`` block as ``reasoning``, apart from ``content``.
        tool_call_parser: how the model writes tool calls, one of `service.tools.FORMATS` (vLLM's names;
            `mistral_v11` is vLLM's `mistral` for tokenizers from v11 on),
            or "auto": the format its chat template renders calls in (`service.tools.detect_format`).
            Calls are read, and forced, in that format. ``openai`` is GPT-OSS's harmony format: every
            chat completion is then read as harmony messages (`service.harmony`), its analysis channel
            as ``reasoning`` (``reasoning_parser`` unset or ``openai_gptoss``, which implies it).
    """
    if engine.tokenizer is None:
        raise ValueError("create_app needs an engine with a tokenizer")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if not body_timeout_s > 0:
        raise ValueError(f"body_timeout_s must be > 0, got {body_timeout_s}")
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; expected one of {', '.join(REASONING_PARSERS)}")
    if tool_call_parser == "auto":
        tool_call_parser = ("openai" if reasoning_parser == HARMONY_REASONING
                            else detect_tool_format(engine.tokenizer.chat_template))
    if tool_call_parser not in TOOL_FORMATS:
        raise ValueError(f"unknown tool call parser {tool_call_parser!r}; expected auto or one of "
                         f"{', '.join(TOOL_FORMATS)}")
    harmony = tool_call_parser == "openai"  # GPT-OSS: reasoning, answer and calls all in harmony
    if reasoning_parser == HARMONY_REASONING and not harmony:
        raise ValueError(f"the reasoning parser {HARMONY_REASONING} reads GPT-OSS's harmony format, whose tool calls "
                         f"are the openai tool call parser's, not {tool_call_parser}'s")
    thinks = reasoning_parser is not None and not harmony
    server = _Server(engine, served_model_name, ServingMetrics(engine), TokenPieces(engine.tokenizer),
                     tuple(health_checks), reasoning=thinks,
                     reasoning_ends=IMPLICIT_ENDS.get(reasoning_parser, ()) if thinks else (),
                     think_tokens=_think_tokens(engine.tokenizer) if thinks else None,
                     tool_format=tool_call_parser, tool_tags=special_tags(tool_call_parser, engine.tokenizer),
                     harmony=_other_special_tokens(engine.tokenizer) if harmony else None)
    app = FastAPI(title="vibe-serve", version="0.1.0")
    app.state.metrics = server.metrics
    app.state.server = server  # (what the app was built to do: its parsers, formats and limits)
    # Handlers for specific types answer in place; the one for Exception answers after Starlette's 500 path.
    for exc_type in (APIError, ValueError, QueueFull, EngineError, HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(exc_type, server.handle_error)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, on_reject=server.count_rejected,
                       timeout_s=body_timeout_s)
    app.include_router(_routes(server))
    if extra_router is not None:
        app.include_router(extra_router)
    return app


def _routes(server: _Server) -> APIRouter:
    router = APIRouter()
    router.add_api_route("/v1/models", server.list_models, methods=["GET"], response_model=ModelList)
    router.add_api_route("/v1/models/{model:path}", server.get_model, methods=["GET"], response_model=ModelCard)
    router.add_api_route("/v1/completions", server.completions, methods=["POST"], response_model=None)
    router.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"], response_model=None)
    router.add_api_route("/v1/responses", server.responses, methods=["POST"], response_model=None)
    # one route per method: a route with two methods gives both one OpenAPI operationId (duplicated in the schema)
    router.add_api_route("/v1/responses/{response_id}", server.get_response, methods=["GET"])
    router.add_api_route("/v1/responses/{response_id}", server.get_response, methods=["DELETE"],
                         operation_id="delete_response")
    router.add_api_route("/tokenize", server.tokenize, methods=["POST"], response_model=TokenizeResponse)
    router.add_api_route("/detokenize", server.detokenize, methods=["POST"], response_model=DetokenizeResponse)
    router.add_api_route("/health", server.health, methods=["GET"])
    router.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    return router


@dataclass
class _Server:
    engine: AsyncEngine
    model_name: str
    metrics: ServingMetrics
    pieces: TokenPieces
    health_checks: tuple[Callable[[], str | None], ...] = ()
    reasoning: bool = False  # split a <think> block from the answer
    reasoning_ends: tuple[str, ...] = ()  # tags that end it besides </think> (the reasoning parser's)
    think_tokens: _ThinkTokens | None = None  # when <think> and </think> are one token each: a grammar can wait
    tool_format: str = "hermes"  # how the model writes tool calls
    tool_tags: dict[str, int] = field(default_factory=dict)  # the format's tags that are special tokens
    harmony: frozenset[str] | None = None  # harmony (GPT-OSS): the tokenizer's other special tokens, dropped
    created: int = field(default_factory=lambda: int(time.time()))
    # tokenizing and chat templates run here, off the event loop (a 1 MiB prompt takes 0.5 s: every stream of
    # the replica would stall meanwhile); one thread, as vLLM's, since a fast tokenizer's encode mutates its
    # padding and truncation state ("Already borrowed" when two threads call it)
    tokenizing: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize"))
    # /tokenize and /detokenize run on a thread and a copy of the tokenizer of their own (`_apart`): they answer every
    # id of a text whatever its length (no refusal from a prefix), and on the thread above one 1 MiB text held every
    # generation request's prompt behind it for ~1 s (the tokenizer releases the GIL while it encodes, so the two
    # threads run side by side)
    tokenizing_apart: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize-api"))

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn)

    async def _apart(self, fn: Callable[[PreTrainedTokenizerBase], T]) -> T:
        """``fn(tokenizer)`` on the /tokenize thread, with that thread's copy of the tokenizer."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing_apart, lambda: fn(self._tokenizer_copy))

    @functools.cached_property
    def _tokenizer_copy(self) -> PreTrainedTokenizerBase:
        """The /tokenize thread's own tokenizer (made there at first use): a fast tokenizer's state is not shared
        between threads ("Already borrowed")."""
        return copy.deepcopy(self.engine.tokenizer)

    async def list_models(self) -> ModelList:
        return ModelList(data=[self._card()])

    async def get_model(self, model: str) -> ModelCard:
        self._check_model(model)
        return self._card()

    async def health(self) -> Response:
        if not self.engine.is_alive:
            return error_response(APIError(503, "the engine is not running", type="service_unavailable_error"))
        if self.engine.broken:  # (Serve's health probe replaces the replica)
            return error_response(APIError(503, self.engine.broken, type="service_unavailable_error"))
        problems = [p for p in (check() for check in self.health_checks) if p]
        return JSONResponse({"status": "degraded", "problems": problems} if problems else {"status": "ok"})

    async def metrics_text(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        timer = self._start_request(request)
        self._check_model(body.model)
        tokenizer = self.engine.tokenizer
        await _grammar_off_loop(body)
        prompts = await self._off_loop(lambda: [p if isinstance(p, list) else self._bounded_encode(tokenizer.encode, p)
                                                for p in body.prompt])
        echoes = [_Echo(ids, sent if isinstance(sent, str) else None, tokenizer.decode)
                  for ids, sent in zip(prompts, body.prompt)] if body.echo else None
        fmt = _CompletionFormat(self.model_name, self.pieces if body.logprobs is not None else None, body.n or 1,
                                len(prompts), echoes)
        return await self._generate(request, body, prompts, fmt, timer)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        timer = self._start_request(request)
        self._check_model(body.model)
        body.use_tool_format(self.tool_format, self.tool_tags).keep_think_tags(self._special_think_tags)
        await _grammar_off_loop(body)
        prompt, reasoning = await self._off_loop(lambda: self._chat_prompt(body))
        fmt = _ChatFormat(self.model_name, self.pieces if body.logprobs else None, body.n or 1,
                          tools=body.tool_setup, reasoning=reasoning, harmony=self._harmony(body))
        return await self._generate(request, body, [prompt], fmt, timer, reasoning)

    async def responses(self, body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API: the request runs as the chat completion it converts to, and errors name
        the responses parameter at fault."""
        timer = self._start_request(request)
        self._check_model(body.model)
        try:
            chat = body.chat_request().use_tool_format(self.tool_format, self.tool_tags).keep_think_tags(
                self._special_think_tags)
            await _grammar_off_loop(chat)
            prompt, reasoning = await self._off_loop(lambda: self._chat_prompt(chat))
            fmt = _ResponsesFormat(self.model_name, self.pieces if chat.logprobs else None, body.echo(),
                                   tools=chat.tool_setup, reasoning=reasoning, harmony=self._harmony(chat))
            fmt.caches_prompts = self.engine.config.enable_prefix_caching
            return await self._generate(request, chat, [prompt], fmt, timer, reasoning)
        except APIError as exc:
            raise renamed(exc) from None

    async def get_response(self, response_id: str) -> Response:
        raise APIError(404, f"no response {response_id!r}: this server stores no responses (store is always "
                       "false); send earlier output items back in input", param="response_id", code="not_found")

    def _harmony(self, body: ChatCompletionRequest) -> _Harmony | None:
        return _Harmony(self.harmony, body.include_reasoning) if self.harmony is not None else None

    def _chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int] | _TooLong, _Reasoning | None]:
        """A chat request's prompt (`_TooLong`: it cannot fit, found without tokenising all of it), and how its
        completion's reasoning is split off (None: it is not)."""
        tokenizer = self.engine.tokenizer
        too_long = self._chat_too_long(body)
        if too_long is not None:
            return too_long, None
        prompt = apply_chat_template(tokenizer, body.template_messages(), tools=body.template_tools(),
                                     template_kwargs=body.template_variables(),
                                     add_generation_prompt=body.add_generation_prompt,
                                     continue_final_message=body.continue_final_message)
        reasoning = None
        # a grammar leaves room for thinking only when the engine can tell the block's tags by token
        if self.reasoning and (body.grammar is None or self.think_tokens is not None):
            # whether the template opened a block: in what it added after the history, not the messages' own text
            added = text_after_history(tokenizer, body.template_messages(), tools=body.template_tools(),
                                       template_kwargs=body.template_variables(),
                                       add_generation_prompt=body.add_generation_prompt,
                                       continue_final_message=body.continue_final_message)
            tail = added if added is not None else tokenizer.decode(prompt[-_THINK_TAIL_TOKENS:])
            reasoning = _Reasoning(opens_reasoning(tail), body.include_reasoning, self.reasoning_ends)
        return prompt, reasoning

    def _chat_too_long(self, body: ChatCompletionRequest) -> _TooLong | None:
        """`_TooLong` when the conversation's text is long enough to be checked in part (`_bounded_encode`) and its
        rendered prompt's first part already cannot fit; None otherwise (the prompt is then tokenised as always)."""
        kwargs = body.template_variables() or {}
        messages, tools = body.template_messages(), body.template_tools()
        if _text_chars((messages, tools, kwargs)) <= _PREFIX_CHARS_PER_TOKEN * self._prefix_tokens:
            return None
        # transformers' sanitize_control_tokens (an apply_chat_template argument) renders no text: it tokenises the
        # control tokens found in user text as plain text, each into one token or more where the text without it has
        # one, so that text's count is a lower bound of the prompt's (it was skipped: 1 MiB prompts were tokenised
        # whole on the one tokenizing thread, every client waiting, before they were refused; a review)
        kwargs = {key: value for key, value in kwargs.items() if key != "sanitize_control_tokens"}
        tokenizer = self.engine.tokenizer
        try:  # the text apply_chat_template tokenises (without special tokens added)
            text = render_template(tokenizer, messages, tokenize=False, add_generation_prompt=body.add_generation_prompt,
                                   tools=tools, template_kwargs=kwargs,
                                   continue_final_message=body.continue_final_message)
        except Exception:  # noqa: BLE001 - the template's own errors come from the full path, with their message
            return None
        if not isinstance(text, str):
            return None
        too_long = self._bounded_encode(lambda t: tokenizer.encode(t, add_special_tokens=False), text, whole=False)
        return too_long if isinstance(too_long, _TooLong) else None

    @property
    def _prefix_tokens(self) -> int:
        """Tokens a prefix must have to refuse a prompt: the context and the margin for the cut."""
        max_model_len = self.engine.config.max_model_len
        return max_model_len + _CUT_MARGIN_TOKENS + max_model_len // _CUT_MARGIN_FRACTION

    @functools.cached_property
    def _longest_token(self) -> int:
        """Characters of the vocabulary's longest entry: no token covers more characters of a text (a byte-level
        entry has a character per byte; added tokens are entries too)."""
        return max(map(len, self.engine.tokenizer.get_vocab()), default=1)

    def _bounded_encode(self, encode: Callable[[str], list[int]], text: str, *,
                        whole: bool = True) -> list[int] | _TooLong | None:
        """``encode(text)``; or, for a text too long for the context, `_TooLong` after tokenising only a part.

        Tokenising runs on one thread per replica: a 1 MiB prompt took ~1 s there before it was refused for its
        length, and every request behind it waited (eight such delayed another's first token from 0.02 s to
        5.4-9.0 s). A text longer than `_PREFIX_CHARS_PER_TOKEN` characters per token of the context is tokenised in
        part first, from a prefix of that many characters up (x4 a time) to as many characters as the longest
        vocabulary entry times the tokens needed (no tokenizer covers more with fewer tokens): when a prefix has
        the context's tokens plus a margin (a prefix may end in tokens that the whole text merges across the
        cut: a few, never the margin's), the whole text has at least that many tokens less the margin, and is
        refused. Otherwise (or when no prefix is conclusive) the whole text is tokenised as before, so a prompt
        that fits gets the same ids; it paid for a prefix too only if it has more characters per token than
        `_PREFIX_CHARS_PER_TOKEN`. ``whole`` False: None instead of the whole text's ids.
        """
        need = self._prefix_tokens
        margin = need - self.engine.config.max_model_len
        size, most = _PREFIX_CHARS_PER_TOKEN * need, self._longest_token * need
        while size < len(text):
            count = len(encode(text[:size]))
            if count >= need:
                return _TooLong(count - margin)
            if size >= most:
                break
            size = min(4 * size, most)
        return encode(text) if whole else None

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        if body.model is not None:
            self._check_model(body.model)
        return await self._apart(lambda tokenizer: self._tokenize(tokenizer, body))

    def _tokenize(self, tokenizer, body: TokenizeRequest) -> TokenizeResponse:
        if body.messages is not None:
            ids = apply_chat_template(tokenizer, body.template_messages(self.tool_format), tools=body.template_tools(),
                                      add_generation_prompt=body.add_generation_prompt,
                                      template_kwargs=body.chat_template_kwargs,
                                      continue_final_message=body.continue_final_message)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.config.max_model_len, tokens=ids,
                                token_strs=tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            self._check_model(body.model)
        vocab = len(self.engine.tokenizer)
        if any(t >= vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab}), got {max(body.tokens)}", param="tokens")
        text = await self._apart(lambda tokenizer: tokenizer.decode(body.tokens, skip_special_tokens=False))
        return DetokenizeResponse(prompt=text)

    async def handle_error(self, request: Request, exc: Exception) -> Response:
        response = error_response(exc)
        timer = getattr(request.state, "timer", None)
        if timer is not None:  # a generation request its handler took: counted once, as it was answered (a 500 of
            # the server's own code was counted as nothing, or as the finish reason of its last choice)
            timer.finish("rejected" if response.status_code < 500 else "error")
        elif response.status_code < 500:
            self.count_rejected(request.url.path)
        return response

    def _start_request(self, request: Request) -> RequestTimer:
        """The timer of a generation request, kept on it for `handle_error`."""
        request.state.timer = timer = self.metrics.start_request()
        return timer

    def count_rejected(self, path: str) -> None:
        """Count a generation request refused before it reached the engine (4xx: a handler's error, or the body
        size limit's 413, which answers before any handler)."""
        if path in _GENERATION_PATHS:
            self.metrics.requests.labels(status="rejected").inc()

    @property
    def _special_think_tags(self) -> tuple[int, ...]:
        """The thinking tags a chat's text must keep for the reasoning parser to find its block, when they are special
        tokens of the tokenizer (skip_special_tokens, the default, would drop them, and the reasoning would read as
        the answer, or the answer as reasoning); none otherwise."""
        special = self.reasoning and self.think_tokens is not None and self.think_tokens.special
        return self.think_tokens.tags if special else ()

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.engine.config.max_model_len)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def _generate(self, request: Request, body: CompletionRequest | ChatCompletionRequest,
                        prompts: list[list[int]], fmt: _Format, timer: RequestTimer,
                        reasoning: _Reasoning | None = None) -> Response:
        """Admit the request's choices, wait for their first tokens (headers wait too), then stream or
        collect. Prompt ``p``'s ``n`` choices are ``n`` engine requests (seeds ``seed + i``), choice
        indexes ``p * n + i``, the others sharing the first one's prefill; a failure of any fails all.
        With ``reasoning``, a grammar waits for the thinking block to close."""
        params = [self._sampling_params(body, prompt) for prompt in prompts]
        if reasoning is not None and body.grammar is not None:
            params = [dataclasses.replace(p, reasoning_tokens=self.think_tokens.tags, reasoning_gap=self.think_tokens.gap,
                                          in_reasoning=reasoning.in_block) for p in params]
        n = body.n or 1
        echoed = n * sum(len(prompt) * (1 + p.prompt_logprobs) for prompt, p in zip(prompts, params)
                         if p.prompt_logprobs is not None and not isinstance(prompt, _TooLong))
        if echoed > MAX_LOGPROB_ENTRIES and not body.stream:
            raise APIError(400, f"echoing the prompts with their log-probabilities would answer {echoed:,} entries "
                           f"(choices x prompt tokens x (1 + logprobs)); one response holds at most "
                           f"{MAX_LOGPROB_ENTRIES:,}: stream it, or ask for fewer", param="logprobs")
        if len(prompts) * n > self.engine.config.max_queue:  # each choice takes a place: it could never be admitted
            raise APIError(400, f"this request asks for {len(prompts) * n} completions (prompts x n); this server "
                           f"queues at most {self.engine.config.max_queue} at once", param="n")
        fmt.prompt_tokens = sum(len(prompt) for prompt in prompts)
        ids = [fmt.id] if len(prompts) * n == 1 else [f"{fmt.id}-{k}" for k in range(len(prompts) * n)]
        streams = [self.engine.generate(ids[k], prompts[k // n], _choice_params(params[k // n], k % n),
                                        share_prefill_with=ids[k - k % n] if k % n else None)
                   for k in range(len(prompts) * n)]
        aborted = functools.partial(timer.finish, "abort", fmt.prompt_tokens)
        try:
            firsts = await _unless_disconnected(request, _first_outputs(streams), aborted)
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except InvalidGrammar as exc:  # name the parameter the grammar came from (the compile cannot say)
            raise APIError(400, str(exc), param=body.grammar_source[1]) from None
        except EngineError as exc:
            timer.finish(_failure_status(exc), fmt.prompt_tokens)
            raise
        fmt.cached_tokens = sum(out.num_cached_tokens for out in firsts[::n])  # choices share a prompt's cache
        timer.on_cached(fmt.cached_tokens)
        outputs = _merged(firsts, streams, timer, fmt.param(body.grammar_source[1]))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(outputs, firsts, fmt, timer, include_usage), media_type="text/event-stream")
        try:
            return await _unless_disconnected(request, _collect(outputs, firsts, fmt, timer,
                                                                MAX_LOGPROB_ENTRIES - echoed), aborted)
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)


    def _sampling_params(self, body: CompletionRequest | ChatCompletionRequest,
                         prompt: list[int] | _TooLong) -> SamplingParams:
        """`sampling_params` for ``prompt`` (a `_TooLong` one: its error, the prompt's tokens a lower bound)."""
        if isinstance(prompt, _TooLong):
            return sampling_params(body, prompt.tokens, self.engine.config.max_model_len, at_least=True)
        return sampling_params(body, len(prompt), self.engine.config.max_model_len)


class _TooLong(NamedTuple):
    """A text prompt found too long for the context from a part of it (`_Server._bounded_encode`)."""

    tokens: int  # the prompt has at least this many


def _text_chars(value) -> int:
    """Characters of ``value`` (nested lists, tuples and dicts, keys included) a template may render: a string's own,
    a number's, true's, null's as written, one more per item (its separator). Strings alone were counted: a 1 MiB
    tool schema of 500,000 zeros counted none, and its 1.5M tokens were tokenised whole on the one tokenizing thread
    before they were refused (a review)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(k) + _text_chars(v) + 1 for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_text_chars(v) + 1 for v in value)
    return len(str(value))


class _ThinkTokens(NamedTuple):
    """The tokens a grammar waits through: a thinking block's tags, then the whitespace after it."""

    tags: tuple[int, int]  # <think>, </think>
    gap: tuple[int, ...]   # the tokens of a newline, two newlines and a space, those that are one token
    special: bool = False  # the tags are special tokens (decoding with skip_special_tokens would drop them)


def _think_tokens(tokenizer) -> _ThinkTokens | None:
    """The thinking tokens when the tokenizer has ``<think>`` and ``</think>`` as one token each (Qwen3,
    DeepSeek-R1); None otherwise."""
    tags = [tokenizer.encode(tag, add_special_tokens=False) for tag in (THINK_START, THINK_END)]
    if not all(len(ids) == 1 for ids in tags):
        return None
    gap = [tokenizer.encode(space, add_special_tokens=False) for space in ("\n", "\n\n", " ")]
    special = special_ids(tokenizer)
    return _ThinkTokens((tags[0][0], tags[1][0]), tuple(dict.fromkeys(ids[0] for ids in gap if len(ids) == 1)),
                        tags[0][0] in special or tags[1][0] in special)


def _other_special_tokens(tokenizer) -> frozenset[str]:
    """The texts of the tokenizer's special tokens that are not harmony's tags (decoded with special tokens
    kept, which harmony needs, they would show in the text)."""
    special = {*tokenizer.all_special_tokens,
               *(token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special)}
    return frozenset(special - set(HARMONY_TAGS))


async def _grammar_off_loop(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Build the request's grammar text (`grammar_source`, kept on it) on a worker thread: a large schema or GBNF
    grammar takes a second of Python or more to convert, which on the event loop stalled every stream and /health
    (and on the tokenizing thread, every prompt behind it).

    Raises:
        APIError: as `grammar_source`.
    """
    if body.response_format is not None or body.structured_outputs is not None or (
            isinstance(body, ChatCompletionRequest) and body.tool_setup is not None):
        await asyncio.to_thread(lambda: body.grammar_source)


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s parameters: its own seed (``seed + index``, wrapped to a signed 64-bit integer) when the
    request has one."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index + 2**63) % 2**64 - 2**63)


async def _first_outputs(streams: list[AsyncIterator[StepOutput]]) -> list[StepOutput]:
    """Each stream's first output; if any fails (the first choice to, by index, of those failed when one does: a
    later choice's 400 or 429 is not held back until the earlier ones have a token), or this is cancelled, every
    stream is closed (aborted)."""
    tasks = [asyncio.ensure_future(anext(stream)) for stream in streams]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((task for task in tasks if task.done() and not task.cancelled() and task.exception()), None)
        if failed is not None:
            raise failed.exception()
        return [task.result() for task in tasks]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
        raise


async def _merged(firsts: list[StepOutput], streams: list[AsyncIterator[StepOutput]],
                  timer: RequestTimer, grammar_param: str | None = None) -> AsyncIterator[tuple[int, StepOutput]]:
    """(choice index, output) of every choice as they come, timed, firsts first (the consumer finishes the request
    on the timer once its response is sent: building it may still fail). An abort by anyone else is an engine
    error; leaving early (or an error) closes every stream, which aborts the choices still running."""
    pending: dict[asyncio.Future, int] = {}
    try:
        outs = list(enumerate(firsts))
        while outs:
            for index, out in outs:
                if out.finish_reason == "abort":
                    raise (StructuredOutputFailed(out.error, grammar_param) if out.error
                           else EngineError("the request was aborted"))
                timer.on_tokens(len(out.new_token_ids), choice=index)
                yield index, out
                if not out.finished:
                    pending[asyncio.ensure_future(anext(streams[index]))] = index
            if not pending:
                return
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            outs = sorted((pending.pop(task), task.result()) for task in done)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)


async def _collect(outputs: AsyncIterator[tuple[int, StepOutput]], firsts: list[StepOutput], fmt: _Format,
                   timer: RequestTimer, room: int = MAX_LOGPROB_ENTRIES) -> Response:
    """The non-streamed response of every choice's outputs; a 400 (the choices aborted) once their generated
    tokens' log-probability entries pass ``room``, what the response may still hold besides the echoed ones."""
    outs: list[list[StepOutput]] = [[] for _ in firsts]
    last = firsts[-1]
    try:
        async for index, out in outputs:
            outs[index].append(out)
            last = out
            if out.logprobs:
                room -= sum(1 + len(entry.top) for entry in out.logprobs)
                if room < 0:
                    timer.finish("rejected", fmt.prompt_tokens)
                    raise APIError(400, f"the log-probabilities of the generated tokens would make this response hold "
                                   f"more than {MAX_LOGPROB_ENTRIES:,} entries (choices x tokens x (1 + "
                                   f"top_logprobs), with any echoed prompt's): stream it, or ask for fewer tokens, "
                                   f"choices or alternatives", param=fmt.logprobs_param)
    except EngineError as exc:
        timer.finish(_failure_status(exc), fmt.prompt_tokens)
        raise
    finally:
        await outputs.aclose()

    def respond() -> Response:
        body = fmt.response([_Choice(choice) for choice in outs])
        if isinstance(body, dict):
            return JSONResponse(body)
        # pydantic's own JSON, not a dict of it then json.dumps: 0.15 s against 0.70 s for 20 MB of echoed
        # log-probabilities (4 prompts x n=16 x 512 tokens, logprobs 20), the same JSON once parsed; the thread holds
        # the GIL, so that time slowed every other stream (log-probabilities are finite: MIN_LOGPROB)
        return Response(body.model_dump_json(), media_type="application/json")

    # off the event loop: a response with log-probabilities of long prompts and many choices is tens of MB of JSON
    # (a second or more to build), which froze every stream and /health meanwhile (isolation audit: 1-2 s)
    response = await asyncio.to_thread(respond)
    timer.finish(last.finish_reason, fmt.prompt_tokens)  # (as the last choice to end ended)
    return response


async def _sse(outputs: AsyncIterator[tuple[int, StepOutput]], firsts: list[StepOutput], fmt: _Format,
               timer: RequestTimer, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the format's start chunks, a chunk per delta, its end chunks (chat and
    completions: a usage chunk if asked, then ``data: [DONE]``); an engine error ends the stream with
    the format's error chunks, and so does any other exception (a bug: logged, sent as a 500's error JSON),
    which had cut the stream with neither an error event nor ``[DONE]``."""
    try:
        for chunk in fmt.start_chunks():
            yield fmt.sse(chunk)
        lasts, last = list(firsts), firsts[-1]
        async for index, out in outputs:
            lasts[index] = last = out
            for chunk in fmt.chunks(index, out):
                yield fmt.sse(chunk)
        for chunk in fmt.end_chunks(lasts, include_usage):
            yield fmt.sse(chunk)
        timer.finish(last.finish_reason, fmt.prompt_tokens)  # (as the last choice to end ended)
    except EngineError as exc:
        timer.finish(_failure_status(exc), fmt.prompt_tokens)
        for chunk in fmt.error_chunks(exc):
            yield fmt.sse(chunk)
    except Exception as exc:
        log.error("a stream failed", exc_info=exc)
        timer.finish("error", fmt.prompt_tokens)
        for chunk in fmt.error_chunks(APIError(500, "internal server error", type="server_error")):
            yield fmt.sse(chunk)
    finally:
        timer.finish("abort", fmt.prompt_tokens)  # no-op unless the client left mid-stream
        await outputs.aclose()
    if fmt.done:
        yield fmt.done


def _failure_status(exc: EngineError) -> str:
    """The status a request that ended in `exc` is counted under: `timeout` for one cut at request_timeout_s (a
    client that stopped reading, an overload: counted as engine errors, they fired the engine-errors alert),
    `rejected` for a structured output its grammar could not go on with (a 400, the request's own), `abort` for one
    cut by the engine's shutdown (past the replica's drain), `error` for the engine's own failures."""
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, StructuredOutputFailed):
        return "rejected"
    return "abort" if isinstance(exc, EngineStopped) else "error"


class _ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def _unless_disconnected(request: Request, awaitable, left: Callable[[], None]):
    """Await ``awaitable``; if the client leaves first, cancel it and call ``left()``: it disconnected (then
    `_ClientGone` is raised), or Serve cancelled this handler (the cancellation goes on: no handler of the app sees
    it, and the request was counted as nothing; 29 of 400 in a disconnect storm, a review)."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        left()
        raise
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work not in done:
        left()
        raise _ClientGone
    return work.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- response formats ------------------------------------------------------------------------------


class _Choice(NamedTuple):
    """One choice of a finished request: every output it got, in order."""

    outputs: Sequence[StepOutput]

    @property
    def text(self) -> str:
        return "".join(out.text for out in self.outputs)

    @property
    def last(self) -> StepOutput:
        return self.outputs[-1]

    @property
    def logprobs(self) -> list[TokenLogprobs]:
        return [entry for out in self.outputs for entry in out.logprobs]

    @property
    def prompt_logprobs(self) -> Sequence[TokenLogprobs]:
        return self.outputs[0].prompt_logprobs  # sent with the first output


class _Format(abc.ABC):
    """Builds the responses and stream chunks of one request of one endpoint, for its ``n`` choices.

    With ``pieces`` (the request asked for log-probabilities), every response and chunk carries the
    log-probabilities of its tokens; a stream holds them back with the text they belong to (tokens of a
    possible stop string, half a character) and sends them with the choice's next chunk that has text,
    or with its last one, so every completion token's entry is sent exactly once, in order.
    """

    prefix = ""
    logprobs_param = "logprobs"  # the parameter that asked for log-probabilities (an error names it)

    def param(self, name: str | None) -> str | None:
        """The request parameter the client sent for the chat or completions parameter ``name``."""
        return name

    def __init__(self, model: str, pieces: TokenPieces | None = None, n: int = 1, num_prompts: int = 1) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.pieces = pieces
        self.n = n
        self.num_choices = n * num_prompts
        self.prompt_tokens = 0  # of every prompt, set once tokenised
        self.cached_tokens = 0  # of them, from the prefix cache; set with the first outputs
        self._pending: list[list[TokenLogprobs]] = [[] for _ in range(self.num_choices)]

    done = "data: [DONE]\n\n"  # the stream's last event

    def start_chunks(self) -> list[BaseModel]:
        return []

    def end_chunks(self, lasts: Sequence[StepOutput], include_usage: bool) -> list[BaseModel]:
        """Chunks after every choice's last: the usage chunk, if asked for."""
        return [self.usage_chunk(lasts)] if include_usage else []

    def error_chunks(self, exc: EngineError) -> list[dict]:
        """What ends a stream that failed: the error's JSON."""
        return [error_body(exc)[1]]

    def sse(self, chunk: BaseModel | dict) -> str:
        """One server-sent event."""
        return f"data: {chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk)}\n\n"

    @abc.abstractmethod
    def response(self, results: Sequence[_Choice]) -> BaseModel | dict:
        """The non-streaming response: per choice all its text and log-probabilities and its last output."""

    @abc.abstractmethod
    def chunks(self, index: int, out: StepOutput) -> list[BaseModel]:
        """Stream chunks for one output of choice ``index`` (none while its text is held back)."""

    @abc.abstractmethod
    def usage_chunk(self, lasts: Sequence[StepOutput]) -> BaseModel:
        """The final chunk with usage and no choices."""

    def _take_pending(self, index: int, out: StepOutput) -> list[TokenLogprobs]:
        """The entries to send with a chunk for ``out``: those held back so far and its own."""
        taken, self._pending[index] = [*self._pending[index], *out.logprobs], []
        return taken

    def _hold(self, index: int, out: StepOutput) -> None:
        self._pending[index] += out.logprobs

    def _usage(self, lasts: Sequence[StepOutput]) -> Usage:
        """Each prompt once, the completion tokens of every choice."""
        return Usage.of(self.prompt_tokens, sum(out.num_completion_tokens for out in lasts), self.cached_tokens)


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


@dataclass
class _Echo:
    """The prompt a completion echoes: its ids, and its text as sent or (for token ids) decoded once
    asked, after the engine admitted the ids."""

    ids: Sequence[int]
    sent_text: str | None
    decode: Callable[[Sequence[int]], str]

    @functools.cached_property
    def text(self) -> str:
        return self.sent_text if self.sent_text is not None else self.decode(self.ids)


class _CompletionFormat(_Format):
    """The legacy endpoint; with ``echo`` each choice starts with the prompt, and its log-probabilities
    with the prompt tokens' (the first one has none: null)."""

    prefix = "cmpl"

    def __init__(self, model: str, pieces: TokenPieces | None = None, n: int = 1, num_prompts: int = 1,
                 echoes: Sequence[_Echo] | None = None) -> None:
        super().__init__(model, pieces, n, num_prompts)
        self.echoes = echoes
        self._echoed = [echoes is None] * self.num_choices
        self._text_offset = [0] * self.num_choices  # per choice, characters of the token texts sent so far
        # per prompt, its echoed log-probabilities as last built: (from the text offset, of these prompt
        # entries, the result, the text offset after); the prompt's other choices share them
        self._echo_built: dict[int, tuple[int, Sequence[TokenLogprobs], CompletionLogprobs, int]] = {}

    def response(self, results: Sequence[_Choice]) -> CompletionResponse:
        choices = []
        for i, r in enumerate(results):
            prefix, logprobs = self._echo(i, r.prompt_logprobs)
            logprobs = _joined(logprobs, self._logprobs(i, r.logprobs))
            choices.append(CompletionChoice(index=i, text=prefix + r.text, finish_reason=r.last.finish_reason,
                                            logprobs=logprobs))
        return self._make(choices, self._usage([r.last for r in results]))

    def chunks(self, index: int, out: StepOutput) -> list[CompletionResponse]:
        chunks = []
        if not self._echoed[index]:
            prefix, logprobs = self._echo(index, out.prompt_logprobs)
            chunks.append(self._make([CompletionChoice(index=index, text=prefix, logprobs=logprobs)]))
        if not out.text and not out.finished:
            self._hold(index, out)
            return chunks
        logprobs = self._logprobs(index, self._take_pending(index, out))
        chunks.append(self._make([CompletionChoice(index=index, text=out.text, finish_reason=out.finish_reason,
                                                   logprobs=logprobs)]))
        return chunks

    def usage_chunk(self, lasts: Sequence[StepOutput]) -> CompletionResponse:
        return self._make([], self._usage(lasts))

    def _echo(self, index: int, prompt_logprobs: Sequence[TokenLogprobs]) -> tuple[str, CompletionLogprobs | None]:
        """Choice ``index``'s prompt text and its tokens' log-probabilities ('' and None without echo)."""
        self._echoed[index] = True
        if self.echoes is None:
            return "", None
        echo = self.echoes[index // self.n]
        if self.pieces is None:
            return echo.text, None
        return echo.text, self._echo_logprobs(index, echo, prompt_logprobs)

    def _echo_logprobs(self, index: int, echo: _Echo, prompt_logprobs: Sequence[TokenLogprobs]) -> CompletionLogprobs:
        """Choice ``index``'s echoed prompt tokens' log-probabilities: built once per prompt and shared (read only)
        by its choices with the same entries from the same offset, as its ``n`` choices have (a prompt of 512
        tokens with ``n`` 16 and ``logprobs`` 20 built its top tokens' dicts 16 times over)."""
        start, prompt = self._text_offset[index], index // self.n
        built = self._echo_built.get(prompt)
        if built is not None and built[0] == start and built[1] == prompt_logprobs:  # (the same entries: at once)
            self._text_offset[index] = built[3]
            return built[2]
        first = self.pieces.text(echo.ids[0])
        result = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[start])
        self._text_offset[index] += len(first)
        result = _joined(result, self._logprobs(index, prompt_logprobs))
        self._echo_built[prompt] = (start, prompt_logprobs, result, self._text_offset[index])
        return result

    def _logprobs(self, index: int, entries: Sequence[TokenLogprobs]) -> CompletionLogprobs | None:
        """The legacy format: token texts, their log-probabilities, the top tokens (the chosen one
        included), and each token's character offset in the choice's concatenated token texts.

        The top tokens are keyed by text: tokens with the same text (bytes of a split character all read
        U+FFFD) share a key holding the highest of their log-probabilities, so a less likely chosen token
        never overwrites a top one (as vLLM, which inserts the chosen token first)."""
        if self.pieces is None:
            return None
        result = CompletionLogprobs()
        for entry in entries:
            token = self.pieces.text(entry.token_id)
            chosen = () if any(t == entry.token_id for t, _ in entry.top) else ((entry.token_id, entry.logprob),)
            top: dict[str, float] = {}
            for t, lp in (*entry.top, *chosen):
                text = self.pieces.text(t)
                top[text] = max(top.get(text, MIN_LOGPROB), _finite(lp))
            result.tokens.append(token)
            result.token_logprobs.append(_finite(entry.logprob))
            result.top_logprobs.append(top)
            result.text_offset.append(self._text_offset[index])
            self._text_offset[index] += len(token)
        return result

    def _make(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


def _joined(head: CompletionLogprobs | None, tail: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """``head``'s entries, then ``tail``'s. Not validated again (both were): validating copied every top-token
    dict, an echoed prompt's too, for each choice sharing it."""
    if head is None or tail is None:
        return tail if head is None else head
    return CompletionLogprobs.model_construct(tokens=head.tokens + tail.tokens,
                                              token_logprobs=head.token_logprobs + tail.token_logprobs,
                                              top_logprobs=head.top_logprobs + tail.top_logprobs,
                                              text_offset=head.text_offset + tail.text_offset)


class _Reasoning(NamedTuple):
    """How a request's choices split reasoning from the answer."""

    in_block: bool  # the prompt opened a <think> block
    include: bool   # the response carries the reasoning (else it is dropped)
    ends: tuple[str, ...] = ()  # tags that end the block besides </think> (`service.reasoning.IMPLICIT_ENDS`)


class _Harmony(NamedTuple):
    """A request's choices are GPT-OSS's harmony messages."""

    drop: frozenset[str]  # the tokenizer's other special tokens, left out of the text
    include: bool         # the response carries the reasoning (else it is dropped)


class _ChatFormat(_Format):
    """The chat endpoint. With ``reasoning``, a thinking model's ``<think>`` block becomes ``reasoning``.
    With ``tools``, the rest of each choice's text is split into content and tool calls (a stream sends a
    call once its block is complete; a named call's arguments as they come), and a choice that called a
    tool of its own accord ends with ``finish_reason: "tool_calls"``. With ``harmony`` (GPT-OSS), one
    harmony parser per choice does both (``reasoning`` is then not used): analysis is reasoning, final
    messages content, and a call comes whole once its message ends, a named one too."""

    prefix = "chatcmpl"

    def __init__(self, model: str, pieces: TokenPieces | None = None, n: int = 1, *,
                 tools: ToolSetup | None = None, reasoning: _Reasoning | None = None,
                 harmony: _Harmony | None = None) -> None:
        super().__init__(model, pieces, n)
        self.tools = tools
        self.reasoning = reasoning if harmony is None else _Reasoning(False, harmony.include)
        if harmony is not None:
            functions = {} if tools is None else (
                {tools.name: tools.parameters[tools.name]} if tools.choice == "named" else tools.parameters)
            parallel = tools is None or tools.parallel
            make_id = TOOL_FORMATS[tools.format].call_id if tools is not None else None
            self._new_thinking = lambda: HarmonyStream(functions, parallel, harmony.drop, make_id)
            self._harmony = [self._new_thinking() for _ in range(self.num_choices)]
            self._parsers = self._harmony if tools is not None else None
            self._thinking = self._harmony
        else:
            self._harmony = None
            self._parsers = [tools.stream() for _ in range(self.num_choices)] if tools is not None else None
            self._new_thinking = lambda: ReasoningStream(reasoning.in_block, reasoning.ends)
            self._thinking = [self._new_thinking() for _ in range(self.num_choices)] if reasoning is not None else None
        self._announced: list[dict[str, int]] = [{} for _ in range(self.num_choices)]  # call id -> delta index

    def start_chunks(self) -> list[ChatCompletionChunk]:
        return [self._make([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
                for i in range(self.num_choices)]

    @property
    def _hides_reasoning(self) -> bool:
        """The reasoning is left out (``include_reasoning: false``): its tokens' log-probabilities too (they
        spelled it out, the whole block before the answer's first entry)."""
        return self.pieces is not None and self._thinking is not None and not self.reasoning.include

    def _reasoning_now(self, thinking, before: bool) -> bool:
        """Whether ``thinking`` (a choice's reasoning parser) is in its reasoning: ``before`` a push, inside the
        block (harmony: an analysis message's body); after it, inside it or past it with no answer begun (harmony:
        an analysis message's body again, its header just read)."""
        if self._harmony is not None:
            return thinking.in_reasoning
        return thinking.in_block if before else thinking.before_answer

    def _was_reasoning(self, thinking, was: bool) -> bool:
        """Whether the output just pushed to ``thinking`` was reasoning (``was``: it was in it before the push): not
        when the push began the answer (a token that ends the block and stays in the content: Kimi-K2's call
        section's opening tag; or ``</think>`` and the answer's first text in one token)."""
        if self._harmony is None and thinking.gave_content:
            return False
        return was or self._reasoning_now(thinking, before=False)

    def _shown(self, outputs: Sequence[StepOutput], truncated: bool) -> list[StepOutput]:
        """A choice's outputs as the response shows them: those whose tokens were reasoning it leaves out without
        log-probabilities, and so those held undecided before them (a partial ``<think``, a harmony header)."""
        thinking, shown, held = self._new_thinking(), [], []
        for k, out in enumerate(outputs):
            was, final = self._reasoning_now(thinking, before=True), k == len(outputs) - 1
            pushed = thinking.push(out.text, final, truncated) if self._harmony is not None else \
                thinking.push(out.text, final)
            if self._was_reasoning(thinking, was):
                shown += [dataclasses.replace(o, logprobs=()) for o in (*held, out)]
                held = []
            elif not (any(pushed) or final):
                held.append(out)
            else:
                shown += [*held, out]
                held = []
        return shown + held

    def response(self, results: Sequence[_Choice]) -> ChatCompletionResponse:
        choices = []
        for i, r in enumerate(results):
            if self._hides_reasoning:
                r = _Choice(self._shown(r.outputs, truncated=r.last.finish_reason == "length"))
            reasoning, content, _ = self._split(i, r.text, final=True, truncated=r.last.finish_reason == "length")
            calls = self._parsers[i].calls if self._parsers is not None else []
            thought = self._thinking is not None and self._thinking[i].reasoned  # a block was opened
            message = AssistantMessage(content=content if content or not (calls or thought) else None,
                                       reasoning=reasoning or None,
                                       tool_calls=[ToolCallOut.of(call) for call in calls] or None)
            choices.append(ChatChoice(index=i, message=message, finish_reason=self._finish_reason(i, r.last),
                                      logprobs=self._logprobs(r.logprobs)))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=self._usage([r.last for r in results]))

    def chunks(self, index: int, out: StepOutput) -> list[ChatCompletionChunk]:
        if self._hides_reasoning:
            was = self._reasoning_now(self._thinking[index], before=True)
        reasoning, content, calls = self._split(index, out.text, final=out.finished,
                                                truncated=out.finish_reason == "length")
        if self._hides_reasoning and self._was_reasoning(self._thinking[index], was):
            # (and the entries held while the block's opening was undecided, a partial <think>)
            out, self._pending[index] = dataclasses.replace(out, logprobs=()), []
        if not reasoning and not content and not calls and not out.finished:
            self._hold(index, out)
            return []
        logprobs = self._logprobs(self._take_pending(index, out))
        chunks = []
        if reasoning or content or calls:
            delta = Delta(content=content or None, reasoning=reasoning or None,
                          tool_calls=[self._delta(index, call) for call in calls] or None)
            chunks.append(self._make([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)]))
            logprobs = None
        if out.finished:
            chunks.append(self._make([ChatChunkChoice(index=index, delta=Delta(),
                                                      finish_reason=self._finish_reason(index, out),
                                                      logprobs=logprobs)]))
        return chunks

    def _split(self, index: int, text: str, final: bool, truncated: bool = False) -> tuple[str, str, list[ToolCall]]:
        """Choice ``index``'s next text as (reasoning, unless it is left out; content; tool calls completed or
        continued by it). ``truncated``: with ``final``, the completion was cut off by its length limit."""
        if self._harmony is not None:
            reasoning, content, calls = self._harmony[index].push(text, final, truncated)
            return (reasoning if self.reasoning.include else ""), content, calls
        reasoning = ""
        if self._thinking is not None:
            reasoning, text = self._thinking[index].push(text, final)
            reasoning = reasoning if self.reasoning.include else ""
        if self._parsers is None:
            return reasoning, text, []
        return reasoning, *self._parsers[index].push(text, final)

    def _delta(self, index: int, call: ToolCall) -> DeltaToolCall:
        announced = self._announced[index]
        if call.id in announced:
            return DeltaToolCall(index=announced[call.id], function=DeltaFunctionCall(arguments=call.arguments))
        announced[call.id] = len(announced)
        return DeltaToolCall(index=announced[call.id], id=call.id, type="function",
                             function=DeltaFunctionCall(name=call.name, arguments=call.arguments))

    def _finish_reason(self, index: int, last: StepOutput) -> str | None:
        """The choice's finish reason: "tool_calls" when it ended of its own accord after calling a tool (a
        forced call of a named function ends with "stop", as OpenAI's does)."""
        called = self._parsers is not None and self.tools.choice != "named" and self._parsers[index].calls
        return "tool_calls" if called and last.finish_reason == "stop" else last.finish_reason

    def usage_chunk(self, lasts: Sequence[StepOutput]) -> ChatCompletionChunk:
        return self._make([], self._usage(lasts))

    def _logprobs(self, entries: Sequence[TokenLogprobs]) -> ChatLogprobs | None:
        if self.pieces is None:
            return None
        return ChatLogprobs(content=[
            TokenLogprob(**self._top(entry.token_id, entry.logprob).model_dump(),
                         top_logprobs=[self._top(t, lp) for t, lp in entry.top])
            for entry in entries])

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=self.pieces.text(token_id), logprob=_finite(logprob), bytes=self.pieces.bytes(token_id))

    def _make(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


class _ResponsesFormat(_ChatFormat):
    """The Responses API over one chat choice, split as the chat endpoint splits it (reasoning, text,
    tool calls): typed stream events (`ResponseBuilder`), and as the response the last event's, the
    outputs replayed (so a response is its stream's, item for item). The text's log-probabilities
    cover every generated token, as the chat endpoint's do, when there is text. Reasoning tokens are
    the tokens generated inside the thinking block, its tags and the whitespace after it included; with
    harmony (GPT-OSS), those of its reasoning messages, their headers and ends included (the answer's
    header and the closing token are not: a response without analysis reported 4 of 6 tokens)."""

    done = ""  # the stream ends with response.completed (or .incomplete, or .failed)
    caches_prompts = False  # the engine's prefix cache keeps prompts (their uncached tokens are cache writes)

    def __init__(self, model: str, pieces: TokenPieces | None, settings: dict, *, tools: ToolSetup | None = None,
                 reasoning: _Reasoning | None = None, harmony: _Harmony | None = None) -> None:
        super().__init__(model, pieces, 1, tools=tools, reasoning=reasoning, harmony=harmony)
        self.builder = ResponseBuilder(model, settings)
        self.logprobs_param = "top_logprobs" if settings.get("top_logprobs") is not None else "include"
        self.id = self.builder.id
        # a named call's arguments stream as they come, unless harmony's parser sends the call whole
        self._named = tools is not None and tools.choice == "named" and harmony is None
        self._reasoning_tokens = 0
        self._framing = 0  # harmony: tokens of a header whose channel is not read yet (reasoning if it is analysis)

    def sse(self, event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    def start_chunks(self) -> list[dict]:
        return self.builder.start()

    def chunks(self, index: int, out: StepOutput) -> list[dict]:
        thinking = self._thinking[index] if self._thinking is not None else None
        harmony = self._harmony is not None
        was_thinking = thinking is not None and (thinking.in_reasoning if harmony else thinking.in_block)
        was_framing = harmony and thinking.framing
        reasoning, text, calls = self._split(index, out.text, final=out.finished,
                                             truncated=out.finish_reason == "length")
        tokens = len(out.new_token_ids)
        if not harmony:
            if was_thinking or (thinking is not None and thinking.before_answer):
                self._reasoning_tokens += tokens
        elif was_thinking or thinking.in_reasoning:  # (was: its body or its end; is: its header just read)
            self._reasoning_tokens += self._framing + tokens
            self._framing = 0
        elif was_framing and thinking.framing and not out.finished:  # (not the token that ends a preamble: a
            # content message's end is not the next header's)
            self._framing += tokens
        else:  # the answer's header, body or closing token
            self._framing = 0
        logprobs = ()
        if text:
            logprobs = self._entries(self._take_pending(index, out))
        else:
            self._hold(index, out)
        parser = self._parsers[index] if self._parsers is not None else None
        return self.builder.push(reasoning, text, calls, logprobs, named=self._named,
                                 text_after_calls=getattr(parser, "text_before_calls", None) is False)

    def end_chunks(self, lasts: Sequence[StepOutput], include_usage: bool) -> list[dict]:
        (last,) = lasts
        written = self.prompt_tokens - self.cached_tokens if self.caches_prompts else 0  # (the prefix cache took them)
        spent = response_usage(self.prompt_tokens, self.cached_tokens, last.num_completion_tokens, self._reasoning_tokens,
                               written)
        incomplete = "max_output_tokens" if last.finish_reason == "length" else None
        return self.builder.finish(spent, incomplete, self._entries(self._pending[0]))

    def error_chunks(self, exc: EngineError) -> list[dict]:
        error = error_body(exc)[1]["error"]
        return self.builder.failed(error["code"] or error["type"], error["message"], error["param"])

    def param(self, name: str | None) -> str | None:
        return responses_param(name)

    def response(self, results: Sequence[_Choice]) -> dict:
        (result,) = results
        for out in result.outputs:
            self.chunks(0, out)
        return self.end_chunks([result.last], False)[-1]["response"]

    def _entries(self, entries: Sequence[TokenLogprobs]) -> list[TokenLogprob]:
        logprobs = self._logprobs(entries)
        return logprobs.content if logprobs is not None else []


# --- body size limit -------------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes`` (declared or streamed), 408 for one not received
    within ``timeout_s`` of the request (None: no limit); ``on_reject(path)`` is called for each request it answers
    itself (a declared size; the others end in the app's error handler)."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None] | None = None,
                 timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if self.on_reject is not None:
                self.on_reject(scope["path"])
            await error_response(self._error(declared.isdigit()))(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Receive) -> Receive:
        received, whole = 0, False
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, whole
            try:
                if whole or deadline is None:  # (after the body: a streamed response waiting for the disconnect)
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s of its "
                                         "headers") from None
            except Exception as exc:  # Ray Serve's receive raises once its proxy cancelled the request (the client
                if _cancelled_by_serve(exc):  # left): that is the disconnect it means, not an internal error to log
                    return {"type": "http.disconnect"}
                raise
            whole = whole or message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"request body larger than {self.max_bytes} bytes")
            return message

        return limited_receive

    def _error(self, too_large: bool) -> APIError:
        if too_large:
            return APIError(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")
        return APIError(400, "invalid Content-Length header")


def _cancelled_by_serve(exc: BaseException) -> bool:
    """Whether `exc` is Ray's TaskCancelledError (Ray is loaded wherever Serve runs the app; not imported here)."""
    exceptions = sys.modules.get("ray.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.TaskCancelledError)


@contextlib.contextmanager
def serve_locally(app: ASGIApp, *, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn on 127.0.0.1 and an ephemeral port in a daemon thread; yields the base URL.

    For tests and in-process benchmarks (a deployment runs the app under Ray Serve instead).

    Raises:
        RuntimeError: if the server has not started within `start_timeout_s`.
    """
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"uvicorn did not start within {start_timeout_s:g} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
