"""Drift detection: when the workload or the devices no longer match what the placement was made for.

Owns two detectors (README, Design: "Recalibration"): workload drift, the paper's Algorithm 2 trigger (cosine distance
between a sliding window of router counts and the reference loads) and ours next to it (the router load
of a typical pass rising or falling by a factor: the batch size, which the cosine cannot see), and
device drift, ours (observed vs predicted expert time per device). Plain classes with no clocks or
threads: callers feed them forward passes and timing samples and act on what they report. Knows nothing
of placements or of how recalibration is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float [L]: 1 - cos(a[l], b[l]) per row of two [L, E] arrays.

    Rows where either side is all zero give 0: without load there is nothing to compare. ValueError on a
    NaN or infinite entry (its row would read as 0, "no drift").
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [L, E] arrays of the same shape, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("cosine_distance needs finite loads")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide((a * b).sum(axis=1), norms, out=np.ones(a.shape[0]), where=norms > 0)
    return np.clip(1.0 - cos, 0.0, 2.0)


@dataclass(frozen=True, eq=False)
class DriftReport:
    """What a workload drift check found.

    Attributes:
        distances: float [L]; cosine distance of each layer's window-mean loads to the reference.
        worst_layer: index of the largest distance.
        window_mean: float [L, E]; mean router counts per pass over the window (the new reference).
        num_passes: passes observed when the check ran.
        volume_ratio: the window's volume (median router load per pass, `WorkloadDriftDetector.volume`)
            over the reference's; None while either is unknown.
        causes: what was found: "routing" (a layer's distance beyond the threshold) and/or "volume" (the
            volume ratio beyond the volume factor, either way).
    """

    distances: np.ndarray
    worst_layer: int
    window_mean: np.ndarray
    num_passes: int
    volume_ratio: float | None
    causes: tuple[str, ...]

    @property
    def worst_distance(self) -> float:
        return float(self.distances[self.worst_layer])

    def summary(self) -> str:
        """What drifted, in words: "layer 2 cosine distance 0.081; median router load per pass 3.90x the
        reference's"."""
        parts = []
        if "routing" in self.causes:
            parts.append(f"layer {self.worst_layer} cosine distance {self.worst_distance:.3f}")
        if "volume" in self.causes:
            parts.append(f"median router load per pass {self.volume_ratio:.2f}x the reference's")
        return "; ".join(parts)


@dataclass(frozen=True)
class WorkloadDriftConfig:
    """Settings of the workload drift trigger (the paper's values as defaults).

    Attributes:
        check_every: passes between checks (H), >= 1.
        window: passes in the sliding window of router counts, >= 1.
        threshold: cosine distance in (0, 1) above which a layer has drifted.
        cooldown: passes after a `reset` before a report can be made again, >= 0; after a `cool_down`,
            doubled with each cool-down since the last reset (from at least `check_every`), up to `window` passes.
        volume_factor: the window's volume (median router load per pass) more than this factor above or
            below the reference's is drift too (> 1; inf: never). Ours, not the paper's: the cosine of the
            mean loads does not change with the batch size, but which experts are called in a pass, and so
            the best placement, does. Placement simulator, served model on the default cluster, vibe planned
            for one batch size and run at another, MoE time against re-planned: batch grown 8x or more
            2.0-3.7% longer, 3-6x up or down up to 2.5%, 2x -0.8 to +1.3% (the estimate's noise is about
            1%); hence 3. The median, not the mean: one prefill pass of a few hundred tokens among a
            hundred one-token decode passes would otherwise double the volume.
    """

    check_every: int = 10
    window: int = 100
    threshold: float = 0.05
    cooldown: int = 10
    volume_factor: float = 3.0

    def __post_init__(self) -> None:
        counts = (self.check_every, self.window, self.cooldown)
        if not all(isinstance(n, int | np.integer) and not isinstance(n, bool) for n in counts):
            raise ValueError(f"check_every, window and cooldown count passes (integers); got {counts}")
        if self.check_every < 1 or self.window < 1 or self.cooldown < 0:
            raise ValueError(
                f"need check_every >= 1, window >= 1, cooldown >= 0; got {self.check_every}, "
                f"{self.window}, {self.cooldown}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold!r}")
        if not self.volume_factor > 1.0:  # also rejects NaN
            raise ValueError(f"volume_factor must be > 1 (inf: off), got {self.volume_factor!r}")


class WorkloadDriftDetector:
    """Sliding-window router statistics compared to the loads the placement was made for.

    Every `check_every` passes, unless cooling down after a `reset`, the window mean is compared to
    the reference layer by layer; any layer beyond `threshold`, or a window whose volume (`volume`: the
    median router load per pass) differs from the reference volume by more than `volume_factor` either way,
    gives a DriftReport. The window is kept across `reset`: the loads it holds stay valid whatever the
    placement. There is no reference volume until a `reset` gives one (no volume check before).
    """

    def __init__(
        self,
        reference: np.ndarray,
        *,
        check_every: int = WorkloadDriftConfig.check_every,
        window: int = WorkloadDriftConfig.window,
        threshold: float = WorkloadDriftConfig.threshold,
        cooldown: int = WorkloadDriftConfig.cooldown,
        volume_factor: float = WorkloadDriftConfig.volume_factor,
    ) -> None:
        self.config = WorkloadDriftConfig(check_every, window, threshold, cooldown, volume_factor)
        self._reference = _check_reference(reference)
        self._window = np.zeros((window, *self._reference.shape))  # ring buffer [window, L, E]
        self._reference_volume: float | None = None
        self._cool_downs = 0  # since the last reset: each doubles the next quiet spell
        self._num_passes = 0
        self._quiet_until = 0  # no report before this pass count

    @property
    def num_passes(self) -> int:
        return self._num_passes

    @property
    def reference(self) -> np.ndarray:
        """float [L, E]: the loads the current placement was made for (read-only)."""
        return self._reference

    def observe(self, counts: np.ndarray) -> DriftReport | None:
        """Add one forward pass's router counts [L, E]; return a report when a check finds drift."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != self._reference.shape:
            raise ValueError(f"counts must be [L, E] = {self._reference.shape}, got {counts.shape}")
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise ValueError("counts must be finite and >= 0")
        self._window[self._num_passes % self.config.window] = counts
        self._num_passes += 1
        if self._num_passes % self.config.check_every or self._num_passes < self._quiet_until:
            return None
        return self._check()

    @property
    def reference_volume(self) -> float | None:
        """The volume (median router load per pass) the current placement was made for, if known."""
        return self._reference_volume

    def reset(self, reference: np.ndarray, volume: float | None = None) -> None:
        """Adopt the loads of a new placement and cool down for `cooldown` passes.

        Args:
            reference: float [L, E], the loads the placement was made for.
            volume: the median router load per pass of the passes it was made for; None: the window's
                now (a placement planned on the window), or none while the window is empty.
        """
        reference = _check_reference(reference)
        if reference.shape != self._reference.shape:
            raise ValueError(f"reference must be [L, E] = {self._reference.shape}, got {reference.shape}")
        if volume is not None and not (np.isfinite(volume) and volume > 0):
            raise ValueError(f"volume must be finite and > 0, got {volume!r}")
        self._reference = reference
        self._reference_volume = self.volume() if volume is None else float(volume)
        self._cool_downs = 0
        self._quiet_until = self._num_passes + self.config.cooldown

    def cool_down(self) -> int:
        """Keep the references (the placement did not change: a drift that did not pay to act on, or a re-plan
        that failed) and report nothing for `cooldown` passes (at least `check_every`: with 0, none at all, it was
        reported again at every check), doubled with each cool-down since the last `reset`, at most the window: the
        drift is judged again as the window moves on, not at every check. Returns those passes."""
        base = max(self.config.cooldown, self.config.check_every)
        quiet = min(base << min(self._cool_downs, 30), max(base, self.config.window))
        self._quiet_until = self._num_passes + quiet
        self._cool_downs += 1
        return quiet

    def window_mean(self) -> np.ndarray | None:
        """float [L, E]: mean router counts per pass over the window (None before the first pass)."""
        filled = min(self._num_passes, self.config.window)
        return self._window[:filled].mean(axis=0) if filled else None

    def window_activity(self) -> np.ndarray | None:
        """float [L, E]: share of the window's passes that routed tokens to each expert (None before the
        first pass)."""
        filled = min(self._num_passes, self.config.window)
        return (self._window[:filled] > 0).mean(axis=0) if filled else None

    def window_passes(self) -> np.ndarray:
        """float [n, L, E]: router counts of the window's passes, oldest first (a copy; n = 0 before the
        first pass)."""
        filled = min(self._num_passes, self.config.window)
        start = self._num_passes % self.config.window if self._num_passes > self.config.window else 0
        return np.roll(self._window[:filled], -start, axis=0)

    def volume(self) -> float | None:
        """Median over the window's passes of the router load per pass (expert assignments per layer, top-k
        per token: about top-k x the batch size in decode); None before a pass with load. The lower median
        of an even count, always one pass's own load: a window half prefill, half decode passes has the
        volume of one of the two, not their mean."""
        filled = min(self._num_passes, self.config.window)
        per_pass = self._window[:filled].sum(axis=(1, 2)) / self._reference.shape[0]
        median = float(np.quantile(per_pass, 0.5, method="inverted_cdf")) if filled else 0.0
        return median if median > 0 else None

    def volume_ratio(self) -> float | None:
        """The window's volume over the reference volume (None while either is unknown)."""
        volume = self.volume()
        if volume is None or self._reference_volume is None:
            return None
        return volume / self._reference_volume

    def _check(self) -> DriftReport | None:
        mean = self.window_mean()
        distances = cosine_distance(mean, self._reference)
        worst = int(np.argmax(distances))
        ratio = self.volume_ratio()
        causes = tuple(cause for cause, found in (
            ("routing", distances[worst] > self.config.threshold),
            ("volume", ratio is not None and max(ratio, 1.0 / ratio) > self.config.volume_factor)) if found)
        if not causes:
            return None
        return DriftReport(distances, worst, mean, self._num_passes, ratio, causes)


def _check_reference(reference: np.ndarray) -> np.ndarray:
    reference = np.array(reference, dtype=np.float64)
    if reference.ndim != 2 or reference.size == 0:
        raise ValueError(f"reference must be a non-empty [L, E] array, got shape {reference.shape}")
    if not np.all(np.isfinite(reference)) or np.any(reference < 0):
        raise ValueError("reference loads must be finite and >= 0")
    empty = np.flatnonzero(reference.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"reference layer {int(empty[0])} has no load")
    reference.setflags(write=False)
    return reference


@dataclass(frozen=True)
class DeviceDriftConfig:
    """Settings of the device drift detector.

    Attributes:
        threshold: relative deviation of observed/predicted from 1 that counts as drift, > 0.
        min_samples: samples a device needs before it can be reported, >= 1.
        halflife: samples after which a sample's weight has halved, > 0; also how many samples the
            ratio must stay beyond the threshold before the device is reported.
    """

    threshold: float = 0.10
    min_samples: int = 20
    halflife: float = 50.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {self.threshold!r}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        if not (np.isfinite(self.halflife) and self.halflife > 0):
            raise ValueError(f"halflife must be finite and > 0, got {self.halflife!r}")


class DeviceDriftDetector:
    """Exponentially weighted observed/predicted time ratio per device, reported with the level it settled at.

    The ratio is that of exponentially weighted sums, sum w_i observed_i / sum w_i predicted_i, with
    w_i = 2^(-age_i / halflife) and age counted in samples of that device. Long calls thus weigh more
    than short ones, whose timing noise is relatively larger. A ratio of 1.25 means the device runs
    25% slower than its model predicts (e.g. thermal throttling); 0.8, faster.

    The weighted ratio detects a drift but lags it: after a step in the device's speed it passes the
    threshold while still on its way, at a fraction of the step, and a model refitted to it is left a
    second drift to report (two re-plans and two migrations for one change). So a device is reported
    only once its weighted ratio has stayed beyond the threshold for `halflife` samples, and with its
    *level*: the plain ratio sum observed / sum predicted over the samples since the weighted ratio
    went beyond (after a step, all of them come after it; at most the latest 8 halflives). The level
    of the latest half of those samples must lie beyond the threshold on the same side too, so a
    spike the weighted ratio is still decaying from is not reported; and the level must be known: its
    standard error (delta method) at most a quarter of the threshold, relative to the level, unless
    8 halflives of samples are in, and the level beyond the threshold by two standard errors. With
    noisy timings a device is thus reported later but once, not refitted to noise again and again
    (`python -m load_tests.device_tracking`).
    """

    def __init__(
        self,
        num_devices: int,
        *,
        threshold: float = DeviceDriftConfig.threshold,
        min_samples: int = DeviceDriftConfig.min_samples,
        halflife: float = DeviceDriftConfig.halflife,
    ) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        # scipy.signal takes about 0.9 s to import: imported by the detector (the coordinator's, built at its
        # start), not by `placement` itself, which every worker process imports for its latency curves
        from scipy.signal import lfilter

        self._lfilter = lfilter
        self.config = DeviceDriftConfig(threshold, min_samples, halflife)
        self._decay = 0.5 ** (1.0 / halflife)
        self._observed = np.zeros(num_devices)  # weighted sums, seconds
        self._predicted = np.zeros(num_devices)
        self._samples = np.zeros(num_devices, dtype=np.int64)
        # per device, [2, n]: (observed, predicted) of the samples since the weighted ratio went beyond
        self._run_cap = max(1, math.ceil(8 * halflife))
        self._runs = [np.zeros((2, 0)) for _ in range(num_devices)]

    @property
    def num_devices(self) -> int:
        return self._samples.size

    def observe(self, device, predicted_s, observed_s) -> None:
        """Add timing samples, in call order: scalars, or arrays broadcast together.

        Args:
            device: int device index(es) in [0, num_devices).
            predicted_s: seconds the device model predicted for the call(s), > 0.
            observed_s: seconds measured, >= 0.
        """
        arrays = np.broadcast_arrays(device, predicted_s, observed_s)
        device, predicted, observed = (np.ravel(x) for x in arrays)
        device = _check_devices(device, self.num_devices)
        predicted = predicted.astype(np.float64)
        observed = observed.astype(np.float64)
        if not np.all(np.isfinite(predicted)) or np.any(predicted <= 0):
            raise ValueError("predicted_s must be finite and > 0")
        if not np.all(np.isfinite(observed)) or np.any(observed < 0):
            raise ValueError("observed_s must be finite and >= 0")
        for g in np.unique(device):
            self._observe_one(int(g), predicted[device == g], observed[device == g])

    def _observe_one(self, g: int, predicted: np.ndarray, observed: np.ndarray) -> None:
        # the weighted sums after each sample, s_i = decay * s_(i-1) + x_i (the newest sample weighs 1),
        # to tell when the ratio went beyond the threshold
        def sums(x: np.ndarray, before: float) -> np.ndarray:
            return self._lfilter([1.0], [1.0, -self._decay], x, zi=[self._decay * before])[0]

        sums_observed, sums_predicted = sums(observed, self._observed[g]), sums(predicted, self._predicted[g])
        beyond = np.abs(sums_observed / sums_predicted - 1.0) > self.config.threshold
        within = np.flatnonzero(~beyond)
        start = within[-1] + 1 if within.size else 0  # the run of samples beyond that reaches the newest
        run = self._runs[g] if start == 0 else np.zeros((2, 0))
        self._runs[g] = np.concatenate([run, np.stack([observed[start:], predicted[start:]])],
                                       axis=1)[:, -self._run_cap:]
        self._observed[g], self._predicted[g] = sums_observed[-1], sums_predicted[-1]
        self._samples[g] += predicted.size

    def ratios(self) -> np.ndarray:
        """float [G]: current weighted observed/predicted ratio per device (NaN for devices without samples)."""
        out = np.full(self.num_devices, np.nan)
        np.divide(self._observed, self._predicted, out=out, where=self._samples > 0)
        return out

    def drifted(self) -> dict[int, float]:
        """{device: level} for devices with >= min_samples whose weighted ratio has been beyond 1 +- threshold
        for the last `halflife` samples or more, and whose level and that of the latest half of those
        samples lie beyond it on the same side (class docstring)."""
        threshold = self.config.threshold
        report = {}
        for g in np.flatnonzero(self._samples >= self.config.min_samples):
            run = self._runs[g]
            if run.shape[1] < self.config.halflife:
                continue
            level = run[0].sum() / run[1].sum()
            # standard error of the level (delta method): it must lie beyond the threshold by two of them,
            # and be within a quarter of the threshold (relative) unless the run is as long as is kept
            error = np.sqrt(np.sum((run[0] - level * run[1]) ** 2)) / run[1].sum()
            known = error <= threshold / 4 * level or run.shape[1] >= self._run_cap
            recent = run[:, run.shape[1] // 2:]
            latest = recent[0].sum() / recent[1].sum() - 1.0
            latest_agrees = abs(latest) > threshold and (latest > 0) == (level > 1.0)
            # (a level of 0, from calls timed at 0 s, would scale the device's model to nothing)
            if level > 0 and known and abs(level - 1.0) - threshold > 2 * error and latest_agrees:
                report[int(g)] = float(level)
        return report

    def reset(self, device: int | None = None) -> None:
        """Forget the samples of `device` (after its model was refitted), or of all devices."""
        if device is None:
            selected = slice(None)
        else:
            selected = int(_check_devices(np.array([device]), self.num_devices)[0])
        self._observed[selected] = 0.0
        self._predicted[selected] = 0.0
        self._samples[selected] = 0
        for g in range(self.num_devices) if device is None else [selected]:
            self._runs[g] = np.zeros((2, 0))


class DeviceDriftTracker:
    """The device side of recalibration: scales of each device's profiled model, refined from serving
    timings, and the drift that is worth a re-plan.

    Timings go to `detector` (`DeviceDriftDetector.observe`, predicted by the current scaled models).
    Refitting a model is cheap and a re-plan moves expert weights, so the two are separate: a device's
    scale follows its observed / predicted ratio once that settles beyond threshold / 2
    (`DeviceDriftDetector`, whose level it takes), and a re-plan is due once a scale is beyond
    1 +- threshold times the one the current placement was planned with. A slow ramp is followed in
    small refits and re-planned once it has moved far enough; a step is refitted and re-planned once.
    """

    def __init__(
        self,
        num_devices: int,
        *,
        threshold: float = 0.10,
        min_samples: int = DeviceDriftConfig.min_samples,
        halflife: float = DeviceDriftConfig.halflife,
    ) -> None:
        self.threshold = float(threshold)
        self.detector = DeviceDriftDetector(num_devices, threshold=self.threshold / 2, min_samples=min_samples,
                                            halflife=halflife)
        self._scales = np.ones(num_devices)
        self._planned = np.ones(num_devices)
        self._asked = False  # `ask` gave a re-plan whose outcome is not known yet

    @property
    def scales(self) -> np.ndarray:
        """float [G]: each device's time over its profiled model's (a copy)."""
        return self._scales.copy()

    def since_planned(self) -> np.ndarray:
        """float [G]: each scale over the one the current placement was planned with."""
        return self._scales / self._planned

    def refit(self) -> dict[int, float]:
        """Rescale the devices whose ratio settled away from their model; {device: factor applied}."""
        levels = self.detector.drifted()
        for device, level in levels.items():
            self._scales[device] *= level
            self.detector.reset(device)
        return levels

    def due(self) -> dict[int, float]:
        """{device: scale over planned} beyond 1 +- threshold, or {}. Given once: the current scales count
        as planned with from here, for a caller that does not say what became of the re-plan (one that does
        uses `ask`)."""
        drifted = self.ask()
        if drifted:
            self.planned_with(self._scales)
        return drifted

    def ask(self) -> dict[int, float]:
        """{device: scale over planned} beyond 1 +- threshold, or {}. Given once, until the caller says what
        became of the re-plan: `planned_with` (made, or judged not worth it) or `retry` (it failed). The
        scales the placement was planned with stay until then: a re-plan that rolled back leaves the drift in
        `since_planned` and asked for again (counted as planned with when asked, it read 1 while the device
        stayed 3x slower, and no re-plan was asked for again)."""
        if self._asked:
            return {}
        moved = self.since_planned()
        drifted = {int(g): float(moved[g]) for g in np.flatnonzero(np.abs(moved - 1.0) > self.threshold)}
        self._asked = bool(drifted)
        return drifted

    def planned_with(self, scales: np.ndarray) -> None:
        """A placement was planned (or judged not worth moving to) with these scales."""
        self._planned = np.array(scales, dtype=np.float64)
        self._asked = False

    def retry(self) -> None:
        """The re-plan `ask` gave failed: the drift it was asked for is given again."""
        self._asked = False

    def reprofiled(self, device: int, change: float) -> None:
        """``device`` has a new profiled model, ``change`` times the old one's time: its scale back to 1, samples
        forgotten, and the scale the placement was planned with re-expressed against the new model (divided by
        ``change``): a re-profile that finds a device 2.9x slower than the placement was planned for is drift still
        due, not forgotten (a reset read as planned with the new model: no re-plan, `model_over_planned` 1)."""
        if not np.isfinite(change) or change <= 0:
            raise ValueError(f"change must be finite and > 0, got {change!r}")
        selected = int(_check_devices(np.array([device]), len(self._scales))[0])
        self._planned[selected] /= change
        self._scales[selected] = 1.0
        self.detector.reset(selected)

    def reset(self, device: int | None = None) -> None:
        """New profiled models: every scale (or ``device``'s) back to 1, samples forgotten."""
        selected = slice(None) if device is None else int(_check_devices(np.array([device]), len(self._scales))[0])
        self._scales[selected] = 1.0
        self._planned[selected] = 1.0
        self.detector.reset(device)


def _check_devices(device: np.ndarray, num_devices: int) -> np.ndarray:
    if device.size and (not np.issubdtype(device.dtype, np.integer) or device.min() < 0
                        or device.max() >= num_devices):
        raise ValueError(f"device indices must be integers in [0, {num_devices}), got {device.tolist()[:8]}")
    return device.astype(np.int64)
