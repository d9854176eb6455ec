"""Placement metrics in Prometheus format: what the coordinator decided and how the devices behave.

Owns a prometheus_client collector that renders a snapshot of `Coordinator.metrics_summary()`: placement
version, per-layer predicted imbalance, per-device predicted time and observed/predicted ratio,
recalibration events by outcome with their duration, experts and bytes moved, lost devices, and GPU
telemetry (SM clock, power, temperature) where the workers have it. The snapshot is refreshed off the
request path (`refresh`, from a background thread), so a scrape never waits for the coordinator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# the outcomes of a recalibration (service.coordinator.Recalibration.status)
RECALIBRATION_STATUSES = ("applied", "dry_run", "skipped", "no_change", "rolled_back", "failed")


class PlacementCollector:
    """Register with a CollectorRegistry; call `refresh(summary)` whenever a new summary arrives."""

    def __init__(self) -> None:
        self._summary: dict[str, Any] | None = None

    def refresh(self, summary: dict[str, Any]) -> None:
        self._summary = summary

    def collect(self) -> Iterator[Metric]:
        """The summary's metrics, each sample with the time the coordinator made it (when it says): every replica
        exposes its own copy, and one that missed refreshes (its coordinator call failed) showed older counters than
        another's; Prometheus now rejects them as out of order, not as counters that went down (a review)."""
        summary = self._summary
        if summary is None:
            return
        at = summary.get("at")
        for family in self._families(summary):
            if at is not None:
                family.samples = [sample._replace(timestamp=at) for sample in family.samples]
            yield family

    def _families(self, summary: dict[str, Any]) -> Iterator[Metric]:
        yield _gauge("vibe_placement_version", "Version of the placement the coordinator publishes.",
                     [((), summary["placement_version"])])
        if summary["layer_imbalance"] is not None:
            yield _gauge("vibe_layer_imbalance", "Predicted max/mean device time of each MoE layer.",
                         [((str(layer),), value) for layer, value in enumerate(summary["layer_imbalance"])],
                         ["layer"])
            yield _gauge("vibe_device_predicted_seconds", "Predicted MoE time of each device per forward pass.",
                         [((str(d),), value) for d, value in enumerate(summary["device_predicted_s"])], ["device"])
        yield _gauge("vibe_device_observed_over_predicted",
                     "Observed / predicted expert time of each device (drift when far from 1).",
                     [((str(d),), value) for d, value in enumerate(summary["device_observed_over_predicted"])
                      if value is not None], ["device"])
        yield _gauge("vibe_device_model_over_planned",
                     "Each device's latency model over the one the placement in service was planned with (a device "
                     "slower or faster than the placement assumes when far from 1).",
                     [((str(d),), value) for d, value in enumerate(summary.get("device_model_over_planned", ()))],
                     ["device"])
        events = CounterMetricFamily("vibe_recalibrations", "Placement decisions by outcome: recalibrations (calibration, "
                                     "drift, admin) and fault recovery (a lost device's experts re-placed, a reload of "
                                     "every device).", labels=["status"])
        # every outcome from 0: increase() misses a series' first sample, so a first failure would never alert
        for status, count in {**dict.fromkeys(RECALIBRATION_STATUSES, 0), **summary["recalibrations"]}.items():
            events.add_metric([status], count)
        yield events
        last = summary["last_recalibration_s"]
        yield _gauge("vibe_last_recalibration_seconds", "Planning-to-publish time of the last applied placement change "
                     "(recalibration or fault recovery; a wait for the previous change's old copies to drop is not "
                     "counted).",
                     [((), last)] if last is not None else [])
        yield CounterMetricFamily("vibe_experts_moved", "Expert copies moved or loaded by applied placement changes "
                                  "(recalibrations and fault recovery).",
                                  value=summary["experts_moved"])
        yield CounterMetricFamily("vibe_bytes_moved", "Expert weight bytes moved or loaded by applied placement "
                                  "changes (recalibrations and fault recovery).",
                                  value=summary["bytes_moved"])
        yield _gauge("vibe_lost_devices", "Devices out of the placement (dead or rejoining).",
                     [((), len(summary["lost_devices"]))])
        for name, field, help_text in (("vibe_gpu_sm_clock_mhz", "sm_clock_mhz", "SM clock of each GPU."),
                                       ("vibe_gpu_power_watts", "power_w", "Power draw of each GPU."),
                                       ("vibe_gpu_temperature_celsius", "temperature_c", "Temperature of each GPU.")):
            samples = [((str(t["device"]),), t[field]) for t in summary["telemetry"]
                       if t["available"] and t[field] is not None]
            if samples:
                yield _gauge(name, help_text, samples, ["device"])
        samples = [((str(t["device"]),), t["expert_bytes"]) for t in summary["telemetry"]
                   if t.get("expert_bytes") is not None]
        yield _gauge("vibe_worker_expert_bytes", "Bytes of the experts each worker holds (as held: quantized or not).",
                     samples, ["device"])


def _gauge(name: str, help_text: str, samples, labels: list[str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=labels or [])
    for label_values, value in samples:
        family.add_metric(list(label_values), float(value))
    return family
