"""Continuous-batching engine: one model forward per step over a flattened ragged batch.

Owns the request lifecycle (waiting queue, running batch, paged KV cache, preemption), the per-step schedule under a token
budget (decode tokens of running sequences first, then prefill chunks of new ones), sampling (with the
token log-probabilities a request asks for, of its completion and of its prompt, and prompt-only
requests that score a prompt), requests sharing another's prefill, prefix caching (a new request starts
from the keys and values of the longest prefix of its prompt that a slot already holds, sharing its blocks;
with linear attention, from copies of its states too), stop conditions
and per-step outputs. Plain Python and torch: no threads, no asyncio, no Ray; the
`AsyncEngine` shell and the HTTP app sit on top. The model runs as is; an optional dispatch context
(``begin_step()`` / ``end_step()``) around each forward lets MoE layers send one message per device per
layer per step.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service import attention, linear_attention, rope, sparse_attention
from service.attention import KVCache, SeqChunk, StepBatch
from service.sampling import MAX_REASONING_GAP, History, SamplingParams, TokenLogprobs, sample, token_logprobs
from service.structured import GrammarFailed, Grammars, out_of_states
from service.text import TextStream

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]

# A waiting request whose prompt shares at least this many tokens, beyond what the cache holds, with one a running
# sequence is prefilling waits for that prefill to share them (`Engine._deferred`; SGLang's in-batch prefix caching
# threshold: under it, waiting a step costs more than prefilling them again).
DEFER_SHARED_TOKENS = 32

# Slots for finished requests' cached prefixes per running sequence, when `EngineConfig.max_cached_sequences` is None.
CACHED_SEQUENCES_PER_SEQ = 16

# Seconds of a step that may go to compiling grammars again for requests whose cached compile ran out of lexer states
# (`Engine._renew`, on the step thread: each compile and replay holds every request's step). Once spent, the step's
# other requests that ran out fail, as all of them did before: many rows renewing one large schema at once (0.3-0.5 s
# a compile) held the step for seconds (a review).
RENEW_BUDGET_S = 0.05


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


class StepFailed(RuntimeError):
    """A step's forward failed; the sequences it scheduled were finished and their slots freed, except those
    kept to be retried (a transient failure: see ``EngineConfig.step_retry_s``).

    Attributes:
        request_ids: the requests that failed (finished).
        retried: the requests that were in the step too and wait at the head of the queue to be run again.
    """

    def __init__(self, request_ids: Sequence[str], cause: BaseException, retried: Sequence[str] = ()) -> None:
        kept = f" ({len(retried)} more kept to retry)" if retried else ""
        super().__init__(f"engine step failed for {len(request_ids)} request(s){kept}: {type(cause).__name__}: {cause}")
        self.request_ids = tuple(request_ids)
        self.retried = tuple(retried)
        self.cause = cause


class StepHooks(Protocol):
    """Called around every forward (e.g. the dispatching experts' ``DispatchContext``)."""

    def begin_step(self) -> None: ...

    def end_step(self, completed: bool = True) -> None:
        """`completed`: False when the forward raised (its tokens are run again by a retry, if any)."""


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine.

    Attributes:
        max_num_seqs: running sequences at most (the decode batch size).
        max_num_batched_tokens: tokens per forward at most (prefill is chunked to fit); >= max_num_seqs.
        max_model_len: prompt plus completion tokens of one sequence at most.
        max_queue: waiting requests at most; `add_request` raises `QueueFull` beyond.
        kv_cache_bytes: memory for keys and values at most (and linear-attention states, with their snapshots
            for the prefix cache). Keys and values are held in blocks of ``kv_block_size`` positions that a
            sequence takes as it grows (paged, as vLLM's), so a sequence holds memory for its tokens, not for
            ``max_model_len``; at least one ``max_model_len`` sequence must fit. When a running sequence needs a
            block and none is free (nor held by a finished request's cached prefix), the most recently admitted
            running sequence is preempted: its blocks are freed and it waits at the head of the queue, to be
            prefilled again (its prompt and the tokens it generated) when blocks are free; its client sees only
            the delay. With prefix caching (and no linear-attention states) all of it holds blocks, the ones
            running sequences do not fill holding finished requests' prefixes, as vLLM gives its cache all the
            memory; without, no more than ``max_num_seqs`` sequences of ``max_model_len`` fill. A block's memory
            is committed when it is first used (on CPU: resident as the cache fills, not at start-up).
        kv_block_size: positions per block of the KV cache (16, vLLM's default).
        request_timeout_s: seconds a request may take from admission to its last output, waiting
            included; the `AsyncEngine` aborts it after that (None: no limit).
        max_prompt_logprob_tokens: prompt tokens per step of requests that asked for their prompt's
            log-probabilities (their prefill is chunked to fit): bounds the ``[tokens, vocabulary]``
            float32 logits a step keeps for them (128 x 152k: 78 MB).
        enable_prefix_caching: a finished request's slot keeps its keys and values until the slot is
            reused or its blocks are needed (the least recently used slot's last blocks first); a new
            request shares the blocks of the slot (free, or a running request's) holding the longest prefix
            of its prompt (or takes that free slot) and prefills only the rest. The slot a request overwrites
            is an empty one if any, else the least recently used. A request whose prompt shares 32 or more
            uncached tokens with one a running sequence is still prefilling waits for that prefill instead of
            prefilling them too (requests behind it may be admitted first). Requests that ask for their
            prompt's log-probabilities are prefilled whole. With linear-attention layers (Qwen3-Next, Qwen3.5,
            Kimi-Linear's KDA, MiniMax's lightning attention, Nemotron-H's and Granite's Mamba2), whose states
            hold one position, a cached sequence is reusable whole (a new turn of a conversation, or an agent's
            next call, whose prompt extends a finished request's tokens) or up to a position its states were
            copied at (``prefix_state_interval``).
        max_cached_sequences: finished requests whose keys and values the prefix cache holds at once, at most
            (models without linear-attention states; each takes a slot: a row of the block table, of
            ``max_model_len / kv_block_size`` entries), beside the ``max_num_seqs`` running ones. None: 16 x
            ``max_num_seqs``, at most one per block. Memory is what bounds the cache: when blocks run short the
            least recently used sequences give theirs up, tail first; this only caps the table (and the slots a
            new request's prefix is looked up among: two sorted neighbours, not one comparison each). A chat
            service whose users reply after others have been answered needs one per user in conversation:
            with as many as running sequences, 64 users taking turns found almost none of their conversations
            still cached (`load_tests.prefix_cache --only-users`).
        prefix_state_interval: with linear-attention layers, a slot's states are copied (snapshots, for the
            prefix cache) at the multiples of this many positions that its prefills reach, at the end of its
            prompt, and at the position where its prompt left the longest cached sequence it shared tokens
            with (a branch point: where the next prompt with that prefix will likely leave too); never at a
            position below it. A prompt sharing ``s`` tokens with a cached sequence resumes from its latest
            snapshot <= ``s`` and prefills the rest (fewer than this many shared tokens again, none at a
            known branch point). Fixed multiples, not the ends of prefill chunks: those depend on each step's
            token budget and on the other requests, so two prompts would rarely have one at the same place.
            Smaller: fewer shared tokens prefilled again, but more copies made and held per prompt. 256:
            under half a default chunk (512) prefilled again, at most 128 copies for a 32k prompt, and a
            multiple of DeltaNet's chunks of 64 and Mamba2's of 128 or 256 (the split falls between chunks).
        prefix_state_memory: share of ``kv_cache_bytes`` held for those snapshots (models with linear-attention
            layers and prefix caching only; 0: none, only whole cached sequences are reused). A snapshot takes
            a slot's states' bytes (Qwen3-Next-80B: 36 layers x 2.06 MiB, 74 MiB in bf16); the slots get the
            rest. At most ``max_num_seqs`` x (``max_model_len`` // interval + 2) snapshots (as many as positions
            of ``max_num_seqs`` slots), made when a prefill reaches their position, evicted with their slot's
            keys and values or by the segmented LRU of `linear_attention.StateSnapshots`.
        step_retry_s: a step whose forward fails with an error the engine's ``retryable`` calls transient (the
            serving app's: an expert device failed or could not be reached, while the coordinator moves its
            experts to the other devices) does not fail its requests: each is preempted as for want of blocks
            (it keeps the keys and values it had before the step, unless the model has linear-attention
            states, which a failed forward may have advanced) and waits at the head of the queue to run again,
            its client seeing only the delay. A request whose steps still fail this many seconds after the
            first of these failures fails then (0: at once); a step that runs clears its count.
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 1024
    max_queue: int = 256
    kv_cache_bytes: int = 512 * 2**20
    kv_block_size: int = 16
    request_timeout_s: float | None = None
    max_prompt_logprob_tokens: int = 128
    enable_prefix_caching: bool = True
    prefix_state_interval: int = 256
    prefix_state_memory: float = 0.125
    max_cached_sequences: int | None = None
    step_retry_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_queue", "kv_cache_bytes",
                     "kv_block_size", "max_prompt_logprob_tokens", "prefix_state_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}) so every running sequence decodes each step")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 or None, got {self.request_timeout_s!r}")
        if self.max_cached_sequences is not None and (isinstance(self.max_cached_sequences, bool) or not isinstance(
                self.max_cached_sequences, int) or self.max_cached_sequences < 1):
            raise ValueError(f"max_cached_sequences must be a positive integer or None, got {self.max_cached_sequences!r}")
        if isinstance(self.prefix_state_memory, bool) or not 0 <= self.prefix_state_memory < 1:
            raise ValueError(f"prefix_state_memory must be in [0, 1), got {self.prefix_state_memory!r}")
        if isinstance(self.step_retry_s, bool) or not self.step_retry_s >= 0:
            raise ValueError(f"step_retry_s must be >= 0, got {self.step_retry_s!r}")


@dataclass(frozen=True)
class StepOutput:
    """What one request got in one step.

    Attributes:
        request_id: the request.
        new_token_ids: the token sampled this step (empty for an abort).
        text: new completion text ('' without a tokenizer; held back while a stop string may follow).
        finished: whether the request is done.
        finish_reason: "stop" (EOS, stop token or stop string), "length" or "abort" (aborted, or its structured
            output's grammar failed mid-completion: an error, not a whole output); None while running.
        num_prompt_tokens, num_completion_tokens: token counts so far.
        num_cached_tokens: prompt tokens whose keys and values came from the prefix cache (not prefilled).
        logprobs: one entry per new token when the request asked for log-probabilities, else empty.
        prompt_logprobs: with the first completion token of a request that asked for its prompt's
            log-probabilities, one entry per prompt token after the first (the first has no context).
        error: why an "abort" that nobody asked for ended the request (its grammar failed), else None.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_completion_tokens: int
    logprobs: tuple[TokenLogprobs, ...] = ()
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    num_cached_tokens: int = 0
    error: str | None = None


class _Sequence:
    """Mutable state of one request inside the engine."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 text: TextStream | None) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_ids)       # prompt, then completion
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.generator = params.make_generator()
        self.text = text
        self.slot = -1
        self.num_cached = 0                     # tokens whose keys/values are in the cache
        self.num_reused = 0                     # of them, prompt tokens taken from the prefix cache
        self.branch = 0                         # linear attention: a position to snapshot the states at (0: none)
        self.preemptions = 0                    # times its blocks were taken back for other sequences
        self.retry_until: float | None = None   # a transient step failure: retried until then (monotonic clock)
        self.matcher = None                     # the structured output's grammar state, if any
        self.grammar_tokens: list[int] = []     # the tokens its matcher consumed (replayed when it is renewed)
        self.own_compile = False                # its matcher is of a compile of its own (`Engine._renew`)
        self.generation = 0                     # of the cached compile its matcher was copied from
        # with a grammar and reasoning tokens: "maybe" (the first token may open a thinking block), "in" (in
        # one: no grammar yet), "gap" (just closed: whitespace may come before the grammar), None (the
        # grammar applies)
        self.thinking: str | None = None
        self.gap_left = 0                       # whitespace tokens still allowed in the gap
        self.prompt_logprobs: list[TokenLogprobs] = []  # filled chunk by chunk while prefilling

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model (the whole prompt at first, then one per step)."""
        return len(self.token_ids) - self.num_cached


class _Match(NamedTuple):
    """A prefix of a sequence's tokens held in the KV cache (`Engine._match`)."""

    length: int = 0             # tokens
    source: int | None = None   # the slot holding them
    snapshot: bool = False      # its linear-attention states at ``length`` come from a snapshot
    shared: int = 0             # the longest prefix any slot shares with the tokens (a branch point)


class Engine:
    """Continuous batching over one causal LM (see the module docstring).

    Args:
        model: a transformers causal LM whose attention uses transformers' AttentionInterface; it is
            switched to ragged attention, so it cannot be used with ``generate`` afterwards.
        config: limits.
        tokenizer: enables text outputs and stop strings (None: token ids only).
        hooks: object with ``begin_step()`` / ``end_step()`` called around each forward.
        retryable: whether a failed forward's error is transient, its requests to be retried (see
            ``EngineConfig.step_retry_s``; None: none is).
    """

    def __init__(self, model: PreTrainedModel, config: EngineConfig,
                 tokenizer: PreTrainedTokenizerBase | None = None, hooks: StepHooks | None = None,
                 retryable: Callable[[BaseException], bool] | None = None) -> None:
        self.config = config
        self._retryable = retryable
        self.tokenizer = tokenizer
        self._model = model.eval()
        self._hooks = hooks
        self._cache = _make_cache(model, config)
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self._grammars = (Grammars(tokenizer, model.config.vocab_size, self._eos_ids)
                          if tokenizer is not None else None)
        self._renewing_s = 0.0  # of this step, in `_renew`
        self._free_slots = list(range(self._cache.num_slots))  # least recently used (released or shared) first
        self._slot_tokens = _CachedPrefixes()  # free slot -> the tokens whose keys/values it holds
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._outputs: list[StepOutput] = []    # aborts, reported by the next step
        self._forks: dict[str, list[_Sequence]] = {}  # parent id -> requests waiting to share its prefill
        self.prefix_cache_queries = 0  # prompt tokens of admitted requests that may use the prefix cache
        self.prefix_cache_hits = 0     # of them, tokens taken from it
        self.num_preemptions = 0       # running sequences whose blocks were taken back (prefilled again later)
        self.num_step_retries = 0      # requests kept to run again after a transient step failure
        self.num_prefill_deferrals = 0  # admissions put off for a running prefill of the same prompt prefix
        # blocks kept free when admitting beside running sequences, for their next decode steps (1%, as vLLM)
        self._watermark = self._cache.num_blocks // 100
        attention.install(model)
        # dynamic and longrope RoPE chosen once for max_model_len, not per step from the step's longest position
        rope.freeze(model, config.max_model_len)
        linear_attention.install(model)
        sparse_attention.install(model)
        self._snapshots = self._cache.linear.snapshots if self._cache.linear is not None else None
        if self._cache.linear is not None and config.enable_prefix_caching:
            log.info("prefix caching of %s: %d snapshots of its linear-attention states (every %d positions)",
                     type(model).__name__, self._snapshots.capacity if self._snapshots else 0,
                     config.prefix_state_interval)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + sum(len(children) for children in self._forks.values())

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_kv_slots(self) -> int:
        """Sequences (running, or finished and cached for their prefix) the KV cache can hold at once."""
        return self._cache.num_slots

    @property
    def num_kv_blocks(self) -> int:
        """Blocks of ``kv_block_size`` positions in the KV cache."""
        return self._cache.num_blocks

    @property
    def kv_cache_usage(self) -> float:
        """Share of the KV cache's blocks that running sequences hold (a block they share counts once; the rest
        is free or holds cached prefixes, which are given up when needed)."""
        return self._cache.num_live / self._cache.num_blocks

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._outputs)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                    share_prefill_with: str | None = None, matcher=None) -> None:
        """Queue a request; it joins the running batch at a step boundary.

        Args:
            share_prefill_with: a queued or running request with the same prompt whose prefill has not
                finished (another choice of the same HTTP request): this one then skips its own prefill.
                When that request finishes its prefill, this one shares its keys and values and samples
                its first token from the same logits, if a KV slot (and a block) is free then; otherwise (or
                if that request is gone or does not qualify) it is prefilled as any other request.
            matcher: ``params.grammar``'s matcher, made beforehand with `make_matcher` (off the step loop);
                without it the grammar is compiled here (unless cached).

        Raises:
            ValueError: empty prompt, token id out of vocabulary, prompt + max_tokens > max_model_len,
                duplicate request id, or stop strings without a tokenizer.
            QueueFull: ``max_queue`` requests are already waiting.
        """
        prompt = [int(t) for t in prompt_token_ids]
        self._validate(request_id, prompt, params)
        if self.num_waiting >= self.config.max_queue:
            raise QueueFull(f"{self.num_waiting} requests waiting (max_queue={self.config.max_queue})")
        text = (TextStream(self.tokenizer, prompt, params.stop, params.skip_special_tokens, params.kept_special_ids,
                           params.include_stop_str)
                if self.tokenizer is not None else None)
        seq = _Sequence(request_id, prompt, params, text)
        if params.grammar is not None:  # ValueError for a grammar it cannot follow
            seq.matcher = matcher if matcher is not None else self._grammars.warmed_matcher(params.grammar)
            # (the compile cached now: the one its matcher was copied from, unless another took its place since the
            # matcher was made, a recompile at worst when it runs out)
            seq.generation = self._grammars.generation(params.grammar)
            if params.reasoning_tokens is not None:
                seq.thinking = "in" if params.in_reasoning else "maybe"
        parent = next((s for s in (*self._running, *self._waiting) if s.request_id == share_prefill_with), None)
        if (parent is not None and parent.token_ids == prompt and parent.num_cached < len(prompt)
                and parent.params.max_tokens > 0 and params.max_tokens > 0
                and parent.params.prompt_logprobs == params.prompt_logprobs):
            self._forks.setdefault(parent.request_id, []).append(seq)
        else:
            self._waiting.append(seq)

    def make_matcher(self, grammar: str):
        """A ready matcher of ``grammar`` for `add_request`, the caller's own; thread-safe, touches no engine state
        but the grammar cache, so it can run on any thread while the engine steps (its first mask included,
        which is the costly part). A grammar is compiled once while cached (`structured.CACHE_SIZE`).

        Raises:
            ValueError: an engine without a tokenizer, or a grammar its tokenizer cannot follow.
        """
        if self._grammars is None:
            raise ValueError("structured outputs need an engine with a tokenizer")
        return self._grammars.warmed_matcher(grammar)

    def cached_matcher(self, grammar: str):
        """`make_matcher` if ``grammar`` is compiled already (cheap enough for an event loop), else None."""
        return self._grammars.cached_matcher(grammar) if self._grammars is not None else None

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request (its slot is free at once); False if it is unknown."""
        seq = self._find(request_id)
        if seq is None:
            return False
        if seq in self._running:
            self._release(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        else:
            for children in self._forks.values():
                if seq in children:
                    children.remove(seq)
        self._unfork(seq)
        self._outputs.append(_output(seq, (), "", "abort"))
        return True

    def _unfork(self, parent: _Sequence) -> None:
        """``parent`` will not share its prefill (any more): the requests waiting for it are prefilled alone,
        first in the queue."""
        self._waiting.extendleft(reversed(self._forks.pop(parent.request_id, [])))

    def _forkable(self, sampled: list[_Sequence]) -> list[tuple[_Sequence, int]]:
        """The requests waiting to share a prefill finishing in this step that get a KV slot now, each
        with its parent's index in ``sampled`` (no state changes: `_adopt` does them)."""
        if not self._forks:
            return []
        room = min(len(self._free_slots), self.config.max_num_seqs - len(self._running))
        spare = self._cache.spare_blocks()
        forked = []
        for row, parent in enumerate(sampled):
            if parent.num_completion_tokens == 0:  # its prompt ends in this step
                need = self._cache.own_blocks(parent.num_prompt_tokens, shared=parent.num_prompt_tokens)
                for child in self._forks.get(parent.request_id, [])[:room - len(forked)]:
                    if need > spare:
                        return forked
                    spare -= need
                    forked.append((child, row))
        return forked

    def _adopt(self, child: _Sequence, parent: _Sequence) -> None:
        """``child`` joins the running batch sharing ``parent``'s prompt keys and values."""
        self._forks[parent.request_id].remove(child)
        length = parent.num_prompt_tokens
        child.slot = self._share_into(self._victim(), parent.slot, length, length)
        child.num_cached = length
        child.prompt_logprobs = list(parent.prompt_logprobs)
        self._running.append(child)

    def step(self) -> list[StepOutput]:
        """Schedule, run one forward over every scheduled token, sample, and report.

        Raises:
            StepFailed: the forward or sampling raised; the scheduled requests are finished and freed.
        """
        outputs, self._outputs = self._outputs, []
        self._renewing_s = 0.0
        chunks = self._schedule()
        if not chunks:
            return outputs
        done = [seq for seq, n in chunks if n == seq.num_pending]  # chunks that end their pending tokens
        sampled = [seq for seq in done if seq.params.max_tokens > 0]
        scored = [seq for seq in done if seq.params.max_tokens == 0]  # prompt only: finished, nothing sampled
        ahead = self._masks_ahead(sampled)
        try:
            self._plan_snapshots(chunks)
            logits, prompt_rows = self._forward(chunks)
            for seq, rows in prompt_rows:
                begin = seq.num_cached + 1  # each row predicts the prompt token after its position
                targets = seq.token_ids[begin:begin + len(rows)]
                seq.prompt_logprobs += token_logprobs(logits[rows], targets, [seq.params.prompt_logprobs] * len(rows))
            logits = logits[len(logits) - len(sampled):]  # the sampling rows
            forked = self._forkable(sampled)  # (request sharing a prefill, its parent's row), first tokens too
            logits = torch.cat([logits, logits[[row for _, row in forked]]]) if forked else logits
            sampled += [child for child, _ in forked]
            histories = [self._history(s) if s.params.uses_history else None for s in sampled]
            tokens = sample(self._masked(logits, sampled, ahead), [s.params for s in sampled],
                            [s.generator for s in sampled], histories)
            logprobs = _logprobs(logits, sampled, tokens)
        except Exception as exc:
            if ahead is not None:  # (its matchers stay in use until it is done)
                concurrent.futures.wait([ahead])
            self._end_snapshots()
            self._outputs = outputs + self._outputs  # (aborts' final outputs, queued before: the next step reports them)
            raise self._failed(chunks, exc) from exc
        self._end_snapshots()
        for seq, n in chunks:
            seq.num_cached += n
            seq.retry_until = None
        for child, row in forked:  # before any parent's slot is freed below
            self._adopt(child, sampled[row])
        for seq in done:  # requests still waiting to share a finished prefill: there was no slot for them
            self._unfork(seq)
        advanced = self._advanced(sampled, tokens)
        outputs += [self._append_token(*args) for args in zip(sampled, tokens, logprobs, advanced)]
        for seq in scored:
            self._release(seq)
            outputs.append(_output(seq, (), "", "length"))
        return outputs

    def transient(self, exc: BaseException) -> bool:
        """Whether a forward's error is one the engine retries (a failure of an expert device, not of its own)."""
        return self._retryable is not None and self._retryable(exc)

    def _failed(self, chunks: list[tuple[_Sequence, int]], exc: Exception) -> StepFailed:
        """The step's forward raised ``exc``: its requests are retried (a transient failure, within their
        ``step_retry_s``) or finished, their slots freed either way; the error to raise."""
        now = time.monotonic()
        transient = self.config.step_retry_s > 0 and self._retryable is not None and self._retryable(exc)
        failed, retried = [], []
        for seq, _ in reversed(chunks):  # requeued at the head in reverse: they keep their order
            if transient and (seq.retry_until is None or now < seq.retry_until):
                if seq.retry_until is None:
                    seq.retry_until = now + self.config.step_retry_s
                # its keys and values before the step stay (the step wrote only past them), unless linear-attention
                # states, which the forward updates in place, may have moved on
                self._requeue(seq, keep_cache=self._cache.linear is None)
                retried.append(seq.request_id)
            else:
                self._release(seq, keep_cache=False)  # a failed forward may have written part of a chunk
                self._unfork(seq)
                failed.append(seq.request_id)
        self.num_step_retries += len(retried)
        return StepFailed(failed[::-1], exc, retried[::-1])

    def _requeue(self, seq: _Sequence, keep_cache: bool) -> None:
        """``seq`` leaves the running batch for the head of the queue, to be prefilled again (prompt and generated
        tokens) when admitted; what it streamed stays streamed, its sampling state is kept. With ``keep_cache``
        its keys and values stay cached (reused at its admission, unless given up for blocks meanwhile)."""
        self._release(seq, keep_cache)
        self._unfork(seq)
        seq.slot, seq.num_cached, seq.branch = -1, 0, 0
        if seq.num_completion_tokens == 0:  # its prompt's log-probabilities are computed again
            seq.prompt_logprobs = []
        seq.preemptions += 1
        self._waiting.appendleft(seq)

    def _constrained(self, seq: _Sequence):
        """The matcher that masks ``seq``'s next token (None: none does, inside a thinking block or unconstrained)."""
        return None if seq.thinking == "in" else seq.matcher

    def _masks_ahead(self, sampled: list[_Sequence]) -> concurrent.futures.Future | None:
        """The structured outputs' masks of the rows a step samples, begun before its forward (they depend on what
        was sampled before only), or None when no row is constrained."""
        if all(seq.matcher is None for seq in sampled):  # most steps: nothing to build
            return None
        matchers = [self._constrained(seq) for seq in sampled]
        return self._grammars.masks_ahead([m for m in matchers if m is not None])

    def _masked(self, logits: torch.Tensor, sampled: list[_Sequence],
                ahead: concurrent.futures.Future | None = None) -> torch.Tensor:
        """The logits to sample from: a copy with the tokens each structured output forbids at -inf (the
        reported log-probabilities stay the model's own). Inside a thinking block nothing is forbidden but the
        tokens that would end the completion (an answer in the format must follow: a thinking model's end of text
        there gave no answer and finish_reason "stop", a review); a first token may also open one, and the gap's
        whitespace may follow its close."""
        if all(seq.matcher is None for seq in sampled):  # most steps: nothing to build
            return logits
        matchers = [self._constrained(seq) for seq in sampled]
        masked = logits.clone()
        if any(matcher is not None for matcher in matchers):
            # ``ahead``: the masks of the constrained rows sampled before the forks were added (which come after)
            self._grammars.mask(masked, matchers, ahead.result() if ahead is not None else None)
            for row, (seq, matcher) in enumerate(zip(sampled, matchers)):
                if matcher is not None and self._renew(seq):  # its lexer ran out building this mask
                    masked[row] = logits[row]
                    self._grammars.mask(masked[row:row + 1], [seq.matcher])
        for row, seq in enumerate(sampled):
            if seq.matcher is None:
                continue
            if seq.thinking == "maybe":
                opener = seq.params.reasoning_tokens[0]
                masked[row, opener] = logits[row, opener]
            elif seq.thinking == "gap":
                gap = list(seq.params.reasoning_gap)
                masked[row, gap] = logits[row, gap]
            if seq.thinking in ("in", "maybe", "gap"):
                masked[row, list(self._end_ids(seq.params))] = -math.inf
        return masked

    def _end_ids(self, params: SamplingParams) -> tuple[int, ...]:
        """The tokens that end a completion of ``params``: its stop token ids, and EOS unless it ignores it."""
        return tuple(params.stop_token_ids) if params.ignore_eos else (*params.stop_token_ids, *self._eos_ids)

    def _history(self, seq: _Sequence) -> History:
        return History(seq.token_ids, seq.num_prompt_tokens, self._end_ids(seq.params))

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        vocab = self._model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
        total = len(prompt) + params.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"max_model_len {self.config.max_model_len}")
        for name, ids in (("stop_token_ids", params.stop_token_ids),
                          ("logit_bias token ids", [token for token, _ in params.logit_bias]),
                          ("reasoning_tokens", params.reasoning_tokens), ("reasoning_gap", params.reasoning_gap)):
            if ids and max(ids) >= vocab:
                raise ValueError(f"{name} must be in [0, {vocab}), got {max(ids)}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if params.grammar is not None and self._grammars is None:
            raise ValueError("structured outputs need an engine with a tokenizer")
        if self._find(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in use")

    def _find(self, request_id: str) -> _Sequence | None:
        forks = (child for children in self._forks.values() for child in children)
        return next((s for s in (*self._running, *self._waiting, *forks) if s.request_id == request_id), None)

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """(sequence, new tokens) of this step: decodes first, then prefill chunks, then admissions."""
        self._grow_running()
        budget = self.config.max_num_batched_tokens
        scored = self.config.max_prompt_logprob_tokens  # prompt tokens with log-probabilities left this step
        decodes = sorted(((s, 1) for s in self._running if s.num_pending == 1), key=lambda c: c[0].slot)
        budget -= len(decodes)
        prefills = []

        def chunk(seq: _Sequence) -> int:
            limit = budget if seq.params.prompt_logprobs is None else min(budget, scored)
            return min(seq.num_pending, limit)

        def take(seq: _Sequence) -> None:
            nonlocal budget, scored
            n = chunk(seq)
            prefills.append((seq, n))
            budget -= n
            scored -= n if seq.params.prompt_logprobs is not None else 0

        for seq in (s for s in self._running if s.num_pending > 1):
            if budget == 0:
                break
            if chunk(seq):
                take(seq)
        index = 0  # requests deferred in this step (`_deferred`), at most max_num_seqs: each costs a prefix search
        while (budget > 0 and index < min(len(self._waiting), self.config.max_num_seqs)
               and chunk(self._waiting[index]) and self._free_slots and len(self._running) < self.config.max_num_seqs):
            seq = self._waiting[index]
            match = self._admit(seq)
            if match is None:
                break
            if self._deferred(seq, match):
                index += 1
                continue
            del self._waiting[index]
            self._assign_slot(seq, match)
            self._running.append(seq)
            take(seq)
        return decodes + prefills

    def _deferred(self, seq: _Sequence, match: _Match) -> bool:
        """Whether ``seq`` waits (the requests behind it may go first) because a running sequence is still
        prefilling at least `DEFER_SHARED_TOKENS` tokens of ``seq``'s prompt beyond its cached ``match``: admitted
        now, ``seq`` would prefill them too (a burst of requests with one uncached system prompt would each
        prefill it, in the same step or in a leader's last chunk); a step or so later it shares them. SGLang's
        in-batch prefix caching does the same. Not with linear-attention states (a running sequence's are
        shared only whole or from a snapshot), nor when ``seq`` may not use the prefix cache."""
        if self._cache.linear is not None or not self._reusable(seq):
            return False
        tokens, limit = seq.token_ids, len(seq.token_ids) - 1
        for other in self._running:
            if other.num_pending > 1 and other.token_ids[0] == tokens[0]:
                shared = _common_prefix(tokens, other.token_ids, min(limit, len(other.token_ids) - 1))
                if shared - match.length >= DEFER_SHARED_TOKENS:
                    self.num_prefill_deferrals += 1
                    return True
        return False

    def _grow_running(self) -> None:
        """Give each running sequence blocks for the tokens this step may write (a decode's next position; a
        prompt's blocks were all taken at admission), oldest first, taking cached prefixes' blocks and then
        preempting the newest running sequences when too few are free."""
        for seq in list(self._running):
            while seq.slot >= 0 and not self._make_room(seq.slot, len(seq.token_ids)):  # (-1: it was preempted)
                self._preempt(self._running[-1])

    def _preempt(self, seq: _Sequence) -> None:
        """Take ``seq``'s blocks back (`_requeue`, nothing kept) for the running sequences before it."""
        log.info("preempting request %s (%d tokens): the KV cache is full", seq.request_id, len(seq.token_ids))
        self.num_preemptions += 1
        self._requeue(seq, keep_cache=False)

    def _admit(self, seq: _Sequence) -> _Match | None:
        """``seq``'s cached prefix (`_match`) if its tokens fit in the blocks free or cached, leaving the watermark
        to running ones, else None. It needs the blocks it adds to those running sequences hold: its prefix's
        blocks that they hold are shared. The prefix is looked for only if sharing all it could would make it fit
        (the search compares the tokens with every cached and running sequence's, and a queue's head may wait
        for blocks many steps)."""
        cache = self._cache
        room = cache.spare_blocks() - (self._watermark if self._running else 0)
        need = cache.blocks_for(len(seq.token_ids))
        if need - min(cache.num_live, (len(seq.token_ids) - 1) // cache.block_size) > room:
            return None
        match = self._match(seq)
        if match.source is not None:
            need -= cache.live_blocks(match.source, match.length // cache.block_size)
        return match if need <= room else None

    def _make_room(self, slot: int, num_tokens: int, keep: int | None = None, required: bool = False,
                   write_from: int | None = None) -> bool:
        """Grow ``slot`` to ``num_tokens`` positions (its own blocks from ``write_from`` on: see `KVCache.grow`),
        giving up cached prefixes' blocks as needed (`_evict`; not free slot ``keep``'s); False if that is not
        enough (RuntimeError with ``required``: the caller counted the blocks)."""
        trimmed: set[int] = set()  # free slots that gave blocks up: their cached tokens follow once, at the end
        try:
            while not self._cache.grow(slot, num_tokens, write_from):
                victim = self._to_evict(keep)
                if victim is None:
                    if required:
                        raise RuntimeError(f"no KV blocks for {num_tokens} positions of slot {slot}")
                    return False
                self._evict(victim, self._cache.shortfall(slot, num_tokens, write_from), trimmed)
            return True
        finally:
            for victim in trimmed:
                if victim in self._slot_tokens:
                    self._slot_tokens.trim(victim, len(self._cache.blocks[victim]) * self._cache.block_size)

    def _to_evict(self, keep: int | None) -> int | None:
        """The free slot (not ``keep``) to give a block up: of those holding blocks, the least recently used whose
        last block nothing else holds (giving it up frees it), else the least recently used; None if none holds any.
        (Stops at the first such slot: there may be hundreds of cached prefixes, and one block is evicted at a time.)"""
        cache, first = self._cache, None
        for free in self._free_slots:
            if free != keep and cache.blocks[free]:
                if cache.refs[cache.blocks[free][-1]] == 1:
                    return free
                first = free if first is None else first
        return first

    def _evict(self, slot: int, shortfall: int, trimmed: set[int]) -> None:
        """Give up free slot ``slot``'s blocks from its last one (`_to_evict` passes the least recently used slot
        first), so a cached prefix keeps its first tokens (a system prompt) longest, as vLLM evicts a freed
        sequence's blocks tail first; a slot with linear-attention states (theirs at its end) is given up whole.

        Blocks go one at a time, as long as `_to_evict` would pass ``slot`` again and ``shortfall`` blocks have not
        come free: its last block is its own, or (``slot`` passed with no free slot's last block its own) a block
        that stays shared with two slots or more, so no other slot's last block becomes its own. The slot's cached
        tokens are trimmed by the caller once (``trimmed``): one block a call, each re-sorting them, cost 11 s for
        one prompt when 64 cached conversations shared a 16k-token system prompt (their shared blocks free nothing
        until every one gave them up; a review)."""
        cache = self._cache
        blocks = cache.blocks[slot]
        if cache.linear is not None:
            self._clear_slot(slot)
            return
        none_own = cache.refs[blocks[-1]] > 1  # (passed with no free slot's last block its own)
        while True:
            last = blocks[-1]
            cache.trim(slot, (len(blocks) - 1) * cache.block_size)
            if not blocks:
                self._clear_slot(slot)
                trimmed.discard(slot)
                return
            trimmed.add(slot)
            shortfall -= cache.refs[last] == 0
            if shortfall <= 0 or cache.refs[last] == 1 or not (none_own or cache.refs[blocks[-1]] == 1):
                return

    def _clear_slot(self, slot: int) -> None:
        """``slot`` holds nothing reusable any more: its cached tokens, state snapshots and blocks go."""
        self._slot_tokens.pop(slot)
        self._drop_snapshots(slot)
        self._cache.release(slot)

    def _match(self, seq: _Sequence) -> _Match:
        """The longest prefix of ``seq``'s tokens (a preempted sequence's: its prompt and what it generated) that
        a slot holds, free (a cached prefix) or running; at least the last token is always prefilled, for its
        logits. With linear-attention states (one position per slot) a candidate's reusable prefix is all it holds,
        if that is a prefix of the tokens (its states are then theirs at that position), else its latest state
        snapshot within the shared tokens."""
        if not self._reusable(seq):
            return _Match()
        best, source, snapshot, shared = 0, None, False, 0
        prompt, limit = seq.token_ids, len(seq.token_ids) - 1
        linear = self._cache.linear is not None
        if linear:  # (a prefix's use depends on the slot's snapshots: each is looked at; there are max_num_seqs slots)
            candidates = [(slot, tokens, len(tokens)) for slot, tokens in self._slot_tokens.items()]
        else:
            source, best = self._slot_tokens.longest(prompt, limit)
            shared, candidates = best, []
        candidates += [(s.slot, s.token_ids, s.num_cached) for s in self._running if s.num_cached]
        for slot, tokens, cached in candidates:
            n = _common_prefix(prompt, tokens, min(limit, cached)) if tokens[0] == prompt[0] else 0
            shared = max(shared, n)
            from_snapshot = linear and n < cached
            if from_snapshot:  # the states are the slot's at ``cached``: a snapshot's, if any, at or before n
                n = self._snapshots.latest(slot, n) if self._snapshots is not None else 0
            if n > best:
                best, source, snapshot = n, slot, from_snapshot
        return _Match(best, source, snapshot, shared)

    def _reusable(self, seq: _Sequence) -> bool:
        """Whether ``seq`` may start from a cached prefix (not when it wants every prompt position scored)."""
        return self.config.enable_prefix_caching and seq.params.prompt_logprobs is None and len(seq.token_ids) > 1

    def _assign_slot(self, seq: _Sequence, match: _Match) -> None:
        """Give a newly admitted ``seq`` a free slot, holding ``match``'s prefix (`_match`).

        The slot to overwrite (one holding nothing, else the least recently used) shares the blocks of the
        prefix with the slot holding it (the block the prefix ends inside is copied before it is written: see
        `KVCache.share_prefix`), unless the prefix is a free slot's whole content or that slot is the one to
        overwrite: then that slot is taken as is. So a short match (a chat template's first tokens) never
        destroys a longer cached conversation. A free slot is also taken as is when its blocks past the prefix
        leave too few for the new sequence beside them. With linear-attention states, a prefix from a snapshot
        is restored into the slot after the blocks are shared, and from then on belongs to it (a shared prefix's
        snapshot goes from slot to slot with the requests that use it, never overwritten while they come); the
        shared length itself becomes a branch point to snapshot at while this prompt is prefilled.
        """
        best, source, snapshot = match.length, match.source, match.snapshot
        if not seq.preemptions and self._reusable(seq):
            self.prefix_cache_queries += seq.num_prompt_tokens
            self.prefix_cache_hits += best
        if self._snapshots is not None and match.shared > max(best, self.config.prefix_state_interval - 1):
            seq.branch = match.shared
        victim, need = self._victim(), len(seq.token_ids)
        in_place = source is not None and (source == victim or best == len(self._slot_tokens.get(source, ())))
        if (source is not None and not in_place and source in self._slot_tokens
                and self._cache.own_blocks(need, shared=best) > self._cache.spare_blocks(keep=source)):
            in_place = True  # no room beside the cached prefix's other blocks: it is taken itself
        if in_place:
            seq.slot = self._take_free_slot(source)  # in place: nothing else of that slot was worth keeping
            self._cache.trim(seq.slot, need)  # (blocks past the prompt held a longer cached sequence's tokens)
            self._make_room(seq.slot, need, write_from=best, required=True)
        else:
            seq.slot = self._share_into(victim, source, best, need)
        self._drop_snapshots(seq.slot, keep=best if seq.slot == source else 0)
        if snapshot:
            self._snapshots.restore(source, best, self._cache.linear, seq.slot)
            if seq.slot != source:  # the copy goes with the newest slot holding its tokens, the last to be overwritten
                self._snapshots.move(source, best, seq.slot)
        seq.num_cached = best
        if not seq.preemptions:  # (what the client is told its prompt took from the cache)
            seq.num_reused = best

    def _share_into(self, slot: int, source: int | None, length: int, num_tokens: int) -> int:
        """Take free slot ``slot`` for a sequence of ``num_tokens`` positions whose first ``length`` are slot
        ``source``'s (None: nothing): whatever it held goes, it shares ``source``'s blocks of them (and takes its
        linear-attention states) and grows, the block ``length`` ends inside copied for it to write in. A cached
        ``source`` is kept (`_make_room` gives up others first) and counts as just used."""
        self._take_free_slot(slot)
        self._clear_slot(slot)
        if source is not None:
            self._cache.share_prefix(source, slot, length)
            self._cache.copy_states(source, slot)
            if source in self._slot_tokens:  # a cached prefix just used: the last to overwrite or trim now
                self._free_slots.remove(source)
                self._free_slots.append(source)
        self._make_room(slot, num_tokens, keep=source, write_from=length, required=True)
        return slot

    def _drop_snapshots(self, slot: int, keep: int = 0) -> None:
        """``slot``'s keys and values past ``keep`` are overwritten: its state snapshots past it are void."""
        if self._snapshots is not None:
            self._snapshots.drop(slot, keep)

    def _plan_snapshots(self, chunks: list[tuple[_Sequence, int]]) -> None:
        """Choose where this step's prefill chunks copy their linear-attention states (see
        ``EngineConfig.prefix_state_interval``) and reserve the snapshots; the forward fills them."""
        if self._snapshots is None:
            return
        interval, plan = self.config.prefix_state_interval, self._cache.linear.plan
        for seq, n in chunks:
            start, end = seq.num_cached, seq.num_cached + n
            if (n == 1 and start > 0) or end < interval:  # a decode (or a last prompt token run with them)
                continue
            positions = set(range((start // interval + 1) * interval, end + 1, interval))
            positions |= {p for p in (seq.branch, seq.num_prompt_tokens) if start < p <= end and p >= interval}
            for position in sorted(positions):
                buffer = self._snapshots.reserve(seq.slot, position, protected=position == seq.branch)
                if buffer is not None:
                    plan.setdefault(seq.slot, []).append((position, buffer))

    def _end_snapshots(self) -> None:
        if self._snapshots is not None:
            self._cache.linear.plan = {}
            self._snapshots.release_pins()

    def _victim(self) -> int:
        """The free slot to overwrite: one holding nothing reusable, else the least recently used (released, or
        its prefix shared)."""
        return next((slot for slot in self._free_slots if slot not in self._slot_tokens), self._free_slots[0])

    def _take_free_slot(self, slot: int) -> int:
        self._free_slots.remove(slot)
        self._slot_tokens.pop(slot)
        self._cache.set_live(slot, True)
        return slot

    def _free_slot(self, slot: int) -> None:
        self._free_slots.append(slot)
        self._cache.set_live(slot, False)

    def _forward(self, chunks: list[tuple[_Sequence, int]]) -> tuple[torch.Tensor, list[tuple[_Sequence, list[int]]]]:
        """float32 CPU logits ``[K, V]`` and where the prompt log-probability rows are.

        The logits end with one row per chunk that completes its pending tokens (its last token, in
        chunk order; none for prompt-only requests, ``max_tokens`` 0); before them, for sequences that
        asked for prompt log-probabilities, a row per position of the chunk that predicts a prompt
        token, listed as (sequence, rows).
        """
        ids, positions, meta, prompt_keep, keep = [], [], [], [], []
        prompt_rows: list[tuple[_Sequence, list[int]]] = []
        for seq, n in chunks:
            meta.append(SeqChunk(seq.slot, seq.num_cached, n, len(ids)))
            predicting = min(n, seq.num_prompt_tokens - 1 - seq.num_cached)  # positions before the prompt's last
            if seq.params.prompt_logprobs is not None and predicting > 0 and seq.num_completion_tokens == 0:
                prompt_rows.append((seq, list(range(len(prompt_keep), len(prompt_keep) + predicting))))
                prompt_keep += range(len(ids), len(ids) + predicting)
            ids += seq.token_ids[seq.num_cached:seq.num_cached + n]
            positions += range(seq.num_cached, seq.num_cached + n)
            if n == seq.num_pending and seq.params.max_tokens > 0:
                keep.append(len(ids) - 1)
        keep = prompt_keep + keep
        device = self._model.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        if self._hooks is not None:
            self._hooks.begin_step()
        completed = False
        try:
            with torch.inference_mode(), attention.bind_step(self._cache, StepBatch.build(meta, device)):
                out = self._model(input_ids=as_tensor([ids]), position_ids=as_tensor([positions]),
                                  use_cache=False, logits_to_keep=as_tensor(keep))
            completed = True
        finally:
            if self._hooks is not None:
                self._hooks.end_step(completed)
        return out.logits[0].float().cpu(), prompt_rows

    def _advanced(self, sampled: list[_Sequence], tokens: list[int]) -> list[bool | GrammarFailed]:
        """Append each row's token (`_constrains`) and feed it to the row's grammar where one reads it, all rows'
        at once (`Grammars.advance`): per row, whether its structured output is whole, or how its grammar failed
        (False: no grammar read the token)."""
        rows = [i for i, (seq, token) in enumerate(zip(sampled, tokens)) if self._constrains(seq, token)]
        advanced: list[bool | GrammarFailed] = [False] * len(sampled)
        if rows:
            results = self._grammars.advance([(sampled[i].matcher, tokens[i]) for i in rows])
            for i, result in zip(rows, results, strict=True):
                seq = sampled[i]
                if not seq.own_compile:  # (replayed when its matcher is renewed, which happens once)
                    seq.grammar_tokens.append(tokens[i])
                if isinstance(result, GrammarFailed) and self._renew(seq):  # ran out reading the token
                    result = seq.matcher.is_stopped()
                advanced[i] = result
        return advanced

    def _renew(self, seq: _Sequence) -> bool:
        """Give ``seq`` a matcher of a compile of its own, fed its tokens, when the one it copied from the cache ran
        out of lexer states (`Grammars.renew`: those of every request that used the cached compile, which is
        dropped); whether it was given one. One that runs out on a compile of its own fails, as does one when the
        step has spent `RENEW_BUDGET_S` on renewals."""
        if seq.own_compile or not out_of_states(seq.matcher) or self._renewing_s >= RENEW_BUDGET_S:
            return False
        seq.own_compile = True
        self._grammars.forget(seq.params.grammar, seq.generation)
        started = time.perf_counter()
        matcher = self._grammars.renew(seq.params.grammar, seq.grammar_tokens)
        self._renewing_s += time.perf_counter() - started
        if matcher is None:
            return False
        log.info("request %s: the cached grammar's lexer ran out of states: compiled for it alone", seq.request_id)
        seq.matcher = matcher
        return True

    def _constrains(self, seq: _Sequence, token: int) -> bool:
        """Append ``token`` to ``seq``; whether its structured output's grammar reads it (outside a thinking block
        and the whitespace after it), the block's state moved on."""
        seq.token_ids.append(token)
        constrained = seq.matcher is not None
        if seq.thinking is not None:
            opener, closer = seq.params.reasoning_tokens
            if seq.thinking == "gap" and token in seq.params.reasoning_gap:
                constrained = False  # whitespace between the block and the answer
                seq.gap_left -= 1
                seq.thinking = "gap" if seq.gap_left else None
            elif seq.thinking == "gap" or (seq.thinking == "maybe" and token != opener):
                seq.thinking = None  # no (more) block or gap: this token is the answer's first
            else:
                constrained = False  # a token of the block, its tags included
                if seq.thinking == "in" and token == closer:
                    seq.thinking = "gap" if seq.params.reasoning_gap else None
                    seq.gap_left = MAX_REASONING_GAP
                else:
                    seq.thinking = "in"
        return constrained

    def _append_token(self, seq: _Sequence, token: int, logprobs: TokenLogprobs | None,
                      advanced: bool | GrammarFailed) -> StepOutput:
        """``seq``'s output for ``token`` (appended by `_constrains`); ``advanced``: whether its grammar is complete
        after it (`Grammars.advance`), or how the grammar failed."""
        if isinstance(advanced, GrammarFailed):  # its output would break the grammar: ended as failed, not as whole
            log.warning("request %s: %s", seq.request_id, advanced)
            self._grammars.forget(seq.params.grammar, seq.generation)  # (a parser limit: what it built is not kept)
            self._release(seq)
            return dataclasses.replace(_output(seq, (), "", "abort"), error=str(advanced))
        complete = advanced  # the structured output is whole
        reason: FinishReason | None = None
        if token in seq.params.stop_token_ids or (token in self._eos_ids and not seq.params.ignore_eos):
            reason = "stop"
        elif seq.text is not None:
            seq.text.push(token, search=seq.num_completion_tokens > seq.params.min_tokens)  # (as vLLM)
            reason = "stop" if seq.text.stopped or complete else None
        if reason is None and seq.num_completion_tokens >= seq.params.max_tokens:
            reason = "length"
        text = seq.text.take(final=reason is not None) if seq.text is not None else ""
        if reason is not None:
            self._release(seq)
        return _output(seq, (token,), text, reason, (logprobs,) if logprobs is not None else ())

    def _release(self, seq: _Sequence, keep_cache: bool = True) -> None:
        """Free ``seq``'s slot; with ``keep_cache`` its keys and values stay reusable until the slot is taken."""
        self._running.remove(seq)
        self._free_slot(seq.slot)
        if keep_cache and self.config.enable_prefix_caching and seq.num_cached:
            self._slot_tokens.put(seq.slot, seq.token_ids[:seq.num_cached])
            self._cache.trim(seq.slot, seq.num_cached)
        else:
            self._clear_slot(seq.slot)


def _output(seq: _Sequence, tokens: tuple[int, ...], text: str, reason: FinishReason | None,
            logprobs: tuple[TokenLogprobs, ...] = ()) -> StepOutput:
    """The request's output; the first one carries (and takes) its prompt's log-probabilities."""
    prompt_logprobs, seq.prompt_logprobs = tuple(seq.prompt_logprobs), []
    return StepOutput(seq.request_id, tokens, text, reason is not None, reason, seq.num_prompt_tokens,
                      seq.num_completion_tokens, logprobs, prompt_logprobs, seq.num_reused)


class _CachedPrefixes:
    """Free slots' cached tokens (slot -> the tokens whose keys and values it holds), also kept sorted, so that the
    slot sharing the longest prefix with a prompt is one of the two where the prompt would sort (of sequences in
    lexicographic order, the one sharing the longest prefix with another lies next to where that one sorts): two
    comparisons per lookup, not one per cached sequence (hundreds, with ``max_cached_sequences``)."""

    def __init__(self) -> None:
        self._tokens: dict[int, list[int]] = {}
        self._sorted: list[tuple[tuple[int, ...], int]] = []  # (tokens, slot), ascending

    def __contains__(self, slot: int) -> bool:
        return slot in self._tokens

    def get(self, slot: int, default=()) -> list[int] | tuple:
        return self._tokens.get(slot, default)

    def items(self):
        return self._tokens.items()

    def put(self, slot: int, tokens: list[int]) -> None:
        """``slot`` holds ``tokens`` (at least one) from now on."""
        self.pop(slot)
        self._tokens[slot] = tokens
        bisect.insort(self._sorted, (tuple(tokens), slot))

    def trim(self, slot: int, length: int) -> None:
        """``slot`` keeps its first ``length`` tokens."""
        self.put(slot, self._tokens[slot][:length])

    def pop(self, slot: int) -> None:
        tokens = self._tokens.pop(slot, None)
        if tokens is not None:
            del self._sorted[bisect.bisect_left(self._sorted, (tuple(tokens), slot))]

    def longest(self, tokens: list[int], limit: int) -> tuple[int | None, int]:
        """The slot sharing the longest prefix with ``tokens`` and that prefix's length, at most ``limit`` (None, 0:
        none shares a token)."""
        key = tuple(tokens)
        at = bisect.bisect_left(self._sorted, (key,))
        best, source = 0, None
        for cached, slot in self._sorted[max(at - 1, 0):at + 1]:
            n = _common_prefix(key, cached, limit) if cached[0] == key[0] else 0
            if n > best:
                best, source = n, slot
        return source, best


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit`` (slice compares: C speed)."""
    hi = min(len(a), len(b), limit)
    if a[:hi] == b[:hi]:
        return hi
    lo = 0  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _logprobs(logits: torch.Tensor, sampled: list[_Sequence], tokens: list[int]) -> list[TokenLogprobs | None]:
    """Per sampled row, its token's log-probabilities if the request asked for them, else None."""
    rows = [i for i, seq in enumerate(sampled) if seq.params.logprobs is not None]
    found: list[TokenLogprobs | None] = [None] * len(sampled)
    if rows:
        computed = token_logprobs(logits[rows], [tokens[i] for i in rows], [sampled[i].params.logprobs for i in rows])
        for i, entry in zip(rows, computed):
            found[i] = entry
    return found


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV cache bytes one token takes over all layers of a model (its transformers config): keys and values (multi-head
    latent attention's latent), and a DSA indexer's keys; linear-attention states are per sequence, not counted."""
    per_token = KVCache.bytes_per_token(config.num_hidden_layers, dtype=dtype, **KVCache.for_model(config))
    indexed = sparse_attention.indexed_layers(config)
    if indexed:
        per_token += len(indexed) * config.index_head_dim * torch.empty(0, dtype=dtype).element_size()
    return per_token


def kv_blocks_bytes(config, dtype: torch.dtype, max_model_len: int, block: int) -> int:
    """KV cache bytes of the blocks one sequence of `max_model_len` tokens takes (whole blocks of `block` positions);
    without its linear-attention states."""
    return kv_bytes_per_token(config, dtype) * block * -(-max_model_len // block)


def _make_cache(model: PreTrainedModel, config: EngineConfig) -> KVCache:
    """A paged KV cache of as many blocks as ``kv_cache_bytes`` holds once the slots' linear-attention states and
    their snapshots are paid for; without prefix caching (or with linear-attention states), no more than
    ``max_num_seqs`` sequences of ``max_model_len`` fill (the blocks beyond would hold nothing). The blocks'
    memory is committed as they are first used (`KVCache`).

    Slots (a sequence's block table row, and its states where the model has linear layers): ``max_num_seqs``
    for the running sequences, and with prefix caching ``max_cached_sequences`` more to hold finished requests'
    prefixes, since a row costs no KV memory (at most one per block: a cached prefix holds one at least); with
    linear layers, whose states a slot holds, ``max_num_seqs`` in all, or as many as fit beside one
    ``max_model_len`` sequence's blocks.
    """
    mc = model.config
    heads = KVCache.for_model(mc)  # multi-head latent attention: its latent (service.attention)
    per_token = kv_bytes_per_token(mc, model.dtype)
    indexed = sparse_attention.indexed_layers(mc)  # the layers whose DSA indexer caches keys
    linear = linear_attention.linear_layers(mc)  # their states: a fixed size per slot
    shape = linear_attention.LinearShape.of(mc) if linear else None
    states = len(linear) * shape.bytes_per_slot(model.dtype) if linear else 0
    block = config.kv_block_size
    per_block = per_token * block
    full_blocks = -(-config.max_model_len // block)  # one max_model_len sequence
    num_snapshots = 0  # copies of the states for the prefix cache, from their share of the budget
    if linear and config.enable_prefix_caching:
        num_snapshots = min(int(config.kv_cache_bytes * config.prefix_state_memory) // states,
                            config.max_num_seqs * (config.max_model_len // config.prefix_state_interval + 2))
    budget = config.kv_cache_bytes - num_snapshots * states
    num_slots = config.max_num_seqs
    if states:  # as many slots as fit beside one max_model_len sequence's blocks
        num_slots = min(num_slots, max(0, budget - full_blocks * per_block) // states)
    # never more than max_num_seqs sequences of max_model_len can use, but for the prefix cache: what the budget
    # holds beyond is taken only with it (and no linear-attention states: its slots, max_num_seqs, hold those)
    cached = config.enable_prefix_caching and not states
    most = config.max_num_seqs * full_blocks
    num_blocks = (budget - num_slots * states) // per_block if per_block else most
    if not cached:
        num_blocks = min(num_blocks, most)
    if cached:  # rows for finished requests' prefixes (each holds a block)
        num_slots += min(config.max_cached_sequences or CACHED_SEQUENCES_PER_SEQ * config.max_num_seqs, num_blocks)
    if num_slots < 1 or num_blocks < full_blocks:
        snapshots = f" after {num_snapshots} state snapshots (prefix_state_memory)" if num_snapshots else ""
        one = kv_blocks_bytes(mc, model.dtype, config.max_model_len, block) + states
        raise ValueError(f"kv_cache_bytes {config.kv_cache_bytes} cannot hold one sequence of max_model_len "
                         f"{config.max_model_len} ({one} bytes){snapshots}: give the app a larger "
                         f"kv_cache_bytes or a smaller max_model_len")
    cache = KVCache(mc.num_hidden_layers, num_slots, max_len=config.max_model_len, dtype=model.dtype,
                    device=model.device, block_size=block, num_blocks=num_blocks, **heads)
    if indexed:  # a DSA indexer's keys: one more "head" per layer that runs one (none on GLM-5's shared layers)
        cache.set_index_keys([torch.empty(num_blocks, block if layer in indexed else 0, 1, mc.index_head_dim,
                                          dtype=model.dtype, device=model.device)
                              for layer in range(mc.num_hidden_layers)])
    if linear:
        cache.linear = linear_attention.LinearStates(linear, num_slots, shape, model.dtype, model.device)
        if num_snapshots:
            cache.linear.snapshots = linear_attention.StateSnapshots(num_snapshots, linear, shape, model.dtype,
                                                                     model.device)
    return cache


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> frozenset[int]:
    """EOS ids from the generation config (as ``generate`` uses them), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
