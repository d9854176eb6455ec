"""The side-by-side benchmark on a Ray cluster that is already running (`load_tests.compare --address`).

A second process holds the cluster. First without Serve: the benchmark, each app deployed alone in turn, starts
Serve with the config's HTTP options for each, runs, and stops Serve again. Then with Serve running on a port of its own and apps of the user's (started
by another driver, as `serve deploy` would): the benchmark's app goes onto it beside them, is reached through its
proxy, and is deleted at the end with its expert workers, while the cluster, its Serve and the user's apps stay;
an app name or route the cluster already serves is refused before anything is deployed. (Giving up an app that
cannot start, at the deadline: tests/load_tests/test_compare.py, with Serve's status faked.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace

import httpx
import pytest

from load_tests.compare import DEFAULT, Experiment, serve_apps

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
APP_ARGS = {"num_devices": 2, "speeds": [1.0, 0.9], "max_num_seqs": 8, "drain_timeout_s": 1,
            "emulation": {"fixed_s": 2e-4, "knee_tokens": 64, "jitter": 0.0, "throttle_floor": 1.0}}

# The user's cluster, without Serve, held until stdin closes. Each line it reads asks, as a driver of the cluster
# other than the test's, for the cluster's Serve applications, its expert workers' actor names and whether a Serve
# controller runs (a driver started for each ask took 2 s).
HOLDER = textwrap.dedent("""
    import json, sys
    import ray
    from ray import serve
    from ray.serve.context import _set_global_client
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    print(json.dumps({"address": ray.get_runtime_context().gcs_address}), flush=True)
    for _ in sys.stdin:
        _set_global_client(None)  # (the Serve it last saw may have been shut down, and another started)
        named = ray.util.list_named_actors(all_namespaces=True)
        print(json.dumps([sorted(serve.status().applications),
                          sorted(a["name"] for a in named if a["namespace"] == "vibe"),
                          any(a["namespace"] == "serve" and a["name"] == "SERVE_CONTROLLER_ACTOR" for a in named)]),
              flush=True)
    ray.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _driver(address: str, body: str) -> str:
    """Run `body` in a driver of its own connected to the cluster; its last line of output."""
    code = f"import json, ray\nfrom ray import serve\nray.init(address={address!r}, log_to_driver=False)\n" + body
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=180,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


_HOLDERS: dict[str, subprocess.Popen] = {}  # GCS address -> the process holding that cluster (`cluster`)


def _cluster_state(address: str) -> tuple[set[str], set[str], bool]:
    """The cluster's Serve applications, its expert workers' actor names, whether a Serve controller runs (asked
    of the cluster's holder, another driver)."""
    holder = _HOLDERS[address]
    holder.stdin.write("state\n")
    holder.stdin.flush()
    line = holder.stdout.readline()
    assert line, "the cluster holder exited"
    apps, actors, controller = json.loads(line)
    return set(apps), set(actors), controller


@pytest.fixture(scope="module")
def cluster():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    address = None
    try:
        line = holder.stdout.readline()
        assert line, "the cluster holder exited before starting its cluster"
        address = json.loads(line)["address"]
        _HOLDERS[address] = holder
        yield address
    finally:
        _HOLDERS.pop(address, None)
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()


@pytest.fixture(scope="module")
def user_serve(cluster):
    """Serve on the cluster, as the user's own deployment left it: a port of its own, an app at /other and one
    named "squatter" at /taken (the driver that deployed them has exited)."""
    port = _free_port()
    _driver(cluster, textwrap.dedent(f"""
        @serve.deployment(ray_actor_options={{"num_cpus": 0}})
        def other(request):
            return "other app"
        serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})
        serve.run(other.bind(), name="other", route_prefix="/other")
        serve.run(other.bind(), name="squatter", route_prefix="/taken")
        print("ok")
    """))
    return port


def test_without_serve_the_benchmark_starts_it_with_the_configs_options_runs_and_stops_it(cluster, tmp_path,
                                                                                         monkeypatch):
    """The whole `Experiment` on a cluster without Serve, each app deployed alone (`--deploy-one-at-a-time`): the
    cluster holds one app at a time, and Serve, started for each with the config's options, goes with it."""
    from load_tests import compare

    assert _cluster_state(cluster) == (set(), set(), False)
    roots, held = [], []
    real_root, real_deploy = compare._cluster_root, compare._deploy

    def deploy(app, name, *args):  # the cluster's apps and expert workers as each app is deployed
        held.append((name, *_cluster_state(cluster)[:2]))
        real_deploy(app, name, *args)

    monkeypatch.setattr(compare, "_cluster_root", lambda *a: roots.append(real_root(*a)) or roots[-1])
    monkeypatch.setattr(compare, "_deploy", deploy)
    port = _free_port()
    serve_config = tmp_path / "cluster.yaml"
    serve_config.write_text(f"http_options: {{host: 0.0.0.0, port: {port}}}\napplications:\n  - args: "
                            + json.dumps(APP_ARGS) + "\n")
    config = replace(DEFAULT, policies=("vibe", "eplb"), rates=(1.0,), duration_s=4.0, warmup_rate=1.0,
                     warmup_s=2.0, unloaded_requests=1, unloaded_max_tokens=4, max_tokens_cap=8, drain_s=30.0,
                     max_rates=1, deploy_config=str(serve_config), together=False, deploy_apart=True,
                     ttft_factor=100.0, tpot_factor=100.0)  # SLOs loose enough to meet on a busy host
    result = Experiment(config, tmp_path, progress=False, address=cluster).run()
    assert result["ray_address"] == cluster
    # eplb first, alone each time: the app before it and its workers (which hold the devices) already gone
    assert held == [(name, set(), set()) for name in ("bench-eplb", "bench-vibe") * 2]
    assert roots == [(f"http://127.0.0.1:{port}", True)] * 4  # Serve started here each time, on the config's port
    for policy in ("eplb", "vibe"):
        entry = result["policies"][policy]
        assert entry["app_args"]["num_devices"] == 2 and entry["app_args"]["policy"] == policy
        assert len(entry["unloaded"]["results"]["ttft_s"]) == 1
        runs = entry["runs"]
        assert [r["rate_rps"] for r in runs] == [1.0]
        assert runs[0]["summary"]["failed"] == 0 and len(runs[0]["results"]["ttft_s"]) == 4
        assert runs[0]["placement"]["version"] >= 1  # the app's own coordinator answered through the proxy
        assert entry["frontier"]["rate_rps"] > 0  # with SLOs this loose: the run at eplb's frontier follows
        assert entry["at_eplb_frontier"]["rate_rps"] == result["policies"]["eplb"]["frontier"]["rate_rps"]
    assert len(result["startup_s_per_app"]["vibe"]) == 2
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["config"]["deploy_config"] == str(serve_config) and saved["ray_address"] == cluster
    # the apps, their expert workers and the Serve instance started for them are gone; the cluster stays
    assert _cluster_state(cluster) == (set(), set(), False)


def test_beside_the_users_apps_only_the_benchmarks_app_comes_and_goes(cluster, user_serve):
    assert _cluster_state(cluster) == ({"other", "squatter"}, set(), True)
    with serve_apps({"bench-vibe": {**APP_ARGS, "app_name": "bench-vibe"}}, address=cluster) as (bases, _):
        assert bases == {"bench-vibe": f"http://127.0.0.1:{user_serve}/bench-vibe"}  # through the user's proxy
        assert httpx.get(f"{bases['bench-vibe']}/health", timeout=30).status_code == 200
        assert _cluster_state(cluster)[1]  # its expert workers run
    assert _cluster_state(cluster) == ({"other", "squatter"}, set(), True)  # the user's apps and Serve stay
    assert httpx.get(f"http://127.0.0.1:{user_serve}/other", timeout=30).text == "other app"


def test_an_app_name_or_route_the_cluster_serves_is_refused_before_anything_is_deployed(cluster, user_serve):
    with (pytest.raises(ValueError, match="already serves applications named \\['other'\\]"),
          serve_apps({"other": {**APP_ARGS, "app_name": "other"}}, address=cluster)):
        pytest.fail("deployed over the cluster's own app")
    with (pytest.raises(ValueError, match="already serves applications at \\['/taken'\\]"),
          serve_apps({"taken": {**APP_ARGS, "app_name": "taken"}}, address=cluster)):
        pytest.fail("deployed over the cluster's route")
    assert _cluster_state(cluster) == ({"other", "squatter"}, set(), True)
