"""infra/kuberay read as data: the RayCluster has the fields KubeRay's CRD and its validation require, the
Deployments have what Kubernetes requires, and the pieces agree with each other and with this repository.

REQUIRED below is derived from KubeRay's RayCluster CRD (ray-operator/config/crd/bases/ray.io_rayclusters.yaml,
apiVersion ray.io/v1, at ray-project/kuberay feeaf72f, 2026-08-19): every `required` list on the paths a
lorafleet manifest uses. The rules in test_raycluster_passes_kuberays_own_validation come from the same
commit's ray-operator/controllers/ray/utils/validation.go (ValidateRayClusterSpec).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from fleet.catalog import BaseModelSpec
from fleet.settings import Settings
from tests.deploy.conftest import ENV_PREFIX, ROOT, check_command_line, settings_field

KUBERAY = ROOT / "infra/kuberay"
POD = "*template.spec"
REQUIRED: dict[str, list[str]] = {
    "": ["apiVersion", "kind", "metadata", "spec"],
    "metadata": ["name"],
    # RayCluster (CRD `required`)
    "spec.headGroupSpec": ["template"],
    "spec.headGroupSpec.template.spec": ["containers"],
    "spec.workerGroupSpecs[]": ["groupName", "maxReplicas", "minReplicas", "template"],
    "spec.workerGroupSpecs[].template.spec": ["containers"],
    # Pod templates, in RayClusters and Deployments (core/v1 PodSpec, as the CRD embeds it)
    f"{POD}.containers[]": ["name", "image"],  # image: the CRD leaves it to the pod; a pod needs one
    f"{POD}.containers[].ports[]": ["containerPort"],
    f"{POD}.containers[].env[]": ["name"],
    f"{POD}.containers[].env[].valueFrom.secretKeyRef": ["key", "name"],
    f"{POD}.containers[].volumeMounts[]": ["mountPath", "name"],
    f"{POD}.volumes[]": ["name"],
    f"{POD}.volumes[].persistentVolumeClaim": ["claimName"],
    f"{POD}.tolerations[]": ["key"],
    # apps/v1 Deployment
    "spec.selector": ["matchLabels"],
}
SECRET_KEYS = {"lorafleet": {"redis-url", "admin-key", "s3-access-key-id", "s3-secret-access-key"},
               "lorafleet-ray-token": {"auth_token"}}


def _documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    (cluster,) = _documents("raycluster.yaml")
    return cluster


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in _documents("lorafleet.yaml")}


def _missing(node: Any, path: str = "") -> list[str]:
    """Every REQUIRED key absent under `node`, named by its path (list items as [])."""
    problems = []
    if isinstance(node, dict):
        for pattern, keys in REQUIRED.items():
            if _matches(path, pattern):
                problems += [f"{path or '<root>'}: missing {k}" for k in keys if node.get(k) in (None, "", [])]
        for key, value in node.items():
            problems += _missing(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for item in node:
            problems += _missing(item, f"{path}[]")
    return problems


def _matches(path: str, pattern: str) -> bool:
    """`*` is any run of characters; everything else, `[]` included, is literal."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), path) is not None


def _pod_specs(raycluster: dict) -> dict[str, dict]:
    spec = raycluster["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_raycluster_has_every_field_kuberay_requires(raycluster: dict) -> None:
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert not _missing(raycluster), "\n".join(_missing(raycluster))
    for group in [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]:
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"rayStartParams values must be strings: {params}"


def test_raycluster_passes_kuberays_own_validation(raycluster: dict) -> None:
    spec = raycluster["spec"]
    assert spec["authOptions"]["mode"] in ("disabled", "token")
    if spec["authOptions"]["mode"] == "token":
        assert _version(spec["rayVersion"]) >= (2, 52, 0), "token auth needs Ray 2.52.0 or later"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        params = group.get("rayStartParams", {})
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params) and group.get("resources")), \
            "resources go in rayStartParams or the group's resources, not both"
        assert "labels" not in params
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
    if spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2":
        for name, pod in _pod_specs(raycluster).items():
            assert pod.get("restartPolicy") in (None, "Never"), f"{name}: autoscaler v2 needs restartPolicy Never"
    assert not spec.get("gcsFaultToleranceOptions") and "redis-password" not in spec["headGroupSpec"]["rayStartParams"]


def test_raycluster_autoscales_a_gpu_group_with_the_token_from_a_secret(raycluster: dict) -> None:
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "lorafleet-ray-token"}
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["maxReplicas"] > gpu["minReplicas"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_ray_version_is_the_worker_images_and_new_enough_for_http_probes(raycluster: dict) -> None:
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)", (ROOT / "infra/Dockerfile").read_text(), re.MULTILINE)[1]
    assert raycluster["spec"]["rayVersion"] == pinned
    # From 2.53.0 KubeRay probes Ray over HTTP; before it, with wget, which our slim image lacks.
    assert _version(pinned) >= (2, 53, 0)


def test_every_volume_mount_names_a_volume_of_its_pod(raycluster: dict, objects: dict) -> None:
    pods = dict(_pod_specs(raycluster))
    pods.update({name: d["spec"]["template"]["spec"] for (kind, name), d in objects.items() if kind == "Deployment"})
    claims = {name for kind, name in objects if kind == "PersistentVolumeClaim"}
    config_maps = {name for kind, name in objects if kind == "ConfigMap"}
    for name, pod in pods.items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{container['name']} mounts unknown {mount['name']}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {volume}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{name}: {volume}"


def test_deployments_have_what_kubernetes_requires(objects: dict) -> None:
    deployments = {name: d for (kind, name), d in objects.items() if kind == "Deployment"}
    assert set(deployments) == {"lorafleet-api", "lorafleet-dispatcher"}
    for name, d in deployments.items():
        assert d["apiVersion"] == "apps/v1"
        assert not _missing(d), "\n".join(_missing(d))
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{name}: selector must match"


def test_no_secret_is_embedded_and_every_reference_names_a_documented_key(objects: dict) -> None:
    for path in KUBERAY.glob("*.yaml"):
        kinds = {d["kind"] for d in yaml.safe_load_all(path.read_text()) if d}
        assert "Secret" not in kinds, f"{path.name} embeds a Secret; reference one instead"
    for (kind, name), d in objects.items():
        if kind != "Deployment":
            continue
        for container in d["spec"]["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if re.search(r"PASSWORD|SECRET|TOKEN|_KEY$|REDIS_URL", var["name"]):
                    assert ref is not None, f"{name}: {var['name']} must come from a Secret"
                if ref is not None:
                    assert ref["key"] in SECRET_KEYS.get(ref["name"], set()), f"{name}: {ref}"


def test_every_lorafleet_variable_is_a_settings_field_and_the_values_validate(
    objects: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_secrets = {"redis-url": "redis://lorafleet:fake@redis:6379/0", "admin-key": "fake-admin-key",
                    "s3-access-key-id": "fake-id", "s3-secret-access-key": "fake-secret"}
    for (kind, name), d in objects.items():
        if kind != "Deployment":
            continue
        (container,) = d["spec"]["template"]["spec"]["containers"]
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(objects[("ConfigMap", source["configMapRef"]["name"])]["data"])
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            env[var["name"]] = fake_secrets.get(ref["key"], "fake") if ref else var["value"]
        unknown = [k for k in env if k.startswith(ENV_PREFIX) and settings_field(k) is None]
        assert not unknown, f"{name} sets {unknown}, which fleet.settings.Settings does not have"
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            Settings()


def test_commands_are_real_and_dispatchers_join_the_clusters_head(raycluster: dict, objects: dict) -> None:
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    gcs_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs-server")
    head_service = f"{raycluster['metadata']['name']}-head-svc"  # KubeRay's GenerateHeadServiceName
    api = objects[("Deployment", "lorafleet-api")]["spec"]["template"]["spec"]["containers"][0]
    assert not check_command_line(" ".join(api["command"]))
    dispatcher = objects[("Deployment", "lorafleet-dispatcher")]["spec"]["template"]["spec"]
    (container,) = dispatcher["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    (line,) = container["args"]
    assert not check_command_line(line), check_command_line(line)
    assert f"--address={head_service}:{gcs_port}" in line and "--num-gpus=0" in line
    env = {v["name"]: v for v in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == raycluster["spec"]["authOptions"]["secretName"]
    assert container["image"] == head["image"], "dispatchers and Ray nodes need the same Ray and Python"
    assert dispatcher["terminationGracePeriodSeconds"] >= 30  # time to hand the running job back


def test_api_service_probes_and_port_agree(objects: dict) -> None:
    api = objects[("Deployment", "lorafleet-api")]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    command = container["command"]
    assert port_names["http"] == int(command[command.index("--port") + 1])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = objects[("Service", "lorafleet-api")]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_catalog_config_map_is_a_valid_catalog(objects: dict) -> None:
    catalog = json.loads(objects[("ConfigMap", "lorafleet-catalog")]["data"]["catalog.json"])
    assert catalog
    for entry in catalog.values():
        BaseModelSpec.model_validate(entry)


def test_required_field_check_catches_a_missing_field(raycluster: dict) -> None:
    broken = json.loads(json.dumps(raycluster))
    del broken["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    del broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert _missing(broken) == ["spec.headGroupSpec.template.spec.containers[]: missing image",
                                "spec.workerGroupSpecs[]: missing maxReplicas"]
