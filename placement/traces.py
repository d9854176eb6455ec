"""Real expert-load traces: where they live, loading them, and reshaping them for simulation.

Owns the `.npz` trace format (see `placement/data/traces/README.md`: `counts` int64 [L, E] and a
JSON `meta` string), the folder lookup (`VIBE_TRACES` or the shipped copies in `placement/data/traces`)
and the transformations the simulator applies: resampling a layer's load curve to another expert count,
scaling it to a token level, picking a subset of layers. Knows nothing of devices or placements.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TRACES_ENV = "VIBE_TRACES"
_DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "traces"  # copies of ../shared/traces (356 KB)


@dataclass(frozen=True, eq=False)
class Trace:
    """One recorded workload.

    Attributes:
        name: file stem, e.g. "olmoe1b7b_arxiv_L0-7-15".
        counts: int64 [L, E]; tokens routed to each expert of each recorded layer (read-only).
        meta: provenance and summary from the file (source, model, top_k, workload, ...).
    """

    name: str
    counts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def trace_dir() -> Path:
    """The trace folder: `$VIBE_TRACES` if set, else the copies shipped in `placement/data/traces`.

    Raises FileNotFoundError, naming the path and the variable, when the folder does not exist.
    """
    raw = os.environ.get(TRACES_ENV)
    path = Path(raw) if raw else _DEFAULT_DIR
    if not path.is_dir():
        raise FileNotFoundError(
            f"no trace folder at {path}: set {TRACES_ENV} to the folder holding the .npz expert-load traces"
        )
    return path


def trace_names(directory: Path | None = None) -> list[str]:
    """Sorted stems of the `.npz` traces in `directory` (default `trace_dir()`)."""
    directory = trace_dir() if directory is None else Path(directory)
    return sorted(p.stem for p in directory.glob("*.npz"))


def load_trace(path: str | Path) -> Trace:
    """Read one `.npz` trace; ValueError if its counts are not a non-negative [L, E] array of whole numbers.

    Counts are router token counts (int64): a float trace of whole numbers is taken, one with fractions
    (e.g. normalized shares) is refused rather than truncated (a layer of shares would load as zeros).
    """
    path = Path(path)
    with np.load(path) as data:
        if "counts" not in data:
            raise ValueError(f"{path} has no 'counts' array")
        counts = np.asarray(data["counts"])
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"{path}: counts must be a non-empty [L, E] array, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"{path}: counts must be finite and >= 0")
    if np.any(counts != np.floor(counts)):
        raise ValueError(f"{path}: counts must be whole token counts, got fractions (a normalized trace? "
                         "store the raw counts)")
    counts = counts.astype(np.int64)
    counts.setflags(write=False)
    return Trace(path.stem, counts, meta)


def load_traces(directory: Path | None = None) -> list[Trace]:
    """Every trace in `directory` (default `trace_dir()`), sorted by name."""
    directory = trace_dir() if directory is None else Path(directory)
    return [load_trace(directory / f"{name}.npz") for name in trace_names(directory)]


def resample_experts(counts: np.ndarray, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """Loads for `num_experts` experts with each layer's load distribution shape kept.

    Each layer's loads, sorted descending, form a quantile curve; it is linearly interpolated at
    `num_experts` evenly spaced points (so the hottest and coldest loads are kept), rescaled to the
    layer's original total, and randomly permuted (expert ids carry no meaning across models).
    With `num_experts == E0` the result is a permutation of each layer's loads. On the real traces
    upsampling keeps each layer's max/mean within 3%; downsampling by a large factor lowers it (point
    samples over-weight the hot end: DeepSeek-V3 256 -> 16 experts, mean max/mean 6.2 -> 5.1).

    Args:
        counts: [L, E0] non-negative loads.
        num_experts: E >= 1.
        rng: source of the permutations.
    Returns:
        float64 [L, E]; row sums equal those of `counts`.
    """
    counts = _check_loads(counts)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    curve = -np.sort(-counts, axis=1)  # [L, E0] descending
    pos = np.linspace(0.0, curve.shape[1] - 1, num_experts)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, curve.shape[1] - 1)
    frac = pos - lo
    out = curve[:, lo] * (1.0 - frac) + curve[:, hi] * frac  # [L, E]
    totals, sums = counts.sum(axis=1), out.sum(axis=1)
    out *= np.divide(totals, sums, out=np.zeros_like(sums), where=sums > 0)[:, None]
    return rng.permuted(out, axis=1)


def scale_loads(counts: np.ndarray, tokens_per_expert: float) -> np.ndarray:
    """Loads rescaled per layer so that the mean tokens per expert is `tokens_per_expert`.

    A mean above a device's knee is prefill-like (experts compute bound), below it decode-like (weight
    loading dominates). Layers without any load stay zero. Tokens are left fractional.

    Args:
        counts: [L, E] non-negative loads. tokens_per_expert: > 0.
    Returns:
        float64 [L, E].
    """
    counts = _check_loads(counts)
    if not np.isfinite(tokens_per_expert) or tokens_per_expert <= 0:
        raise ValueError(f"tokens_per_expert must be finite and > 0, got {tokens_per_expert!r}")
    means = counts.mean(axis=1)
    factor = np.divide(tokens_per_expert, means, out=np.zeros_like(means), where=means > 0)
    return counts * factor[:, None]


def select_layers(counts: np.ndarray, num_layers: int | None) -> np.ndarray:
    """Rows [num_layers, E] of `counts` [L, E], evenly spaced from first to last (all if None or >= L)."""
    counts = np.asarray(counts)
    if num_layers is None or num_layers >= counts.shape[0]:
        return counts
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1 or None, got {num_layers}")
    return counts[np.linspace(0, counts.shape[0] - 1, num_layers).round().astype(np.int64)]


def _check_loads(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"loads must be a non-empty [L, E] array, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("loads must be finite and >= 0")
    return counts
