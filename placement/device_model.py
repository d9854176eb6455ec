"""Per-device latency model of ONE expert: flat up to a knee, then linear.

Owns the curve, its vectorised evaluation and its robust fit from noisy samples. Knows nothing of
experts, placements or where the samples came from (profiling or online timings).

    latency(n) = 0                                  n == 0
               = fixed                              0 < n <= knee
               = fixed + slope * (n - knee)         n > knee

Below the knee an expert kernel is bound by loading its weights, so its time barely depends on the
token count; above it the kernel is compute bound and grows linearly (TEMPO's observation). A device's
time in a layer is the sum of this curve over the experts it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_HUBER_DELTA = 0.05  # relative residual beyond which a sample counts as an outlier
_IRLS_ITERATIONS = 8
_KNEE_REFINE_POINTS = 17


@dataclass(frozen=True)
class DeviceModel:
    """Latency curve of one expert on one device.

    Attributes:
        fixed: seconds for any non-zero token count up to the knee (>= 0).
        knee: tokens where the curve turns linear (>= 0).
        slope: seconds per token beyond the knee (>= 0).
    """

    fixed: float
    knee: float
    slope: float

    def __post_init__(self) -> None:
        for name in ("fixed", "knee", "slope"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"DeviceModel.{name} must be finite and >= 0, got {value!r}")

    def latency(self, tokens: np.ndarray | float) -> np.ndarray:
        """Seconds for one expert to process `tokens` tokens, elementwise (any shape; 0 tokens cost 0)."""
        n = np.asarray(tokens, dtype=np.float64)
        t = self.fixed + self.slope * np.maximum(n - self.knee, 0.0)
        return np.where(n > 0, t, 0.0)

    def throughput(self, tokens: np.ndarray | float) -> np.ndarray:
        """Tokens per second at `tokens` tokens per expert call (0 where tokens is 0)."""
        n = np.asarray(tokens, dtype=np.float64)
        t = self.latency(n)
        return np.divide(n, t, out=np.zeros_like(n), where=t > 0)

    def scaled(self, factor: float) -> DeviceModel:
        """The same curve with every time multiplied by `factor` (> 1: slower device)."""
        if not np.isfinite(factor) or factor <= 0:
            raise ValueError(f"scale factor must be finite and > 0, got {factor!r}")
        return DeviceModel(self.fixed * factor, self.knee, self.slope * factor)

    @classmethod
    def fit(cls, tokens: np.ndarray, seconds: np.ndarray) -> DeviceModel:
        """Fit the curve to latency samples by robust (Huber, relative-error) least squares.

        Args:
            tokens: [N] token count of each sample; samples with 0 tokens are ignored.
            seconds: [N] measured seconds of each sample, > 0.

        Every distinct sampled token count is tried as the knee, then the best neighbourhood is refined
        on a finer grid; for each knee, `fixed` and `slope` come from iteratively reweighted least
        squares on relative residuals, so a few slow outliers (a preempted call, a clock dip) barely
        move the fit. If no sample lies beyond the fitted knee, or the curve rises less than the outlier margin
        (5% of `fixed`) over the samples beyond it, the slope cannot be observed and is set to `fixed / knee` at
        the largest sample, i.e. the compute-bound continuation of the flat part. (A slope that came out at 0 took
        the continuation, one just above 0 did not: fits of one flat device differed 10x beyond its samples by the
        noise alone, a review.)
        """
        n = np.asarray(tokens, dtype=np.float64).ravel()
        y = np.asarray(seconds, dtype=np.float64).ravel()
        if n.shape != y.shape:
            raise ValueError(f"tokens and seconds must have the same length, got {n.shape} and {y.shape}")
        if not (np.all(np.isfinite(n)) and np.all(n >= 0)):
            raise ValueError("tokens must be finite counts >= 0")
        keep = n > 0
        n, y = n[keep], y[keep]
        if n.size < 2:
            raise ValueError(f"need at least 2 samples with tokens > 0, got {n.size}")
        if not (np.all(np.isfinite(y)) and np.all(y > 0)):
            raise ValueError("seconds must be finite and > 0")

        grid = np.unique(np.concatenate([[0.0], n]))
        knees, fixed, slope, loss = _fit_knees(n, y, grid)
        best = _last_min(loss)  # (ties to the largest knee: samples exactly flat have no slope to observe)
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
        fine = np.linspace(lo, hi, _KNEE_REFINE_POINTS)
        k2, f2, s2, l2 = _fit_knees(n, y, fine)
        if l2.min() < loss[best]:
            best2 = _last_min(l2)
            knee, fx, sl = k2[best2], f2[best2], s2[best2]
        else:
            knee, fx, sl = knees[best], fixed[best], slope[best]
        if knee >= n.max() or max(sl, 0.0) * (n.max() - knee) <= _HUBER_DELTA * fx:
            knee = float(n.max())
            sl = fx / knee
        return cls(float(fx), float(knee), float(sl))


def _last_min(values: np.ndarray) -> int:
    """The index of the last of ``values``' minima."""
    return int(values.size - 1 - np.argmin(values[::-1]))


def _fit_knees(n: np.ndarray, y: np.ndarray, knees: np.ndarray):
    """Robust fit of (fixed, slope) for each candidate knee at once.

    Args:
        n, y: [N] samples. knees: [K] candidate knees.
    Returns:
        knees [K], fixed [K], slope [K], loss [K] (sum of Huber losses of relative residuals).
    """
    x = np.maximum(n[None, :] - knees[:, None], 0.0)  # [K, N] tokens beyond the knee
    base_w = 1.0 / (y * y)  # relative residuals: weight 1 / y^2
    w = np.broadcast_to(base_w, x.shape).copy()
    fixed = np.zeros(knees.size)
    slope = np.zeros(knees.size)
    for _ in range(_IRLS_ITERATIONS):
        fixed, slope = _weighted_lines(x, y, w)
        r = (y[None, :] - (fixed[:, None] + slope[:, None] * x)) / y[None, :]
        huber = np.where(np.abs(r) <= _HUBER_DELTA, 1.0, _HUBER_DELTA / np.maximum(np.abs(r), 1e-300))
        w = base_w[None, :] * huber
    r = np.abs((y[None, :] - (fixed[:, None] + slope[:, None] * x)) / y[None, :])
    loss = np.where(r <= _HUBER_DELTA, 0.5 * r * r, _HUBER_DELTA * (r - 0.5 * _HUBER_DELTA)).sum(axis=1)
    return knees, fixed, slope, loss


def _weighted_lines(x: np.ndarray, y: np.ndarray, w: np.ndarray):
    """Per-row weighted least squares of y ~ fixed + slope * x with fixed, slope >= 0.

    Args:
        x: [K, N], y: [N], w: [K, N]. Returns fixed [K], slope [K].
    """
    sw = w.sum(1)
    sx = (w * x).sum(1)
    sy = (w * y).sum(1)
    sxx = (w * x * x).sum(1)
    sxy = (w * x * y).sum(1)
    det = sw * sxx - sx * sx
    ok = det > 1e-12 * np.maximum(sw * sxx, 1e-300)
    slope = np.where(ok, (sw * sxy - sx * sy) / np.where(ok, det, 1.0), 0.0)
    slope = np.maximum(slope, 0.0)
    fixed = (sy - slope * sx) / sw
    # A negative intercept is not a device: refit the slope through the origin instead.
    neg = fixed < 0
    if np.any(neg):
        through_origin = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
        slope = np.where(neg, np.maximum(through_origin, 0.0), slope)
        fixed = np.where(neg, 0.0, fixed)
    return fixed, slope
