"""deploy/kuberay/rayservice.yaml against KubeRay's RayService CRD schema (a vendored excerpt, see
tests/deploy/data/), its embedded serve config against `AppArgs`, and the wiring between the two: GPUs
enough for the workers and the engine, the model volume where `model_roots` says, the admin token from a
Secret, Prometheus scrape annotations."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from deploy.app import AppArgs

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
CRD = Path(__file__).resolve().parent / "data" / "ray.io_rayservices.v1.excerpt.yaml"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load(CRD.read_text())


@pytest.fixture(scope="module")
def app(manifest) -> dict:
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    return application


def schema_of(crd: dict, version: str) -> dict:
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths in `value` that `schema` does not declare: what the API server would silently prune."""
    if isinstance(value, list) and "items" in schema:
        return [p for i, item in enumerate(value) for p in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    properties, extra = schema.get("properties"), schema.get("additionalProperties")
    found = []
    for key, item in value.items():
        if properties is not None and key in properties:
            found += unknown_fields(item, properties[key], f"{path}.{key}")
        elif isinstance(extra, dict):
            found += unknown_fields(item, extra, f"{path}.{key}")
        elif properties is not None:
            found.append(f"{path}.{key}")
    return found


def pods(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_manifest_is_a_ray_io_v1_rayservice_valid_against_the_crd_schema(manifest, crd):
    group, _, version = manifest["apiVersion"].partition("/")
    assert (group, manifest["kind"]) == (crd["spec"]["group"], crd["spec"]["names"]["kind"])
    jsonschema.Draft7Validator(schema_of(crd, version)).validate(manifest)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", manifest["metadata"]["name"])


def test_manifest_has_no_field_the_crd_schema_would_prune(manifest, crd):
    assert unknown_fields(manifest, schema_of(crd, "v1")) == []


def test_schema_checks_catch_typos_and_wrong_types(manifest, crd):
    schema = schema_of(crd, "v1")
    typo = yaml.safe_load(yaml.safe_dump(manifest))
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 9
    assert unknown_fields(typo, schema) == [".spec.rayClusterConfig.workerGroupSpecs[0].replica"]
    wrong = yaml.safe_load(yaml.safe_dump(manifest))
    wrong["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        jsonschema.Draft7Validator(schema).validate(wrong)


def test_embedded_serve_config_validates_as_gpu_app_args(app):
    assert app["import_path"] == "deploy.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.device == "cuda" and not args.emulate and args.admin_token is None  # token from the Secret


def test_gpu_pods_hold_every_worker_and_the_engine(manifest, app):
    args = AppArgs.model_validate(app["args"])
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * g["replicas"] for g in cluster["workerGroupSpecs"])
    assert gpus >= args.num_devices * (args.worker_num_gpus or 1.0) + args.ingress_num_gpus


def test_every_pod_mounts_the_models_and_reads_the_admin_token_from_a_secret(manifest, app):
    (root,) = AppArgs.model_validate(app["args"]).model_roots
    for pod in pods(manifest):
        container = pod["spec"]["containers"][0]
        claims = {v["name"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert any(m["mountPath"] == root and m["name"] in claims for m in container["volumeMounts"])
        (token,) = [e for e in container["env"] if e["name"] == "VIBE_ADMIN_TOKEN"]
        assert set(token["valueFrom"]) == {"secretKeyRef"}


def test_pods_carry_prometheus_scrape_annotations(manifest):
    for pod in pods(manifest):
        annotations = pod["metadata"]["annotations"]
        port = int(annotations["prometheus.io/port"])
        assert annotations["prometheus.io/scrape"] == "true"
        assert port in {p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}


def test_embedded_serve_config_is_the_gpu_config(manifest):
    shipped = yaml.safe_load((ROOT / "deploy" / "config.gpu.yaml").read_text())
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == shipped
