"""Structured outputs (service/structured.py) and the engine following them, on a random tiny chat model."""

from __future__ import annotations

import json
import random
import re
import threading

import pytest
import torch

from service import structured
from service.engine import Engine, EngineConfig
from service.sampling import SamplingParams
from service.structured import MAX_RULES, Grammars, InvalidGrammar, grammar_from_spec
from service.text import apply_chat_template
from tests.service.test_text import build_chat_model, build_tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _engine(tokenizer, **config) -> Engine:
    """An engine over a fresh copy of the chat model (an engine switches its model to ragged attention)."""
    return Engine(build_chat_model(tokenizer), EngineConfig(**{"max_model_len": 256, **config}), tokenizer=tokenizer)


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list] = {}
    while engine.has_work:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def _text(outs) -> str:
    return "".join(o.text for o in outs)


# A regex whose lexer builds new states at every token (llguidance's states per grammar, `structured.MAX_LEXER_STATES`)
LEXER_GROWS = "(" + "|".join(f"[a-z]*{c}[a-z]{{20}}" for c in "etaoinshr") + ")"


def _is_person(value) -> bool:
    return (isinstance(value, dict) and set(value) <= {"name", "age", "tags"} and {"name", "age"} <= set(value)
            and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["age"], int) and 0 <= value["age"] <= 120
            and all(t in ("a", "b") for t in value.get("tags", [])) and len(value.get("tags", [])) <= 3)


def test_specs_become_grammars_and_bad_shapes_are_value_errors(tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    for kind, value in (("json", PERSON), ("json", json.dumps(PERSON)), ("regex", r"\d+"), ("choice", ["x", "y"]),
                        ("grammar", 'start: "yes" | "no"')):
        grammars.matcher(grammar_from_spec(kind, value))
    for kind, value, match in (("json", [1], "must be an object"), ("json", "{not json", "Expecting"),
                               ("regex", "", "non-empty"), ("choice", [], "non-empty"), ("choice", ["a", 1], "non-empty"),
                               ("grammar", " ", "non-empty"), ("xml", "<a/>", "unknown structured output kind")):
        with pytest.raises(ValueError, match=match):
            grammar_from_spec(kind, value)
    for kind, value in (("regex", "[unclosed"), ("grammar", "start: ?? bad"), ("json", {"type": "strin"})):
        with pytest.raises(ValueError, match="invalid structured output"):
            grammars.matcher(grammar_from_spec(kind, value))


def test_a_schema_as_json_text_too_deep_to_parse_is_a_value_error():
    """json.loads raises RecursionError past some 1,000 levels: a 500 where invalid JSON is a ValueError (a 400).
    (The request models refuse JSON text nested past MAX_JSON_DEPTH first; this is the function's own guard.)"""
    with pytest.raises(ValueError, match="nested too deeply"):
        grammar_from_spec("json", "[" * 100_000 + "]" * 100_000)


def test_outputs_follow_a_json_schema_a_regex_and_choices_greedy_and_sampled(tokenizer):
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Describe a person."}])
    grammars = {"json": grammar_from_spec("json", PERSON), "regex": grammar_from_spec("regex", r"[0-9]{3}-[a-z]{2,5}"),
                "choice": grammar_from_spec("choice", ["yes", "no", "maybe so"])}
    requests = {f"{kind}-{seed}": (prompt, SamplingParams(max_tokens=120, temperature=0.0 if seed < 0 else 1.0,
                                                          seed=seed if seed >= 0 else None, grammar=grammar))
                for kind, grammar in grammars.items() for seed in (-1, 1, 2, 3)}
    outputs = _run(_engine(tokenizer), requests)
    for request_id, outs in outputs.items():
        kind, text = request_id.split("-")[0], _text(outs)
        assert outs[-1].finish_reason == "stop", (request_id, text)  # ended by the grammar, not max_tokens
        if kind == "json":
            assert _is_person(json.loads(text)), text
        elif kind == "regex":
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text), text
        else:
            assert text in ("yes", "no", "maybe so")
    free = _run(_engine(tokenizer), {"free": (prompt, SamplingParams(max_tokens=30, temperature=0.0))})
    with pytest.raises(json.JSONDecodeError):  # the random model does not write JSON by itself
        json.loads(_text(free["free"]))


def test_reported_logprobs_are_the_models_own_and_choices_each_follow_the_grammar(tokenizer):
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Yes or no?"}])
    grammar = grammar_from_spec("json", PERSON)
    engine = _engine(tokenizer)
    engine.add_request("c0", prompt, SamplingParams(max_tokens=80, temperature=1.0, seed=5, logprobs=0, grammar=grammar))
    for i in (1, 2):
        engine.add_request(f"c{i}", prompt, SamplingParams(max_tokens=80, temperature=1.0, seed=5 + i, grammar=grammar),
                           share_prefill_with="c0")
    outputs = _run(engine, {})
    assert all(_is_person(json.loads(_text(outputs[f"c{i}"]))) for i in range(3))
    tokens = [t for o in outputs["c0"] for t in o.new_token_ids]
    with torch.inference_mode():
        reference = torch.log_softmax(build_chat_model(tokenizer)(torch.tensor([prompt + tokens])).logits[0].double(), -1)
    reported = [e.logprob for o in outputs["c0"] for e in o.logprobs]
    assert reported == pytest.approx([float(reference[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)], abs=1e-4)


def test_a_grammar_needs_a_tokenizer_and_excludes_min_tokens(tokenizer):
    grammar = grammar_from_spec("regex", "a+")
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(build_chat_model(tokenizer), EngineConfig(max_model_len=64)).add_request(
            "r", [5, 6], SamplingParams(grammar=grammar))
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, grammar=grammar)
    with pytest.raises(ValueError, match="invalid structured output"):
        _engine(tokenizer).add_request("r", [5, 6], SamplingParams(grammar=grammar_from_spec("regex", "(")))


def test_a_grammar_is_compiled_off_the_step_loop_while_other_requests_run(tokenizer, monkeypatch):
    """A large schema's first mask takes seconds; AsyncEngine builds the matcher on a worker thread, so the
    requests already running keep stepping (here: finish) while it is built."""
    import asyncio

    from service.async_engine import AsyncEngine

    release, compiles = _held_compiles(monkeypatch)
    engine = AsyncEngine(_engine(tokenizer))
    engine.start()
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Describe a person."}])

    async def collect(request_id, params):
        return [out async for out in engine.generate(request_id, prompt, params)]

    async def main():
        constrained = asyncio.ensure_future(collect("json", SamplingParams(
            max_tokens=120, temperature=0.0, grammar=grammar_from_spec("json", PERSON))))
        while not compiles:  # the matcher is being built, blocked
            await asyncio.sleep(0.01)
        free = await collect("free", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        assert not constrained.done()
        release.set()
        return free, await constrained

    try:
        free, constrained = asyncio.run(main())
    finally:
        release.set()
        engine.shutdown()
    assert len(free) == 12 and free[-1].finish_reason == "length"
    assert _is_person(json.loads(_text(constrained))) and constrained[-1].finish_reason == "stop"
    with pytest.raises(ValueError, match="invalid structured output"):  # still a ValueError for the app's 400
        asyncio.run(_first(AsyncEngine(_engine(tokenizer)), prompt))


def _held_compiles(monkeypatch) -> tuple[threading.Event, list[tuple[str, str]]]:
    """Grammar compiles wait for the returned event, each recorded as (grammar, thread name) when it starts."""
    release, compiles, warmed = threading.Event(), [], Grammars.warmed_matcher

    def held(self, grammar):
        compiles.append((grammar, threading.current_thread().name))
        assert release.wait(60)
        return warmed(self, grammar)

    monkeypatch.setattr(Grammars, "warmed_matcher", held)
    return release, compiles


async def _first(engine, prompt):
    engine.start()
    try:
        async for _ in engine.generate("bad", prompt, SamplingParams(grammar=grammar_from_spec("regex", "("))):
            pass
    finally:
        engine.shutdown()


@pytest.mark.parametrize("vocab", [64, 100, 4096])
def test_bitmask_application_follows_llguidances_layout(vocab):
    from service.structured import apply_bitmask

    generator = torch.Generator().manual_seed(vocab)
    words = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    logits = torch.randn(3, vocab, generator=generator)
    expected = logits.clone()
    for row in range(3):
        for token in range(vocab):
            if not (int(words[row, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    apply_bitmask(logits, words)
    assert torch.equal(logits, expected)


def test_masking_touches_only_the_constrained_rows(tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    matcher = grammars.matcher(grammar_from_spec("choice", ["yes", "no"]))
    logits = torch.randn(3, len(tokenizer))
    masked = logits.clone()
    grammars.mask(masked, [None, matcher, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]) and ("yes".startswith(tokenizer.decode([t]))
                                                      or "no".startswith(tokenizer.decode([t]))) for t in allowed)


def _allowed(grammars, matcher) -> set[int]:
    import llguidance.torch as llt

    bitmask = grammars._bitmask(1)
    llt.fill_next_token_bitmask(matcher, bitmask, 0)
    return {t for t in range(len(bitmask[0]) * 32) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1}


@pytest.mark.parametrize("choices", [["yes", "no", "maybe so"], ["a", "ab", "abc", "b"],
                                     ['say "hi"', "back\\slash", "new\nline", "(.*)|[x]", "é ü 😀", " lead"]])
def test_choices_allow_the_same_tokens_as_llguidances_own_choice_grammar(tokenizer, choices):
    """`choice` compiles to one terminal (an alternation), not llguidance's rule of one alternative per string:
    at every token of every choice, the same tokens are allowed, and the end is reached alike."""
    import llguidance

    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    for choice in choices:
        ours = grammars.matcher(grammar_from_spec("choice", choices))
        theirs = grammars.matcher(llguidance.grammar_from("choice", json.dumps(choices)))
        for token in tokenizer.encode(choice, add_special_tokens=False):
            assert _allowed(grammars, ours) == _allowed(grammars, theirs), choice
            assert ours.consume_token(token) and theirs.consume_token(token)
        assert _allowed(grammars, ours) == _allowed(grammars, theirs)
        assert (ours.is_accepting(), ours.is_stopped()) == (theirs.is_accepting(), theirs.is_stopped()) == (
            True, not any(c != choice and c.startswith(choice) for c in choices))


def test_thousands_of_choices_and_hundreds_of_optional_properties_are_followed(tokenizer):
    """Past 2000 choices, llguidance's choice grammar (an Earley item per choice) and a schema of 600 optional
    properties (2407 items in a row) exceeded its default max_items_in_row at the first tokens: the output
    ended as "stop" after 'item' or '{' (audit: s7.py)."""
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Pick one."}])
    choices = [f"item{i}" for i in range(2500)]
    schema = {"type": "object", "properties": {f"field{i}": {"type": "string", "maxLength": 5} for i in range(600)},
              "additionalProperties": False}
    requests = {f"{kind}-{seed}": (prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=seed, grammar=grammar))
                for kind, grammar in (("choice", grammar_from_spec("choice", choices)),
                                      ("json", grammar_from_spec("json", schema)))
                for seed in (1, 2)}
    outputs = _run(_engine(tokenizer), requests)
    for request_id, outs in outputs.items():
        text = _text(outs)
        assert outs[-1].finish_reason in ("stop", "length"), (request_id, text)
        if request_id.startswith("choice"):
            assert outs[-1].finish_reason == "stop" and text in choices, text
        elif outs[-1].finish_reason == "stop":
            assert set(json.loads(text)) <= set(schema["properties"]), text


def test_a_grammar_that_fails_mid_completion_fails_its_request_only(tokenizer, caplog):
    """A grammar llguidance gives up on while generating (here 12,000 alternatives of one rule, past its parser's
    row limit) allows only EOS from then on: that ended the completion as "stop" with text breaking the grammar.
    Now the request ends as "abort" (the app's 500), its error logged short; the others run on."""
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Pick one."}])
    alternatives = [f"item{i}" for i in range(12_000)]
    bad = grammar_from_spec("grammar", "start: " + " | ".join(f'"{a}"' for a in alternatives))
    good = grammar_from_spec("choice", ["yes", "no"])
    with caplog.at_level("WARNING", logger="service.engine"):
        outputs = _run(_engine(tokenizer), {
            "bad": (prompt, SamplingParams(max_tokens=30, temperature=0.0, grammar=bad)),
            "good": (prompt, SamplingParams(max_tokens=30, temperature=0.0, grammar=good)),
            "free": (prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))})
    assert outputs["bad"][-1].finish_reason == "abort" and outputs["bad"][-1].new_token_ids == ()
    assert outputs["good"][-1].finish_reason == "stop" and _text(outputs["good"]) in ("yes", "no")
    assert outputs["free"][-1].finish_reason == "length" and len(outputs["free"]) == 8
    failed = [r.getMessage() for r in caplog.records if "request bad" in r.getMessage()]
    assert len(failed) == 1 and "grammar failed" in failed[0] and len(failed[0]) < 400, failed
    assert "item11999" not in failed[0]


def test_a_grammar_that_allows_no_output_is_refused_at_compile_not_cached(tokenizer):
    """A regex whose language is empty compiles, and its matcher failed on its first mask: it was cached so, and each
    request was queued, prefilled, then failed at its first token with llguidance's internal text and no parameter
    (a review). It is refused where it is compiled (a 400 naming the field, `test_app`'s path)."""
    from service.structured import Grammars, InvalidGrammar, grammar_from_spec

    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    empty = grammar_from_spec("regex", "[^\\s\\S]")
    with pytest.raises(InvalidGrammar, match="allows no output") as info:
        grammars.warmed_matcher(empty)
    assert "<non-verbose/>" not in str(info.value) and grammars.cached_matcher(empty) is None


def test_grammar_errors_are_short_and_do_not_repeat_the_grammar(tokenizer):
    """llguidance's verbose errors quote the grammar around the problem (a whole one-line regex or schema): an
    error is cut to MAX_ERROR_CHARS, in the 400 and in the log."""
    from service.structured import MAX_ERROR_CHARS

    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    secret = "(" + "|".join(f"secret{i}" for i in range(2000))
    with pytest.raises(ValueError, match="^invalid structured output: ") as error:
        grammars.matcher(grammar_from_spec("regex", secret))
    assert len(str(error.value)) <= len("invalid structured output: ") + MAX_ERROR_CHARS
    assert "secret1999" not in str(error.value)


def test_a_grammar_is_compiled_once_while_cached_and_each_request_gets_its_own_copy(tokenizer, monkeypatch):
    import service.structured as structured

    compiled = []
    matcher = Grammars.matcher
    monkeypatch.setattr(Grammars, "matcher", lambda self, grammar: compiled.append(grammar) or matcher(self, grammar))
    monkeypatch.setattr(structured, "CACHE_SIZE", 2, raising=False)
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    yes_no = grammar_from_spec("choice", ["yes", "no"])
    first, second = grammars.warmed_matcher(yes_no), grammars.warmed_matcher(yes_no)
    assert compiled == [yes_no] and grammars.cached_matcher(yes_no) is not None
    for token in tokenizer.encode("yes", add_special_tokens=False):  # one copy advances, the other does not move
        assert first.consume_token(token)
    assert first.is_stopped() and not second.is_stopped()
    assert all(second.consume_token(token) for token in tokenizer.encode("no", add_special_tokens=False))
    assert not grammars.cached_matcher(yes_no).is_stopped()  # nor the cached one
    others = [grammar_from_spec("regex", r"\d+"), grammar_from_spec("regex", "[a-z]+")]
    for grammar in others:  # least recently used first out
        grammars.warmed_matcher(grammar)
    assert grammars.cached_matcher(yes_no) is None and grammars.cached_matcher(others[0]) is not None
    with pytest.raises(ValueError, match="invalid structured output"):  # a failed compile is not cached
        grammars.warmed_matcher(grammar_from_spec("regex", "("))
    assert grammars.cached_matcher(others[1]) is not None


def test_requests_share_one_compile_on_the_engines_own_threads_and_a_compile_nobody_awaits_is_dropped(
        tokenizer, monkeypatch):
    """Each of a request's n choices is an engine request: the app's n=16 with a 378 KB schema compiled it 17 times
    on asyncio's default executor, another client's request waiting 12 s (audit: s3.py). Requests for a grammar
    being compiled now wait for that compile, which runs on the AsyncEngine's GRAMMAR_THREADS threads, and a queued
    compile whose requests left is cancelled."""
    import asyncio

    from service.async_engine import GRAMMAR_THREADS, AsyncEngine

    release, compiles = _held_compiles(monkeypatch)
    engine = AsyncEngine(_engine(tokenizer))
    engine.start()
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Describe a person."}])
    person = grammar_from_spec("json", PERSON)
    busy = [grammar_from_spec("regex", f"[0-9]{{{k}}}") for k in range(1, GRAMMAR_THREADS)]
    dropped = grammar_from_spec("choice", ["never", "compiled"])

    async def collect(request_id, grammar, seed=0):
        params = SamplingParams(max_tokens=120, temperature=1.0, seed=seed, grammar=grammar)
        return [out async for out in engine.generate(request_id, prompt, params)]

    async def until(condition):
        while not condition():
            await asyncio.sleep(0.01)

    async def main():
        choices = [asyncio.ensure_future(collect(f"c{i}", person, seed=i)) for i in range(4)]
        others = [asyncio.ensure_future(collect(f"busy{k}", grammar)) for k, grammar in enumerate(busy)]
        await asyncio.wait_for(until(lambda: len(compiles) >= GRAMMAR_THREADS), 60)  # every grammar thread taken
        left = asyncio.ensure_future(collect("left", dropped))
        await asyncio.sleep(0.2)
        left.cancel()  # its compile was queued behind the others
        await asyncio.gather(left, return_exceptions=True)
        release.set()
        outputs = await asyncio.gather(*choices, *others)
        return outputs, await collect("again", person)  # cached: no compile

    try:
        outputs, again = asyncio.run(main())
    finally:
        release.set()
        engine.shutdown()
    assert sorted(grammar for grammar, _ in compiles) == sorted([person, *busy])
    assert all(thread.startswith("vibe-grammar") for _, thread in compiles)
    for outs in [*outputs[:4], again]:
        assert _is_person(json.loads(_text(outs))) and outs[-1].finish_reason == "stop"


def test_grammars_waiting_to_compile_are_bounded_and_the_next_is_refused_as_busy(tokenizer, monkeypatch):
    """Every structured request with a grammar not cached waited behind every other compile, a queue without bound
    (a client sending many large distinct schemas held every later structured request for their whole compile
    time). Beyond MAX_PENDING_GRAMMARS distinct grammars compiling or queued, a new one is refused as QueueFull
    (the app's 429, retry later); a request for a grammar already pending still joins its compile."""
    import asyncio

    from service import async_engine
    from service.async_engine import AsyncEngine
    from service.engine import QueueFull
    from service.openai_api import error_body

    monkeypatch.setattr(async_engine, "MAX_PENDING_GRAMMARS", 3)
    release, compiles = _held_compiles(monkeypatch)
    engine = AsyncEngine(_engine(tokenizer))
    engine.start()
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "A number."}])
    grammars = [grammar_from_spec("regex", f"[0-9]{{{k}}}") for k in range(1, 5)]

    async def collect(request_id, grammar):
        params = SamplingParams(max_tokens=8, temperature=0.0, grammar=grammar)
        return [out async for out in engine.generate(request_id, prompt, params)]

    async def main():
        pending = [asyncio.ensure_future(collect(f"g{k}", g)) for k, g in enumerate(grammars[:3])]
        joined = asyncio.ensure_future(collect("joins", grammars[0]))  # same grammar: shares its compile
        await asyncio.sleep(0.3)
        with pytest.raises(QueueFull) as refused:
            await collect("refused", grammars[3])
        release.set()
        done = await asyncio.gather(*pending, joined)
        return refused.value, done, await collect("later", grammars[3])  # room again

    try:
        refused, done, later = asyncio.run(main())
    finally:
        release.set()
        engine.shutdown()
    assert error_body(refused)[0] == 429 and "3 structured outputs are waiting" in str(refused)
    assert all(outs[-1].finish_reason == "stop" for outs in [*done, later])
    assert sorted(grammar for grammar, _ in compiles) == sorted(grammars)


@pytest.mark.parametrize("kind, spec, message", [
    ("json", {"$defs": {**{f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}}
                          for i in range(600)}, "d600": {"type": "string"}}, "$ref": "#/$defs/d0"}, "601 \\$refs"),
    ("grammar", "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(1200)) + '\nr1200: "x"', "1202 rules"),
    ("grammar", "root ::= r0\n" + "\n".join(f"r{i} ::= r{i + 1}" for i in range(1200)) + '\nr1200 ::= "x"', "rules")])
def test_grammars_whose_chains_could_overflow_the_compilers_stack_are_refused(tokenizer, kind, spec, message):
    """llguidance's compiler recurses once per link of a $ref or rule chain: one request of a 1000-link chain killed
    the whole process (SIGSEGV; a review). Such grammars are refused before they are compiled; shorter ones compile."""
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    with pytest.raises(ValueError, match=message):
        grammars.matcher(grammar_from_spec(kind, spec))
    short = {"type": "object", "properties": {"a": {"$ref": "#/$defs/s"}}, "$defs": {"s": {"type": "string"}}}
    assert not grammars.matcher(grammar_from_spec("json", short)).is_error()


def _lark_texts() -> list[str]:
    """Grammar texts around llguidance's test of Lark syntax: blank lines, other whitespace, keywords in and out of
    place, and random mixes of these pieces."""
    texts = ["start: \"a\"", "  \n\n \t start : \"a\"", "%llguidance {}\nstart: x", "\n\n%llguidancex", "x start: a",
             "root ::= \"start:\"", "start\n:", "\u2028start: a", "\r\nstart: a", "\n" * 50 + "x", "startx: a"]
    pieces = ["\n", " ", "\t", "\r", "\u2028", "\x0b", "start", ":", "%llguidance", "x", "::=", "\"a\""]
    rng = random.Random(0)
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    return texts


def test_lark_is_told_from_gbnf_as_llguidance_tells_it_without_its_backtracking():
    """llguidance's own test of Lark text (``^\\s*`` under MULTILINE) tried every line start across all the blank
    lines after it, holding the GIL: a grammar of 100,000 newlines blocked the server's event loop for 48 s (a
    review). The service's test answers as llguidance's on every text, and reads each character a bounded number
    of times (the regular expression engine's work is not timed here: its pattern lets no line start look past its
    own line before the keyword)."""
    from llguidance.gbnf_to_lark import is_lark_syntax

    for text in _lark_texts():
        assert (structured._LARK.search(text) is not None) == is_lark_syntax(text), repr(text)
    assert structured._LARK.pattern.startswith("(?m)^[^\\S\\n]*")


def test_grammar_text_is_read_without_llguidances_quadratic_steps(tokenizer, monkeypatch):
    """Neither llguidance's test of Lark syntax nor its GBNF conversion of more than MAX_RULES rules (quadratic in a
    chain of rules: 8,000 took seconds) runs for a request's grammar; Lark and GBNF grammars are still read."""
    import llguidance
    import llguidance.gbnf_to_lark

    def refused(*_args, **_kwargs):
        raise AssertionError("llguidance's own reading of grammar text was called")

    convert = llguidance.gbnf_to_lark.gbnf_to_lark
    monkeypatch.setattr(llguidance.gbnf_to_lark, "is_lark_syntax", refused)
    monkeypatch.setattr(llguidance, "grammar_from", refused)
    with pytest.raises(ValueError, match="Failed to convert the grammar from GBNF to Lark"):
        grammar_from_spec("grammar", "\n" * 100_000 + "x")
    lark = grammar_from_spec("grammar", '\n\n  start: "yes" | "no"')
    gbnf = grammar_from_spec("grammar", 'root ::= "yes" | "no"')
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    assert not grammars.matcher(lark).is_error() and not grammars.matcher(gbnf).is_error()
    monkeypatch.setattr(llguidance.gbnf_to_lark, "gbnf_to_lark", refused)
    chain = "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(MAX_RULES)) + f'r{MAX_RULES} ::= "x"\n'
    with pytest.raises(InvalidGrammar, match=f"defines {MAX_RULES + 2} rules; at most {MAX_RULES}"):
        grammar_from_spec("grammar", chain)
    monkeypatch.setattr(llguidance.gbnf_to_lark, "gbnf_to_lark", convert)
    with pytest.raises(InvalidGrammar, match="nested too deeply"):  # (the converter recurses per parenthesis)
        grammar_from_spec("grammar", "root ::= " + "(" * 5000 + '"a"' + ")" * 5000)


def test_a_grammar_whose_lexer_grows_past_its_limit_fails_and_leaves_the_cache(tokenizer, monkeypatch):
    """llguidance builds a lexer's states at the masks and keeps them with the grammar, which the engine caches: a
    160-character regex built new ones at every token up to llguidance's own limit (250,000, some 105 MB), and 32 of
    them held 3.4 GB (a review). The service's limit is passed on, and a grammar past it fails its request and is
    dropped from the cache (its states with it); the other requests run on. (Its matcher runs out on the cached
    compile first, and then on a compile of its own, its tokens replayed: seed 2 needs more states alone, where
    seed 1's replay, which builds no masks of the tokens before, fits.)"""
    monkeypatch.setattr(structured, "MAX_LEXER_STATES", 300)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Write."}])
    grows = grammar_from_spec("regex", LEXER_GROWS)
    good = grammar_from_spec("choice", ["yes", "no"])
    engine = _engine(tokenizer)
    outputs = _run(engine, {
        "grows": (prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=2, grammar=grows)),
        "good": (prompt, SamplingParams(max_tokens=30, temperature=0.0, grammar=good))})
    assert outputs["grows"][-1].finish_reason == "abort" and "states" in outputs["grows"][-1].error
    assert outputs["good"][-1].finish_reason == "stop" and _text(outputs["good"]) in ("yes", "no")
    assert grows not in engine._grammars._compiled and good in engine._grammars._compiled


def test_requests_that_use_up_a_cached_grammars_lexer_together_are_given_a_new_compile(tokenizer, monkeypatch):
    """The lexer states are the cached grammar's, shared by every copy: requests that each stay far under the limit
    used it up together, and then failed, every request running on the grammar at once (88 requests of 40 tokens
    over one regex at the real limit; a review). A request whose matcher runs out is given one of a compile of its
    own, its tokens replayed: each completes as it does on an engine of its own."""
    monkeypatch.setattr(structured, "MAX_LEXER_STATES", 300)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Write."}])
    grammar = grammar_from_spec("regex", LEXER_GROWS)
    shared = _engine(tokenizer, max_model_len=128)
    for seed in range(12):
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, grammar=grammar)
        alone = _run(_engine(tokenizer, max_model_len=128), {"alone": (prompt, params)})["alone"]
        assert alone[-1].finish_reason == "length", alone[-1]  # (under the limit on its own)
        together = _run(shared, {f"r{seed}": (prompt, params)})[f"r{seed}"]
        assert together[-1].finish_reason == "length" and together[-1].error is None, (seed, together[-1])
        assert _text(together) == _text(alone)  # (the same seed: the same tokens, masked as on its own)
    concurrent = {f"c{k}": (prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=k, grammar=grammar))
                  for k in range(8)}
    outputs = _run(_engine(tokenizer, max_model_len=128, max_num_seqs=8), concurrent)
    assert all(outs[-1].finish_reason == "length" and outs[-1].error is None for outs in outputs.values())


def test_a_request_on_an_older_compile_does_not_drop_a_newer_one(tokenizer):
    """A request renewing its matcher dropped whatever compile the cache held, a newer one that never ran out too, and
    the next request compiled it again (a review): it drops only the compile it was copied from."""
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    grammar = grammar_from_spec("choice", ["yes", "no"])
    grammars.warmed_matcher(grammar)
    first = grammars.generation(grammar)
    grammars.forget(grammar, first)
    assert grammars.generation(grammar) == 0 and grammars.cached_matcher(grammar) is None
    grammars.warmed_matcher(grammar)
    second = grammars.generation(grammar)
    assert second not in (0, first)
    grammars.forget(grammar, first)
    assert grammars.cached_matcher(grammar) is not None
    grammars.forget(grammar, second)
    assert grammars.cached_matcher(grammar) is None


def test_renewals_stop_for_the_step_once_its_budget_is_spent(tokenizer, monkeypatch):
    """Compiling again holds every request's step: many rows renewing a large schema at once held it for seconds (a
    review). Past the step's budget a request that ran out fails, as before renewals."""
    import service.engine

    monkeypatch.setattr(structured, "MAX_LEXER_STATES", 300)
    monkeypatch.setattr(service.engine, "RENEW_BUDGET_S", 0.0)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Write."}])
    grammar = grammar_from_spec("regex", LEXER_GROWS)
    shared = _engine(tokenizer, max_model_len=128)
    ends = [_run(shared, {f"r{seed}": (prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=seed,
                                                                grammar=grammar))})[f"r{seed}"][-1]
            for seed in range(12)]
    assert any(end.finish_reason == "abort" and "too many states" in end.error for end in ends)


def test_a_steps_masks_are_computed_in_parallel_beside_its_forward(tokenizer, monkeypatch):
    """The masks of a step's constrained rows were computed one after another on the step loop, after the forward:
    32 rows over a large schema (8 ms a row) held every request's step for 426 ms (a review). They are begun before
    the forward, on a thread of their own, by llguidance's executor (without the GIL, on every core); a fork's
    first mask (n choices sharing a prefill) is computed after it. The completions are those of a serial mask."""
    import llguidance.torch as llt

    calls = []
    parallel = llt.fill_next_token_bitmask_par

    def recorded(executor, matchers, bitmask):
        calls.append((threading.current_thread().name, len(matchers)))
        return parallel(executor, matchers, bitmask)

    monkeypatch.setattr(llt, "fill_next_token_bitmask_par", recorded)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Who?"}])
    grammar = grammar_from_spec("json", PERSON)
    requests = {f"r{i}": (prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=i, grammar=grammar))
                for i in range(3)}
    outputs = _run(_engine(tokenizer, max_num_seqs=4), requests)
    assert calls and all(name.startswith("grammar-masks") for name, _ in calls)
    assert max(rows for _, rows in calls) == 3  # (the three rows of a step in one call)
    for outs in outputs.values():
        assert outs[-1].finish_reason == "stop" and _is_person(json.loads(_text(outs)))

    def serial(self, matchers):
        bitmask = self._bitmask(len(matchers))
        for k, matcher in enumerate(matchers):
            llt.fill_next_token_bitmask(matcher, bitmask, k)
        return bitmask

    monkeypatch.setattr(Engine, "_masks_ahead", lambda self, sampled: None)
    monkeypatch.setattr(Grammars, "masks", serial)
    again = _run(_engine(tokenizer, max_num_seqs=4), requests)
    assert {k: _text(v) for k, v in again.items()} == {k: _text(v) for k, v in outputs.items()}


def test_schemas_of_more_object_properties_than_openai_allows_are_refused_before_compiling():
    """llguidance's compile time grows with the square of an object's properties when it forbids others: 10,000 took
    10 s of one of the engine's two compile threads, and two such requests held a small schema 14.8 s behind them (a
    review). More than MAX_PROPERTIES (OpenAI's limit, counted over every schema of the request) are a 400 first."""
    from service.openai_api import APIError, ChatCompletionRequest

    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(structured.MAX_PROPERTIES)},
            "additionalProperties": False}
    nested = {"type": "object", "properties": {"inner": wide}}
    with pytest.raises(InvalidGrammar, match=f"{structured.MAX_PROPERTIES + 1} object properties"):
        grammar_from_spec("json", nested)
    grammar_from_spec("json", wide)  # (as many as allowed: built)
    tools = [{"type": "function", "function": {"name": n, "parameters": wide if n == "a" else {
        "type": "object", "properties": {"x": {"type": "string"}}}}} for n in ("a", "b")]
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                    "tools": tools, "tool_choice": "required"})
    with pytest.raises(APIError) as info:
        _ = request.grammar_source
    assert info.value.status == 400 and info.value.param == "tools" and "5001 object properties" in info.value.message
