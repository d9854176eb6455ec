"""Sampling parameters of one request and next-token selection from logits.

Owns `SamplingParams` (validated, frozen) and `sample`, which turns the logits of a step into one token
per sequence: exact argmax for temperature 0 (so greedy output equals ``generate(do_sample=False)``) or
below `SAMPLING_EPS`, otherwise temperature, top-k, top-p and min-p sampling from a per-request
``torch.Generator``, after OpenAI's presence and frequency penalties and logit bias and vLLM's
repetition penalty and minimum length; and `token_logprobs`, the log-probabilities of the chosen tokens
and their most likely alternatives (the model's own, before any of those).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20  # most likely alternatives a request may ask for per token (OpenAI's chat limit)
MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a token's logit bias: [-100, 100]
MAX_LOGIT_BIAS_TOKENS = 300
MAX_REPETITION_PENALTY = 10.0
MAX_REASONING_GAP = 2  # whitespace tokens a completion may write between a thinking block and its grammar
_NUCLEUS_CANDIDATES = 1024  # tokens top-p sorts first (a partial sort), before falling back to all of them
SAMPLING_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it is greedy (dividing by it would overflow)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    Attributes:
        max_tokens: completion tokens at most (>= 0; 0 only runs the prompt through the model, to
            score it with ``prompt_logprobs``).
        temperature: 0 for greedy (argmax), else logits are divided by it (0 < t <= 100); below
            `SAMPLING_EPS` it is greedy too, as vLLM's (the seed is then unused).
        top_p: nucleus mass kept, in (0, 1]; 1 keeps every token.
        seed: seeds the request's own generator so sampled output is reproducible (None: random).
        stop: strings that end the completion (at most 4, non-empty); the text is cut before them.
        stop_token_ids: token ids that end the completion, besides the model's EOS.
        ignore_eos: keep generating past the model's EOS tokens (benchmarks).
        logprobs: None for none; k >= 0 to report each completion token's log-probability and the k
            most likely tokens at its position (0 <= k <= MAX_LOGPROBS).
        prompt_logprobs: None for none; k >= 0 to report each prompt token's log-probability (after the
            first) and the k most likely tokens at its position.
        presence_penalty: subtracted from the logit of every token already in the completion.
        frequency_penalty: subtracted from a token's logit once per time it is in the completion.
        logit_bias: (token id, bias) pairs (or a dict) added to those tokens' logits (-100 bans, 100
            forces).
        top_k: sample among the k most likely tokens only (0 or -1: all).
        min_p: drop tokens less likely than ``min_p`` times the most likely one, in [0, 1].
        repetition_penalty: vLLM's (and transformers'): a token already in the prompt or completion has
            its logit divided by it if positive, multiplied if negative (> 0; 1 is none).
        min_tokens: EOS and ``stop_token_ids`` cannot end the completion before this many tokens, nor stop
            strings (as vLLM: text is searched for them once the completion has more than this many tokens; a
            stop string that ends earlier is not found).
        grammar: a structured output (llguidance grammar text, see `service.structured`): only tokens
            that keep the completion inside it are sampled, and it ends when the grammar is complete.
        reasoning_tokens: with a grammar, the ids of a thinking block's opening and closing tags (each
            one token, as Qwen3's and DeepSeek-R1's ``<think>`` and ``</think>``): the completion may
            open a block with its first token (or is in one from the start: ``in_reasoning``, the prompt
            opened it), thinks freely inside it, and the grammar applies from the token after its close.
        in_reasoning: the prompt ends inside a thinking block.
        skip_special_tokens: special tokens decode to no text (vLLM's); False keeps them (harmony's headers).
        kept_special_ids: special tokens decoded all the same, the tags a parser reads (a tool format's, thinking
            tags) when they are special tokens: the others still decode to nothing (with skip_special_tokens off
            for them, a model's other special tokens showed in the content and the reasoning).
        include_stop_str: the text ends with the stop string that ended it (vLLM's
            ``include_stop_str_in_output``); by default it ends before it.
        reasoning_gap: with ``reasoning_tokens``, the ids of whitespace tokens (a newline, two) the completion
            may write between the block's close and the grammar, at most `MAX_REASONING_GAP` of them, as
            thinking models write ``</think>\\n\\n`` before their answer.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    grammar: str | None = None
    reasoning_tokens: tuple[int, int] | None = None
    in_reasoning: bool = False
    reasoning_gap: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    kept_special_ids: tuple[int, ...] = ()
    include_stop_str: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a signed 64-bit integer, got {self.seed!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for text in self.stop:
            if not isinstance(text, str) or not 0 < len(text) <= MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters, got {text!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        for name, ok in (("top_k", lambda v: _is_int(v) and v >= 0), ("min_p", lambda v: 0.0 <= v <= 1.0),
                         ("repetition_penalty", lambda v: 0.0 < v <= MAX_REPETITION_PENALTY),
                         ("min_tokens", lambda v: _is_int(v) and 0 <= v <= self.max_tokens)):
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} is out of range: {getattr(self, name)!r}")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar):
            raise ValueError(f"grammar must be None or a non-empty string, got {self.grammar!r}")
        if self.grammar is not None and self.min_tokens:
            raise ValueError("min_tokens cannot be combined with a structured output (it ends when its grammar does)")
        if self.reasoning_tokens is not None:
            object.__setattr__(self, "reasoning_tokens", tuple(self.reasoning_tokens))
            tags = self.reasoning_tokens
            if len(tags) != 2 or not all(_is_int(t) and t >= 0 for t in tags) or tags[0] == tags[1]:
                raise ValueError(f"reasoning_tokens must be two different token ids, got {tags!r}")
        object.__setattr__(self, "reasoning_gap", tuple(self.reasoning_gap))
        if any(not _is_int(t) or t < 0 or t in (self.reasoning_tokens or ()) for t in self.reasoning_gap):
            raise ValueError(f"reasoning_gap must be token ids other than the block's tags, got {self.reasoning_gap!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {getattr(self, name)!r}")
        bias = tuple((token, float(value)) for token, value in dict(self.logit_bias).items())
        object.__setattr__(self, "logit_bias", bias)
        if len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias may name at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}")
        for token, value in bias:
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {value!r}")

    @property
    def greedy(self) -> bool:
        """Argmax, no draw: temperature 0 or below `SAMPLING_EPS` (as vLLM, where such a temperature is greedy)."""
        return self.temperature < SAMPLING_EPS

    @property
    def uses_history(self) -> bool:
        """Whether the tokens already seen (`History`) change the next token's logits."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or self.min_tokens > 0)

    def make_generator(self) -> torch.Generator | None:
        """The request's own generator (None when greedy: argmax needs no randomness)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(32)
        return torch.Generator().manual_seed(generator_seed(seed))


_MASK64 = (1 << 64) - 1


def generator_seed(seed: int) -> int:
    """The seed of torch's CPU generator (mt19937, which keeps a seed's low 32 bits) for a request's signed 64-bit
    ``seed``: one in [0, 2**32) as it is (its draws unchanged), any other folded into 32 bits by splitmix64's
    finalizer. Seeds that differed only above bit 31 drew alike: s and s + 2**32, -1 and 2**32 - 1 (a review)."""
    if 0 <= seed < 1 << 32:
        return seed
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF



@dataclass(frozen=True)
class History:
    """What a `uses_history` row's logits depend on besides the model.

    Attributes:
        token_ids: the prompt, then the completion so far.
        num_prompt_tokens: how many of them are the prompt.
        stop_ids: the ids that would end the completion (EOS, stop token ids), banned before
            ``min_tokens``.
    """

    token_ids: Sequence[int]
    num_prompt_tokens: int
    stop_ids: Sequence[int] = ()


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           histories: Sequence[History | None] | None = None) -> list[int]:
    """One next token per row.

    Args:
        logits: [N, V] float logits, row i for the sequence with ``params[i]`` and ``generators[i]``.
        histories: per row, its `History` (needed for rows whose params `uses_history`; may be None
            when no row is).

    Returns:
        N token ids.
    """
    assert logits.shape[0] == len(params) == len(generators)
    logits = _adjusted(logits, params, histories)
    tokens = logits.argmax(dim=-1).tolist()  # greedy rows are done; sampled rows are overwritten
    for i, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i], p, gen)
    return tokens


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one completion position.

    Attributes:
        token_id: the token chosen there.
        logprob: its log-probability.
        top: the most likely tokens there, (token id, log-probability), most likely first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprobs]:
    """The chosen tokens' log-probabilities and the ``top[i]`` most likely tokens of each row.

    Log-probabilities are the model's own (log-softmax of the raw logits), before temperature and top-p
    change the distribution tokens are drawn from, as vLLM reports them by default: greedy and sampled
    requests report the same numbers for the same prefix.

    Args:
        logits: [N, V] float logits.
        tokens: N chosen token ids.
        top: N counts of alternatives (0 <= top[i] <= MAX_LOGPROBS).
    """
    assert logits.shape[0] == len(tokens) == len(top)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.int64).unsqueeze(1)).squeeze(1).tolist()
    k = min(max(top, default=0), logprobs.shape[-1])
    best_values, best_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    best_values, best_ids = best_values.tolist(), best_ids.tolist()
    return [TokenLogprobs(token, value, tuple(zip(best_ids[i][:n], best_values[i][:n])))
            for i, (token, value, n) in enumerate(zip(tokens, chosen, top))]


def _adjusted(logits: torch.Tensor, params: Sequence[SamplingParams],
              histories: Sequence[History | None] | None) -> torch.Tensor:
    """``logits`` with each row's logit bias, penalties and minimum length applied (the same tensor when
    no row has any)."""
    rows = [i for i, p in enumerate(params) if p.logit_bias or p.uses_history]
    if not rows:
        return logits
    logits = logits.float().clone()
    for i in rows:
        p = params[i]
        if p.logit_bias:
            ids, values = zip(*p.logit_bias)
            logits[i, list(ids)] += torch.tensor(values)
        if p.uses_history:
            assert histories is not None and histories[i] is not None, "rows using their history need it"
            _penalize(logits[i], p, histories[i])
    return logits


def _penalize(row: torch.Tensor, p: SamplingParams, history: History) -> None:
    """Apply ``p``'s history-dependent rules to one row of logits, in place (vLLM's order)."""
    vocab = row.shape[-1]
    ids = torch.as_tensor(history.token_ids, dtype=torch.int64)
    completion = ids[history.num_prompt_tokens:]
    if p.repetition_penalty != 1.0 and len(ids):
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[ids] = True
        # a penalty float32 cannot hold (1e-300 is 0 there) made a positive logit inf and a ruled-out one (-inf)
        # NaN, which argmax takes: it is at least float32's smallest normal, and a divided logit stays finite
        penalty, values = max(p.repetition_penalty, torch.finfo(torch.float32).tiny), row[seen]
        largest = torch.finfo(row.dtype).max
        row[seen] = torch.where(values > 0, (values / penalty).clamp(max=largest), values * penalty)
    if (p.frequency_penalty or p.presence_penalty) and len(completion):
        counts = torch.bincount(completion, minlength=vocab)[:vocab]
        row -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
    if len(completion) < p.min_tokens and history.stop_ids:
        row[list(history.stop_ids)] = float("-inf")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Temperature, then top-k, min-p and top-p, then a draw, on one row ``[V]``.

    Each filter judges the distribution the one before kept, renormalised. vLLM applies min-p before top-k;
    both keep tokens by their ratio to the most likely one, so their order does not matter.

    Whatever the row holds, the draw cannot fail (one row's failure would fail every request of the step):
    NaN is never drawn, +inf is the largest finite value (several are then equally likely), and the row is
    shifted so that its most likely token's logit is 0 before the temperature divides it, so every
    probability is finite and that token's is positive. A row with nothing to draw (every logit -inf or
    NaN) gives its argmax rather than failing."""
    logits = logits.float().nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))
    best = logits.max()
    if best == float("-inf"):
        return int(logits.argmax())
    logits = (logits - best) / params.temperature  # <= 0, the best 0 (an underflow is -inf: never drawn)
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:  # then top-p judges the mass of what min-p kept, renormalised (vLLM's)
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs [V]`` with the tokens outside the top-p nucleus at 0: a token stays while the tokens more likely
    than it hold less than ``top_p`` (so the most likely one always does).

    Only the most likely tokens are sorted (a full sort of a 150k vocabulary takes ~30 ms on a CPU): the
    `_NUCLEUS_CANDIDATES` most likely, or all those top-k and min-p left; every token when the candidates
    hold less than ``top_p``, since then the nucleus may reach past them."""
    support = int(torch.count_nonzero(probs))  # tokens that can be drawn at all
    k = min(_NUCLEUS_CANDIDATES, support)
    values, order = probs.topk(k)  # most likely first
    mass = values.cumsum(0)
    if k < support and mass[-1] < top_p:  # the nucleus may reach past the candidates: sort every token
        values, order = probs.topk(support)
        mass = values.cumsum(0)
    values[mass - values >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, values)
