"""The side-by-side benchmark's configuration: app arguments per policy and the validated knobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from deploy.app import DEFAULT_SPEEDS, AppArgs
from load_tests.compare import (
    ADMIN_TOKEN,
    DEFAULT,
    CompareConfig,
    Experiment,
    _extras,
    _StopApart,
    app_args_for,
    deploy_args,
    parse_args,
    run_order,
)


def test_every_policy_runs_the_deploy_cluster_with_its_own_knobs():
    config = replace(DEFAULT, app_args={"max_num_seqs": 16},
                     policy_args={"eplb": {"num_redundant": 8}, "vibe": {"num_redundant": 4, "slot_budget": 5}})
    base = deploy_args()
    for policy in ("contiguous", "eplb", "vibe"):
        args = app_args_for(policy, config, f"bench-{policy}")
        AppArgs.model_validate(args)  # build_app accepts it
        assert args["policy"] == policy and args["app_name"] == f"bench-{policy}"
        assert args["speeds"] == base["speeds"] and args["emulation"] == base["emulation"]
        assert args["max_num_seqs"] == 16 and args["admin_token"] == ADMIN_TOKEN
    assert app_args_for("eplb", config, "x")["num_redundant"] == 8
    assert app_args_for("vibe", config, "x")["slot_budget"] == 5
    assert app_args_for("contiguous", config, "x").get("num_redundant", 0) == 0


def test_the_benchmarks_apps_cache_no_prefixes_unless_set():
    """The traces draw whole prompts from a few hundred: with prefix caching on, 31% to 86% of a sweep's requests
    (by rate) repeated a prompt the app had cached and skipped its prefill, MoE layers included (a review)."""
    assert deploy_args().get("enable_prefix_caching", True)  # the served default caches
    assert app_args_for("vibe", DEFAULT, "x")["enable_prefix_caching"] is False
    turned_on = replace(DEFAULT, app_args={"enable_prefix_caching": True})
    assert app_args_for("vibe", turned_on, "x")["enable_prefix_caching"] is True


def test_deploy_cluster_stays_within_published_variability():
    args = deploy_args()
    speeds = args["speeds"]
    assert 1 - min(speeds) / max(speeds) <= 0.13 + 1e-9
    assert args["emulation"]["throttle_floor"] >= 0.7


@pytest.mark.parametrize(("change", "message"), [
    ({"policies": ()}, "policies"),
    ({"policies": ("eplb", "eplb")}, "policies"),
    ({"rates": (2.0, 1.0)}, "rates"),
    ({"rates": (0.0, 1.0)}, "rates"),
    ({"duration_s": 0}, "duration_s"),
    ({"unloaded_requests": 0}, "unloaded"),
    ({"stop_below": 0.95}, "stop_below"),
])
def test_compare_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        replace(DEFAULT, **change)


def test_default_is_valid():
    assert isinstance(DEFAULT, CompareConfig) and DEFAULT.policies[0] == "eplb"


class _ScriptedSweep(Experiment):
    """The sweep logic alone: each policy's attainment at a rate comes from `attainment(policy, rate)`."""

    def __init__(self, config: CompareConfig, attainment, rates: list[float]) -> None:
        self.config = config
        self.attainment = attainment
        self.result = {"rates": rates, "policies": {p: {"runs": []} for p in config.policies}}

    async def _run_all(self, clients, rate, kind):
        if self.attainment(None, rate) is None:  # no request arrives at this rate
            return None
        runs = {p: {"rate_rps": rate, "kind": kind, "summary": {"attainment": self.attainment(p, rate)}}
                for p in clients}
        for policy, run in runs.items():
            self._entry(policy)["runs"].append(run)
        return runs


def _sweep(config: CompareConfig, attainment, rates: list[float]) -> tuple[list[float], dict[str, list[float]]]:
    """The scripted sweep's swept rates and the rates each policy ran."""
    experiment = _ScriptedSweep(config, attainment, rates)
    experiment.result["rates"] = asyncio.run(experiment._sweep({p: None for p in config.policies}, rates))
    own = {p: [r["rate_rps"] for r in experiment._entry(p)["runs"]] for p in config.policies}
    return experiment.result["rates"], own


def _swept(config: CompareConfig, attainment, rates: list[float]) -> list[float]:
    swept, own = _sweep(config, attainment, rates)
    for ran in own.values():  # each policy ran a prefix of the swept rates (all of them when together)
        assert ran == swept[:len(ran)] and (ran == swept or not config.together)
    return swept


def _rates_of(config: CompareConfig, attainment, rates: list[float]) -> dict[str, list[float]]:
    return _sweep(config, attainment, rates)[1]


def test_sweep_goes_on_above_the_listed_rates_while_a_policy_still_meets_the_target():
    config = CompareConfig(policies=("eplb", "vibe"))
    capacity = {"eplb": 1.5, "vibe": 2.5}  # attainment 1 up to the capacity, 0 beyond

    rates = _swept(config, lambda p, r: 1.0 if p is None or r <= capacity[p] else 0.0, [0.5, 1.0])
    assert rates == [0.5, 1.0, 1.3, 1.69, 2.197, 2.856]  # x1.3 until vibe falls below too
    assert _swept(config, lambda p, r: 1.0, [0.5])[-1] == pytest.approx(0.5 * 1.3 ** 9, rel=1e-2)  # max_rates
    assert len(_swept(config, lambda p, r: 1.0, [0.5])) == config.max_rates


def test_one_at_a_time_a_policy_leaves_the_sweep_below_stop_below_together_it_stays():
    capacity = {"eplb": 1.5, "vibe": 2.5}

    def attainment(p, r):
        return 1.0 if p is None or r <= capacity[p] else 0.2

    alone = _rates_of(CompareConfig(policies=("eplb", "vibe"), together=False), attainment, [0.5, 1.0, 2.0, 3.0])
    assert alone == {"eplb": [0.5, 1.0, 2.0], "vibe": [0.5, 1.0, 2.0, 3.0]}
    together = _rates_of(CompareConfig(policies=("eplb", "vibe")), attainment, [0.5, 1.0, 2.0, 3.0])
    assert together == {"eplb": [0.5, 1.0, 2.0, 3.0], "vibe": [0.5, 1.0, 2.0, 3.0]}


def test_run_order_rotates_so_each_policy_takes_each_position():
    policies = ["eplb", "contiguous", "vibe"]
    orders = [run_order(policies, turn) for turn in range(3)]
    assert orders == [["eplb", "contiguous", "vibe"], ["contiguous", "vibe", "eplb"], ["vibe", "eplb", "contiguous"]]
    assert run_order(policies, 3) == policies and policies == ["eplb", "contiguous", "vibe"]
    for position in range(3):
        assert sorted(order[position] for order in orders) == sorted(policies)


def test_sweep_stops_early_once_every_policy_is_below_stop_below():
    config = CompareConfig(policies=("eplb", "vibe"))
    assert _swept(config, lambda p, r: 1.0 if r < 1 else 0.2, [0.5, 1.0, 2.0, 3.0]) == [0.5, 1.0]


def test_a_rate_without_requests_is_left_out_and_the_sweep_goes_on():
    config = CompareConfig(policies=("eplb", "vibe"))
    empty = {0.01}
    assert _swept(config, lambda p, r: None if r in empty else (1.0 if r < 1 else 0.2),
                  [0.01, 0.5, 2.0]) == [0.5, 2.0]
    # Between stop_below and the target nobody meets the target: no extension beyond the list.
    assert _swept(config, lambda p, r: 0.7, [0.5, 1.0]) == [0.5, 1.0]


def test_rates_that_send_no_request_are_rejected_before_anything_starts():
    """`--rates 0.1 --duration 3` (no request in 3 s) was accepted; every rate was skipped and slo.frontier raised
    'need as many attainments as rates (>= 1), got 0 and 0', after the apps had started and warmed up (an audit)."""
    with pytest.raises(ValueError, match=r"rates \[0.1\] send no request in duration_s=3 s"):
        replace(DEFAULT, rates=(0.1, 2.0), duration_s=3.0)
    assert replace(DEFAULT, rates=(0.2, 2.0), duration_s=3.0).rates == (0.2, 2.0)  # round(0.6) = 1 request
    with pytest.raises(ValueError, match="warmup_rate=0.01 sends no request in warmup_s=20 s"):
        replace(DEFAULT, warmup_rate=0.01)
    with pytest.raises(ValueError, match="sends no request in duration_s=3 s"):  # the unloaded requests' trace
        replace(DEFAULT, warmup_rate=0.1, warmup_s=20.0, duration_s=3.0, rates=(1.0,))
    # rates from the multipliers are known only after the unloaded requests: a sweep without a request says so
    with pytest.raises(RuntimeError, match="no swept rate"):
        _swept(CompareConfig(policies=("eplb", "vibe")), lambda p, r: None, [0.001, 0.002])


def test_no_run_at_eplbs_frontier_when_it_is_zero():
    """eplb failing every request has frontier 0, a rate no trace can have (TraceConfig wants > 0): a note instead."""
    experiment = _ScriptedSweep(CompareConfig(policies=("eplb", "vibe")), lambda p, r: 0.0, [0.5, 1.0])
    asyncio.run(experiment._sweep({"eplb": None, "vibe": None}, [0.5, 1.0]))
    asyncio.run(experiment._at_eplb_frontier({"eplb": None, "vibe": None}))
    assert [r["kind"] for p in ("eplb", "vibe") for r in experiment._entry(p)["runs"]] == ["sweep", "sweep"]
    assert "eplb's SLO frontier is 0" in experiment.result["notes"][0]
    met = _ScriptedSweep(CompareConfig(policies=("eplb", "vibe")), lambda p, r: 1.0 if r < 1 else 0.0, [0.5, 1.0])
    asyncio.run(met._sweep({"eplb": None, "vibe": None}, [0.5, 1.0]))
    asyncio.run(met._at_eplb_frontier({"eplb": None, "vibe": None}))
    assert [r["kind"] for r in met._entry("eplb")["runs"]][-1] == "eplb_frontier" and "notes" not in met.result


CAPACITY = {"eplb": 1.0, "vibe": 2.0, "contiguous": 0.5}
# unloaded TTFTs per app: medians 0.1, 0.35, 0.45; pooled, 0.25, which no app alone has
UNLOADED_TTFT = {"eplb": [0.1] * 8, "vibe": [0.2] * 4 + [0.5] * 4, "contiguous": [0.3] * 4 + [0.6] * 4}


def _fake_unloaded(monkeypatch) -> None:
    from load_tests import compare
    from load_tests.generator import RequestResult

    async def unloaded_latency(client, probe, num, max_tokens):
        return [RequestResult(i, "w", 0.0, t, t + 0.09, 8, 10) for i, t in enumerate(UNLOADED_TTFT[client][:num])]

    monkeypatch.setattr(compare, "unloaded_latency", unloaded_latency)


def test_the_unloaded_probe_holds_the_requests_the_slo_is_said_to_pool(monkeypatch, tmp_path):
    """The probe was a trace of warmup_rate over duration_s: at --duration 10 it held 5 of the 8 unloaded requests the
    report says the SLOs pool (a review)."""
    import asyncio

    from load_tests import compare

    sent = {}

    async def unloaded_latency(client, probe, num, max_tokens):
        sent[client] = len(probe[:num])
        return []

    monkeypatch.setattr(compare, "unloaded_latency", unloaded_latency)
    for duration, expected in ((10.0, 8), (90.0, 8)):
        experiment = Experiment(CompareConfig(policies=("eplb",), duration_s=duration, warmup_rate=0.5,
                                              unloaded_requests=8), tmp_path, progress=False)
        experiment.result["policies"]["eplb"] = {}
        asyncio.run(experiment._unloaded({"eplb": "eplb"}))
        assert sent == {"eplb": expected}, duration


class _ScriptedApart(Experiment):
    """`deploy_apart` with the apps and their loads faked: records what was deployed, when, and what ran on it.
    Attainment 1 up to a policy's capacity, 0.2 beyond."""

    def __init__(self, config: CompareConfig, capacity: dict[str, float], out,
                 start_fails: tuple = (), left_after: tuple = (), run_fails: tuple = ()) -> None:
        super().__init__(config, out, progress=False)
        self.capacity = capacity
        self.deployed: set[str] = set()
        self.events: list[tuple] = []
        self.start_fails = start_fails  # (policy, turn): that deployment fails to start
        self.left_after = left_after  # (policy, turn): deleting that deployment leaves workers behind
        self.run_fails = run_fails  # (policy, turn): that deployment's client fails (its /v1/models refused)
        for policy in config.policies:
            self.result["policies"][policy] = {"runs": []}

    @contextlib.contextmanager
    def _serve(self, apps, require_cleanup=False):
        from load_tests.compare import LeftOnCluster

        assert not self.deployed, "two deployments at once"
        assert require_cleanup  # the next app is deployed only once this one is gone
        (policy,) = apps
        turn = sum(1 for e in self.events if e == ("deploy", policy)) + 1
        self.events.append(("deploy", policy))
        if (policy, turn) in self.start_fails:
            raise TimeoutError(f"bench-{policy} not RUNNING before the deadline")
        self.deployed = set(apps)
        left = LeftOnCluster(f"still on the cluster after deleting the apps: ['vibe-worker-bench-{policy}-x-0']")
        try:
            yield {policy: f"http://cluster/bench-{policy}"}, 2.0
        except Exception as exc:  # as serve_apps: what deleting the app left, raised over the turn's error
            if (policy, turn) in self.left_after:
                raise left from exc
            raise
        finally:
            self.deployed = set()
        if (policy, turn) in self.left_after:
            raise left

    async def _clients(self, bases):
        assert set(bases) == self.deployed
        (policy,) = bases
        if (policy, sum(1 for e in self.events if e == ("deploy", policy))) in self.run_fails:
            raise ConnectionError(f"bench-{policy}: /v1/models refused")
        self.events.append(("warm-up", *bases))
        return {p: p for p in bases}

    async def _run_all(self, clients, rate, kind):
        assert set(clients) == self.deployed and self.slo is not None
        self.events.append((kind, rate, *clients))
        runs = {p: {"rate_rps": rate, "kind": kind,
                    "summary": {"attainment": 1.0 if rate <= self.capacity[p] else 0.2}} for p in clients}
        for policy, run in runs.items():
            if kind == "sweep":
                self._entry(policy)["runs"].append(run)
            else:
                self._entry(policy)["at_eplb_frontier"] = run
        return runs


def test_deployed_apart_each_app_comes_alone_twice_eplb_first_and_the_slo_pools_every_app(monkeypatch, tmp_path):
    """`--deploy-one-at-a-time`: the cluster never holds two apps; every app's unloaded latency before any sweep
    (the SLO pooled over all three); eplb's sweep first, so every policy also runs at eplb's frontier rate."""

    _fake_unloaded(monkeypatch)
    config = CompareConfig(policies=("vibe", "contiguous", "eplb"), rates=(0.5, 1.0), together=False,
                           deploy_apart=True)
    experiment = _ScriptedApart(config, CAPACITY, tmp_path)
    experiment._run_apart({p: {} for p in config.policies})

    deploys = [e[1] for e in experiment.events if e[0] == "deploy"]
    assert deploys == ["eplb", "vibe", "contiguous"] * 2
    first_sweep = next(i for i, e in enumerate(experiment.events) if e[0] == "sweep")
    assert [e[1] for e in experiment.events[:first_sweep] if e[0] == "deploy"] == ["eplb", "vibe", "contiguous", "eplb"]
    assert experiment.slo.ttft_s == pytest.approx(5 * 0.25)  # the median of all three apps' unloaded TTFTs
    assert experiment.result["slo"]["set_by"] == "every app (pooled), each deployed alone"
    assert all(experiment._entry(p)["unloaded"]["results"]["ttft_s"] == UNLOADED_TTFT[p] for p in config.policies)
    own = {p: [r["rate_rps"] for r in experiment._entry(p)["runs"]] for p in config.policies}
    assert own == {"eplb": [0.5, 1.0, 1.3], "vibe": [0.5, 1.0, 1.3, 1.69, 2.197], "contiguous": [0.5, 1.0]}
    assert experiment.result["rates"] == [0.5, 1.0, 1.3, 1.69, 2.197]  # every rate some policy ran
    eplb_rate = experiment._frontier("eplb").rate_rps
    assert 1.0 < eplb_rate < 1.3
    assert {p: experiment._entry(p)["at_eplb_frontier"]["rate_rps"] for p in config.policies} == dict.fromkeys(
        config.policies, eplb_rate)
    assert all(experiment._entry(p)["frontier"]["rate_rps"] > 0 for p in config.policies)
    assert experiment.result["startup_s_per_app"] == {p: [2.0, 2.0] for p in deploys[:3]}
    assert experiment.result["startup_s"] == 2.0


def test_deployed_apart_a_policy_whose_app_fails_is_left_out_and_the_others_are_measured(monkeypatch, tmp_path):
    """Deployed apart, a run takes six deployments: one that fails (a deadline, a lost device) lost every policy's
    measurements, and the report could not be written (a review)."""
    _fake_unloaded(monkeypatch)
    config = CompareConfig(policies=("eplb", "contiguous", "vibe"), rates=(0.5, 1.0), together=False,
                           deploy_apart=True)
    experiment = _ScriptedApart(config, CAPACITY, tmp_path, start_fails={("contiguous", 2)})
    experiment._run_apart({p: {} for p in config.policies})
    assert list(experiment.result["policies"]) == ["eplb", "vibe"]
    failed = experiment.result["failed_policies"]["contiguous"]
    assert failed["error"] == "TimeoutError: bench-contiguous not RUNNING before the deadline"
    assert failed["unloaded"]["results"]["ttft_s"] == UNLOADED_TTFT["contiguous"]  # what it measured, kept
    assert experiment.slo.ttft_s == pytest.approx(5 * 0.25)  # its unloaded latency still in the SLOs
    assert any("contiguous failed, left out of the tables" in n for n in experiment.result["notes"])  # in the report

    # failing to start for its unloaded latency: left out of the SLOs too
    experiment = _ScriptedApart(config, CAPACITY, tmp_path, start_fails={("eplb", 1)})
    experiment._run_apart({p: {} for p in config.policies})
    assert list(experiment.result["policies"]) == ["contiguous", "vibe"]
    assert experiment.slo.ttft_s == pytest.approx(5 * 0.4)  # the median of vibe's and contiguous's TTFTs
    assert all("at_eplb_frontier" not in e for e in experiment.result["policies"].values())  # no eplb frontier


def test_deployed_apart_workers_left_behind_end_the_run_with_what_it_measured(monkeypatch, tmp_path):
    """An app whose workers outlive its deletion still holds its devices: the next app would wait for them until
    its deadline (a review). The run ends there; the policies measured so far stay, the others are said not run."""
    _fake_unloaded(monkeypatch)
    config = CompareConfig(policies=("eplb", "contiguous", "vibe"), rates=(0.5, 1.0), together=False,
                           deploy_apart=True)
    experiment = _ScriptedApart(config, CAPACITY, tmp_path, left_after={("eplb", 2)})
    monkeypatch.setattr("load_tests.compare.model_fingerprint", lambda args: {"path": "m"})
    monkeypatch.setattr("load_tests.compare.app_args_for", lambda policy, config, name: {"app_name": name})
    monkeypatch.setattr("load_tests.compare.resolved_args", lambda args: args)
    result = experiment.run()
    assert list(result["policies"]) == ["eplb"] and result["policies"]["eplb"]["frontier"]["rate_rps"] > 0
    assert [e for e in experiment.events if e[0] == "deploy"][-1] == ("deploy", "eplb")  # nothing deployed after
    assert set(result["failed_policies"]) == {"contiguous", "vibe"}
    assert result["failed_policies"]["vibe"]["error"].startswith("not run: still on the cluster")
    # left behind before any sweep: nothing to report; the saved file says which were not run (it listed them)
    experiment = _ScriptedApart(config, CAPACITY, tmp_path, left_after={("contiguous", 1)})
    with pytest.raises(RuntimeError, match="the later apps \\(vibe\\) were not deployed"):
        experiment.run()
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["failed_policies"]) == {"vibe"} and "vibe" not in saved["policies"]
    assert any("were not deployed beside it" in note for note in saved["notes"])


def test_deployed_apart_a_failed_turn_that_left_workers_behind_still_ends_the_run(monkeypatch, tmp_path):
    """A turn that failed (its client refused) and whose deletion left workers behind was recorded as an ordinary
    failure, and the next app was deployed beside those workers, to wait for their devices until its deadline (a
    review): the failed policy keeps its own error, and nothing is deployed after it."""
    _fake_unloaded(monkeypatch)
    config = CompareConfig(policies=("eplb", "contiguous", "vibe"), rates=(0.5, 1.0), together=False,
                           deploy_apart=True)
    experiment = _ScriptedApart(config, CAPACITY, tmp_path, left_after={("eplb", 2)}, run_fails={("eplb", 2)})
    with pytest.raises(_StopApart):
        experiment._run_apart({p: {} for p in config.policies})
    assert [e for e in experiment.events if e[0] == "deploy"][-1] == ("deploy", "eplb")  # nothing deployed after
    failed = experiment.result["failed_policies"]
    assert failed["eplb"]["error"] == "ConnectionError: bench-eplb: /v1/models refused"
    assert failed["vibe"]["error"].startswith("not run: still on the cluster") and not experiment.result["policies"]


def _fake_cluster(monkeypatch, wait_workers_gone):
    """serve_apps on a running cluster with Ray, Serve and the app faked; returns the calls to ray.init/shutdown."""
    import ray
    import ray.serve
    import ray.serve.context

    import deploy.app

    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append("shutdown"))
    monkeypatch.setattr(deploy.app, "build_app", lambda args: object())
    monkeypatch.setattr(ray.serve, "status", lambda: SimpleNamespace(applications={}))
    monkeypatch.setattr(ray.serve.context, "_get_global_client",
                        lambda: SimpleNamespace(delete_apps=lambda names, blocking: calls.append("delete")))
    for name, fake in {"_cluster_root": lambda *a: ("http://127.0.0.1:8000", False), "_warn_if_short": lambda a: None,
                       "_deploy": lambda *a: None, "_wait_healthy": lambda *a: None, "_check_devices": lambda *a: None,
                       "_wait_workers_gone": wait_workers_gone}.items():
        monkeypatch.setattr(f"load_tests.compare.{name}", fake)
    return calls


def test_deleting_apps_whose_workers_cannot_be_listed_disconnects_and_says_they_may_be_left(monkeypatch):
    """Listing the deleted apps' workers raised (a GCS timeout): ray.shutdown was skipped (every later turn's
    ray.init then failed) and a finished turn read as failed (a review). Now they count as left on the cluster."""
    from load_tests.compare import LeftOnCluster, serve_apps

    def unlisted(names, deadline):
        raise TimeoutError("GCS did not answer")

    calls = _fake_cluster(monkeypatch, unlisted)
    with (pytest.raises(LeftOnCluster, match="could not be listed") as raised,
          serve_apps({"bench-eplb": {}}, address="auto", require_cleanup=True)):
        pass
    assert raised.value.__cause__ is None and calls == ["init", "delete", "shutdown"]


def test_what_a_failed_turns_deletion_left_is_raised_over_its_error(monkeypatch):
    from load_tests.compare import LeftOnCluster, serve_apps

    calls = _fake_cluster(monkeypatch, lambda names, deadline: ["vibe-worker-bench-eplb-x-0"])
    with (pytest.raises(LeftOnCluster, match="vibe-worker-bench-eplb-x-0") as raised,
          serve_apps({"bench-eplb": {}}, address="auto", require_cleanup=True)):
        raise ConnectionError("/v1/models refused")
    assert isinstance(raised.value.__cause__, ConnectionError) and calls[-1] == "shutdown"
    with pytest.raises(ConnectionError), serve_apps({"bench-eplb": {}}, address="auto"):  # not asked: the error
        raise ConnectionError("/v1/models refused")
    with pytest.raises(KeyboardInterrupt), serve_apps({"bench-eplb": {}}, address="auto", require_cleanup=True):
        raise KeyboardInterrupt  # a stop stays a stop


def test_deploying_apart_needs_loading_apart():
    with pytest.raises(ValueError, match="deploy_apart loads one app at a time"):
        CompareConfig(deploy_apart=True)
    config, _ = parse_args(["--deploy-one-at-a-time"])
    assert config.deploy_apart and not config.together
    assert not parse_args(["--one-at-a-time"])[0].deploy_apart


def test_command_line_overrides_only_what_it_names():
    config, args = parse_args([])
    assert config == DEFAULT and config.together and not args.drift
    config, args = parse_args(["--one-at-a-time", "--seed", "0", "--rates", "0.5", "1", "--policies", "eplb", "vibe",
                               "--duration", "30", "--drift"])
    assert not config.together and config.seed == 0 and config.rates == (0.5, 1.0)
    assert config.policies == ("eplb", "vibe") and config.duration_s == 30 and args.drift
    assert replace(config, together=True, seed=DEFAULT.seed, rates=None, policies=DEFAULT.policies,
                   duration_s=DEFAULT.duration_s) == DEFAULT


def test_model_fingerprint_names_the_embedded_model_relative_to_the_repository():
    from load_tests.compare import model_fingerprint

    found = model_fingerprint(deploy_args())
    assert found["path"] == "deploy/models/vibe-tiny-moe"
    assert found["weights_sha256"] is not None and len(found["weights_sha256"]) == 64


def test_another_serve_config_and_set_overrides_reach_every_app(tmp_path):
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text("applications:\n  - name: mine\n    import_path: deploy.app:build_app\n    args:\n"
                           "      num_devices: 4\n      speeds: [1.0, 0.95, 0.9, 0.9]\n      max_num_seqs: 8\n")
    config, args = parse_args(["--config", str(config_file), "--set", "max_num_seqs=16", "--set", "num_redundant=4",
                               "--set", "speeds=[1.0, 1.0, 0.9, 0.8]", "--address", "auto"])
    assert config.deploy_config == str(config_file) and args.address == "auto"
    assert config.app_args == {"max_num_seqs": 16, "num_redundant": 4, "speeds": [1.0, 1.0, 0.9, 0.8]}
    for policy in ("eplb", "vibe"):
        built = app_args_for(policy, config, f"bench-{policy}")
        assert built["num_devices"] == 4 and built["max_num_seqs"] == 16 and built["speeds"] == [1.0, 1.0, 0.9, 0.8]
        AppArgs.model_validate(built)


def test_a_relative_config_path_is_found_from_the_repository_root_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert deploy_args("deploy/config.gpu.yaml")["device"] == "cuda"


@pytest.mark.parametrize(("argv", "message"), [
    (["--set", "num_devices"], "KEY=VALUE"),
    (["--set", "=3"], "KEY=VALUE"),
    (["--set", "speeds=[1.0"], "not a YAML value"),
    (["--set", "no_such_arg=1"], "no_such_arg"),
    (["--set", "num_devices=0"], "num_devices"),
    (["--config", "no/such/config.yaml"], "cannot read the serve config"),
    (["--config", "README.md"], "not a serve config|cannot read"),
    (["--config", "deploy/config.gpu.yaml", "--drift"], "--drift needs emulated devices"),
    (["--deploy-one-at-a-time", "--drift"], "--drift deploys its static and adaptive apps together"),
])
def test_bad_command_lines_are_refused_before_anything_starts(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_serve_config_without_application_args_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    for text in ("applications: []\n", "proxy_location: EveryNode\n", "applications:\n  - args: [1, 2]\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match="serve config|mapping"):
            deploy_args(path)


def test_headroom_is_left_out_for_real_devices_and_follows_the_served_args(monkeypatch, capsys, tmp_path):
    from load_tests import headroom

    seen = []
    monkeypatch.setattr(headroom, "run", lambda out, app_args=None: seen.append(app_args) or {"rows": []})
    gpu, args = parse_args(["--config", "deploy/config.gpu.yaml", "--no-scale", "--set", "model=vibe-tiny-moe"])
    assert _extras(args, gpu) == {} and seen == []
    assert "not emulated" in capsys.readouterr().err
    emulated_config, args = parse_args(["--no-scale", "--set", "speeds=[1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]"])
    assert "headroom" in _extras(args, emulated_config)
    assert seen[0]["speeds"][1] == 0.9 and seen[0]["policy"] == "vibe"


def test_the_report_names_the_config_and_the_devices():
    from load_tests.report import _cluster

    result = {"config": {"deploy_config": "deploy/config.gpu.yaml"}, "ray_address": "ray://head:10001",
              "policies": {"eplb": {"app_args": {"emulate": False, "device": "cuda", "num_devices": 8}}}}
    assert _cluster(result) == ("Cluster (deploy/config.gpu.yaml) on the Ray cluster at ray://head:10001: 8 expert "
                                "workers on cuda devices.")
    local = {"config": {}, "policies": {"vibe": {"app_args": {"num_devices": 2, "speeds": [1.0, 0.9],
                                                              "emulation": {"fixed_s": 1e-4}}}}}
    assert _cluster(local).startswith("Emulated cluster (deploy/config.yaml): 2 devices, speeds [1.0, 0.9]")


@pytest.mark.parametrize("key", ["policy", "admin_token", "app_name"])
def test_what_the_benchmark_sets_per_app_cannot_be_set(key, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--set", f"{key}=x"])
    assert "the benchmark sets" in capsys.readouterr().err


def test_a_ray_client_address_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--address", "ray://head:10001"])
    assert "Ray Client" in capsys.readouterr().err


def test_apps_record_every_argument_they_ran_with_but_the_token(tmp_path):
    from load_tests.compare import resolved_args
    from load_tests.report import _cluster

    path = tmp_path / "bare.yaml"
    path.write_text("applications:\n  - args:\n      num_devices: 8\n")
    config, _ = parse_args(["--config", str(path)])
    recorded = resolved_args(app_args_for("vibe", config, "bench-vibe"))
    assert "admin_token" not in recorded and recorded["policy"] == "vibe"
    assert recorded["speeds"] == list(DEFAULT_SPEEDS) and recorded["emulation"]["fixed_s"] > 0
    result = {"config": {"deploy_config": str(path)}, "policies": {"vibe": {"app_args": recorded}}}
    assert f"speeds {list(DEFAULT_SPEEDS)}" in _cluster(result) and "emulation None" not in _cluster(result)


def test_serve_options_and_runtime_env_of_a_config(tmp_path, capsys):
    from load_tests.compare import serve_options

    path = tmp_path / "c.yaml"
    path.write_text("proxy_location: EveryNode\nhttp_options: {host: 0.0.0.0, port: 8000}\napplications:\n"
                    "  - args: {num_devices: 2, speeds: [1.0, 0.9]}\n    runtime_env: {env_vars: {A: b}}\n")
    assert serve_options(path) == {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": 8000}}
    assert serve_options()["http_options"]["port"] == 8000  # deploy/config.yaml: what `make run` serves on
    assert deploy_args(path) == {"num_devices": 2, "speeds": [1.0, 0.9]}
    parse_args(["--config", str(path)])  # the command line says once that the runtime_env is not applied
    assert capsys.readouterr().err.count("runtime_env is not applied") == 1


def test_gpus_the_apps_reserve():
    from load_tests.compare import _reserved_gpus

    assert _reserved_gpus(AppArgs.model_validate(deploy_args())) == 0
    gpu = AppArgs.model_validate({**deploy_args("deploy/config.gpu.yaml"), "model": "vibe-tiny-moe"})
    assert _reserved_gpus(gpu) == 9  # 8 workers and the ingress
    shared = gpu.model_copy(update={"worker_num_gpus": 0.25, "ingress_num_gpus": 0.5, "num_replicas": 2})
    assert _reserved_gpus(shared) == 3


def test_the_report_names_weights_it_did_not_hash():
    from load_tests.report import _weights

    assert _weights({"weights_sha256": "ab" * 32}) == "weights sha256 abababababab"
    files = [["model-00001-of-00002.safetensors", 4_000_000_000, 1], ["model-00002-of-00002.safetensors", 1_000_000_000, 2]]
    assert _weights({"weights_sha256": None, "weights_files": files}).startswith("2 safetensors files, 5.00 GB")


def test_an_app_is_measured_only_once_it_holds_every_device(monkeypatch):
    import time

    import httpx

    from load_tests import compare

    answers = iter([[3], [3], []])
    calls = []

    def fake_get(url, headers, timeout):
        calls.append((url, headers["Authorization"]))
        return httpx.Response(200, json={"lost_devices": next(answers)}, request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", fake_get)
    monkeypatch.setattr(compare.time, "sleep", lambda s: None)
    compare._check_devices("http://h/app", {"admin_token": "t" * 16}, time.monotonic() + 60)  # a worker came late
    assert calls == [("http://h/app/admin/stats", "Bearer " + "t" * 16)] * 3
    monkeypatch.setattr(httpx, "get", lambda url, headers, timeout: httpx.Response(
        200, json={"lost_devices": [5, 6]}, request=httpx.Request("GET", url)))
    with pytest.raises(RuntimeError, match=r"still without expert devices \[5, 6\] .* at the deadline"):
        compare._check_devices("http://h/app", {"admin_token": "t" * 16}, time.monotonic() - 1)
    compare._check_devices("http://h/app", {}, 0.0)  # no admin token: nothing to ask


def test_a_proxy_serving_https_only_is_refused(monkeypatch):
    from types import SimpleNamespace

    import ray.serve.context
    from ray.serve.schema import ServeInstanceDetails

    from load_tests import compare

    client = SimpleNamespace(http_config=SimpleNamespace(host="0.0.0.0", port=8443, ssl_certfile="/certs/c.pem"),
                             get_serve_details=ServeInstanceDetails.get_empty_schema_dict)
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **kw: client)
    with pytest.raises(ValueError, match="https only"):
        compare._cluster_root({"bench-vibe": {}}, {"bench-vibe": "/bench-vibe"}, {})
    client.http_config.ssl_certfile = None
    client.http_config.host = "::"
    assert compare._cluster_root({"bench-vibe": {}}, {"bench-vibe": "/bench-vibe"}, {}) == ("http://[::1]:8443", False)


def test_an_app_that_cannot_start_is_given_up_at_the_deadline(monkeypatch):
    """Serve's own `serve.run` waits forever for resources no node has: the deploy polls the app's status and gives
    up at the deadline, saying what the cluster has free; a failed deploy is said at once."""
    import time
    from types import SimpleNamespace

    import ray
    import ray.serve.api
    from ray import serve

    from load_tests import compare

    deployed, states = [], iter(["DEPLOYING", "RUNNING"])
    monkeypatch.setattr(ray.serve.api, "_run", lambda app, **kw: deployed.append(kw))
    monkeypatch.setattr(compare.time, "sleep", lambda s: None)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 6.0})

    def status_of(state: str, message: str = ""):
        deployment = SimpleNamespace(message="1 replica waiting for {'CPU': 64.0}")
        return SimpleNamespace(applications={"big": SimpleNamespace(
            status=f"ApplicationStatus.{state}", message=message, deployments={"Ingress": deployment})})

    monkeypatch.setattr(serve, "status", lambda: status_of(next(states)))
    compare._deploy("app", "big", "/big", time.monotonic() + 60)  # DEPLOYING, then RUNNING
    assert deployed == [{"_blocking": False, "name": "big", "route_prefix": "/big"}]
    monkeypatch.setattr(serve, "status", lambda: status_of("DEPLOYING"))
    with pytest.raises(TimeoutError, match=r"'big' is DEPLOYING at the deadline \(Ingress: 1 replica waiting for "
                                           r"\{'CPU': 64.0\}; free on the cluster: 6 CPU, 0 GPU\)"):
        compare._deploy("app", "big", "/big", time.monotonic() - 1)
    monkeypatch.setattr(serve, "status", lambda: status_of("DEPLOY_FAILED", "the ingress raised"))
    with pytest.raises(RuntimeError, match=r"'big' is DEPLOY_FAILED \(the ingress raised; Ingress: 1 replica"):
        compare._deploy("app", "big", "/big", time.monotonic() + 60)


def test_wait_idle_asks_again_after_a_failed_metrics_and_says_when_it_gave_up():
    """A /metrics that failed once (an error status, a refused connection) raised out of wait_idle and lost the
    run just measured; one still busy at the deadline returned as if idle (an audit)."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    from load_tests.compare import wait_idle
    from service.app import serve_locally

    answers = iter(["fail", "vibe_num_requests_running 2\n", "vibe_num_requests_waiting 0\n"])
    app = FastAPI()

    @app.get("/metrics")
    async def metrics():
        text = next(answers, "vibe_num_requests_running 1\n")
        return PlainTextResponse(text, status_code=500 if text == "fail" else 200)

    with serve_locally(app) as url:
        assert asyncio.run(wait_idle(url, timeout_s=10)) is True  # failed, busy, then idle
        assert asyncio.run(wait_idle(url, timeout_s=1.2)) is False  # busy until the deadline
    assert asyncio.run(wait_idle(url, timeout_s=1.0)) is False  # nobody answers


def test_a_placement_that_cannot_be_read_costs_its_columns_not_the_run(monkeypatch):
    import httpx

    from load_tests import compare
    from load_tests.generator import ClientConfig

    async def refused(http, token, path):
        raise httpx.ConnectError("refused")

    monkeypatch.setattr(compare, "fetch_admin", refused)
    notes = []
    client = ClientConfig(base_url="http://127.0.0.1:9", model="m", admin_token="t")
    assert asyncio.run(compare.placement_summary(client, notes)) is None
    assert notes == ["/admin/placement after the run: ConnectError: refused (no placement)"]
    with pytest.raises(httpx.ConnectError):  # asked without notes: the caller wants it or nothing
        asyncio.run(compare.placement_summary(client))

    async def partial(http, token, path):  # a 200 that is not the whole view (a review: it still raised)
        return {"layers": [{"device_predicted_s": [], "slots": []}], "num_devices": 2}

    monkeypatch.setattr(compare, "fetch_admin", partial)
    assert asyncio.run(compare.placement_summary(client, notes)) is None and "(no placement)" in notes[-1]


def test_send_lag_is_measured_from_each_scheduled_arrival_without_cut_off_requests():
    from types import SimpleNamespace

    from load_tests.compare import send_lag_ms
    from load_tests.generator import RequestResult

    trace = [SimpleNamespace(arrival_s=a) for a in (0.0, 1.0, 2.0, 3.0)]
    results = [RequestResult(0, "w", 0.001, 0.1, 0.2, 5, 5), RequestResult(1, "w", 1.003, 0.1, 0.2, 5, 5),
               RequestResult(2, "w", 2.0, None, None, 0, 0, "cutoff"), RequestResult(3, "w", 3.020, None, None, 0, 0,
                                                                                      "timeout")]
    lag = send_lag_ms(trace, results)
    assert lag["p50"] == pytest.approx(3.0) and lag["max"] == pytest.approx(20.0) and 3.0 < lag["p99"] < 20.0
    assert send_lag_ms(trace[2:3], results[2:3]) == {"p50": None, "p99": None, "max": None}


def test_a_run_keeps_its_requests_when_the_engine_stays_busy_and_the_placement_cannot_be_read(monkeypatch, tmp_path):
    """The real `_run_all` with the service's answers scripted: a /metrics that never says idle and an
    /admin/placement that times out, after every request was measured, cost notes, not the run (an audit)."""
    import httpx

    from load_tests import compare
    from load_tests.generator import ClientConfig, RequestResult, RunRecord
    from load_tests.slo import SLO

    async def run_trace(client, trace, **kwargs):
        return RunRecord(started_wall=0.0, duration_s=2.0,
                         results=[RequestResult(s.index, "w", s.arrival_s + 0.002, 0.05, 0.5, 8, 10) for s in trace])

    async def still_busy(base, timeout_s=120.0):
        return False

    async def slow_placement(http, token, path):
        raise httpx.ReadTimeout("timed out")

    monkeypatch.setattr(compare, "run_trace", run_trace)
    monkeypatch.setattr(compare, "wait_idle", still_busy)
    monkeypatch.setattr(compare, "fetch_admin", slow_placement)
    experiment = Experiment(CompareConfig(policies=("vibe",), duration_s=4.0), tmp_path, progress=False)
    experiment.result["policies"]["vibe"] = {"runs": []}
    experiment.slo = SLO(ttft_s=1.0, tpot_s=1.0)
    client = ClientConfig(base_url="http://127.0.0.1:9/bench-vibe", model="m", admin_token="t")
    runs = asyncio.run(experiment._run_all({"vibe": client}, 2.0, "sweep"))
    run = runs["vibe"]
    assert run["summary"]["requests"] == 8 and run["summary"]["attainment"] == 1.0 and run["placement"] is None
    assert run["notes"] == [compare.busy_note("this run"),
                            "/admin/placement after the run: ReadTimeout: timed out (no placement)"]
    assert run["send_lag_ms"]["max"] == pytest.approx(2.0)
    assert experiment._entry("vibe")["runs"] == [run]
