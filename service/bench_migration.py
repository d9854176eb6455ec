"""Migration benchmark: trigger-to-live time of a recalibration, and engine step stalls while it runs.

    python -m service.bench_migration --out bench            # `make bench-migration`
    python -m service.bench_migration --out /tmp/b --quick   # one trial

Owns the measurement of two targets of the recalibration issue on the embedded model:

1. From the trigger (`Coordinator.recalibrate(...)` called) to the new placement version live in 2 s
   or less. Three instants are recorded per trial, all on `time.perf_counter()`:
   - published: the coordinator made the new version its placement (it records it on the workers
     right after, `WorkerPool.save_record`; that call is timestamped here);
   - applied: the engine's `PlacementSync` thread got it in a report reply and set it on the
     `DispatchContext` (`set_placement`, timestamped as it is called);
   - live: the first engine step whose pinned placement version is the new one begins (timestamped once
     the step has pinned it, so that applied <= live whatever the two threads' interleaving). This is
     the "trigger to live" figure: the engine is serving with the new version.
2. The step loop stalls at most one step during a migration. Every engine forward is timed through the
   engine's step hooks (`begin_step()` / `end_step()`, wrapping the `DispatchContext`'s). The migration
   window of a trial is [trigger, end of the first step on the new version]: the steps overlapping it
   are the window's steps. A stalled step is a window step longer than 2x the median decode step
   outside every window of that trial. Steps with more tokens than running streams (a prefill) are
   counted apart and never make the median.

Everything runs in this process, as `tests/integration/test_faults.py` wires it, with nothing mocked on
the paths measured: emulated expert workers (jitter 0, one slower device) behind their socket servers
(the real data plane), a `Coordinator` over a `LocalWorkerPool` of the same workers with its background
loop running (auto recalibration off: the benchmark is the only trigger), the engine (`AsyncEngine`)
dispatching its MoE layers through a `DispatchContext`, and the real `PlacementSync` thread reporting to
the coordinator every `sync_interval_s` (its `report` callable is `Coordinator.report` directly, where
Serve puts a deployment-handle call). The engine starts like an ingress replica: a profiling pass over
`deploy/prompts/profile.jsonl` prompts, then `calibrate()`.

Each trial starts `streams` fresh decode streams (ignore_eos, long enough to outlast the trial) on the
prompts of one workload set, alternating `code` and `sharegpt_like` between trials so the router
statistics the incremental solver sees change, waits `baseline_s`, triggers `recalibrate(mode, force=
True)` (force: a migration must happen to be measured, even when the predicted gain is small), waits
until the new version is live plus `after_s`, then cancels the streams.

Caveats (also in the JSON): the coordinator, the workers and the engine share one Python process and
its GIL here, whereas a deployment runs the coordinator and every worker in their own processes; the
coordinator's planning and the worker-to-worker copies therefore compete with the engine's step thread
for the interpreter here, which can only lengthen steps during the migration, not shorten them.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "deploy" / "models" / "vibe-tiny-moe"
PROFILE_PROMPTS = REPO_ROOT / "deploy" / "prompts" / "profile.jsonl"
TARGET_TRIGGER_TO_LIVE_S = 2.0
TARGET_STALLED_STEPS = 1
STALL_FACTOR = 2.0


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        model: local checkpoint folder.
        speeds: emulated relative speed of each device (one entry per device).
        streams: concurrent decode streams (also the engine's max_num_seqs).
        modes: recalibration mode of each trial, in order ("incremental" or "full").
        workloads: the workload sets the trials alternate between (load_tests/workloads/<name>.jsonl).
        prompt_tokens: prompts are cut to their last this many tokens.
        max_model_len: of the engine; every stream asks for max_model_len - prompt tokens.
        baseline_s: seconds of decode before each trigger.
        after_s: seconds of decode after the new version is live.
        sync_interval_s: PlacementSync report interval (the ingress default).
        profile_prompts: prompts of the startup profiling pass (from deploy/prompts/profile.jsonl).
        live_timeout_s: a trial whose version is not live after this is recorded as not live.
        fixed_s, knee_tokens, slope_s: the emulated expert latency curve (jitter 0, no throttling). The
            deployment default (0.4 ms flat up to 128 tokens) puts every expert of a decode batch of 8
            (about one token per expert and pass) on the flat part, where a device's predicted time is
            its expert count; incremental swaps keep the counts, so they can never move an expert
            there. Past the knee from 1 token on, as experts of a large batch are, loads matter and the
            workload change between trials gives the incremental solver swaps to make.
    """

    model: Path = DEFAULT_MODEL
    speeds: tuple[float, ...] = (1.0, 1.0, 1.0, 0.8)
    streams: int = 8
    modes: tuple[str, ...] = ("incremental",) * 6 + ("full",) * 2
    workloads: tuple[str, ...] = ("code", "sharegpt_like")
    prompt_tokens: int = 64
    max_model_len: int = 1024
    baseline_s: float = 1.5
    after_s: float = 1.0
    sync_interval_s: float = 0.1
    profile_prompts: int = 32
    live_timeout_s: float = 30.0
    fixed_s: float = 2e-4
    knee_tokens: float = 1.0
    slope_s: float = 2e-4

    def __post_init__(self) -> None:
        from service.coordinator import RECALIBRATION_MODES

        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"no checkpoint at {str(self.model)!r} (build it with `make model`, or pass --model)")
        if len(self.speeds) < 2 or min(self.speeds) <= 0:
            raise ValueError(f"speeds needs >= 2 positive entries, got {self.speeds}")
        if not self.modes or any(m not in RECALIBRATION_MODES for m in self.modes):
            raise ValueError(f"modes must be non-empty, each one of {RECALIBRATION_MODES}, got {self.modes}")
        if not self.workloads:
            raise ValueError("workloads must name at least one workload set")
        for name in ("streams", "prompt_tokens", "profile_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len <= self.prompt_tokens:
            raise ValueError("max_model_len must exceed prompt_tokens")
        for name in ("baseline_s", "after_s", "sync_interval_s", "live_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BenchConfig.{name} must be > 0, got {getattr(self, name)}")


# --- instrumentation ---------------------------------------------------------------------------------

class StepTimer:
    """Engine step hooks around the dispatch context's: each forward's wall time, version and tokens."""

    def __init__(self, context) -> None:
        self.context = context
        self._lock = threading.Lock()
        self.steps: list[tuple[float, float, int, int]] = []  # (begin, end, pinned version, tokens)
        self._begin = 0.0
        self._tokens = 0

    def begin_step(self) -> None:
        self.context.begin_step()
        # timed once the step's placement is pinned: a step that serves a version begins after it was applied
        self._begin = time.perf_counter()
        self._tokens = 0

    def end_step(self, completed: bool = True) -> None:
        version = self.context.pinned_version
        self.context.end_step(completed)
        end = time.perf_counter()
        with self._lock:
            self.steps.append((self._begin, end, version, self._tokens))

    def count_tokens(self, _module, _args, kwargs) -> None:
        """Forward pre-hook of the model: tokens of the step's flattened batch."""
        ids = kwargs.get("input_ids")
        if ids is not None:
            self._tokens = int(ids.shape[-1])

    def snapshot(self) -> list[tuple[float, float, int, int]]:
        with self._lock:
            return list(self.steps)

    def first_step_at(self, version: int) -> tuple[float, float] | None:
        """(begin, end) of the first step that served `version` or newer, or None."""
        with self._lock:
            return next(((b, e) for b, e, v, _ in self.steps if v >= version), None)


def _instrumented_classes():
    """A worker pool and a dispatch context that timestamp publishing and applying a placement."""
    from service.dispatch import DispatchContext
    from service.worker_pool import LocalWorkerPool

    class TimedPool(LocalWorkerPool):
        def __init__(self, workers) -> None:
            super().__init__(workers)
            self.published: dict[int, float] = {}
            self.dropped: list[float] = []

        def save_record(self, record: dict[str, Any], devices=None) -> None:
            # The coordinator calls this right after it made `record` its placement (_publish).
            self.published.setdefault(int(record["version"]), time.perf_counter())
            super().save_record(record, devices)

        def drop(self, keys) -> None:
            # Phase 3 of a migration: old copies dropped after every engine acknowledged the version.
            if any(keys.values()):
                self.dropped.append(time.perf_counter())
            super().drop(keys)

    class TimedContext(DispatchContext):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.applied: dict[int, float] = {}

        def set_placement(self, placement) -> None:
            # timed before the placement is handed over: a step may pin it at once, on the step thread
            handed = time.perf_counter()
            super().set_placement(placement)
            self.applied.setdefault(placement.version, handed)

    return TimedPool, TimedContext


class StreamDriver:
    """Decode streams on an asyncio loop of its own thread, against an `AsyncEngine`."""

    def __init__(self, engine, core) -> None:
        self.engine = engine
        self._core = core
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-streams", daemon=True)
        self._thread.start()
        self._futures: list = []
        self.first_tokens: list[threading.Event] = []
        self.tokens: list[int] = []
        self.finished_early = 0
        self.errors: list[str] = []

    def start(self, prompts: list[list[int]], max_tokens: list[int], tag: str) -> list[concurrent.futures.Future]:
        """Start one decode stream per prompt; returns their futures (also kept for `stop`)."""
        from service.sampling import SamplingParams

        self.first_tokens = [threading.Event() for _ in prompts]
        self.tokens = [0] * len(prompts)
        self.finished_early = 0
        self.errors = []

        async def stream(i: int) -> None:
            params = SamplingParams(max_tokens=max_tokens[i], temperature=0.0, ignore_eos=True)
            try:
                async for out in self.engine.generate(f"{tag}-{i}", prompts[i], params):
                    self.tokens[i] += len(out.new_token_ids)
                    self.first_tokens[i].set()
                    if out.finished:
                        self.finished_early += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # recorded: a failed stream is a finding, not a crash
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self.first_tokens[i].set()

        self._futures = [asyncio.run_coroutine_threadsafe(stream(i), self.loop) for i in range(len(prompts))]
        return self._futures

    def wait_first_tokens(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        return all(event.wait(max(0.0, deadline - time.monotonic())) for event in self.first_tokens)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel the streams (the engine aborts them) and wait until the engine holds none."""
        for future in self._futures:
            future.cancel()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            held = self.engine.run_at_step_boundary(lambda: self._core.num_running
                                                    + self._core.num_waiting).result(timeout_s)
            if held == 0:
                return
            time.sleep(0.02)
        raise TimeoutError("the engine still holds aborted streams")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


# --- the stack ---------------------------------------------------------------------------------------

class Stack:
    """Emulated workers on sockets, coordinator, dispatch context, engine and PlacementSync, in process."""

    def __init__(self, config: BenchConfig) -> None:
        from service.async_engine import AsyncEngine
        from service.checkpoint import load_layout
        from service.coordinator import Coordinator, CoordinatorConfig, ModelShape
        from service.dispatch import SocketChannel
        from service.emulator import EmulationConfig
        from service.engine import Engine, EngineConfig
        from service.model import load_engine_model
        from service.placement_sync import PlacementSync
        from service.tokenizer import load_tokenizer
        from service.transport import WorkerServer
        from service.worker import ExpertWorker, WorkerConfig, held_expert_bytes

        TimedPool, TimedContext = _instrumented_classes()
        self.config = config
        layout = self.layout = load_layout(config.model)
        configs = [WorkerConfig(index=i, hidden_act=layout.hidden_act, clamped_swiglu=layout.clamped_swiglu,
                                profile_shape=(layout.hidden_size, layout.intermediate_size),
                                emulation=EmulationConfig(speed=speed, fixed_s=config.fixed_s,
                                                          knee_tokens=config.knee_tokens, slope_s=config.slope_s,
                                                          jitter=0.0, seed=i))
                   for i, speed in enumerate(config.speeds)]
        self.pool = TimedPool([ExpertWorker(c) for c in configs])
        self.servers = [WorkerServer(worker) for worker in self.pool.workers]
        self._closers: list = [lambda: [server.close() for server in self.servers]]
        # The bytes of an expert as the workers hold and move it (their dtype, not the checkpoint's), as deploy/app.py
        shape = ModelShape(len(layout.moe_layers), layout.num_experts, held_expert_bytes(configs[0], str(config.model)))
        self.coordinator = Coordinator(CoordinatorConfig(checkpoint=str(config.model), auto_recalibrate=False),
                                       self.pool, shape)
        self.coordinator.start(background=True)
        self._closers.append(self.coordinator.stop)
        _, epoch = self.coordinator.workers()
        # The bootstrap an ingress replica gets: placement, channels and the workers' epoch.
        channels = {d: SocketChannel(server.tcp_address, timeout_s=30) for d, server in enumerate(self.servers)}
        self.context = TimedContext(self.coordinator.placement, channels, workers_epoch=epoch)
        self.timer = StepTimer(self.context)
        model = load_engine_model(config.model, context=self.context).model
        model.register_forward_pre_hook(self.timer.count_tokens, with_kwargs=True)
        self.tokenizer = load_tokenizer(config.model)
        core = Engine(model, EngineConfig(max_model_len=config.max_model_len, max_num_seqs=config.streams),
                      self.tokenizer, hooks=self.timer)
        self.engine = AsyncEngine(core, num_threads=1)
        self.engine.start()
        self._closers.append(self.engine.shutdown)
        self.sync = PlacementSync("bench-engine", self.context, self.coordinator.report, node_id=None,
                                  interval_s=config.sync_interval_s)
        self.sync.start()
        self._closers.append(self.sync.stop)
        self.driver = StreamDriver(self.engine, core)
        self._closers.append(self.driver.close)

    def close(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:  # best effort: close the rest
                print(f"close failed: {type(exc).__name__}: {exc}")

    def prompts(self, name: str, count: int, offset: int = 0) -> list[list[int]]:
        """`count` prompts of a workload set (from `offset`, wrapping), tokenized, cut to their last
        prompt_tokens tokens."""
        from load_tests.workloads import load_workload
        from service.text import apply_chat_template

        items = load_workload(name)
        return [apply_chat_template(self.tokenizer, list(items[(offset + i) % len(items)].messages))
                [-self.config.prompt_tokens:] for i in range(count)]

    def calibrate(self) -> dict[str, Any]:
        """The ingress replica's startup: a profiling pass, its router counts reported, calibrate()."""
        from service.deployments import read_prompts

        started = time.perf_counter()
        prompts = [ids[-self.config.prompt_tokens:]
                   for ids in read_prompts(PROFILE_PROMPTS, self.tokenizer)[:self.config.profile_prompts]]
        for first in range(0, len(prompts), self.config.streams):
            batch = prompts[first:first + self.config.streams]
            for future in self.driver.start(batch, [8] * len(batch), tag=f"profile-{first}"):
                future.result(timeout=120)
        self.sync.sync_once()  # hand over every router count of the pass
        result = self.coordinator.calibrate()
        # As the ingress replica does: wait until the engine has the calibrated placement (idle: no step).
        deadline = time.monotonic() + self.config.live_timeout_s
        while self.context.placement.version < result["to_version"] and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"status": result["status"], "to_version": result["to_version"],
                "experts_moved": result["experts_moved"], "seconds": time.perf_counter() - started,
                "applied": self.context.placement.version >= result["to_version"]}

    def wait_live(self, version: int, since: float) -> tuple[float, float] | None:
        deadline = since + self.config.live_timeout_s
        while time.perf_counter() < deadline:
            first = self.timer.first_step_at(version)
            if first is not None:
                return first
            time.sleep(0.005)
        return None


# --- one trial ---------------------------------------------------------------------------------------

def run_trial(stack: Stack, index: int, mode: str, workload: str) -> dict[str, Any]:
    config = stack.config
    prompts = stack.prompts(workload, config.streams, offset=index * config.streams)
    stack.driver.start(prompts, [config.max_model_len - len(p) for p in prompts], tag=f"trial{index}")
    if not stack.driver.wait_first_tokens(60):
        raise TimeoutError("streams did not start within 60 s")
    time.sleep(config.baseline_s)

    trigger = time.perf_counter()
    record = stack.coordinator.recalibrate(mode=mode, force=True, reason=f"bench trial {index}")
    returned = time.perf_counter()
    version = record["to_version"]
    applied = record["status"] == "applied"
    first = stack.wait_live(version, trigger) if applied else None
    time.sleep(config.after_s)
    steps = stack.timer.snapshot()
    finished_early, errors = stack.driver.finished_early, list(stack.driver.errors)
    stack.driver.stop()

    history = [r for r in stack.coordinator.stats_view()["recalibrations"]
               if r["to_version"] == version and r["reason"] == f"bench trial {index}"]
    coord = history[-1] if history else record
    published = stack.pool.published.get(version) if applied else None
    set_at = stack.context.applied.get(version) if applied else None
    trial = {
        "trial": index, "mode": mode, "workload": workload, "status": coord["status"],
        "from_version": coord["from_version"], "to_version": version,
        "experts_moved": coord["experts_moved"], "bytes_moved": coord["bytes_moved"],
        "coordinator_duration_s": coord["duration_s"],
        "predicted_gain_s": coord["predicted_gain_s"], "migration_cost_s": coord["migration_cost_s"],
        "recalibrate_call_s": returned - trigger,
        "trigger_to_published_s": None if published is None else published - trigger,
        "trigger_to_applied_s": None if set_at is None else set_at - trigger,
        "trigger_to_live_s": None if first is None else first[0] - trigger,
        "trigger_to_old_copies_dropped_s": next((t - trigger for t in stack.pool.dropped if t > trigger), None),
        "streams_finished_early": finished_early, "stream_errors": errors,
    }
    trial.update(step_stats(steps, trigger, first, config, since=trigger - config.baseline_s))
    return trial


def step_stats(steps, trigger: float, first: tuple[float, float] | None, config: BenchConfig,
               since: float) -> dict[str, Any]:
    """Step times of one trial: outside the migration window (decode steps), inside it, stalls. A step of the
    window is judged by its time after the trigger: the one already running when the recalibration was asked
    for counted whole, a stall begun before it (a review: 329.5 ms of which 24 ms after the trigger)."""
    steps = [s for s in steps if s[0] >= since]
    window_end = first[1] if first is not None else trigger  # not live: no window to judge
    decode = [s for s in steps if s[3] <= config.streams]
    outside = [(e - b) * 1e3 for b, e, _, _ in decode if e <= trigger or b > window_end]
    window = [s for s in steps if s[1] > trigger and s[0] <= first[0]] if first is not None else []
    median = statistics.median(outside) if outside else None
    durations = [(e - b) * 1e3 for b, e, _, _ in window]
    after_trigger = [(e - max(b, trigger)) * 1e3 for b, e, _, _ in window]
    after = [(e - b) * 1e3 for b, e, _, _ in steps if b > window_end] if first is not None else []
    begins = [b for b, _, _, _ in steps]
    intervals = [(later - earlier) * 1e3 for earlier, later in zip(begins, begins[1:])]
    outside_intervals = [ms for (b, _, _, _), ms in zip(steps[1:], intervals) if b <= trigger or b > window_end]
    window_intervals = [ms for (b, _, _, _), ms in zip(steps[1:], intervals) if trigger < b <= window_end]
    median_interval = statistics.median(outside_intervals) if outside_intervals else None
    return {
        "steps": len(steps),
        "steps_outside_window": len(outside),
        "median_step_ms": median,
        "p90_step_outside_ms": float(np.percentile(outside, 90)) if outside else None,
        "max_step_outside_ms": max(outside, default=None),
        # The background: how often a step outside the window exceeds the stall threshold anyway.
        "outside_steps_over_threshold": None if median is None else
        sum(1 for ms in outside if ms > STALL_FACTOR * median),
        "steps_in_window": len(window),
        "prefill_steps_in_window": sum(1 for s in window if s[3] > config.streams),
        "window_step_ms": [round(ms, 3) for ms in durations],
        "window_step_after_trigger_ms": [round(ms, 3) for ms in after_trigger],
        "max_step_in_migration_ms": max(after_trigger, default=None),
        "stalled_steps": None if median is None or first is None else
        sum(1 for ms in after_trigger if ms > STALL_FACTOR * median),
        # After the window (old copies are dropped in this part): steps, the longest, those over threshold.
        "steps_after_window": len(after),
        "max_step_after_window_ms": max(after, default=None),
        "steps_after_window_over_threshold": None if median is None else
        sum(1 for ms in after if ms > STALL_FACTOR * median),
        "median_step_interval_ms": median_interval,
        "max_step_interval_in_migration_ms": max(window_intervals, default=None),
        "stalled_intervals": None if median_interval is None or first is None else
        sum(1 for ms in window_intervals if ms > STALL_FACTOR * median_interval),
    }


# --- the run -----------------------------------------------------------------------------------------

def _spread(values: list[float]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "max": None, "min": None}
    return {"median": float(statistics.median(values)), "max": float(max(values)), "min": float(min(values))}


def _fraction(rows: list[dict[str, Any]], part: str, whole: str) -> float | None:
    total = sum(t[whole] for t in rows if t[part] is not None)
    return None if not total else sum(t[part] for t in rows if t[part] is not None) / total


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    live = [t for t in trials if t["trigger_to_live_s"] is not None]

    def over(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "trials": len(rows),
            "trigger_to_published_s": _spread([t["trigger_to_published_s"] for t in rows]),
            "trigger_to_applied_s": _spread([t["trigger_to_applied_s"] for t in rows]),
            "trigger_to_live_s": _spread([t["trigger_to_live_s"] for t in rows]),
            "coordinator_duration_s": _spread([t["coordinator_duration_s"] for t in rows]),
            "experts_moved": _spread([t["experts_moved"] for t in rows]),
            "median_step_ms": _spread([t["median_step_ms"] for t in rows])["median"],
            "max_step_in_migration_ms": _spread([t["max_step_in_migration_ms"] for t in rows])["max"],
            "stalled_steps": _spread([t["stalled_steps"] for t in rows]),
            "max_step_interval_in_migration_ms": _spread([t["max_step_interval_in_migration_ms"]
                                                          for t in rows])["max"],
            "stalled_intervals": _spread([t["stalled_intervals"] for t in rows]),
            "trigger_to_old_copies_dropped_s": _spread([t["trigger_to_old_copies_dropped_s"] for t in rows]),
            "outside_over_threshold_fraction": _fraction(rows, "outside_steps_over_threshold",
                                                         "steps_outside_window"),
            "window_over_threshold_fraction": _fraction(rows, "stalled_steps", "steps_in_window"),
        }

    summary = over(live)
    summary["trials_run"] = len(trials)
    summary["trials_not_live"] = [t["trial"] for t in trials if t["trigger_to_live_s"] is None]
    summary["statuses"] = {s: sum(t["status"] == s for t in trials) for s in sorted({t["status"] for t in trials})}
    summary["by_mode"] = {mode: over([t for t in live if t["mode"] == mode])
                          for mode in dict.fromkeys(t["mode"] for t in trials)}
    return summary


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    live_max = summary["trigger_to_live_s"]["max"]
    stalled_max = summary["stalled_steps"]["max"]
    every_live = not summary["trials_not_live"]
    return {
        "trigger_to_live": {
            "target": f"every migration live <= {TARGET_TRIGGER_TO_LIVE_S} s after its trigger",
            "measured_max_s": live_max, "measured_median_s": summary["trigger_to_live_s"]["median"],
            "met": bool(every_live and live_max is not None and live_max <= TARGET_TRIGGER_TO_LIVE_S)},
        "step_stall": {
            "target": f"at most {TARGET_STALLED_STEPS} step longer than {STALL_FACTOR:g}x the median during a "
                      "migration",
            "measured_max": stalled_max,
            "met": bool(every_live and stalled_max is not None and stalled_max <= TARGET_STALLED_STEPS)},
    }


def run(config: BenchConfig) -> dict[str, Any]:
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()
    stack = Stack(config)
    try:
        calibration = stack.calibrate()
        print(f"calibration: {calibration['status']} v{calibration['to_version']}, "
              f"{calibration['experts_moved']} experts moved, {calibration['seconds']:.1f} s since startup pass",
              flush=True)
        trials = []
        for index, mode in enumerate(config.modes):
            workload = config.workloads[index % len(config.workloads)]
            trials.append(run_trial(stack, index, mode, workload))
            print(_row(trials[-1]), flush=True)
        placement_version = stack.coordinator.placement.version
        served_version = stack.context.pinned_version
    finally:
        stack.close()
    summary = summarize(trials)
    return {
        "config": {**asdict(config), "model": str(config.model), "stall_factor": STALL_FACTOR,
                   "emulation": "jitter 0, no throttling, curve from fixed_s, knee_tokens, slope_s",
                   "coordinator": "CoordinatorConfig defaults, auto_recalibrate off, background loop on",
                   "recalibrate": "force=True"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
                    "torch": torch.__version__},
        "definitions": {
            "published": "coordinator made the version its placement (WorkerPool.save_record called)",
            "applied": "PlacementSync set the version on the engine's DispatchContext",
            "live": "the first engine step pinned to the version began",
            "window": "steps overlapping [trigger, end of the first step on the new version]",
            "stalled_step": f"window step longer than {STALL_FACTOR:g}x the trial's median decode step outside "
                            "the window",
            "caveat": "coordinator, workers and engine share one process and GIL here (separate processes in a "
                      "deployment): coordinator work competes with the engine's step thread",
        },
        "calibration": calibration,
        "final_versions": {"coordinator": placement_version, "engine": served_version},
        "trials": trials,
        "summary": summary,
        "targets": targets(summary),
        "seconds": time.perf_counter() - started,
    }


def _fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _row(t: dict[str, Any]) -> str:
    return (f"{t['trial']:>2} {t['mode']:<11} {t['workload']:<13} {t['status']:<8} {t['experts_moved']:>5} "
            f"{_fmt(t['coordinator_duration_s']):>8} {_fmt(t['trigger_to_published_s']):>8} "
            f"{_fmt(t['trigger_to_applied_s']):>8} {_fmt(t['trigger_to_live_s']):>8} {t['steps_in_window']:>6} "
            f"{_fmt(t['median_step_ms'], digits=1):>7} {_fmt(t['max_step_in_migration_ms'], digits=1):>8} "
            f"{'-' if t['stalled_steps'] is None else t['stalled_steps']:>7}")


HEADER = (" # mode        workload      status   moved  coord_s  publ_s  apply_s  live_s  steps  med_ms "
          " max_win  stalled")


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [HEADER, *(_row(t) for t in result["trials"]), ""]
    for name, part in [("all", s), *s["by_mode"].items()]:
        lines.append(f"{name:<11} trials {part['trials']}: trigger->published median {_fmt(part['trigger_to_published_s']['median'])} "
                     f"max {_fmt(part['trigger_to_published_s']['max'])} s; trigger->live median "
                     f"{_fmt(part['trigger_to_live_s']['median'])} max {_fmt(part['trigger_to_live_s']['max'])} s; "
                     f"median step {_fmt(part['median_step_ms'], digits=1)} ms; max step in migration "
                     f"{_fmt(part['max_step_in_migration_ms'], digits=1)} ms; stalled steps max "
                     f"{'-' if part['stalled_steps']['max'] is None else int(part['stalled_steps']['max'])} "
                     f"(steps over {STALL_FACTOR:g}x median: {_fmt(part['window_over_threshold_fraction'], 100, 0)}% "
                     f"in windows, {_fmt(part['outside_over_threshold_fraction'], 100, 0)}% outside)")
    for name, target in result["targets"].items():
        lines.append(f"target {name}: {target['target']}: {'met' if target['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder of migration.json")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="local checkpoint folder")
    parser.add_argument("--quick", action="store_true", help="one incremental trial, a short profiling pass")
    parser.add_argument("--speeds", type=float, nargs="+", default=list(BenchConfig.speeds),
                        help="emulated device speeds (one per device)")
    parser.add_argument("--modes", nargs="+", default=list(BenchConfig.modes),
                        help="recalibration mode of each trial")
    args = parser.parse_args(argv)
    config = BenchConfig(model=args.model, speeds=tuple(args.speeds), modes=tuple(args.modes))
    if args.quick:
        config = replace(config, modes=("incremental",), profile_prompts=8, baseline_s=1.0, after_s=0.5)
    result = run(config)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "migration.json"
    path.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {path} in {result['seconds']:.0f} s (load average {result['machine']['load_average_after'][0]:.1f}"
          f" on {result['machine']['cpus']} CPUs)")
    stalled = result["summary"]["stalled_steps"]["max"]
    print(f"migration trigger_to_live_s_median={_fmt(result['summary']['trigger_to_live_s']['median'])} "
          f"max_stalled_steps={'-' if stalled is None else int(stalled)}")
    return result


if __name__ == "__main__":
    main()
