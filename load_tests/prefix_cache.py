"""Prefix-caching benchmark: the service with and without it, side by side, on the shipped workload sets.

Three scenarios, each run with caching off and on in alternation (``--repeats`` times each), and two more:

- ``multi_turn``: the ShareGPT-like set's conversations with two or three user turns, played as a chat
  client plays them: each turn sends the conversation so far (the recorded user messages, the model's own
  answers), chat template applied; ``--concurrency`` clients each play one conversation at a time;
- ``long_context``: the Sonnet-like set's long prompts (about 580 tokens: more than one step's prefill
  budget) each followed by two short follow-up questions (the ShareGPT-like set's later user messages),
  played the same way;
- ``shared_system``: the code set (every request has the same system prompt), closed loop;
- ``users``: ``--users`` of the multi-turn conversations (``--users-set sonnet_like``: long_context's) taking
  turns (each user's next turn comes after every other user's: `play`'s ``interleave``), with caching off, with
  as many cached sequences as running ones (``max_cached_sequences`` = ``max_num_seqs``: 16 on the engine, 32
  in the apps) in the KV memory those running ones fill (``kv_cache_bytes``: the cache before it had more),
  with the default cached sequences in that memory (the cache before it took all of ``kv_cache_bytes``), and
  with the engine's defaults (with ``--serve``, four more apps, in a Ray cluster of their own);
- ``burst`` (engine backend only): ``--burst`` requests sent at once that share a long system prompt no
  cache holds yet (a Sonnet-like prompt, about 600 tokens, before a short question each), with the engine's
  deferral of requests whose uncached prefix a running prefill already computes (`Engine._deferred`) and
  without it (switched off on that engine), prefix caching on in both.

Two backends: by default the engine in this process over the embedded model run whole (a fresh engine
per run); with ``--serve``, the default emulated cluster of ``deploy/config.yaml`` through Ray Serve
(experts on the workers, OpenAI API, the official ``openai`` client), two apps in one Ray cluster, one
with ``enable_prefix_caching: false``, loaded one after the other (the users scenario: four apps, in a
cluster of their own). Greedy decoding with ``ignore_eos`` and the recorded ``max_tokens`` (at most
``--max-tokens``), so every mode serves the same number of tokens. Reports TTFT medians (turns after the first separately), the scenario's wall time, the prompt
tokens prefilled and taken from the cache, and how many answers were the same in both modes; prints a
table and writes ``<out>/prefix_cache.json`` (``prefix_cache_serve.json`` with ``--serve``).

    python -m load_tests.prefix_cache --out bench            # `make bench-prefix`, about 4 minutes
    python -m load_tests.prefix_cache --serve --users 0 --out bench    # through Ray Serve, about 15 minutes
    python -m load_tests.prefix_cache --only-burst --repeats 8 --out bench  # the burst alone, prefix_burst.json
    python -m load_tests.prefix_cache --only-users --out bench  # the users alone, prefix_users.json
    python -m load_tests.prefix_cache --serve --only-users --users 127 --out bench  # through Serve, 10 minutes
    python -m load_tests.prefix_cache --only-users --users-set sonnet_like --out bench  # prefix_users_sonnet.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from deploy.app import DEFAULT_MODEL
from load_tests.workloads import Prompt, load_workload
from service.async_engine import AsyncEngine
from service.engine import Engine, EngineConfig, kv_bytes_per_token
from service.sampling import SamplingParams
from service.text import apply_chat_template
from service.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Conversation:
    """The user side of one conversation: its system prompt (or None), user messages and answer length."""

    index: int
    system: str | None
    users: tuple[str, ...]
    max_tokens: int


@dataclass(frozen=True)
class Served:
    """One turn as served: seconds to its first and last token, prompt and cached prompt tokens, answer."""

    conversation: int
    turn: int
    ttft: float
    e2e: float
    prompt_tokens: int
    cached: int
    text: str


# send(request id, messages, max_tokens) -> (ttft, e2e, prompt tokens, cached tokens, answer text)
Send = Callable[[str, list[dict], int], Awaitable[tuple[float, float, int, int, str]]]


def conversations(prompts: list[Prompt], *, multi_turn: bool, max_tokens: int) -> list[Conversation]:
    """The set's conversations with at least two user turns (``multi_turn``), else every prompt's last one."""
    found = []
    for prompt in prompts:
        system = prompt.messages[0]["content"] if prompt.messages[0]["role"] == "system" else None
        users = tuple(m["content"] for m in prompt.messages if m["role"] == "user")
        if multi_turn and len(users) < 2:
            continue
        found.append(Conversation(len(found), system, users if multi_turn else users[-1:],
                                  min(prompt.max_tokens, max_tokens)))
    return found


def with_follow_ups(prompts: list[Prompt], follow_ups: list[str], *, turns: int, max_tokens: int) -> list[Conversation]:
    """Each prompt's last user message, then ``turns - 1`` follow-up questions taken in turn from ``follow_ups``."""
    return [Conversation(i, c.system, (*c.users, *(follow_ups[(i * (turns - 1) + k) % len(follow_ups)]
                                                   for k in range(turns - 1))), c.max_tokens)
            for i, c in enumerate(conversations(prompts, multi_turn=False, max_tokens=max_tokens))]


def short_follow_ups(prompts: list[Prompt], max_chars: int = 80) -> list[str]:
    """The user messages after the first of the set's conversations, those of at most ``max_chars``."""
    return [m["content"] for p in prompts for k, m in enumerate(p.messages)
            if m["role"] == "user" and k > 0 and len(m["content"]) <= max_chars]


# the conversation sets of the scenarios, by name: max_tokens -> conversations
CONVERSATION_SETS: dict[str, Callable[[int], list[Conversation]]] = {
    "sharegpt_like": lambda max_tokens: conversations(load_workload("sharegpt_like"), multi_turn=True,
                                                      max_tokens=max_tokens),
    "sonnet_like": lambda max_tokens: with_follow_ups(load_workload("sonnet_like"),
                                                      short_follow_ups(load_workload("sharegpt_like")), turns=3,
                                                      max_tokens=max_tokens),
}


async def play(send: Send, items: list[Conversation], concurrency: int, tag: str, session: int,
               max_model_len: int, count: Callable[[list[dict]], int], interleave: bool = False) -> list[Served]:
    """``concurrency`` clients, each playing one conversation at a time, turn by turn, with the answers it
    got as history; a turn that would not fit the context ends its conversation. With ``interleave`` a client
    plays one turn and puts the conversation at the back of the line (as users who read an answer and reply
    later: every other conversation's next turn is served before its next one). Every conversation's
    first message starts with ``(session <session>)``, so that a run cannot find an earlier run's
    prompts in a cache that outlives it (a served app's)."""
    marker = f"(session {session}) "
    line: deque[tuple[Conversation, list[dict], list[str]]] = deque()
    for item in items:
        system, users = item.system, list(item.users)
        if system is not None:
            system = marker + system
        else:
            users[0] = marker + users[0]
        line.append((item, [{"role": "system", "content": system}] if system is not None else [], users))
    served: list[Served] = []

    async def client() -> None:
        while line:
            item, messages, users = conversation = line.popleft()
            messages.append({"role": "user", "content": users[0]})
            if count(messages) + item.max_tokens > max_model_len:
                continue
            turn = len(item.users) - len(users) + 1
            ttft, e2e, prompt_tokens, cached, text = await send(f"{tag}-{item.index}-{turn}", messages, item.max_tokens)
            served.append(Served(item.index, turn, ttft, e2e, prompt_tokens, cached, text))
            messages.append({"role": "assistant", "content": text})
            del users[0]
            if users:  # (without interleave this client takes it again at once: nothing runs in between)
                line.append(conversation) if interleave else line.appendleft(conversation)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return served


def engine_sender(engine: AsyncEngine, tokenizer) -> Send:
    async def send(request_id: str, messages: list[dict], max_tokens: int):
        prompt = apply_chat_template(tokenizer, messages)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start, first, cached, tokens = time.perf_counter(), None, 0, []
        async for out in engine.generate(request_id, prompt, params):
            if first is None:
                first, cached = time.perf_counter() - start, out.num_cached_tokens
            tokens += out.new_token_ids
        return first, time.perf_counter() - start, len(prompt), cached, tokenizer.decode(tokens,
                                                                                          skip_special_tokens=True)
    return send


def openai_sender(client, model: str) -> Send:
    async def send(request_id: str, messages: list[dict], max_tokens: int):
        start, first, text, usage = time.perf_counter(), None, [], None
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        return (first, time.perf_counter() - start, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
                "".join(text))
    return send


def summarise(served: list[Served], seconds: float) -> dict:
    def ms(values: list[float]) -> float | None:
        return round(1000 * statistics.median(values), 1) if values else None

    prompt_tokens = sum(s.prompt_tokens for s in served)
    cached = sum(s.cached for s in served)
    return {"requests": len(served), "wall_s": round(seconds, 2), "ttft_p50_ms": ms([s.ttft for s in served]),
            "ttft_p50_ms_first_turns": ms([s.ttft for s in served if s.turn == 1]),
            "ttft_p50_ms_later_turns": ms([s.ttft for s in served if s.turn > 1]),
            "e2e_p50_ms": ms([s.e2e for s in served]),
            "prompt_tokens": prompt_tokens, "cached_tokens": cached, "prefilled_tokens": prompt_tokens - cached}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--serve", action="store_true", help="through Ray Serve on the default emulated cluster")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=24,
                        help="conversations played in each multi-turn scenario")
    parser.add_argument("--requests", type=int, default=32, help="requests of the shared-system-prompt scenario")
    parser.add_argument("--burst", type=int, default=16, help="requests of the burst scenario (0: none)")
    parser.add_argument("--only-burst", action="store_true", help="the burst scenario alone (engine backend)")
    parser.add_argument("--users", type=int, default=64,
                        help="conversations of the users scenario, taking turns (0: none)")
    parser.add_argument("--users-set", choices=tuple(CONVERSATION_SETS), default="sharegpt_like",
                        help="the users' conversations: the ShareGPT-like multi-turn ones, or the Sonnet-like long "
                             "prompts with two follow-ups (as long_context)")
    parser.add_argument("--only-users", action="store_true", help="the users scenario alone")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    model_config = AutoConfig.from_pretrained(args.model)
    max_model_len = model_config.max_position_embeddings
    scenarios = {
        "multi_turn": CONVERSATION_SETS["sharegpt_like"](args.max_tokens)[:args.conversations],
        "long_context": CONVERSATION_SETS["sonnet_like"](args.max_tokens)[:args.conversations],
        "shared_system": conversations(load_workload("code"), multi_turn=False,
                                       max_tokens=args.max_tokens)[:args.requests],
    }
    if args.only_burst and args.only_users:
        parser.error("--only-burst and --only-users: pick one")
    if args.only_burst:
        if args.serve or not args.burst:
            parser.error("--only-burst runs on the engine backend, with --burst > 0")
        scenarios, args.users = {}, 0
    if args.only_users:
        if not args.users:
            parser.error("--only-users needs --users > 0")
        scenarios, args.burst = {}, 0
    count = lambda messages: len(apply_chat_template(tokenizer, messages))  # noqa: E731
    results = {"backend": "serve" if args.serve else "engine",
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_average_start": [round(x, 1) for x in os.getloadavg()]},
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "scenarios": {}}
    caching = {"off": {"enable_prefix_caching": False}, "on": {}}
    if args.serve:
        from load_tests.compare import deploy_args, resolved_args

        served = deploy_args()
        running = _running_bytes(model_config, served["max_num_seqs"], served.get("max_model_len") or max_model_len,
                                 getattr(torch, resolved_args(served)["dtype"]))  # unset: by device
        users = {mode: _users_config(mode, served["max_num_seqs"], running) for mode in USERS_MODES}
        run = _serve_run
    else:
        running = _running_bytes(model_config, ENGINE_MAX_NUM_SEQS, max_model_len, torch.float32)
        users = {mode: _users_config(mode, ENGINE_MAX_NUM_SEQS, running) for mode in USERS_MODES}
        run = lambda prefix, modes, measure: asyncio.run(  # noqa: E731
            measure(_engine_senders(args.model, tokenizer, max_model_len, modes)))
    if scenarios:
        run("cache", caching, lambda backend: _measure(args, scenarios, count, max_model_len, backend, results))
    if args.burst and not args.serve:
        results["burst"] = asyncio.run(_measure_burst(args, tokenizer, max_model_len))
    if args.users:
        results["users"] = run("users", users, lambda backend: _measure_users(args, count, max_model_len, backend))
    results["machine"]["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        users = f"prefix_users{'_sonnet' if args.users_set == 'sonnet_like' else ''}"
        name = "prefix_burst" if args.only_burst else users if args.only_users else "prefix_cache"
        path = args.out / f"{name}{'_serve' if args.serve else ''}.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {path}")


async def _measure(args, scenarios: dict[str, list[Conversation]], count, max_model_len: int, backend,
                   results: dict) -> None:
    """Warm up, then every scenario, caching off then on, ``args.repeats`` times; fills ``results``."""
    async with backend as senders:
        await play(senders["off"](), scenarios["multi_turn"][:2], args.concurrency, "warm-up", -1, max_model_len,
                   count)
        print(f"{'scenario':<14} {'caching':<8} {'run':>3} {'requests':>8} {'wall s':>7} {'TTFT p50':>9} "
              f"{'later turns':>11} {'prefilled':>9} {'cached':>7}")
        for name, items in scenarios.items():
            runs, texts = await _rounds(args, name, senders, items, max_model_len, count)
            same = sum(texts["on"].get(key) == text for key, text in texts["off"].items())
            keys = ("wall_s", "ttft_p50_ms", *(("ttft_p50_ms_later_turns",) if name != "shared_system" else ()))
            results["scenarios"][name] = {"runs": runs, "same_answers": f"{same}/{len(texts['off'])}",
                                          "off_over_on": {key: _ratio(runs, key) for key in keys}}
            print(f"{name}: off / on (medians of {args.repeats}) {results['scenarios'][name]['off_over_on']}, "
                  f"same answers {same}/{len(texts['off'])}")


async def _measure_burst(args, tokenizer, max_model_len: int) -> dict:
    """The burst scenario, deferral off then on, ``args.repeats`` times, each on a fresh engine."""
    system = load_workload("sonnet_like")[0].messages[-1]["content"]
    users = short_follow_ups(load_workload("sharegpt_like"))[:args.burst]
    runs, texts = {"off": [], "on": []}, {}
    print(f"{'burst':<14} {'deferral':<8} {'run':>3} {'requests':>8} {'wall s':>7} {'TTFT p50':>9} {'TTFT max':>9} "
          f"{'prefilled':>9} {'cached':>7}")
    for repeat in range(-1, args.repeats):  # -1: a warm-up, not recorded
        for mode in ("off", "on"):
            config = EngineConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=max_model_len)
            core = Engine(AutoModelForCausalLM.from_pretrained(args.model), config)
            if mode == "off":
                core._deferred = lambda seq, match: False  # the engine before it deferred anything
            engine = AsyncEngine(core)
            engine.start()
            try:
                send = engine_sender(engine, tokenizer)
                start = time.perf_counter()
                answers = await asyncio.gather(*(
                    send(f"burst-{mode}-{repeat}-{i}", [{"role": "system", "content": f"(session {repeat}) {system}"},
                                                        {"role": "user", "content": user}], args.max_tokens)
                    for i, user in enumerate(users)))
                wall = time.perf_counter() - start
            finally:
                engine.shutdown()
            if repeat < 0:
                continue
            served = [Served(i, 1, *answer) for i, answer in enumerate(answers)]
            summary = {**summarise(served, wall), "ttft_max_ms": round(1000 * max(s.ttft for s in served), 1),
                       "deferrals": core.num_prefill_deferrals}
            runs[mode].append(summary)
            texts.setdefault(mode, [s.text for s in served])
            print(f"{'burst':<14} {mode:<8} {repeat:>3} {summary['requests']:>8} {summary['wall_s']:>7} "
                  f"{summary['ttft_p50_ms']:>9} {summary['ttft_max_ms']:>9} {summary['prefilled_tokens']:>9} "
                  f"{summary['cached_tokens']:>7}", flush=True)
    same = sum(a == b for a, b in zip(texts["off"], texts["on"]))
    ratios = {key: _ratio(runs, key) for key in ("wall_s", "ttft_p50_ms", "ttft_max_ms", "prefilled_tokens")}
    print(f"burst: without / with deferral (medians of {args.repeats}) {ratios}, same answers {same}/{len(users)}")
    return {"requests": len(users), "system_prompt_chars": len(system), "runs": runs,
            "same_answers": f"{same}/{len(users)}", "off_over_on": ratios}


# caching off; as many cached sequences as running ones and KV blocks for the running ones only (the engine before
# max_cached_sequences); the default cached sequences in those blocks (before the cache took all the KV memory); the
# default
USERS_MODES = ("off", "running", "capped", "default")
ENGINE_MAX_NUM_SEQS = 16  # the engine backend's running sequences (the Serve apps': deploy/config.yaml's)


def _users_config(mode: str, max_num_seqs: int, running_bytes: int) -> dict:
    """Engine settings of a users-scenario mode (`USERS_MODES`), as EngineConfig and app arguments share them;
    ``running_bytes``: the KV memory ``max_num_seqs`` sequences of ``max_model_len`` fill (what the cache took of
    any budget before it gave the rest to finished requests' prefixes)."""
    return {"enable_prefix_caching": mode != "off",
            "max_cached_sequences": max_num_seqs if mode == "running" else None,
            **({"kv_cache_bytes": running_bytes} if mode in ("running", "capped") else {})}


def _running_bytes(model_config, max_num_seqs: int, max_model_len: int, dtype: torch.dtype) -> int:
    """KV memory of ``max_num_seqs`` sequences of ``max_model_len`` (whole blocks) of a model without linear
    attention."""
    per_token = kv_bytes_per_token(model_config, dtype)
    block = EngineConfig.kv_block_size
    return max_num_seqs * -(-max_model_len // block) * block * per_token


async def _measure_users(args, count, max_model_len: int, backend) -> dict:
    """The users scenario: ``args.users`` conversations taking turns (`play` with ``interleave``), with caching
    off, with as many cached sequences as running ones (``max_cached_sequences=max_num_seqs``: the engine's layout
    before it had more), and with the default, ``args.repeats`` times each; ``backend`` gives per mode a factory of
    a sender (a fresh engine's, or an app's)."""
    items = CONVERSATION_SETS[args.users_set](args.max_tokens)[:args.users]
    print(f"{'users':<14} {'caching':<8} {'run':>3} {'requests':>8} {'wall s':>7} {'TTFT p50':>9} {'later turns':>11} "
          f"{'prefilled':>9} {'cached':>7}")
    async with backend as senders:
        runs, texts = await _rounds(args, "users", senders, items, max_model_len, count, interleave=True)
    same = sum(texts[mode].get(key) == text for mode in USERS_MODES[1:] for key, text in texts["off"].items())
    keys = ("wall_s", "ttft_p50_ms", "ttft_p50_ms_later_turns", "prefilled_tokens")
    ratios = {f"{mode}_over_default": {key: _ratio(runs, key, mode, "default") for key in keys}
              for mode in USERS_MODES[:-1]}
    compared = (len(USERS_MODES) - 1) * len(texts["off"])
    print(f"users: over the default (medians of {args.repeats}) {ratios}, same answers {same}/{compared}")
    return {"conversations": len(items), "concurrency": args.concurrency, "runs": runs,
            "same_answers": f"{same}/{compared}", **ratios}


async def _rounds(args, name: str, senders: dict[str, Callable[[], Send]], items: list[Conversation],
                  max_model_len: int, count, interleave: bool = False) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """``items`` played (`play`) ``args.repeats`` times in every mode of ``senders``, in turn; per mode the rounds'
    summaries and the first round's answers by (conversation, turn). Prints a row per round."""
    runs: dict[str, list[dict]] = {mode: [] for mode in senders}
    texts: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for mode, make in senders.items():
            start = time.perf_counter()
            served = await play(make(), items, args.concurrency, f"{name}-{mode}-{repeat}", repeat, max_model_len,
                                count, interleave)
            summary = summarise(served, time.perf_counter() - start)
            runs[mode].append(summary)
            texts.setdefault(mode, {(x.conversation, x.turn): x.text for x in served})
            print(f"{name:<14} {mode:<8} {repeat:>3} {summary['requests']:>8} {summary['wall_s']:>7} "
                  f"{summary['ttft_p50_ms']:>9} {summary['ttft_p50_ms_later_turns'] or '-':>11} "
                  f"{summary['prefilled_tokens']:>9} {summary['cached_tokens']:>7}", flush=True)
    return runs, texts


def _ratio(runs: dict[str, list[dict]], key: str, over: str = "off", under: str = "on") -> float:
    """Median over the runs of mode ``over`` (caching off) over the median of ``under`` (on)."""
    return round(statistics.median(r[key] for r in runs[over]) / statistics.median(r[key] for r in runs[under]), 3)


@contextlib.asynccontextmanager
async def _engine_senders(model_path: Path, tokenizer, max_model_len: int, modes: dict[str, dict]):
    """Per mode (its EngineConfig settings beyond the shared ones), a factory of a sender over a fresh in-process
    engine (the previous one is shut down)."""
    engines: list[AsyncEngine] = []

    def factory(settings: dict) -> Callable[[], Send]:
        def make() -> Send:
            while engines:
                engines.pop().shutdown()
            config = EngineConfig(max_num_seqs=ENGINE_MAX_NUM_SEQS, max_num_batched_tokens=512,
                                  max_model_len=max_model_len, **settings)
            engine = AsyncEngine(Engine(AutoModelForCausalLM.from_pretrained(model_path), config))
            engine.start()
            engines.append(engine)
            return engine_sender(engine, tokenizer)
        return make

    try:
        yield {mode: factory(settings) for mode, settings in modes.items()}
    finally:
        while engines:
            engines.pop().shutdown()


def _serve_run(prefix: str, modes: dict[str, dict], measure: Callable[[object], Awaitable]):
    """``measure(backend)`` against one app per mode (``<prefix>_<mode>``: the default emulated cluster of
    ``deploy/config.yaml`` with that mode's settings), in a fresh local Ray cluster shut down after it."""
    from load_tests.compare import deploy_args, serve_apps

    apps = {f"{prefix}_{mode}": {**deploy_args(), "app_name": f"{prefix}_{mode}", **settings}
            for mode, settings in modes.items()}
    with serve_apps(apps) as (bases, _):
        return asyncio.run(measure(_openai_senders(bases, prefix, tuple(modes))))


@contextlib.asynccontextmanager
async def _openai_senders(bases: dict[str, str], prefix: str, modes: Sequence[str]):
    """Per mode, a sender to its app (``<prefix>_<mode>``) with the official ``openai`` client."""
    import openai

    clients = {mode: openai.AsyncOpenAI(base_url=f"{bases[f'{prefix}_{mode}']}/v1", api_key="unused", max_retries=0,
                                        timeout=300) for mode in modes}
    try:
        model = (await clients[modes[-1]].models.list()).data[0].id
        yield {mode: (lambda client=client: openai_sender(client, model)) for mode, client in clients.items()}
    finally:
        for client in clients.values():
            await client.close()


if __name__ == "__main__":
    main()
