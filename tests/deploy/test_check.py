"""`python -m deploy.check`, which `make run` runs before `serve run`: a config whose app cannot be built is refused
with the reason (a walkthrough: `serve run` kept waiting on the failed build, /health a 404)."""

from __future__ import annotations

import pytest

from deploy import check


def _config(tmp_path, args: str, extra: str = "") -> object:
    path = tmp_path / "config.yaml"
    path.write_text("applications:\n  - name: mine\n    import_path: deploy.app:build_app\n"
                    f"    args: {args}\n{extra}")
    return path


def test_the_shipped_config_builds(capsys, monkeypatch):
    monkeypatch.delenv("VIBE_ADMIN_TOKEN", raising=False)
    assert check.main(["deploy/config.yaml"]) == 0
    assert "vibe built; starting Serve" in capsys.readouterr().err


def test_a_short_admin_token_is_refused_with_the_reason_before_anything_starts(capsys, monkeypatch):
    monkeypatch.setenv("VIBE_ADMIN_TOKEN", "short")
    assert check.main(["deploy/config.yaml"]) == 2
    err = capsys.readouterr().err
    assert "application 'vibe' cannot be built: VIBE_ADMIN_TOKEN must be at least 16" in err and "short" not in err


def test_args_and_the_runtime_envs_variables_are_checked_as_serve_would_build_them(tmp_path, monkeypatch):
    monkeypatch.delenv("VIBE_ADMIN_TOKEN", raising=False)
    with pytest.raises(ValueError, match="(?s)application .mine. cannot be built: .*num_devices"):
        check.check(_config(tmp_path, "{num_devices: 0}"))
    with pytest.raises(ValueError, match="(?s)application .mine. cannot be built: .*no-such-model"):
        check.check(_config(tmp_path, "{model: no-such-model}"))
    env = "    runtime_env: {env_vars: {VIBE_ADMIN_TOKEN: too-short}}\n"
    with pytest.raises(ValueError, match="VIBE_ADMIN_TOKEN must be at least 16"):
        check.check(_config(tmp_path, "{}", env))
    import os

    assert "VIBE_ADMIN_TOKEN" not in os.environ  # restored after the build


def test_other_applications_and_files_that_are_not_configs(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("applications:\n  - name: x\n    import_path: some.module:app\n")
    assert check.check(path) == []
    path.write_text("proxy_location: EveryNode\n")
    with pytest.raises(ValueError, match="is not a serve config with applications"):
        check.check(path)
    with pytest.raises(ValueError, match="cannot read the serve config"):
        check.check(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override", ["num_replicas: 2", "autoscaling_config: {min_replicas: 1, max_replicas: 2}",
                                      "max_surge_percent: 100"])
def test_an_override_that_runs_two_coordinators_is_refused(tmp_path, monkeypatch, override):
    """A `deployments:` override of the Coordinator that can run two at once was applied by Serve: both adopted the
    same workers, each dropped the copies outside its own placement, and engines dispatched to experts no longer
    held (a Serve review). The ingress's overrides stay allowed."""
    monkeypatch.delenv("VIBE_ADMIN_TOKEN", raising=False)
    extra = f"    deployments:\n      - name: Coordinator\n        {override}\n"
    with pytest.raises(ValueError, match="(?s)application .mine. cannot be built: the Coordinator deployment runs "
                                         "exactly one replica"):
        check.check(_config(tmp_path, "{}", extra))
    ingress = "    deployments:\n      - name: OpenAIIngress\n        num_replicas: 2\n"
    assert check.check(_config(tmp_path, "{}", ingress)) == ["mine"]


def test_the_runtime_refuses_a_second_coordinator_from_its_deployment_config():
    """The same rule on the replica's own deployment config (Ray's DeploymentConfig), for configs not checked."""
    from ray.serve._private.config import DeploymentConfig

    from service.deployments import single_coordinator

    single_coordinator(DeploymentConfig(num_replicas=1))
    single_coordinator(None)  # outside a replica
    with pytest.raises(ValueError, match="runs exactly one replica"):
        single_coordinator(DeploymentConfig(num_replicas=2))
    with pytest.raises(ValueError, match="max_surge_percent 50"):
        single_coordinator(DeploymentConfig(num_replicas=1, max_surge_percent=50))


def test_a_kv_cache_that_cannot_hold_one_sequence_and_the_dotted_import_path(tmp_path, monkeypatch):
    """kv_cache_bytes 1 MiB for the default model's 2 MiB sequence was built and checked: every ingress replica then
    refused to start and `serve run` waited for good (a Serve review). `deploy.app.build_app`, which Serve takes as
    well, was skipped by the check."""
    monkeypatch.delenv("VIBE_ADMIN_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"kv_cache_bytes 1048576 cannot hold one sequence of max_model_len 1024 "
                                         r"\(2097152 bytes"):
        check.check(_config(tmp_path, "{kv_cache_bytes: 1048576}"))
    path = tmp_path / "dotted.yaml"
    path.write_text("applications:\n  - name: dotted\n    import_path: deploy.app.build_app\n    args: {}\n")
    assert check.check(path) == ["dotted"]


def test_two_applications_whose_workers_are_named_alike_are_refused(tmp_path, monkeypatch):
    """Each coordinator retires the other's workers as strays of its own earlier configuration (or both adopt the same
    actors): an app_name equal to another app's name, or set alike in both, passed the check (a review)."""
    monkeypatch.delenv("VIBE_ADMIN_TOKEN", raising=False)
    app = "  - name: {}\n    route_prefix: /{}\n    import_path: deploy.app:build_app\n    args: {{{}}}\n"
    path = tmp_path / "config.yaml"
    path.write_text("applications:\n" + app.format("chat", "chat", "app_name: vibe") + app.format("vibe", "v", ""))
    with pytest.raises(ValueError, match="applications 'chat' and 'vibe' name their expert workers alike "
                                         r"\(vibe-worker-vibe-...\)"):
        check.check(path)
    path.write_text("applications:\n" + app.format("chat", "chat", "app_name: a") + app.format("b", "b", "app_name: a"))
    with pytest.raises(ValueError, match="name their expert workers alike"):
        check.check(path)
    path.write_text("applications:\n" + app.format("chat", "chat", "") + app.format("vibe", "v", ""))
    assert check.check(path) == ["chat", "vibe"]
