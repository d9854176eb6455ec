"""The Grafana dashboard and the Prometheus alerting rules (deploy/monitoring): every query parses as
PromQL and names only metrics, and labels of them, that an app's ``/metrics`` exposes."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.messages import Telemetry
from service.metrics import ServingMetrics
from service.placement_metrics import PlacementCollector

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())
RULES = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"][0]["rules"]
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m"}


class _Engine:
    num_waiting = 0
    num_running = 0
    kv_cache_usage = 0.0
    num_preemptions = 0
    num_step_retries = 0

    def add_step_listener(self, listener) -> None:
        pass


def _exposed() -> dict[str, set[str]]:
    """Sample name -> its label names, in the /metrics text of an app that has seen every kind of event."""
    metrics = ServingMetrics(_Engine())
    for status in ("stop", "length", "abort", "error", "rejected"):
        timer = metrics.start_request()
        timer.on_cached(2)
        timer.on_tokens(1)
        timer.on_tokens(1)
        timer.finish(status, 3)
    metrics.step.observe(0.01)
    collector = PlacementCollector()
    collector.refresh({
        "placement_version": 3, "layer_imbalance": [1.2, 1.1], "device_predicted_s": [0.01, 0.02],
        "device_observed_over_predicted": [1.0, 1.3], "device_model_over_planned": [1.0, 1.25],
        "last_recalibration_s": 0.4, "experts_moved": 4,
        "recalibrations": {"applied": 2, "rolled_back": 1, "failed": 1, "skipped": 3}, "bytes_moved": 1 << 20,
        "lost_devices": [1],
        "telemetry": [asdict(Telemetry(0, True, sm_clock_mhz=1980.0, max_sm_clock_mhz=1980.0, power_w=362.0,
                                       power_limit_w=700.0, temperature_c=42.0, expert_bytes=1 << 30))]})
    metrics.registry.register(collector)
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    return exposed


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard target and alert rule, Grafana's macros replaced."""
    queries = [(f"panel {panel['title']!r}", target["expr"]) for panel in DASHBOARD["panels"]
               for target in panel.get("targets", ())]
    queries += [(f"alert {rule['alert']}", rule["expr"]) for rule in RULES]
    for macro, value in GRAFANA_MACROS.items():
        queries = [(where, expr.replace(macro, value)) for where, expr in queries]
    return queries


def _selectors(node) -> list:
    """Every vector selector in a parsed expression."""
    if isinstance(node, promql_parser.VectorSelector):
        return [node]
    found = []
    for name in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, name, None)
        if child is not None and not isinstance(child, (int, float, str)):
            found += _selectors(child)
    for child in getattr(node, "args", None) or ():
        found += _selectors(child)
    return found


def _labels_used(node) -> set[str]:
    """Label names an expression groups by or matches on."""
    used = set()
    modifier = getattr(node, "modifier", None)
    if modifier is not None and getattr(modifier, "labels", None):
        used |= set(modifier.labels)
    for name in ("expr", "lhs", "rhs", "param"):
        child = getattr(node, name, None)
        if child is not None and not isinstance(child, (int, float, str)):
            used |= _labels_used(child)
    for child in getattr(node, "args", None) or ():
        used |= _labels_used(child)
    return used


QUERIES = _queries()


def test_there_is_a_query_per_panel_and_rule():
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    assert len(panels) >= 15 and all(p.get("targets") for p in panels)
    assert len(RULES) >= 8 and len(QUERIES) >= len(panels) + len(RULES)


@pytest.mark.parametrize("where, expr", QUERIES, ids=[where for where, _ in QUERIES])
def test_every_query_parses_and_names_exposed_metrics_and_labels(where, expr):
    exposed = _exposed()
    parsed = promql_parser.parse(expr)
    selectors = _selectors(parsed)
    assert selectors, f"{where}: no metric in {expr}"
    labels = set()
    for selector in selectors:
        assert selector.name in exposed, f"{where}: {selector.name} is not in /metrics"
        labels |= exposed[selector.name]
        for matcher in selector.matchers.matchers:
            assert matcher.name in exposed[selector.name], f"{where}: {selector.name} has no label {matcher.name}"
    assert _labels_used(parsed) - {"le"} <= labels, f"{where}: groups by a label its metrics do not have"


def test_alerts_say_what_and_how_bad():
    names = [rule["alert"] for rule in RULES]
    assert len(set(names)) == len(names)
    for rule in RULES:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_dashboard_imports_with_a_datasource_variable():
    assert DASHBOARD["uid"] == "vibe-serve" and DASHBOARD["templating"]["list"][0]["type"] == "datasource"
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in DASHBOARD["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["description"], panel["title"]


def test_every_status_is_exposed_from_zero():
    """Counters by status exist at 0 before their first event: Prometheus' increase() and rate() see nothing of a
    series' first sample, so a first recalibration rolled back (or a first burst of errors) created at 1 never
    alerted (audit: sum(increase(vibe_recalibrations_total{status=~"failed|rolled_back"}[1h])) stayed 0)."""
    from service.placement_metrics import RECALIBRATION_STATUSES

    metrics = ServingMetrics(_Engine())
    collector = PlacementCollector()
    collector.refresh({"placement_version": 1, "layer_imbalance": None, "device_observed_over_predicted": [],
                       "last_recalibration_s": None, "experts_moved": 0, "recalibrations": {}, "bytes_moved": 0,
                       "lost_devices": [], "telemetry": []})
    metrics.registry.register(collector)
    values = {(sample.name, sample.labels.get("status")): sample.value
              for family in text_string_to_metric_families(metrics.render().decode()) for sample in family.samples}
    for status in ("stop", "length", "abort", "error", "rejected"):
        assert values[("vibe_requests_total", status)] == 0
    for status in ("failed", "rolled_back", "applied", "skipped", "no_change", "dry_run"):
        assert values[("vibe_recalibrations_total", status)] == 0
    assert set(RECALIBRATION_STATUSES) == {"applied", "dry_run", "skipped", "no_change", "rolled_back", "failed"}


def test_latency_histograms_reach_past_the_request_timeout():
    """TTFT and end-to-end buckets went to 60 s while requests may run 300 s (request_timeout_s's default): every
    longer request read as 60 s in histogram_quantile."""
    from deploy.app import AppArgs

    metrics = ServingMetrics(_Engine())
    for seconds in (90.0, 200.0):
        metrics.e2e.observe(seconds)
    buckets = [sample for family in text_string_to_metric_families(metrics.render().decode())
               for sample in family.samples if sample.name == "vibe_e2e_request_latency_seconds_bucket"]
    finite = [float(s.labels["le"]) for s in buckets if s.labels["le"] != "+Inf"]
    assert max(finite) >= AppArgs().request_timeout_s
    assert next(s.value for s in buckets if s.labels["le"] == "120.0") == 1


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def test_alerts_on_sustained_events_need_them_throughout():
    """An alert on events going on for its `for:` duration (a rate or increase above 0) must look back over a window
    well inside it: with rate(...[10m]) > 0 for 10m a single preemption kept the condition true for 10 minutes, and two
    a minute apart fired VibeServePreempting (audit)."""
    checked = 0
    for rule in RULES:
        expr = " ".join(rule["expr"].split())
        if "for" in rule and re.search(r"\b(rate|increase)\(", expr) and expr.endswith("> 0"):
            windows = [_seconds(w) for w in re.findall(r"\[(\d+[smh])\]", expr)]
            assert max(windows) <= _seconds(rule["for"]) / 2, rule["alert"]
            checked += 1
    assert checked >= 1


def test_manifest_sets_no_field_kuberay_ignores():
    """serviceUnhealthySecondThreshold and deploymentUnhealthySecondThreshold are deprecated and unused since KubeRay
    1.1 (kuberay#1656, #1665): the manifest's "900 s while the app loads" grace did not exist."""
    manifest = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy/kuberay/rayservice.yaml").read_text())
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(manifest["spec"])


def test_each_replica_exposes_every_replicas_serving_series_labelled():
    """A scrape through Serve's proxy reaches one ingress replica at random: each exposes every replica's serving
    series labelled `replica` (its own live, the others' last snapshots), and the coordinator's placement metrics
    once, unlabelled. (Audit: unlabelled, one series jumped between the replicas' counters, every drop a counter
    reset: 2 replicas at 1 request/s read as 109 requests/s.)"""
    replicas = {name: ServingMetrics(_Engine(), replica=name) for name in ("ingress-a", "ingress-b")}
    placement = PlacementCollector()
    placement.refresh({"placement_version": 7, "layer_imbalance": None, "device_observed_over_predicted": [],
                       "last_recalibration_s": None, "experts_moved": 0, "recalibrations": {}, "bytes_moved": 0,
                       "lost_devices": [], "telemetry": []})
    for metrics, count in zip(replicas.values(), (3, 5)):
        metrics.add_shared(placement)
        for _ in range(count):
            timer = metrics.start_request()
            timer.on_tokens(1)
            timer.finish("stop", 2)
    snapshots = {name: metrics.snapshot() for name, metrics in replicas.items()}
    for metrics in replicas.values():
        metrics.set_peers(snapshots)
        families = list(text_string_to_metric_families(metrics.render().decode()))
        samples = [sample for family in families for sample in family.samples]
        requests = {s.labels["replica"]: s.value for s in samples
                    if s.name == "vibe_requests_total" and s.labels["status"] == "stop"}
        assert requests == {"ingress-a": 3, "ingress-b": 5}
        assert all("replica" in s.labels for s in samples if s.name.startswith("vibe_time_to_first_token"))
        (version,) = [s for s in samples if s.name == "vibe_placement_version"]
        assert version.labels == {} and version.value == 7
        assert len({family.name for family in families}) == len(families)  # each family once


def test_every_sample_carries_the_time_its_replica_took_it(monkeypatch):
    """A scrape reaching a replica whose copy of a peer is older than what a scrape of the peer itself gave saw that
    peer's counters go down (Prometheus: a counter reset, rate() adding the whole counter back; up to 30 s old copies
    when the peer's exchange stalled, a review). Each sample carries the time its replica took it, so Prometheus
    rejects an older copy as out of order; a copy taken more than PEERS_TTL_S ago is left out; the placement
    metrics carry the time the coordinator made its summary."""
    from service import metrics as metrics_module

    wall = [5000.0]
    monkeypatch.setattr(metrics_module.time, "time", lambda: wall[0])
    a, b = (ServingMetrics(_Engine(), replica=name) for name in ("ingress-a", "ingress-b"))
    b.start_request().finish("stop", 1)
    a.set_peers({"ingress-b": b.snapshot()})  # taken at 5000
    wall[0] = 5004.0
    b.start_request().finish("stop", 1)

    def stops(metrics: ServingMetrics) -> dict[str, tuple[float, float]]:
        return {s.labels["replica"]: (s.value, s.timestamp) for family in text_string_to_metric_families(
            metrics.render().decode()) for s in family.samples
            if s.name == "vibe_requests_total" and s.labels["status"] == "stop"}

    assert stops(b)["ingress-b"] == (2.0, 5004.0)  # live
    assert stops(a)["ingress-b"] == (1.0, 5000.0)  # the older copy: older than the live one, not a lower count
    wall[0] = 5000.0 + metrics_module.PEERS_TTL_S + 1
    assert "ingress-b" not in stops(a)  # taken too long ago, though it arrived within PEERS_TTL_S
    a.set_peers({"ingress-b": [(n, k, h, u, samples) for n, k, h, u, samples in b.snapshot()["families"]]})
    assert stops(a)["ingress-b"] == (2.0, None)  # a replica from before "at" (a rolling update): untimed

    placement = PlacementCollector()
    placement.refresh({"at": 4321.5, "placement_version": 7, "layer_imbalance": None,
                       "device_observed_over_predicted": [], "last_recalibration_s": None, "experts_moved": 3,
                       "recalibrations": {"applied": 1}, "bytes_moved": 10, "lost_devices": [], "telemetry": []})
    samples = [sample for family in placement.collect() for sample in family.samples]
    assert samples and {sample.timestamp for sample in samples} == {4321.5}


def test_a_replicas_copy_of_its_peers_expires(monkeypatch):
    """Peers' snapshots are exposed for PEERS_TTL_S after they arrived: while the coordinator did not answer, a
    replica exposed its peers' frozen counters for good beside their live ones (a scrape reaches either replica),
    read as counter resets (review)."""
    from service import metrics as metrics_module

    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    a, b = (ServingMetrics(_Engine(), replica=name) for name in ("ingress-a", "ingress-b"))
    a.set_peers({"ingress-b": b.snapshot()})

    def replicas() -> set[str]:
        return {sample.labels.get("replica") for family in text_string_to_metric_families(a.render().decode())
                for sample in family.samples if sample.name == "vibe_requests_total"}

    assert replicas() == {"ingress-a", "ingress-b"}
    clock[0] += metrics_module.PEERS_TTL_S + 1
    assert replicas() == {"ingress-a"}
