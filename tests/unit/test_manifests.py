"""The cluster manifests and the image recipe agree with each other and with their schemas:
KubeRay's ray.io/v1 fields (tests/schemas, from KubeRay's API reference), Ray's cluster-launcher
schema (the one the installed Ray validates `ray up` with). Nothing is built or fetched."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "cluster_configs"
KUBERAY = json.loads((ROOT / "tests" / "schemas" / "kuberay-v1.6-subset.json").read_text())
LAUNCHER = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
KUBE_MANIFESTS = ["kuberay-gpu.yaml", "kuberay-job.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", DOCKERFILE, re.M).group(1)


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def test_every_manifest_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(KUBE_MANIFESTS + ["aws-8gpu.yaml"])


@pytest.mark.parametrize("name", KUBE_MANIFESTS)
def test_kuberay_manifests_follow_the_ray_io_v1_schema(name):
    jsonschema.validate(_load(name), KUBERAY)


@pytest.mark.parametrize("name", KUBE_MANIFESTS)
def test_kuberay_manifests_run_our_image_with_token_auth_mlflow_the_shared_volume_and_gpus(name):
    doc = _load(name)
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _arg("RAY_VERSION") == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    for group, c in _containers(spec):
        assert c["image"] == "REGISTRY/scpretrain-dist:0.1.0-cu128", (group, c["image"])
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI", "").startswith("http"), group
        assert "RAY_AUTH_MODE" not in env, "authOptions sets it (with the token): a bare value has no token"
        assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]
        if group != "head":
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if doc["kind"] == "RayJob":
        entry = doc["spec"]["entrypoint"]
        assert entry.startswith("scpretrain ") and "--work-dir /shared/" in entry


def test_the_launcher_config_follows_rays_schema_and_runs_our_image():
    doc = _load("aws-8gpu.yaml")
    jsonschema.validate(doc, LAUNCHER)
    assert doc["docker"]["image"] == "REGISTRY/scpretrain-dist:0.1.0-cu128"
    assert all("RAY_AUTH_MODE=token" in c for c in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in doc["file_mounts"]


@pytest.mark.parametrize("change, where", [
    (lambda d: d["spec"].update(authOption={"mode": "token"}), "authOption"),           # a misspelt field
    (lambda d: d["spec"]["authOptions"].update(mode="tokens"), "tokens"),              # a value outside the enum
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),        # a required field
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="4"), "'4'"),          # a wrong type
])
def test_the_schema_refuses_broken_manifests(change, where):
    doc = copy.deepcopy(_load("kuberay-gpu.yaml"))
    change(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, KUBERAY)


def test_the_launcher_schema_refuses_an_unknown_key():
    doc = _load("aws-8gpu.yaml") | {"head_start_ray_command": []}
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):
        jsonschema.validate(doc, LAUNCHER)


def test_the_dockerfile_builds_both_variants_from_build_args():
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{PLATFORM\}$", DOCKERFILE, re.M)
    assert _arg("PLATFORM") == "cpu" and _arg("FAISS") == "faiss-cpu"
    assert _arg("TORCH_INDEX").endswith("/whl/cpu")
    torch_pin = _arg("TORCH_VERSION")
    deps = (ROOT / "pyproject.toml").read_text()
    low, high = re.search(r'"torch>=([\d.]+),<([\d.]+)"', deps).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(torch_pin) < as_tuple(high), "the image's torch is outside the project's range"
    # the CUDA build line in deploy/README.md names the args the Dockerfile reads
    readme = (ROOT / "deploy" / "README.md").read_text()
    for arg in re.findall(r"--build-arg (\w+)=", readme):
        assert re.search(rf"^ARG {arg}\b", DOCKERFILE, re.M), arg
