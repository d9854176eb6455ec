"""The side-by-side benchmark on a Ray cluster that is already running (`load_tests.compare --address`).

A second process holds the cluster. First without Serve: the benchmark starts Serve with the config's HTTP
options and stops it again at the end. Then with Serve running on a port of its own and apps of the user's
(started by another driver, as `serve deploy` would): the benchmark's apps go onto it beside them, get measured
through its proxy, and are deleted at the end with their expert workers, while the cluster, its Serve and the
user's apps stay. An app name or route the cluster already serves is refused before anything is deployed, and an
app that cannot start is given up at the deadline, with what Serve waits for, and deleted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import httpx
import pytest

from load_tests.compare import DEFAULT, Experiment, serve_apps

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
APP_ARGS = {"num_devices": 2, "speeds": [1.0, 0.9], "max_num_seqs": 8,
            "emulation": {"fixed_s": 2e-4, "knee_tokens": 64, "jitter": 0.0, "throttle_floor": 1.0}}

# The user's cluster, without Serve, held until stdin closes.
HOLDER = textwrap.dedent("""
    import json, sys
    import ray
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    print(json.dumps({"address": ray.get_runtime_context().gcs_address}), flush=True)
    sys.stdin.read()
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


def _cluster_state(address: str) -> tuple[set[str], set[str], bool]:
    """The cluster's Serve applications, its expert workers' actor names, whether a Serve controller runs."""
    apps, actors, controller = json.loads(_driver(address, textwrap.dedent("""
        named = ray.util.list_named_actors(all_namespaces=True)
        print(json.dumps([sorted(serve.status().applications),
                          sorted(a["name"] for a in named if a["namespace"] == "vibe"),
                          any(a["namespace"] == "serve" and a["name"] == "SERVE_CONTROLLER_ACTOR" for a in named)]))
    """)))
    return set(apps), set(actors), controller


@pytest.fixture(scope="module")
def cluster():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        line = holder.stdout.readline()
        assert line, "the cluster holder exited before starting its cluster"
        yield json.loads(line)["address"]
    finally:
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


def test_without_serve_on_the_cluster_it_is_started_with_the_configs_options_and_stopped(cluster):
    assert _cluster_state(cluster) == (set(), set(), False)
    port = _free_port()
    options = {"http_options": {"host": "0.0.0.0", "port": port}}
    with serve_apps({"solo": APP_ARGS}, address=cluster, serve_options=options) as (bases, _):
        assert bases == {"solo": f"http://127.0.0.1:{port}/solo"}
        assert httpx.get(f"{bases['solo']}/health", timeout=30).status_code == 200
    assert _cluster_state(cluster) == (set(), set(), False)


def test_the_benchmark_runs_beside_the_users_apps_and_leaves_only_what_was_there(cluster, user_serve, tmp_path):
    assert _cluster_state(cluster) == ({"other", "squatter"}, set(), True)
    config = replace(DEFAULT, policies=("eplb", "vibe"), rates=(1.0,), duration_s=4.0, warmup_rate=1.0,
                     warmup_s=2.0, unloaded_requests=1, unloaded_max_tokens=4, max_tokens_cap=8, drain_s=30.0,
                     app_args=APP_ARGS)
    result = Experiment(config, tmp_path, progress=False, address=cluster).run()
    assert result["ray_address"] == cluster
    for policy in ("eplb", "vibe"):
        entry = result["policies"][policy]
        assert entry["app_args"]["num_devices"] == 2 and entry["app_args"]["policy"] == policy
        runs = entry["runs"]
        assert [r["rate_rps"] for r in runs] == [1.0]
        assert runs[0]["summary"]["failed"] == 0 and len(runs[0]["results"]["ttft_s"]) == 4
        assert runs[0]["placement"]["version"] >= 1  # the app's own coordinator answered, through the user's proxy
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["config"]["deploy_config"] == "deploy/config.yaml" and saved["ray_address"] == cluster
    # the benchmark's apps and their expert workers are gone; the user's apps and their Serve stay
    assert _cluster_state(cluster) == ({"other", "squatter"}, set(), True)
    assert httpx.get(f"http://127.0.0.1:{user_serve}/other", timeout=30).text == "other app"


def test_an_app_name_or_route_the_cluster_serves_is_refused_before_anything_is_deployed(cluster, user_serve):
    with (pytest.raises(ValueError, match="already serves applications named \\['other'\\]"),
          serve_apps({"other": {**APP_ARGS, "app_name": "other"}}, address=cluster)):
        pytest.fail("deployed over the cluster's own app")
    with (pytest.raises(ValueError, match="already serves applications at \\['/taken'\\]"),
          serve_apps({"taken": {**APP_ARGS, "app_name": "taken"}}, address=cluster)):
        pytest.fail("deployed over the cluster's route")
    assert _cluster_state(cluster) == ({"other", "squatter"}, set(), True)


def test_an_app_that_cannot_start_is_given_up_at_the_deadline_and_deleted(cluster, user_serve):
    """`serve.run` would wait forever for resources no node has: the deploy gives up at its deadline, saying what
    Serve waits for, and the app is deleted. (A trivial app: deleting one of ours stuck in its start takes its
    drain time.)"""
    import ray
    from ray import serve

    from load_tests.compare import _delete_apps, _deploy

    @serve.deployment(ray_actor_options={"num_cpus": 64})  # no node has 64 CPUs
    def big(request):
        return "never"

    ray.init(address=cluster, log_to_driver=False)
    try:
        with pytest.raises(TimeoutError, match="'big' is DEPLOYING at the deadline \\(.*free on the cluster: [0-9.]+ CPU, 0 GPU\\)"):
            _deploy(big.bind(), "big", "/big", time.monotonic() + 5)
        assert "big" in serve.status().applications
        _delete_apps(["big"], started_serve=False)
    finally:
        ray.shutdown()
    assert _cluster_state(cluster) == ({"other", "squatter"}, set(), True)
