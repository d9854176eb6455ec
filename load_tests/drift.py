"""Drift scenarios: `python -m load_tests.drift --out bench` (or `python -m load_tests.compare --drift`).

Owns two scenarios on the emulated cluster of `deploy/config.yaml` with the `vibe` policy. Each starts
two apps, static (`auto_recalibrate: false`) and adaptive (`true`), and sends both the same trace at the
same time, so that both see the same machine:

- workload drift: the prompts switch from prose (sharegpt_like, sonnet_like) to code `switch_s` into the
  trace;
- device drift: one emulated device throttles to 0.8x of its speed `switch_s` into the trace, in both
  apps at once, through the emulator's speed control (POST /admin/emulation/speed). `emulation.drift`
  cannot place the step there: it counts from each worker's start, which a client cannot observe and
  which differs by the minute or more it takes to start one app after the other on this machine.

"After" numbers count the requests of the trace scheduled to arrive from the switch on (the arrival decides
prose or code; each scenario's `first_after_switch` is the first such request's index; a drift.json written
before it was recorded is split by send time). Writes `<out>/drift.json` and `<out>/drift.png`
(TTFT over time with the switch and the recalibrations marked, from /admin/stats `recalibrations` and
their `started_at`). Ignores the side-by-side comparison (see `compare`), whose app start it reuses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import httpx
import numpy as np

from load_tests.compare import (
    DEFAULT,
    CompareConfig,
    app_args_for,
    busy_note,
    client_for,
    emulated,
    record_json,
    results_from_json,
    serve_apps,
    serve_options,
    unloaded_latency,
    wait_idle,
)
from load_tests.generator import (
    ClientConfig,
    Event,
    RequestResult,
    RequestSpec,
    TraceClock,
    TraceConfig,
    make_trace,
    run_trace,
)
from load_tests.slo import SLO, meets, single_stream_rate, summarize
from load_tests.workloads import CODE, PROSE, load_workloads

SCENARIOS = ("workload", "device")
MODES = ("static", "adaptive")


@dataclass(frozen=True)
class DriftConfig:
    """The drift scenarios.

    Attributes:
        policy: placement policy of every app.
        rate_rps: request rate of each app's trace (both apps of a scenario are loaded at once); None:
            `rate_multiplier` x the single-stream rate of the unloaded latency measured here.
        duration_s: arrivals span this many seconds.
        switch_s: seconds into the trace when the prompts switch (workload) or the throttle is due (device).
        throttled_device, throttle_to: the device drift: device index and its speed multiplier.
        warmup_s: a warm-up trace of prose prompts before the measured trace.
        max_tokens_cap: as in the side-by-side run.
        seed: trace seed (the same trace for static and adaptive).
        slo_factors: (TTFT, TPOT) SLOs as multiples of the unloaded medians.
    """

    policy: str = "vibe"
    rate_rps: float | None = None
    rate_multiplier: float = 1.25
    duration_s: float = 100.0
    switch_s: float = 40.0
    throttled_device: int = 0
    throttle_to: float = 0.8
    warmup_s: float = 20.0
    max_tokens_cap: int | None = DEFAULT.max_tokens_cap
    seed: int = 7
    slo_factors: tuple[float, float] = (DEFAULT.ttft_factor, DEFAULT.tpot_factor)

    def __post_init__(self) -> None:
        if not 0 < self.switch_s < self.duration_s:
            raise ValueError(f"switch_s must lie in (0, duration_s={self.duration_s}), got {self.switch_s}")
        for name in ("rate_multiplier", "warmup_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DriftConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.rate_rps is not None and not self.rate_rps > 0:
            raise ValueError(f"DriftConfig.rate_rps must be > 0 or None, got {self.rate_rps!r}")
        if not 0 < self.throttle_to <= 1:
            raise ValueError(f"DriftConfig.throttle_to must be in (0, 1], got {self.throttle_to!r}")


def scenario_args(scenario: str, mode: str, config: DriftConfig, base: CompareConfig = DEFAULT) -> dict:
    """build_app arguments of one (scenario, mode) app: the side-by-side run's (`base`: its deploy config and
    overrides) with the scenario's policy and recalibration."""
    args = app_args_for(config.policy, base, f"drift-{scenario}-{mode}")
    args["auto_recalibrate"] = mode == "adaptive"
    return args


def throttle_event(client: ClientConfig, args: dict, config: DriftConfig) -> Event:
    """The device drift: the throttled device's emulated speed set to throttle_to x its configured speed."""
    from deploy.app import AppArgs

    speed = AppArgs.model_validate(args).speeds[config.throttled_device] * config.throttle_to

    async def throttle() -> None:
        async with httpx.AsyncClient(base_url=client.base_url, timeout=60) as http:
            response = await http.post("/admin/emulation/speed", json={"device": config.throttled_device,
                                       "speed": speed}, headers={"Authorization": f"Bearer {client.admin_token}"})
            response.raise_for_status()

    return Event(f"device {config.throttled_device} speed -> {speed:.3f}", config.switch_s, throttle)


def first_after_switch(trace: list[RequestSpec], switch_s: float) -> int:
    """Index of the first request of `trace` scheduled to arrive at or after `switch_s` (its length if none): the
    scheduled arrival, not the send, decides prose or code (`make_trace`), and both apps share it."""
    return next((spec.index for spec in trace if spec.arrival_s >= switch_s), len(trace))


def segments(results: list[RequestResult], slo: SLO, switch_s: float, duration_s: float,
             first_after: int | None = None) -> dict:
    """Summaries of the requests before and from the switch on (None for an empty segment): by index, from
    `first_after` (`first_after_switch`) on; without it (a drift.json written before it was recorded), by send time."""
    after = [(r.index >= first_after if first_after is not None else r.sent_s >= switch_s) for r in results]
    parts = {"before": ([r for r, a in zip(results, after) if not a], switch_s),
             "after": ([r for r, a in zip(results, after) if a], duration_s - switch_s)}
    return {name: summarize(rs, slo, span) if rs else None for name, (rs, span) in parts.items()}


class DriftRun:
    """Runs the scenarios; the first scenario's apps set the SLO and the rate (two apps loaded at once,
    the condition of every drift run), the second reuses them."""

    def __init__(self, config: DriftConfig, out: Path, progress: bool, base: CompareConfig = DEFAULT,
                 address: str | None = None) -> None:
        self.config = config
        self.base = base
        self.address = address
        self.out = out
        self.progress = progress
        self.slo: SLO | None = None
        self.rate = config.rate_rps
        self.result: dict = {"config": asdict(config), "deploy_config": base.deploy_config, "app_args": base.app_args,
                             "scenarios": {}}

    @cached_property
    def prompts(self) -> dict:
        return load_workloads((*PROSE, *CODE))

    def trace_config(self, scenario: str, rate: float, warmup: bool = False) -> TraceConfig:
        cfg = self.config
        if warmup:
            return TraceConfig(rate, cfg.warmup_s, ((0.0, PROSE),), cfg.seed + 1000, cfg.max_tokens_cap)
        phases = ((0.0, PROSE),) if scenario == "device" else ((0.0, PROSE), (cfg.switch_s, CODE))
        return TraceConfig(rate, cfg.duration_s, phases, cfg.seed, cfg.max_tokens_cap)

    def run(self, scenario: str) -> dict:
        """Both modes of one scenario, loaded at the same time; returns {mode: run}."""
        apps = {mode: scenario_args(scenario, mode, self.config, self.base) for mode in MODES}
        with serve_apps({args["app_name"]: args for args in apps.values()}, address=self.address,
                        serve_options=serve_options(self.base.deploy_config)) as (bases, startup_s):
            modes, first_after = asyncio.run(self._measure(scenario, apps, dict(zip(MODES, bases.values()))))
        self.result["scenarios"][scenario] = {"startup_s": startup_s, "first_after_switch": first_after, **modes}
        self.save()
        return modes

    async def _measure(self, scenario: str, apps: dict[str, dict], bases: dict[str, str]) -> tuple[dict, int]:
        """{mode: run} and the index of the first request scheduled from the switch on."""
        cfg = self.config
        clients = {mode: await client_for(base) for mode, base in bases.items()}
        if self.slo is None or self.rate is None:
            await self._unloaded(scenario, clients)
        warm = make_trace(self.trace_config(scenario, self.rate, warmup=True), self.prompts)
        await asyncio.gather(*(run_trace(c, warm, progress=False) for c in clients.values()))
        for mode, client in clients.items():
            if not await wait_idle(client.base_url):
                self.result.setdefault("notes", []).append(f"{scenario} {mode}: {busy_note('the warm-up')}")
        trace = make_trace(self.trace_config(scenario, self.rate), self.prompts)
        first_after = first_after_switch(trace, cfg.switch_s)
        events = {m: [throttle_event(c, apps[m], cfg)] if scenario == "device" else [] for m, c in clients.items()}
        clock = TraceClock(len(clients))  # (the same trace at the same time: one start)
        records = await asyncio.gather(*(run_trace(c, trace, desc=f"{scenario} {m}", progress=self.progress,
                                                   events=events[m], clock=clock) for m, c in clients.items()))
        entries = {}
        for mode, record in zip(clients, records):
            entries[mode] = record_json(record, summary=summarize(record.results, self.slo, record.duration_s,
                                                                  window_s=cfg.duration_s),
                                        segments=segments(record.results, self.slo, cfg.switch_s, cfg.duration_s,
                                                          first_after))
            after = entries[mode]["segments"]["after"] or {}
            print(f"  {scenario:>8} {mode:>8} after the switch: attainment={after.get('attainment')} "
                  f"p90_ttft_ms={after.get('ttft_p90_ms')} recalibrations={len(record.recalibrations)} "
                  f"applied={applied(record.recalibrations)}", flush=True)
        return entries, first_after

    async def _unloaded(self, scenario: str, clients: dict[str, ClientConfig]) -> None:
        """Unloaded latency of the apps (one request at a time each, both at once; pooled): sets the SLO and
        the rate where not given."""
        cfg = self.config
        probe = make_trace(TraceConfig(1.0, 60.0, ((0.0, PROSE),), cfg.seed + 2000, cfg.max_tokens_cap), self.prompts)
        found = await asyncio.gather(*(unloaded_latency(c, probe, DEFAULT.unloaded_requests, DEFAULT.unloaded_max_tokens)
                                       for c in clients.values()))
        unloaded = [r for results in found for r in results]
        if self.slo is None:
            self.slo = SLO.from_unloaded(unloaded, *cfg.slo_factors, DEFAULT.target)
            self.result["slo"] = asdict(self.slo) | {"set_by": f"{scenario} apps, unloaded, pooled"}
        if self.rate is None:
            outputs = [min(p.max_tokens, cfg.max_tokens_cap or p.max_tokens) for n in PROSE for p in self.prompts[n]]
            self.rate = cfg.rate_multiplier * single_stream_rate(unloaded, sum(outputs) / len(outputs))
        self.result["rate_rps"] = self.rate

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "drift.json").write_text(json.dumps(self.result, separators=(",", ":")))


def run_all(out: Path, config: DriftConfig = DriftConfig(), *, progress: bool = True, base: CompareConfig = DEFAULT,
            address: str | None = None) -> dict:
    """Both scenarios (apps as `base` builds them, on the cluster at `address`: see `compare.serve_apps`); writes
    drift.json and drift.png; returns the result. The device scenario throttles an emulated device: ValueError
    for a `base` whose devices are not emulated."""
    from load_tests import plots

    if not emulated(app_args_for(config.policy, base, "drift")):
        raise ValueError("the drift scenarios need emulated devices (the device drift throttles one through the "
                         "emulator): run them on an emulated config")
    runner = DriftRun(config, out, progress, base, address)
    for scenario in SCENARIOS:
        print(f"== drift: {scenario}", flush=True)
        runner.run(scenario)
    plots.drift_timeline(runner.result, out / "drift.png")
    return runner.result


def applied(recalibrations: list[dict]) -> int:
    """How many of an app's recalibration records were applied (the others were judged and skipped)."""
    return sum(r.get("status") == "applied" for r in recalibrations)


# Each scenario's own cause, as the coordinator begins the reasons of the re-plans it causes ("workload drift: layer
# 3 cosine distance ...", "device drift: device 0 at 1.26x ..."); any other reason (admin, a lost device) is "other".
CAUSES = {"workload": "workload drift", "device": "device drift"}
CAUSE_NAMES = ("workload drift", "device drift", "other")


def cause(record: dict) -> str:
    """The cause of one recalibration record, from its reason: one of CAUSE_NAMES."""
    reason = record.get("reason") or ""
    return next((c for c in CAUSE_NAMES[:-1] if reason.startswith(c)), "other")


# A difference between static and adaptive counts when a test this significant finds it (two-sided): after the
# switch each app has some 40 requests, and one request's miss decided the verdict (41/41 against 40/41 read as a
# loss, the mirror case as a win; their 95% intervals overlap).
SIGNIFICANCE = 0.05
# Sign-flip tests enumerate every flip up to this many blocks (2^16 sums), and draw FLIP_DRAWS flips beyond.
EXACT_BLOCKS = 16
FLIP_DRAWS = 100_000
# The difference-in-differences test enumerates every assignment of blocks to the two windows up to this many.
EXACT_RELABELLINGS = 2 ** 16
_DRAW_CHUNK = 10_000  # (relabellings drawn this many at a time: a few MB)


def block_length(pairs: int) -> int:
    """Consecutive pairs the tests flip together: the cube root of their number, rounded up (the rate at which a
    block bootstrap's blocks grow with the sample, Hall, Horowitz and Jing 1995). Requests sent close in time share
    the machine's load, so their differences are not independent: the committed workload scenario's TTFT
    differences correlate 0.46 with the next request's, 0.05 two requests on."""
    return max(1, int(np.ceil(pairs ** (1 / 3) - 1e-9)))


def block_sign_flip_p(scores: np.ndarray, block: int, seed: int = 0) -> float:
    """Two-sided p-value that ``scores`` (per pair, in time order) are symmetric about 0, each block of ``block``
    consecutive pairs flipping its sign together: the null distribution of the scores' sum over every assignment of
    signs to blocks (exact up to `EXACT_BLOCKS` blocks, else `FLIP_DRAWS` seeded draws, the observed one counted).
    With ``block`` 1 it is the exact sign-flip test: on signed ranks Wilcoxon's signed-rank test, on +1 / -1 for
    the pairs only one app served within the SLO McNemar's exact test. Dependence within a block (requests that
    shared the machine's load) does not make it lean small; dependence across blocks still would."""
    scores = np.asarray(scores, dtype=float)
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    sums = np.add.reduceat(scores, np.arange(0, scores.size, block)) if scores.size else scores
    sums = sums[sums != 0]  # (a block summing to 0 flips to itself)
    observed = abs(sums.sum())
    if sums.size == 0 or observed == 0:
        return 1.0
    tolerance = 1e-9 * np.abs(sums).sum()
    if sums.size <= EXACT_BLOCKS:
        signs = 1 - 2 * ((np.arange(2 ** sums.size)[:, None] >> np.arange(sums.size)) & 1)
        return float(np.mean(np.abs(signs @ sums) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    flipped = np.abs(rng.choice((-1.0, 1.0), size=(FLIP_DRAWS, sums.size)) @ sums)
    return float((1 + np.count_nonzero(flipped >= observed - tolerance)) / (1 + FLIP_DRAWS))


def block_permutation_p(before: np.ndarray, after: np.ndarray, block: int, seed: int = 0) -> tuple[float, float]:
    """Two-sided p-value that two windows' per-pair scores (each in time order) come from one distribution, and the
    shift between them: the pooled scores ranked (ties averaged), the mean rank of each block of ``block`` consecutive
    pairs within each window (a window's last block may be shorter), and the after window's mean block rank minus the
    before window's, against its distribution over every assignment of the blocks to the windows (exact up to
    `EXACT_RELABELLINGS` assignments, else `FLIP_DRAWS` seeded draws, the observed one counted). As in
    `block_sign_flip_p`, a stretch of requests that one load spike moved counts as one event. Returns (p, shift in
    ranks); (1.0, 0.0) when a window has no pairs."""
    from itertools import combinations
    from math import comb

    from scipy.stats import rankdata

    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.size == 0 or after.size == 0:
        return 1.0, 0.0
    ranks = rankdata(np.concatenate([before, after]))

    def block_means(r: np.ndarray) -> np.ndarray:
        starts = np.arange(0, r.size, block)
        return np.add.reduceat(r, starts) / np.diff(np.append(starts, r.size))

    values = np.concatenate([block_means(ranks[:before.size]), block_means(ranks[before.size:])])
    n, k = values.size, values.size - block_means(ranks[:before.size]).size  # k: the after window's blocks
    total = values.sum()

    def shift(after_sums: np.ndarray) -> np.ndarray:
        return after_sums / k - (total - after_sums) / (n - k)

    observed = float(shift(values[n - k:].sum()))
    tolerance = 1e-9 * np.abs(values).sum()
    if comb(n, k) <= EXACT_RELABELLINGS:
        sums = values[np.array(list(combinations(range(n), k)))].sum(axis=1)
        return float(np.mean(np.abs(shift(sums)) >= abs(observed) - tolerance)), observed
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, FLIP_DRAWS, _DRAW_CHUNK):
        drawn = rng.permuted(np.tile(values, (min(_DRAW_CHUNK, FLIP_DRAWS - start), 1)), axis=1)
        extreme += int(np.count_nonzero(np.abs(shift(drawn[:, :k].sum(axis=1))) >= abs(observed) - tolerance))
    return float((1 + extreme) / (1 + FLIP_DRAWS)), observed


def verdicts(result: dict) -> dict[str, dict]:
    """Per scenario: after-switch attainment and P90 TTFT / TPOT, static vs adaptive, and the verdict on adaptive.

    Both apps get the same trace at the same time, so request i is the same prompt, sent at the same moment, on the
    same machine: the tests are paired by request (`paired`; tests for two independent samples let the spread of
    prompt lengths hide a difference on nearly every request: the committed workload scenario's TTFTs correlate
    0.92 between the apps, and Mann-Whitney gave p=0.30 where the paired test gives 0.003). `win` or `loss` when
    attainment differs significantly (McNemar's test on the requests one app served within the SLO and the other
    did not, p < SIGNIFICANCE), else when the TTFTs do (Wilcoxon's signed-rank test on each request's adaptive minus
    static TTFT, a failure as slower than any TTFT, the direction the signed ranks' sum; a win also needs a P90
    TPOT no higher, a shorter TTFT bought with a longer TPOT being no win, and an attainment no lower), else `within
    noise` (`adaptive_wins`: a win). Requests close in time share the machine's load, so both tests flip the signs
    of `block_length` consecutive pairs together (`block_sign_flip_p`): a stretch of requests that one load spike
    slowed in one app counts as one event, not as many (tests treating each pair as independent gave p-values that
    leant small).

    The same tests run on the requests before the switch (`before_...`): a difference already there is no drift's
    doing (the committed workload scenario's adaptive app re-planned on prose 16 s before the switch). A win (loss)
    stands when the before window shows no significant difference in its direction, or when it does and the
    difference-in-differences test (`did_ttft_p`, `block_permutation_p` on the per-pair TTFT differences, after
    against before, blocks of the larger window's block length) finds the difference significantly larger after
    the switch; else the verdict is `within noise`, `reason` saying that the difference predates the switch. A
    scenario whose scheduled event failed in either app (the device was never throttled) is `invalid`, neither
    win nor loss, its `failed_events` and `reason` saying which.

    Also the adaptive app's recalibrations from the switch on: those it judged and those it applied, in all and
    by cause (`cause`; `exercised`: at least one re-plan of the scenario's own cause, `CAUSES`, applied from the
    switch on; None for a scenario of another name) (`..._whole_run`: all that started during the measured trace;
    the generator leaves out those before it, such as the startup calibration and the warm-up's). `split_by`:
    whether before and after were told apart by scheduled arrival (`first_after_switch` recorded) or by send time
    (a drift.json written before it was)."""
    out = {}
    switch_s = result.get("config", {}).get("switch_s", 0.0)
    for scenario, entry in result["scenarios"].items():
        if not all(entry.get(mode, {}).get("segments", {}).get("after") for mode in MODES):
            continue
        slo = SLO(**{k: v for k, v in result["slo"].items() if k in ("ttft_s", "tpot_s", "target")})
        after = {mode: entry[mode]["segments"]["after"] for mode in MODES}
        first_after = entry.get("first_after_switch")
        static, adaptive = paired(entry["static"], entry["adaptive"], switch_s, first_after)
        before_static, before_adaptive = paired(entry["static"], entry["adaptive"], switch_s, first_after, "before")
        now, was = _paired_tests(static, adaptive, slo), _paired_tests(before_static, before_adaptive, slo)
        verdict = "within noise"
        if now["attainment_p"] < SIGNIFICANCE:
            verdict = "win" if now["attainment_sign"] > 0 else "loss"
        ttft_p = None
        if verdict == "within noise" and now["ttft_p"] is not None:
            ttft_p = now["ttft_p"]
            tpot = {m: a["tpot_p90_ms"] or float("inf") for m, a in after.items()}
            if ttft_p < SIGNIFICANCE and now["ttft_sign"] < 0:
                if tpot["adaptive"] <= tpot["static"] and now["gained"] >= now["lost"]:
                    verdict = "win"
            elif ttft_p < SIGNIFICANCE:
                verdict = "loss"
        # difference in differences: the per-pair TTFT differences after the switch against those before it
        slower, _ = _ttft_differences(before_static + static, before_adaptive + adaptive)
        did_block = max(was["block"], now["block"])
        did_p, did_shift = (block_permutation_p(slower[:len(before_static)], slower[len(before_static):], did_block)
                            if before_static and static else (None, 0.0))
        reason = None
        if verdict in ("win", "loss") and verdict in _significant_directions(was):
            word = "better" if verdict == "win" else "worse"
            grew = did_p is not None and did_p < SIGNIFICANCE and (did_shift < 0) == (verdict == "win")
            if grew:
                reason = (f"adaptive was {word} before the switch too, but significantly more so after it (difference "
                          f"in differences p={_p(did_p)})")
            else:
                reason = (f"the difference predates the switch: adaptive was {word} before it too, and not "
                          f"significantly more so after it (difference in differences p={_p(did_p)}); the {verdict} "
                          "after the switch is not credited")
                verdict = "within noise"
        # a scheduled event that failed (the throttle's admin call): the scenario did not happen as planned
        failed = [f"{m}: {e['name']}: {e['error']}" for m in MODES for e in entry[m].get("events", []) if e.get("error")]
        if failed:
            verdict = "invalid"
            reason = "a scheduled event failed, so the scenario did not happen as planned: " + "; ".join(failed)
        records = entry["adaptive"]["recalibrations"]
        since = entry["adaptive"].get("started_wall", float("-inf")) + switch_s
        later = [r for r in records if r.get("started_at", float("inf")) >= since]
        applied_by_cause = {c: applied([r for r in later if cause(r) == c]) for c in CAUSE_NAMES}
        own = CAUSES.get(scenario)
        out[scenario] = {**{f"{m}_{k}": after[m][k] for m in MODES for k in ("attainment", "ttft_p90_ms",
                                                                             "tpot_p90_ms")},
                         "adaptive_wins": verdict == "win", "verdict": verdict, "reason": reason,
                         "split_by": "send time" if first_after is None else "scheduled arrival",
                         "pairs": now["pairs"], "block": now["block"],
                         "within_slo_only_adaptive": now["gained"], "within_slo_only_static": now["lost"],
                         "attainment_p": now["attainment_p"], "ttft_p": ttft_p,
                         "median_ttft_difference_ms": now["median_ms"],
                         "before_pairs": was["pairs"], "before_block": was["block"],
                         "before_attainment_p": was["attainment_p"], "before_ttft_p": was["ttft_p"],
                         "before_median_ttft_difference_ms": was["median_ms"],
                         "did_ttft_p": did_p, "did_block": did_block,
                         "failed_events": failed,
                         "recalibrations_adaptive": len(later), "recalibrations_applied_adaptive": applied(later),
                         "recalibrations_adaptive_by_cause": {c: sum(cause(r) == c for r in later) for c in CAUSE_NAMES},
                         "recalibrations_applied_adaptive_by_cause": applied_by_cause,
                         "cause": own, "exercised": None if own is None else applied_by_cause[own] > 0,
                         "recalibrations_adaptive_whole_run": len(records),
                         "recalibrations_applied_adaptive_whole_run": applied(records)}
    return out


def _paired_tests(static: list[RequestResult], adaptive: list[RequestResult], slo: SLO) -> dict:
    """The paired tests of one window of pairs (`verdicts`): attainment on +1 / -1 for the pairs only adaptive / only
    static served within the SLO, TTFT on the signed ranks of adaptive's TTFT minus static's (None when no pair
    differs), both by `block_sign_flip_p`; the signs of their sums (attainment: > 0 adaptive better; TTFT: < 0
    adaptive faster) and the median TTFT difference over the pairs both completed (ms; None without one)."""
    from scipy.stats import rankdata

    block = block_length(len(static))
    met = (np.array([meets(a, slo) for a in adaptive], dtype=int)
           - np.array([meets(s, slo) for s in static], dtype=int))
    slower, completed = _ttft_differences(static, adaptive)
    differ = slower != 0
    signed = np.zeros_like(slower)  # signed ranks of the non-zero differences (zeros left out, as Wilcoxon's)
    signed[differ] = np.sign(slower[differ]) * rankdata(np.abs(slower[differ]))
    return {"pairs": len(static), "block": block, "gained": int(np.count_nonzero(met > 0)),
            "lost": int(np.count_nonzero(met < 0)), "attainment_p": block_sign_flip_p(met, block),
            "attainment_sign": int(np.sign(met.sum())),
            "ttft_p": block_sign_flip_p(signed, block) if differ.any() else None,
            "ttft_sign": int(np.sign(signed.sum())),
            "median_ms": float(np.median(slower[completed])) * 1e3 if completed.any() else None}


def _significant_directions(tests: dict) -> set[str]:
    """"win" / "loss" for each of a window's tests that found adaptive significantly better / worse."""
    found = set()
    if tests["attainment_p"] < SIGNIFICANCE and tests["attainment_sign"]:
        found.add("win" if tests["attainment_sign"] > 0 else "loss")
    if tests["ttft_p"] is not None and tests["ttft_p"] < SIGNIFICANCE and tests["ttft_sign"]:
        found.add("win" if tests["ttft_sign"] < 0 else "loss")
    return found


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def paired(static: dict, adaptive: dict, switch_s: float, first_after: int | None = None,
           window: str = "after") -> tuple[list[RequestResult], list[RequestResult]]:
    """The two apps' results for the same requests of the trace (by index), in the trace's order ([] and [] without
    results): of `window` "after" those from the switch on, of "before" the others. From the switch on: from index
    `first_after` on (`first_after_switch`: the first request scheduled to arrive from the switch on, as `segments`
    splits); without it (a drift.json written before it was recorded), those either app sent from the switch on."""
    if window not in ("after", "before"):
        raise ValueError(f"window must be 'after' or 'before', got {window!r}")
    if "results" not in static or "results" not in adaptive:
        return [], []
    by_index = [{r.index: r for r in results_from_json(e)} for e in (static, adaptive)]

    def is_after(i: int) -> bool:
        if first_after is not None:
            return i >= first_after
        return max(by_index[0][i].sent_s, by_index[1][i].sent_s) >= switch_s

    both = sorted(i for i in by_index[0].keys() & by_index[1].keys() if is_after(i) == (window == "after"))
    return [by_index[0][i] for i in both], [by_index[1][i] for i in both]


def _ttft_differences(static: list[RequestResult], adaptive: list[RequestResult]) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive's TTFT minus static's per pair, and where both requests completed. A failed request (no TTFT) counts
    as slower than any TTFT: a failure against a success is the largest difference in that direction (for the
    ranks), two failures tie (0)."""
    ttft = np.array([[np.inf if r.error is not None or r.ttft_s is None else r.ttft_s for r in rs]
                     for rs in (static, adaptive)], dtype=float).reshape(2, -1)
    completed = np.isfinite(ttft).all(axis=0)
    finite = ttft[np.isfinite(ttft)]
    ttft[~np.isfinite(ttft)] = 2.0 * (np.abs(finite).max() if finite.size else 1.0) + 1.0
    return ttft[1] - ttft[0], completed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.drift", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--rate", type=float, help="request rate per app, req/s (default: from the single-stream rate)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = DriftConfig() if args.rate is None else replace(DriftConfig(), rate_rps=args.rate)
    result = run_all(args.out, config, progress=not args.no_progress)
    for scenario, verdict in verdicts(result).items():
        print(f"drift={scenario} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in verdict.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
