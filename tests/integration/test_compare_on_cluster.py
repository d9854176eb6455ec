"""The side-by-side benchmark on a Ray cluster that is already running (`load_tests.compare --address`).

A second process holds the cluster, its Serve instance on a port of its own and an app of its own, as a user's
cluster would. The benchmark's apps go onto it beside that app, get measured through its proxy, and are
deleted at the end with their expert workers, while the cluster and the user's app stay. An app name the
cluster already serves is refused before anything is deployed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import httpx
import pytest

from load_tests.compare import DEFAULT, Experiment, serve_apps

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The user's cluster: Serve on its own port, an app at /other and one named "squatter" at /taken, held until stdin
# closes.
HOLDER = textwrap.dedent("""
    import json, socket, sys
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    def other(request):
        return "other app"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(other.bind(), name="other", route_prefix="/other")
    serve.run(other.bind(), name="squatter", route_prefix="/taken")
    print(json.dumps({"address": ray.get_runtime_context().gcs_address, "port": port}), flush=True)
    sys.stdin.read()
    serve.shutdown()
    ray.shutdown()
""")

APP_ARGS = {"num_devices": 2, "speeds": [1.0, 0.9], "max_num_seqs": 8,
            "emulation": {"fixed_s": 2e-4, "knee_tokens": 64, "jitter": 0.0, "throttle_floor": 1.0}}


@pytest.fixture(scope="module")
def cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        line = holder.stdout.readline()
        assert line, "the cluster holder exited before starting its cluster"
        yield json.loads(line)
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()


def _cluster_state(address: str) -> tuple[set[str], set[str]]:
    """The cluster's Serve applications and its workers' actor names (in the pool's namespace), from a driver
    of its own."""
    code = textwrap.dedent(f"""
        import json, ray
        from ray import serve
        ray.init(address={address!r}, log_to_driver=False)
        apps = set(serve.status().applications)
        actors = {{a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "vibe"}}
        print(json.dumps([sorted(apps), sorted(actors)]))
    """)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    apps, actors = json.loads(out.stdout.strip().splitlines()[-1])
    return set(apps), set(actors)


def test_the_benchmark_runs_on_a_running_cluster_and_leaves_only_what_was_there(cluster, tmp_path):
    assert _cluster_state(cluster["address"]) == ({"other", "squatter"}, set())
    config = replace(DEFAULT, policies=("eplb", "vibe"), rates=(1.0,), duration_s=4.0, warmup_rate=1.0,
                     warmup_s=2.0, unloaded_requests=1, unloaded_max_tokens=4, max_tokens_cap=8, drain_s=30.0,
                     app_args=APP_ARGS)
    experiment = Experiment(config, tmp_path, progress=False, address=cluster["address"])
    result = experiment.run()
    assert result["ray_address"] == cluster["address"]
    for policy in ("eplb", "vibe"):
        entry = result["policies"][policy]
        assert entry["app_args"]["num_devices"] == 2 and entry["app_args"]["policy"] == policy
        runs = entry["runs"]
        assert [r["rate_rps"] for r in runs] == [1.0]
        assert runs[0]["summary"]["failed"] == 0 and len(runs[0]["results"]["ttft_s"]) == 4
        assert runs[0]["placement"]["version"] >= 1  # the app's own coordinator answered, through the proxy
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["config"]["deploy_config"] == "deploy/config.yaml" and saved["ray_address"] == cluster["address"]
    apps, actors = _cluster_state(cluster["address"])
    assert apps == {"other", "squatter"}  # the benchmark's apps are gone, the user's stay
    assert not actors  # and their expert workers with them (the cluster had none before)
    assert httpx.get(f"http://127.0.0.1:{cluster['port']}/other", timeout=30).text == "other app"


def test_an_app_name_the_cluster_serves_is_refused_before_anything_is_deployed(cluster):
    with (pytest.raises(ValueError, match="already serves applications named \\['other'\\]"),
          serve_apps({"other": {**APP_ARGS, "app_name": "other"}}, address=cluster["address"])):
        pytest.fail("deployed over the cluster's own app")
    with (pytest.raises(ValueError, match="already serves applications at \\['/taken'\\]"),
          serve_apps({"taken": {**APP_ARGS, "app_name": "taken"}}, address=cluster["address"])):
        pytest.fail("deployed over the cluster's route")
    assert _cluster_state(cluster["address"])[0] == {"other", "squatter"}
    assert httpx.get(f"http://127.0.0.1:{cluster['port']}/other", timeout=30).text == "other app"
