"""An emulated device: how long expert calls would take on a GPU with a given speed, drift and throttling.

Owns the emulated latency curve (flat up to a knee, then linear), the device timeline on which
concurrent callers queue as on one GPU, scheduled speed drift, and load-dependent throttling driven by
an exponentially weighted duty cycle (as a power-capped GPU lowers its clocks under sustained load).
Ignores the expert computation itself: the worker computes real outputs and holds its reply until the
emulated end time. Nothing outside the worker may read these parameters (the placement side learns a
device only by profiling and observed timings); the only way in from outside is an explicit
emulation control (`ExpertWorker.set_emulated_speed`).

    seconds(n) = curve(n) / max(speed * drift(t) * throttle(duty), MIN_SPEED) * jitter
    curve(n)   = 0 (n == 0), fixed_s (0 < n <= knee_tokens), fixed_s + slope_s * (n - knee_tokens) beyond
    throttle   = 1 - (1 - throttle_floor) * duty,   duty in [0, 1]
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from placement.device_model import DeviceModel

# The slowest an emulated device runs: a hundredth of the reference curve (a base speed or `set_speed` below it is
# refused; drift and throttling never take the effective speed below it). Slower would make one expert call take
# seconds to years, beyond every timeout, where no real GPU goes.
MIN_SPEED = 0.01


@dataclass(frozen=True)
class EmulationConfig:
    """Parameters of one emulated device.

    Attributes:
        speed: relative speed, 1.0 = the reference curve below; 0.8 = every call takes 1/0.8 as long; at
            least MIN_SPEED.
        fixed_s: seconds of one expert call up to the knee, at speed 1.0.
        knee_tokens: tokens per expert call where the curve turns linear.
        slope_s: seconds per token beyond the knee at speed 1.0; None = fixed_s / knee_tokens.
        jitter: relative standard deviation of each call's time (log-normal, mean 1).
        drift: ((seconds_after_start, speed_multiplier), ...) steps, times strictly increasing; the
            multiplier of the latest step reached applies (1.0 before the first).
        throttle_floor: speed multiplier at a sustained 100% duty cycle (1.0 = no throttling).
        throttle_tau_s: time constant of the exponentially weighted duty cycle, seconds.
        seed: seed of the jitter.
    """

    speed: float = 1.0
    fixed_s: float = 4e-4
    knee_tokens: float = 128.0
    slope_s: float | None = None
    jitter: float = 0.02
    drift: tuple[tuple[float, float], ...] = ()
    throttle_floor: float = 1.0
    throttle_tau_s: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.speed >= MIN_SPEED, "speed", self.speed, f">= {MIN_SPEED}")
        _require(self.fixed_s >= 0, "fixed_s", self.fixed_s, ">= 0")
        _require(self.knee_tokens >= 0, "knee_tokens", self.knee_tokens, ">= 0")
        if self.slope_s is None:
            _require(self.knee_tokens > 0, "knee_tokens", self.knee_tokens, "> 0 when slope_s is None")
            object.__setattr__(self, "slope_s", self.fixed_s / self.knee_tokens)
        _require(self.slope_s >= 0, "slope_s", self.slope_s, ">= 0")
        _require(0 <= self.jitter < 1, "jitter", self.jitter, "in [0, 1)")
        _require(0 < self.throttle_floor <= 1, "throttle_floor", self.throttle_floor, "in (0, 1]")
        _require(self.throttle_tau_s > 0, "throttle_tau_s", self.throttle_tau_s, "> 0")
        object.__setattr__(self, "drift", tuple((float(t), float(m)) for t, m in self.drift))
        times = [t for t, _ in self.drift]
        _require(all(t >= 0 for t in times) and times == sorted(set(times)), "drift", self.drift,
                 "with times >= 0 and strictly increasing")
        _require(all(m > 0 and math.isfinite(m) for _, m in self.drift), "drift", self.drift,
                 "with finite multipliers > 0")

    def curve(self) -> DeviceModel:
        """The per-expert latency curve at speed 1.0."""
        return DeviceModel(self.fixed_s, self.knee_tokens, self.slope_s)


def _require(ok: bool, name: str, value, constraint: str) -> None:
    if not (ok and np.all(np.isfinite(np.asarray(value, dtype=np.float64)))):
        raise ValueError(f"EmulationConfig.{name} must be finite and {constraint}, got {value!r}")


class DeviceEmulator:
    """Emulated time of expert calls on one device; thread-safe.

    All times are seconds on `clock` (default time.monotonic); `now` arguments default to clock().
    The device timeline is serial: a call reserved while the device is busy starts when it frees.
    """

    def __init__(self, config: EmulationConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._curve = config.curve()
        self._rng = np.random.default_rng(config.seed)
        self._lock = threading.Lock()
        self._start = clock()
        self._speed = config.speed
        self._free_at = self._start
        self._busy: deque[tuple[float, float]] = deque()  # reserved [begin, end) not yet folded into duty
        self._duty = 0.0
        self._duty_at = self._start

    def expert_seconds(self, counts: np.ndarray, now: float | None = None) -> np.ndarray:
        """Emulated seconds [k] of expert calls with `counts` [k] tokens each, at the speed the device
        will have when a call arriving at `now` starts (after the calls already queued)."""
        counts = np.asarray(counts, dtype=np.float64).reshape(-1)
        with self._lock:
            begin = max(self._now(now), self._free_at)
            speed = self._effective_speed(begin)
            noise = self._rng.standard_normal(counts.size)
        sigma = self.config.jitter
        return self._curve.latency(counts) / speed * np.exp(sigma * noise - 0.5 * sigma**2)

    def reserve(self, total: float, now: float | None = None) -> float:
        """Occupy the device for `total` seconds from max(now, end of the queue); returns the end time."""
        if not total >= 0:
            raise ValueError(f"reserved time must be >= 0 seconds, got {total!r}")
        with self._lock:
            begin = max(self._now(now), self._free_at)
            self._free_at = begin + total
            if total > 0:
                self._busy.append((begin, self._free_at))
            return self._free_at

    def set_speed(self, factor: float) -> None:
        """Replace the base speed (EmulationConfig.speed) from now on; drift and throttling still apply."""
        if not (math.isfinite(factor) and factor >= MIN_SPEED):
            raise ValueError(f"emulated speed must be finite and >= {MIN_SPEED}, got {factor!r}")
        with self._lock:
            self._speed = float(factor)

    def effective_speed(self, now: float | None = None) -> float:
        """Base speed x drift step x throttle at `now` (1.0 = the reference curve), at least MIN_SPEED."""
        with self._lock:
            return self._effective_speed(self._now(now))

    def duty_cycle(self, now: float | None = None) -> float:
        """Exponentially weighted busy fraction in [0, 1] at `now` (time constant throttle_tau_s)."""
        with self._lock:
            return self._advance_duty(self._now(now))

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    def _effective_speed(self, now: float) -> float:
        throttle = 1.0 - (1.0 - self.config.throttle_floor) * self._advance_duty(now)
        return max(self._speed * self._drift(now - self._start) * throttle, MIN_SPEED)

    def _drift(self, elapsed: float) -> float:
        multiplier = 1.0
        for after_s, step in self.config.drift:
            if elapsed >= after_s:
                multiplier = step
        return multiplier

    def _advance_duty(self, now: float) -> float:
        """Fold busy and idle time up to `now` into the duty cycle (exact for piecewise-constant load).

        A time earlier than the last fold (a caller's stale `now`) reads the current value unchanged.
        """
        tau = self.config.throttle_tau_s
        while self._duty_at < now:
            if self._busy and self._busy[0][1] <= self._duty_at:
                self._busy.popleft()  # folded already, or reserved with a stale `now`
            elif self._busy and self._busy[0][0] <= self._duty_at:
                end = min(self._busy[0][1], now)
                self._duty = 1.0 - (1.0 - self._duty) * math.exp(-(end - self._duty_at) / tau)
                self._duty_at = end
            else:
                end = min(self._busy[0][0], now) if self._busy else now
                self._duty *= math.exp(-(end - self._duty_at) / tau)
                self._duty_at = end
        return self._duty
