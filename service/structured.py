"""Structured outputs: completions constrained to a JSON schema, a regular expression, a list of choices
or a Lark grammar, by masking every token that would leave the grammar before sampling.

Owns the grammar text of a request (`grammar_from_spec`: llguidance's grammar format, built from what the
OpenAI API's ``response_format`` or vLLM's ``structured_outputs`` names) and the per-engine `Grammars`,
which compiles a grammar once (refusing one its tokenizer cannot follow), keeps the last `CACHE_SIZE`
compiled, gives each request its own copy of one and masks a step's logits rows. llguidance (the backend
vLLM, SGLang and llama.cpp offer too) does the parsing and the token masks. Ignores HTTP (the app maps its
ValueErrors to 400s) and sampling itself.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

KINDS = ("json", "regex", "choice", "grammar")
# Compact JSON: with flexible whitespace a weak model may emit whitespace until max_tokens.
JSON_DEFAULTS = {"whitespace_flexible": False}
# Compiled grammars an engine keeps (LRU, keyed by grammar text): the n choices of a request, and clients that
# send the same schema again, share one compile.
CACHE_SIZE = 32
# llguidance's Earley parser gives up (the matcher's error state, mid-completion) on a row of more items than
# max_items_in_row, 2000 by default: a JSON schema of 600 optional properties reached 2407 at its first token.
# The work of one mask stays bounded by step_max_items (50,000 items, some 2.5 ms), which is left as it is.
# verbose_errors=False: an error names the problem, not the parser's state and the grammar around it (which
# could be a client's whole schema, in a log line or a 400).
MAX_ITEMS_IN_ROW = 10_000
# llguidance builds its lexer's states lazily, at the masks, and keeps them with the grammar (the cached matcher shares
# them with its copies): a 160-character regex built new ones at every token up to llguidance's own limit (250,000,
# some 105 MB), and 32 such grammars in the cache held 3.4 GB for good (an adversarial review). At most this many
# (some 21 MB; a grammar past it fails its request, and is dropped from the cache).
MAX_LEXER_STATES = 50_000
# The states are those of the grammar, shared by every copy of the cached matcher: requests that each stay far under
# the limit used it up together, and every request running on the grammar then failed at once (88 requests of 40
# tokens over one regex; a review). A request whose matcher runs out on the cached compile is given one of a compile
# of its own, its tokens replayed (`Grammars.renew`), and the cached compile is dropped (the next request compiles
# anew): it fails only if that one runs out too, on its own states. (vLLM compiles a matcher per request.)
_OUT_OF_STATES = "too many states"  # llguidance's error when a lexer reaches max_lexer_states
# llguidance's compiler recurses once per link of a chain of $refs or rules and overflows its thread's stack: the
# whole process died (SIGSEGV) on one request of a 1000-link $ref chain (94 KB) or some 3000 chained Lark rules (a
# review). Grammars with more are refused before they are compiled (the counts bound any chain's length).
MAX_REFS = 500
MAX_RULES = 1000
# llguidance's own test of whether grammar text is Lark (`grammar_from`'s ``^\s*`` under MULTILINE) tries every line
# start across all the blank lines after it, holding the GIL: 100,000 newlines took 48 s (a review). The same answer in
# linear time: only the whitespace of the keyword's own line may come before it.
_LARK = re.compile(r"(?m)^[^\S\n]*(?:%llguidance\b|start\s*:)")
# Object properties a request's JSON schemas may define in all (OpenAI's limit for structured outputs): llguidance's
# compile time grows with the square of an object's properties when it forbids others (10,000 took 10 s of one of the
# two compile threads; two such requests held a small schema 14.8 s behind them; an adversarial review).
MAX_PROPERTIES = 5000
_RULE = re.compile(r"(?:^|\n|\\n)[ \t]*[?!]?[A-Za-z_][A-Za-z0-9_.]*(?:\[[^\]\n]*\])?[ \t]*(?::|::=)")
# Longest grammar error message raised or logged, in characters.
MAX_ERROR_CHARS = 300


class InvalidGrammar(ValueError):
    """A grammar llguidance cannot compile for this tokenizer (a ValueError: the client's input, a 400)."""


class GrammarFailed(RuntimeError):
    """A matcher refused the sampled token or gave up mid-completion (a parser limit): the output so far may
    not follow the grammar, and the rest cannot be constrained."""


def check_properties(schemas: Iterable[Any]) -> None:
    """InvalidGrammar when ``schemas`` (JSON schemas, nested in any way) define more than MAX_PROPERTIES object
    properties in all."""
    count, stack = 0, list(schemas)
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            properties = value.get("properties")
            count += len(properties) if isinstance(properties, dict) else 0
            stack += value.values()
        elif isinstance(value, list):
            stack += value
    if count > MAX_PROPERTIES:
        raise InvalidGrammar(f"invalid structured output: its JSON schemas define {count} object properties; at most "
                             f"{MAX_PROPERTIES} are compiled")


def grammar_from_spec(kind: str, value: Any) -> str:
    """llguidance grammar text for a ``kind`` in KINDS: ``json`` (a JSON schema, as a dict or its JSON
    text; ``{"type": "object"}`` is any object), ``regex`` (a regular expression the whole output
    matches), ``choice`` (a list of strings, the output is one of them) or ``grammar`` (Lark syntax, as
    llguidance reads it; GBNF is converted).

    Raises:
        ValueError: unknown kind or a value of the wrong shape (the grammar itself is checked by
            `Grammars.matcher`, against a tokenizer).
    """
    import llguidance

    if kind == "json":
        try:
            schema = json.loads(value) if isinstance(value, str) else value
        except RecursionError:  # (JSON text nested some 1,000 deep: a 500 where invalid JSON is a ValueError)
            raise ValueError("the JSON schema is nested too deeply") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        check_properties([schema])
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError("regex must be a non-empty string")
        return llguidance.grammar_from("regex", value)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        # one terminal, an alternation of the strings: one lexeme, not (as llguidance's own "choice") a rule with an
        # Earley item per choice, which fails mid-completion past MAX_ITEMS_IN_ROW choices
        return llguidance.LLMatcher.grammar_from_lark(
            "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in value))
    if kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("grammar must be a non-empty string")
        if _LARK.search(value) is None:
            value = _gbnf_to_lark(value)
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise ValueError(f"unknown structured output kind {kind!r}; expected one of {', '.join(KINDS)}")


def _gbnf_to_lark(text: str) -> str:
    """Lark text of a GBNF (llama.cpp) grammar, by llguidance's converter, if it defines at most MAX_RULES rules: its
    time grows with the square of a chain of rules (8,000 took seconds), and a longer chain would be refused once
    compiled anyway (`_check_depth`)."""
    from llguidance.gbnf_to_lark import gbnf_to_lark

    _check_rules(text.count("::="))
    try:
        return gbnf_to_lark(text)
    except RecursionError:
        raise InvalidGrammar("invalid structured output: the GBNF grammar is nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - the converter's own errors (llguidance's grammar_from words them so)
        raise InvalidGrammar(f"Failed to convert the grammar from GBNF to Lark: {exc}"[:MAX_ERROR_CHARS]) from None


def _check_depth(grammar: str) -> None:
    """InvalidGrammar unless ``grammar`` (llguidance's grammar text: JSON schemas and Lark inside) holds at most
    MAX_REFS ``$ref``s and MAX_RULES rule definitions."""
    refs = grammar.count('"$ref"') + grammar.count('\\"$ref\\"')
    if refs > MAX_REFS:
        raise InvalidGrammar(f"invalid structured output: its JSON schemas hold {refs} $refs; at most {MAX_REFS} are "
                             f"compiled")
    _check_rules(len(_RULE.findall(grammar)))


def _check_rules(rules: int) -> None:
    if rules > MAX_RULES:
        raise InvalidGrammar(f"invalid structured output: its grammar defines {rules} rules; at most {MAX_RULES} are "
                             f"compiled")


class Grammars:
    """One engine's grammar backend over its tokenizer (built on first use: about a second for a 152k
    vocabulary), with the last `CACHE_SIZE` grammars compiled.

    Args:
        tokenizer: the model's fast (Rust-backed) Hugging Face tokenizer.
        vocab_size: the width of the model's logits (may exceed the tokenizer's length).
        eos_token_ids: the ids that end a completion; a grammar allows them once it is complete.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._hf = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()  # matchers are made on worker threads (AsyncEngine), off the step loop
        self._executor = None  # llguidance's: a step's masks in parallel, without the GIL (made at first use)
        self._ahead = None  # one thread starting a step's masks before its forward (`masks_ahead`)
        # grammar text -> its warmed matcher, never advanced (requests get copies); least recently used first
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._generation: dict[str, int] = {}  # which compile each cached one is (`generation`)
        self._generations = 0

    def _ll(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                if not getattr(self._hf, "is_fast", False):
                    raise ValueError("structured outputs need a fast (tokenizers-backed) tokenizer")
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size,
                                                               eos_token=self._eos or None)
            return self._tokenizer

    def matcher(self, grammar: str):
        """A fresh matcher of ``grammar`` at the start of a completion, compiled now (uncached).

        Raises:
            ValueError: naming the problem, if ``grammar`` is not valid for this tokenizer.
        """
        import llguidance

        _check_depth(grammar)
        limits = llguidance.LLParserLimits(max_items_in_row=MAX_ITEMS_IN_ROW, max_lexer_states=MAX_LEXER_STATES,
                                           verbose_errors=False)
        matcher = llguidance.LLMatcher(self._ll(), grammar, limits=limits, log_level=0)  # (we log its errors)
        if matcher.is_error():
            raise InvalidGrammar(f"invalid structured output: {error_of(matcher)}")
        return matcher

    def warmed_matcher(self, grammar: str):
        """A matcher of ``grammar`` of the caller's own, its first token mask computed (llguidance builds parts
        of a grammar lazily, on the first mask): a copy of the cached one, compiled now if not cached. Built on
        a worker thread (llguidance releases the GIL), a large schema's cost (0.3-0.5 s for a 480 KB one here)
        stays off the engine's step loop. Threads compiling the same grammar at once each compile it.

        Raises:
            ValueError: as `matcher` (a grammar that failed is not cached).
        """
        import llguidance.torch as llt

        cached = self.cached_matcher(grammar)
        if cached is not None:
            return cached
        matcher = self.matcher(grammar)
        llt.fill_next_token_bitmask(matcher, self._bitmask(1), 0)
        if matcher.is_error():  # a language with nothing in it ("[^\s\S]"): was cached so, each request prefilled
            # then failed at its first token, with no parameter named (a review)
            raise InvalidGrammar(f"invalid structured output: {error_of(matcher)} (the grammar allows no output)")
        self._cache(grammar, matcher)
        return matcher.deep_copy()

    def _cache(self, grammar: str, matcher) -> None:
        with self._lock:
            self._compiled[grammar] = matcher
            self._generations += 1
            self._generation[grammar] = self._generations
            self._compiled.move_to_end(grammar)
            while len(self._compiled) > CACHE_SIZE:
                evicted, _ = self._compiled.popitem(last=False)
                self._generation.pop(evicted, None)

    def renew(self, grammar: str, tokens: Sequence[int]):
        """A matcher of a compile of ``grammar`` of its own (uncached: its lexer builds the states of one request
        only), fed the ``tokens`` that a matcher which ran out of lexer states (`out_of_states`) consumed; None when
        it fails too (the tokens alone need more states, or the grammar no longer compiles)."""
        import llguidance.torch as llt

        try:
            matcher = self.matcher(grammar)
        except ValueError:
            return None
        if tokens and not matcher.consume_tokens(list(tokens)) or matcher.is_error():
            return None
        llt.fill_next_token_bitmask(matcher, self._bitmask(1), 0)  # (its next mask: the one the caller needs)
        return None if matcher.is_error() else matcher

    def generation(self, grammar: str) -> int:
        """Which compile of ``grammar`` the cache holds (each one cached is numbered anew); 0 when none."""
        with self._lock:
            return self._generation.get(grammar, 0)

    def forget(self, grammar: str, generation: int | None = None) -> None:
        """Drop ``grammar`` from the cache (a request failed on it: the lexer states it built stay with it), if it
        still holds the compile of ``generation`` (None: any): a request on an older compile dropped a newer one
        that never ran out, and the next request compiled it again (a review)."""
        with self._lock:
            if generation is None or self._generation.get(grammar) == generation:
                self._compiled.pop(grammar, None)
                self._generation.pop(grammar, None)

    def cached_matcher(self, grammar: str):
        """`warmed_matcher` if ``grammar`` is cached (a copy: some 0.1 ms), else None; never compiles."""
        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is None:
                return None
            self._compiled.move_to_end(grammar)
        return matcher.deep_copy()  # (a copy is independent: the cached one is never advanced)

    def _bitmask(self, rows: int) -> torch.Tensor:
        import llguidance.torch as llt

        return torch.empty(llt.get_bitmask_shape(rows, self._vocab_size), dtype=torch.int32)

    def masks(self, matchers: Sequence) -> torch.Tensor:
        """The bitmask of the next tokens each of ``matchers`` allows (one row each), computed by llguidance's
        executor on all the host's cores, without the GIL: one after another on the step loop, a request of 32
        constrained rows over a large schema (8 ms a row) held every request's step for 426 ms (an adversarial
        review)."""
        import llguidance.torch as llt

        bitmask = self._bitmask(len(matchers))
        if matchers:
            llt.fill_next_token_bitmask_par(self._parallel(), [(m, k) for k, m in enumerate(matchers)], bitmask)
        return bitmask

    def _parallel(self):
        import llguidance

        with self._lock:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(max(1, min(os.cpu_count() or 1, 32)))
            return self._executor

    def advance(self, pairs: Sequence[tuple[Any, int]]) -> list[bool | GrammarFailed]:
        """Feed each (matcher, sampled token) its token, in parallel by llguidance's executor, without the GIL (a
        token's cost grows with the parser's items: 18 ms a row over a large schema, one after another on the step
        loop). For each: whether the completion must end there (its grammar is complete), or a GrammarFailed when
        the token was refused (masking prevents that, unless the matcher had given up) or the matcher is in its
        error state: llguidance gives up on a grammar mid-completion past a parser limit, and then allows only EOS,
        which would end the completion as if it were whole."""
        import llguidance.torch as llt

        if not pairs:
            return []
        consumed = llt.consume_token_par(self._parallel(), [(m, int(t)) for m, t in pairs])
        results: list[bool | GrammarFailed] = []
        for (matcher, token), ok in zip(pairs, consumed):
            if not ok or matcher.is_error():
                results.append(GrammarFailed(f"the structured output's grammar failed at token {token}: "
                                             f"{error_of(matcher)}"))
            else:
                results.append(matcher.is_stopped())
        return results

    def masks_ahead(self, matchers: Sequence) -> concurrent.futures.Future:
        """`masks` of ``matchers`` on a thread of its own, begun now (the engine begins a step's masks before its
        forward, which they overlap, as vLLM's and SGLang's do); the matchers must not advance until it is done."""
        with self._lock:
            if self._ahead is None:
                self._ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._ahead.submit(self.masks, list(matchers))

    def mask(self, logits: torch.Tensor, matchers: Sequence, ahead: torch.Tensor | None = None) -> None:
        """Set, in place, the logits of row i's tokens that ``matchers[i]`` does not allow next to -inf
        (rows whose matcher is None keep every token). ``ahead``: the `masks` of the first of the matchers that are
        not None, computed before (`masks_ahead`); the others' are computed now."""
        rows = [i for i, matcher in enumerate(matchers) if matcher is not None]
        ahead = self._bitmask(0) if ahead is None else ahead
        bitmask = torch.cat([ahead, self.masks([matchers[i] for i in rows[len(ahead):]])])
        if len(rows) == len(matchers):
            apply_bitmask(logits, bitmask)
        elif rows:  # the constrained rows only: the cost is per row and vocabulary entry
            index = torch.tensor(rows, device=logits.device)
            constrained = logits.index_select(0, index)
            apply_bitmask(constrained, bitmask)
            logits.index_copy_(0, index, constrained)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits[i, t]`` to -inf where bit ``t`` of row i of ``bitmask`` (int32 [rows, ceil(V / 32)],
    llguidance's layout: token t is bit t % 32 of word t // 32) is 0.

    Plain torch on the logits' device. llguidance's own `apply_token_bitmask_inplace` is a
    ``torch.compile`` kernel: its first call builds C++ with inductor, which took 4.4 s here with the GIL
    held (every running request waited) and needs a compiler on the serving host. On CPU this is slower
    per call than that kernel once compiled: 0.27 against 0.07-0.10 ms for 16 rows of 4096 tokens, 3.8
    against 0.3-0.8 ms for 16 rows of Qwen3's 151936.
    """
    words = bitmask.to(logits.device, non_blocking=True)
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=logits.device, dtype=torch.int32)) & 1
    allowed = bits.reshape(words.shape[0], -1)[:, :logits.shape[1]].bool()
    logits.masked_fill_(~allowed, float("-inf"))


def out_of_states(matcher) -> bool:
    """Whether ``matcher`` gave up because its grammar's lexer reached `MAX_LEXER_STATES`."""
    return matcher.is_error() and _OUT_OF_STATES in matcher.get_error()


def error_of(matcher) -> str:
    """``matcher``'s error message, cut to `MAX_ERROR_CHARS`."""
    error = matcher.get_error().replace("<non-verbose/>", "").strip() or "token refused"
    return error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS - 3] + "..."
