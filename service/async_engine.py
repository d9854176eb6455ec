"""Asyncio shell around `Engine`: a background step thread and per-request output queues.

Owns the thread that runs ``Engine.step()`` while there is work, the hand-over of commands to it (every
engine mutation runs on that thread, at a step boundary), and the delivery of step outputs to asyncio
consumers with ``loop.call_soon_threadsafe``, and the threads that compile structured outputs' grammars. A failed step fails only the requests it held, or none when the
engine keeps them to retry (a transient failure: `EngineConfig.step_retry_s`): the loop then waits a little
longer after each such step (`RETRY_PAUSES_S`), so a dead expert device is not called in a tight loop while
the coordinator moves its experts away; the loop keeps running either way. Ignores HTTP, tokenisation and
metrics formats (listeners get raw `StepStats`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from service.dispatch import DispatchError
from service.engine import Engine, EngineConfig, QueueFull, StepFailed, StepOutput
from service.sampling import SamplingParams

T = TypeVar("T")
log = logging.getLogger(__name__)

# Pauses before the next step after the first, second, ... step in a row whose requests the engine kept to retry
# (the last one repeats): a dead worker's calls fail at once, and the coordinator, told by the engines' reports,
# publishes a placement without it in about 0.2-0.4 s (a hung one: some 4 s after the engine's data-plane
# timeout), which each replica applies within its sync interval (0.1 s).
RETRY_PAUSES_S = (0.05, 0.1, 0.2, 0.4, 0.5)
BROKEN_AFTER_FAILED_STEPS = 3  # steps in a row failed beyond retry: the engine reports itself broken (`broken`)
# Threads compiling structured outputs' grammars (seconds for a large schema; llguidance releases the GIL), the
# engine's own: on asyncio's default executor, one client's large schemas (compiled once per choice) took
# every thread that other requests' grammars and the app's other blocking calls wait for.
GRAMMAR_THREADS = 2
# Grammars being compiled or waiting for a grammar thread at once; a structured request wanting another is refused
# (429, retry later): each waited behind every other compile, a queue without bound (a client sending many large
# distinct schemas held every later structured request for their whole compile time).
MAX_PENDING_GRAMMARS = 64


class EngineError(RuntimeError):
    """A request failed inside the engine (its step raised)."""


class StructuredOutputFailed(EngineError):
    """A request's structured output could not be followed to its end (its grammar past a parser limit);
    ``param``: the request parameter the grammar came from, when the caller knows it (an error names it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineStopped(EngineError):
    """The engine shut down before the request finished."""


class RequestTimeout(EngineError):
    """The request did not finish within the engine's `request_timeout_s`; it was aborted."""


class DeviceUnavailable(EngineError):
    """The request's step failed because expert device `device` failed or could not be reached (worth a
    retry: the coordinator moves its experts to the other devices)."""

    def __init__(self, message: str, device: int) -> None:
        super().__init__(message)
        self.device = device


@dataclass(frozen=True)
class StepStats:
    """One step as seen by listeners (called on the engine thread, after the step).

    Attributes:
        seconds: wall time of ``Engine.step()``.
        num_outputs: outputs the step produced (sampled tokens and aborts).
        num_running, num_waiting: batch size and queue depth after the step.
        failed: whether the step raised.
    """

    seconds: float
    num_outputs: int
    num_running: int
    num_waiting: int
    failed: bool


class AsyncEngine:
    """Runs an `Engine` on its own thread and serves it to asyncio code.

    Call ``start()`` once (``create_app`` does not), ``shutdown()`` at the end.

    Args:
        engine: the engine; from now on only the step thread touches it.
        num_threads: torch intra-op threads of the step thread (None: OpenMP's default, all cores).
            ``torch.set_num_threads`` reaches OpenMP only in the calling thread, so a setting made in
            the main thread does not apply here; on a busy 2-core machine 2 threads spin and run slower.
    """

    def __init__(self, engine: Engine, *, num_threads: int | None = None) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._engine = engine
        self._num_threads = num_threads
        self._commands: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._commands_lock = threading.Lock()  # orders submissions against shutdown
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vibe-engine", daemon=True)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._listeners: list[Callable[[StepStats], None]] = []
        self._num_running = 0
        self._num_waiting = 0
        self._kv_cache_usage = 0.0
        self._num_preemptions = 0
        self._num_step_retries = 0
        self._failed_in_a_row = 0  # steps whose requests were kept to retry, since the last that ran
        self._unretried_failures, self._last_failure = 0, ""  # steps failed beyond retry, since the last that ran
        self._resume_at = 0.0      # time.monotonic() before which no step starts (after such a step)
        self._compiler = concurrent.futures.ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="vibe-grammar")
        self._compiles: dict[str, _Compile] = {}  # grammar text -> its compile in progress (or queued)
        self._compiles_lock = threading.Lock()    # requests may come from several event loops

    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def num_running(self) -> int:
        """Running batch size after the last step."""
        return self._num_running

    @property
    def num_waiting(self) -> int:
        """Queue depth after the last step boundary."""
        return self._num_waiting

    @property
    def kv_cache_usage(self) -> float:
        """Share of the KV cache's blocks held by running sequences after the last step."""
        return self._kv_cache_usage

    @property
    def num_preemptions(self) -> int:
        """Running sequences preempted so far for want of KV blocks (`EngineConfig.kv_cache_bytes`)."""
        return self._num_preemptions

    @property
    def num_step_retries(self) -> int:
        """Requests kept to run again after a step failed on a transient error (`EngineConfig.step_retry_s`)."""
        return self._num_step_retries

    @property
    def is_alive(self) -> bool:
        """Whether the step thread runs (False before ``start()`` and after ``shutdown()``)."""
        return self._thread.is_alive() and not self._stopping

    @property
    def broken(self) -> str | None:
        """Why the engine cannot serve though its thread runs, or None: its last `BROKEN_AFTER_FAILED_STEPS` steps
        all failed with errors of its own, which no retry helps (a GPU after a sticky CUDA error, "illegal memory
        access", fails every forward from then on: the replica answered every request with an error while its health
        check passed). An expert device's failures never count, even past step_retry_s: the coordinator replaces
        the device, and a replaced ingress would not help."""
        if self._unretried_failures < BROKEN_AFTER_FAILED_STEPS:
            return None
        return f"the engine's last {self._unretried_failures} steps failed: {self._last_failure[:300]}"

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Call ``listener`` after every step, on the engine thread (keep it short; errors are logged)."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the step thread; unfinished requests and pending calls fail with `EngineStopped`."""
        with self._commands_lock:
            self._stopping = True
        self._wake.set()
        self._compiler.shutdown(wait=False, cancel_futures=True)  # a compile under way finishes, unused
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._fail_pending("the engine shut down")

    def _fail_pending(self, message: str) -> None:
        """Fail the calls not run and the requests not finished with `EngineStopped` (``_stopping`` set)."""
        while self._commands:  # a cancelled future would reach an awaiting request as CancelledError
            _, future = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStopped(message))
        self._send([(rid, EngineStopped(message)) for rid in list(self._streams)])
        # nothing runs or waits any more (the gauges read these: they kept the last step's values for good)
        self._num_running = self._num_waiting = 0
        self._kv_cache_usage = 0.0

    def run_at_step_boundary(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn()`` on the engine thread between two steps; the future holds its result or error."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._commands_lock:
            if self._stopping:
                future.set_exception(EngineStopped("the engine shut down"))
                return future
            self._commands.append((fn, future))
        self._wake.set()
        return future

    async def call_at_step_boundary(self, fn: Callable[[], T]) -> T:
        """Awaitable `run_at_step_boundary`."""
        return await asyncio.wrap_future(self.run_at_step_boundary(fn))

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                       share_prefill_with: str | None = None, timed: bool = True) -> AsyncIterator[StepOutput]:
        """Outputs of one request as they come; the last one has ``finished`` set (``share_prefill_with``:
        see `Engine.add_request`; ``timed`` False: no ``request_timeout_s``, for the server's own work, such as
        the startup profiling pass, which queues every prompt at once).

        Raises ValueError / QueueFull from ``Engine.add_request``, `RequestTimeout` once the request has
        taken ``config.request_timeout_s`` (time the consumer spends between outputs included: at that deadline
        the engine aborts it whether or not the consumer reads, and outputs not read yet are dropped), and
        `EngineError` if the request fails. Closing or cancelling the iterator early (client gone), or a
        timeout, aborts the request.
        """
        queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        self._streams[request_id] = (loop, queue)
        timeout = self.config.request_timeout_s if timed else None
        deadline = None if timeout is None else loop.time() + timeout
        finished = False
        timer = None
        expired = False

        def on_aborted(abort: concurrent.futures.Future[bool]) -> None:  # on the loop
            nonlocal expired
            if not abort.cancelled() and abort.exception() is None and abort.result():
                expired = True  # aborted at the deadline, still running: end the stream, unread outputs dropped
                queue.put_nowait(_timed_out(timeout))

        def expire() -> None:  # at the deadline, read or not: a client that stops reading holds no KV blocks
            abort = self.run_at_step_boundary(lambda: self._engine.abort(request_id))
            abort.add_done_callback(lambda done: _call_soon(loop, on_aborted, done))

        try:
            prompt = list(prompt_token_ids)
            matcher = None
            if params.grammar is not None:  # compiled on a grammar thread: seconds for a large schema
                matcher = await _before(deadline, timeout, self._matcher(params.grammar))
            admission = self.call_at_step_boundary(lambda: self._engine.add_request(
                request_id, prompt, params, share_prefill_with=share_prefill_with, matcher=matcher))
            await _before(deadline, timeout, admission)
            if deadline is not None:  # one timer per request, not one per output token
                timer = loop.call_at(deadline, expire)
            while not finished:
                if expired:
                    raise _timed_out(timeout)
                item = await queue.get()
                if isinstance(item, RequestTimeout):  # our own timer's, the request aborted
                    raise item
                if isinstance(item, BaseException):  # the engine ended the request with an error: aborted all the
                    raise item  # same (a step that raised unexpectedly failed it before its queued admission ran)
                if (item.finish_reason == "abort" and not item.error and deadline is not None
                        and loop.time() >= deadline):  # our timer's abort, its output before the timer's answer
                    raise _timed_out(timeout)
                finished = item.finished
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            self._streams.pop(request_id, None)
            if not finished:
                self.run_at_step_boundary(lambda: self._engine.abort(request_id))

    async def _matcher(self, grammar: str):
        """A ready matcher of ``grammar``, the request's own: a copy of the engine's cached one, else compiled on the
        grammar threads, one compile shared by the requests that want the same grammar meanwhile (a request's n
        choices: the app makes each an engine request). A queued compile nobody waits for any more is cancelled.

        Raises:
            ValueError: the grammar is invalid (as `Engine.make_matcher`).
            QueueFull: MAX_PENDING_GRAMMARS other grammars are compiling or waiting to.
            EngineStopped: the engine shut down first.
        """
        matcher = self._engine.cached_matcher(grammar)
        if matcher is not None:
            return matcher
        with self._compiles_lock:
            compile_ = self._compiles.get(grammar)
            if compile_ is None:
                if len(self._compiles) >= MAX_PENDING_GRAMMARS:
                    raise QueueFull(f"{len(self._compiles)} structured outputs are waiting to compile their grammars")
                try:  # its result: a matcher no request advances, which each waiter copies
                    future = self._compiler.submit(self._engine.make_matcher, grammar)
                except RuntimeError:  # the executor is shut down
                    raise EngineStopped("the engine shut down") from None
                compile_ = self._compiles[grammar] = _Compile(future)
            compile_.waiters += 1
        try:  # (shielded: a waiter that leaves would cancel the compile for the others)
            await asyncio.shield(asyncio.wrap_future(compile_.future))
        except asyncio.CancelledError:
            if compile_.future.cancelled():  # only shutdown cancels a compile someone waits for
                raise EngineStopped("the engine shut down") from None
            raise
        finally:
            with self._compiles_lock:
                compile_.waiters -= 1
                if not compile_.waiters:
                    if self._compiles.get(grammar) is compile_:
                        del self._compiles[grammar]
                    compile_.future.cancel()  # not started: nobody needs it; started or done: no effect
        return compile_.future.result().deep_copy()

    def _run(self) -> None:
        """The step loop; should it ever raise (each step's errors are caught in `_step`), the engine stops as at
        shutdown, failing what is pending, rather than leave requests and calls waiting on a dead thread."""
        try:
            self._loop()
        except BaseException:
            log.exception("the engine's step thread failed; the engine is stopped")
            with self._commands_lock:
                self._stopping = True
            self._fail_pending("the engine stopped after an internal error")

    def _loop(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        while True:
            self._wake.clear()
            self._run_commands()
            if self._stopping:
                return
            if not self._engine.has_work:
                self._wake.wait()
            elif (pause := self._resume_at - time.monotonic()) > 0:  # retrying: commands still run meanwhile
                self._wake.wait(pause)
            else:
                self._step()

    def _run_commands(self) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
        self._num_waiting = self._engine.num_waiting

    def _step(self) -> None:
        start = time.perf_counter()
        outputs: list[StepOutput] = []
        failed = True
        try:
            outputs = self._engine.step()
        except StepFailed as exc:
            if exc.retried:
                pause = RETRY_PAUSES_S[min(self._failed_in_a_row, len(RETRY_PAUSES_S) - 1)]
                self._failed_in_a_row += 1
                self._resume_at = time.monotonic() + pause
                log.warning("%s; retrying in %.2f s", exc, pause)
            else:
                log.exception("engine step failed")
                if not self._engine.transient(exc.cause):  # (a device's failure past step_retry_s is the workers')
                    self._unretried_failures, self._last_failure = self._unretried_failures + 1, str(exc)
            self._send([(rid, _step_error(exc)) for rid in exc.request_ids])
        except Exception as exc:  # a bug outside the forward: drop every request rather than the loop
            log.exception("engine step raised unexpectedly")
            self._unretried_failures, self._last_failure = self._unretried_failures + 1, f"{type(exc).__name__}: {exc}"
            request_ids = list(self._streams)  # a snapshot: consumers add and remove streams concurrently
            for rid in request_ids:
                self._engine.abort(rid)
            self._send([(rid, EngineError(f"engine step failed: {type(exc).__name__}")) for rid in request_ids])
        else:
            failed = False
            self._failed_in_a_row = self._unretried_failures = 0
            self._send([(out.request_id, out) for out in outputs])
        self._num_running, self._num_waiting = self._engine.num_running, self._engine.num_waiting
        self._kv_cache_usage, self._num_preemptions = self._engine.kv_cache_usage, self._engine.num_preemptions
        self._num_step_retries = self._engine.num_step_retries
        stats = StepStats(time.perf_counter() - start, len(outputs), self._num_running, self._num_waiting, failed)
        for listener in self._listeners:
            try:
                listener(stats)
            except Exception:
                log.exception("step listener failed")

    def _send(self, items: list[tuple[str, StepOutput | BaseException]]) -> None:
        """Hand items to their requests' consumers: one thread-safe call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, batch in by_loop.items():
            _call_soon(loop, _put_all, batch)


@dataclass
class _Compile:
    """A grammar's compile on the grammar threads and the requests waiting for it."""

    future: concurrent.futures.Future
    waiters: int = 0


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """``fn(*args)`` on ``loop`` from another thread, unless the loop is closed (nobody listens any more)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _step_error(failure: StepFailed) -> EngineError:
    """One request's error for a failed step: `DeviceUnavailable` when a device failed, else EngineError."""
    cause = failure.__cause__
    error = (DeviceUnavailable(str(failure), cause.device) if isinstance(cause, DispatchError)
             else EngineError(str(failure)))
    error.__cause__ = cause
    return error


async def _before(deadline: float | None, timeout: float | None, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`; RequestTimeout if the loop's clock passes `deadline` (None: no deadline) first.
    `timeout`: the request's limit in seconds, for the message."""
    if deadline is None:
        return await awaitable
    try:
        async with asyncio.timeout_at(deadline):
            return await awaitable
    except TimeoutError:
        raise _timed_out(timeout) from None


def _timed_out(timeout: float) -> RequestTimeout:
    return RequestTimeout(f"the request did not finish within the server's limit of {timeout:g} s and was "
                          "aborted; retry later or ask for fewer tokens")
