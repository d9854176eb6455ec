"""Scale simulator: placement quality on sampled devices and real loads, from a handful to hundreds of GPUs.

Owns the device variability profiles (published measurements: identical; 7% spread; one device 13% slower; 22%
spread; two devices throttled to 0.8x), the evaluation of policies on one case against the proven
lower bound, and the scale study "do redundant experts and uneven expert counts keep ViBE's gain at
large G". Knows nothing of timing, printing or files (see `bench`); placements come from `plan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from placement.bounds import lower_bound
from placement.device_model import DeviceModel
from placement.metrics import balancedness, device_times, imbalance
from placement.policies import plan
from placement.traces import resample_experts, scale_loads, select_layers

BASE_DEVICE = DeviceModel(2e-4, 128.0, 2e-4 / 128.0)  # fixed 0.2 ms, knee 128 tokens, slope fixed / knee
PROFILES = ("identical", "spread7", "one_slow13", "spread22", "two_throttled")
VARIANTS = ("even", "redundant", "uneven", "redundant_uneven")


def device_speeds(num_devices: int, profile: str, rng: np.random.Generator) -> np.ndarray:
    """float [G]: speed of each device relative to the base curve (1.0 nominal, 0.8 = 20% slower).

    Profiles: "identical" all 1; "spread7" uniform in 1 +- 0.035; "spread22" uniform in 1 +- 0.11;
    "one_slow13" one random device at 0.87; "two_throttled" two random devices at 0.8.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    speeds = np.ones(num_devices)
    if profile == "identical":
        return speeds
    if profile in ("spread7", "spread22"):
        half_width = 0.035 if profile == "spread7" else 0.11
        return rng.uniform(1.0 - half_width, 1.0 + half_width, num_devices)
    if profile == "one_slow13":
        speeds[rng.integers(num_devices)] = 0.87
        return speeds
    if profile == "two_throttled":
        if num_devices < 2:
            raise ValueError(f"profile 'two_throttled' needs >= 2 devices, got {num_devices}")
        speeds[rng.choice(num_devices, 2, replace=False)] = 0.8
        return speeds
    raise ValueError(f"unknown variability profile {profile!r}; known: {PROFILES}")


def sample_devices(
    num_devices: int, profile: str, rng: np.random.Generator, base: DeviceModel = BASE_DEVICE
) -> list[DeviceModel]:
    """G device curves: `base` with every time divided by the device's speed from `device_speeds`."""
    return [base.scaled(1.0 / speed) for speed in device_speeds(num_devices, profile, rng)]


@dataclass(frozen=True)
class PolicyResult:
    """One policy's placement on one case.

    Attributes:
        makespan_s: sum_l T_l, predicted seconds of all MoE layers of one forward pass.
        bound_ratio: makespan_s / sum_l LB_l (>= 1; 1 is provably optimal).
        imbalance: mean over layers of max_g / mean_g predicted device time.
        balancedness: mean over layers of mean_g / max_g device tokens (vLLM's log metric).
    """

    makespan_s: float
    bound_ratio: float
    imbalance: float
    balancedness: float


@dataclass(frozen=True)
class CaseResult:
    """Every evaluated policy on one (loads, devices, slots) case, with the lower bound."""

    bound_s: float  # sum_l LB_l
    policies: dict[str, PolicyResult]

    def gain(self, policy: str = "vibe", baseline: str = "eplb") -> float:
        """1 - T(policy) / T(baseline): share of the baseline's time that `policy` saves; NaN when the baseline
        takes no time (no load)."""
        return _gain(self.policies[policy].makespan_s, self.policies[baseline].makespan_s)

    def captured_gain(self, policy: str = "vibe", baseline: str = "eplb") -> float:
        """(T(baseline) - T(policy)) / (T(baseline) - bound); NaN when the baseline is at the bound."""
        room = self.policies[baseline].makespan_s - self.bound_s
        if room <= 1e-9 * self.bound_s:
            return float("nan")
        return (self.policies[baseline].makespan_s - self.policies[policy].makespan_s) / room


def _gain(seconds: float, baseline: float) -> float:
    return 1.0 - seconds / baseline if baseline > 0 else float("nan")


def evaluate(
    loads: np.ndarray,
    devices: Sequence[DeviceModel],
    policies: Sequence[str] = ("contiguous", "eplb", "vibe"),
    *,
    num_redundant: int = 0,
    slot_budget: int | Sequence[int] | None = None,
    bound_s: float | None = None,
) -> CaseResult:
    """Plan every policy on `loads` [L, E] and `devices` with the same slots, and score it.

    `num_redundant` and `slot_budget` go to every policy and, unless `bound_s` (a proven bound on
    sum_l T_l for these slots, seconds) is given, to `lower_bound`; pass only policies that accept them
    (e.g. "contiguous" has no redundant slots).
    """
    if bound_s is None:
        bound_s = float(np.sum(lower_bound(loads, devices, num_redundant=num_redundant,
                                           slot_budget=slot_budget)))
    results = {}
    for policy in policies:
        placement = plan(loads, devices, policy, num_redundant=num_redundant, slot_budget=slot_budget)
        times = device_times(placement, loads, devices)  # [L, G]
        total = float(times.max(axis=1).sum())
        results[policy] = PolicyResult(
            makespan_s=total,
            bound_ratio=total / bound_s if bound_s > 0 else float("nan"),
            imbalance=float(imbalance(times).mean()),
            balancedness=float(balancedness(placement, loads).mean()),
        )
    return CaseResult(bound_s, results)


@dataclass(frozen=True)
class ScaleStudyConfig:
    """The scale study: one trace resampled to `num_experts`, devices from `profile`, G growing.

    Variants of the slots each device gets (R = E + redundant slots):
      "even": R = E, R / G slots each;  "redundant": R = E + redundant_per_device * G, even;
      "uneven": R = E, at most R / G + spare_slots_per_device each;  "redundant_uneven": both.
    EPLB keeps even counts by design, so it runs in "even" and "redundant" and is the baseline of the
    variants with the same number of redundant slots. Every variant is measured against one bound per
    G, that of "redundant_uneven": its LP relaxes every other variant's (more slots per device, split
    costs no higher than whole ones), so it holds for all and makes their ratios comparable.

    Attributes:
        device_counts: values of G; each must divide num_experts.
        num_experts: E after resampling.
        num_layers: layers used, evenly spaced over the trace's (None: all).
        profile: variability profile of `device_speeds`.
        tokens_per_expert: mean load per expert (above the base curve's knee: prefill-like).
        redundant_per_device, spare_slots_per_device: >= 1.
        policies: policies run in every variant (EPLB only where counts are even).
        seed: seeds the loads' resampling and the device sampling.
        base_device: the nominal device's per-expert curve, which `sample_devices` scales per device.
    """

    device_counts: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    num_experts: int = 256
    num_layers: int | None = 16
    profile: str = "spread7"
    tokens_per_expert: float = 1024.0
    redundant_per_device: int = 1
    spare_slots_per_device: int = 1
    policies: tuple[str, ...] = ("eplb", "vibe")
    seed: int = 0
    base_device: DeviceModel = BASE_DEVICE

    def __post_init__(self) -> None:
        bad = [g for g in self.device_counts if g < 2 or self.num_experts % g]  # (one device: nothing to place)
        if not self.device_counts or bad:
            raise ValueError(
                f"device_counts must be non-empty divisors of num_experts={self.num_experts}, bad: {bad}"
            )
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 or None, got {self.num_layers}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown variability profile {self.profile!r}; known: {PROFILES}")
        if self.redundant_per_device < 1 or self.spare_slots_per_device < 1:
            raise ValueError(
                f"redundant_per_device and spare_slots_per_device must be >= 1, got "
                f"{self.redundant_per_device}, {self.spare_slots_per_device}"
            )
        if "contiguous" in self.policies:
            raise ValueError("the scale study runs with redundant slots, which 'contiguous' cannot use")


def scale_study(counts: np.ndarray, config: ScaleStudyConfig) -> list[dict]:
    """Rows of the scale study, one per (G, variant, policy) that applies.

    Args:
        counts: [L0, E0] a real trace's loads.
    Returns:
        dicts with num_devices, variant, policy, num_redundant, slot_budget, makespan_s, bound_ratio (to
        the common bound), imbalance, balancedness, gain_vs_eplb (1 - T / T_eplb with the same redundant
        slots) and gain_vs_eplb_even (1 - T / T_eplb without redundant slots).
    """
    rng = np.random.default_rng(config.seed)
    loads = scale_loads(resample_experts(select_layers(counts, config.num_layers), config.num_experts, rng),
                        config.tokens_per_expert)
    rows = []
    for num_devices in config.device_counts:
        devices = sample_devices(num_devices, config.profile, rng, config.base_device)
        loosest_redundant, loosest_budget = _variant_slots("redundant_uneven", config, num_devices)
        bound_s = float(np.sum(lower_bound(loads, devices, num_redundant=loosest_redundant,
                                           slot_budget=loosest_budget)))
        eplb_makespan = {}
        for variant in VARIANTS:
            num_redundant, slot_budget = _variant_slots(variant, config, num_devices)
            policies = [p for p in config.policies if p != "eplb" or slot_budget is None]
            case = evaluate(loads, devices, policies, num_redundant=num_redundant, slot_budget=slot_budget,
                            bound_s=bound_s)
            if "eplb" in case.policies:
                eplb_makespan[num_redundant] = case.policies["eplb"].makespan_s
            for policy, result in case.policies.items():
                baseline = eplb_makespan.get(num_redundant)
                even = eplb_makespan.get(0)
                rows.append({
                    "num_devices": num_devices, "variant": variant, "policy": policy,
                    "num_redundant": num_redundant, "slot_budget": slot_budget, **asdict(result),
                    "gain_vs_eplb": None if baseline is None else _gain(result.makespan_s, baseline),
                    "gain_vs_eplb_even": None if even is None else _gain(result.makespan_s, even),
                })
    return rows


def _variant_slots(variant: str, config: ScaleStudyConfig, num_devices: int) -> tuple[int, int | None]:
    """(num_redundant, slot_budget) of a study variant at G = num_devices."""
    redundant = "redundant" in variant
    num_redundant = config.redundant_per_device * num_devices if redundant else 0
    if "uneven" not in variant:
        return num_redundant, None
    slots_per_device = (config.num_experts + num_redundant) // num_devices
    return num_redundant, slots_per_device + config.spare_slots_per_device
