"""docker-compose.yml read as data (no Docker engine here): every build context, Dockerfile target, mounted
file, command, port, healthcheck and `LORAFLEET_*` variable it names must exist in this repository and
agree with each other, and no secret may have a default."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from fleet.settings import Settings
from tests.deploy.conftest import (
    ENV_PREFIX,
    ROOT,
    SECRET_NAME,
    check_command_line,
    interpolate,
    interpolations,
    settings_field,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
OUR_IMAGES = {"api", "ray-head", "ray-gpu", "dispatcher"}  # built from infra/Dockerfile
SECRETS = {"LORAFLEET_ADMIN_KEY", "REDIS_PASSWORD", "MINIO_ROOT_PASSWORD", "RAY_AUTH_TOKEN"}
FAKE_ENV = {name: f"fake-{name.lower().replace('_', '-')}" for name in SECRETS}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _command_lines(service: dict) -> list[str]:
    """The shell line(s) a service runs: `sh -c` scripts as they are, exec-form commands joined."""
    command = service.get("command")
    if command is None:
        return []
    if service.get("entrypoint") == ["/bin/sh", "-c"]:
        return [" ".join(command) if isinstance(command, list) else command]
    return [shlex.join(command) if isinstance(command, list) else command]


def _env(service: dict) -> dict[str, str]:
    return {k: interpolate(str(v), FAKE_ENV) for k, v in (service.get("environment") or {}).items()}


def _option(argv_line: str, name: str) -> str | None:
    for token in shlex.split(argv_line):
        if token.startswith(f"{name}="):
            return token.split("=", 1)[1]
    return None


def test_the_stack_has_every_piece(services: dict) -> None:
    assert {"redis", "minio", "minio-bucket", "api", "ray-head", "ray-gpu", "dispatcher"} <= set(services)


def test_every_build_context_dockerfile_and_target_exists(services: dict) -> None:
    problems = []
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context = ROOT / build["context"]
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            problems.append(f"{name}: no Dockerfile at {dockerfile}")
            continue
        stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.MULTILINE | re.IGNORECASE)
        if build.get("target") not in stages:
            problems.append(f"{name}: target {build.get('target')!r} is not a stage of {dockerfile} ({stages})")
    assert {n for n, s in services.items() if "build" in s} == OUR_IMAGES
    assert not problems, "\n".join(problems)


def test_every_bind_mounted_file_exists_and_named_volumes_are_declared(compose: dict, services: dict) -> None:
    problems = []
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./models"):
                continue  # the operator's model weights, not part of the repository
            if source.startswith("."):
                if not (ROOT / source).exists():
                    problems.append(f"{name}: {source} does not exist")
            elif source not in (compose.get("volumes") or {}):
                problems.append(f"{name}: named volume {source} is not declared")
    assert not problems, "\n".join(problems)


def test_every_command_of_our_images_is_a_real_cli_command(services: dict) -> None:
    problems = []
    for name in OUR_IMAGES:
        lines = _command_lines(services[name])
        assert lines, f"{name} must say what it runs"
        for line in lines:
            problems += [f"{name}: {p}" for p in check_command_line(line)]
        test = services[name].get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "ray"]:
            problems += [f"{name} healthcheck: {p}" for p in check_command_line(shlex.join(test[1:]))]
    assert not problems, "\n".join(problems)


def test_checks_catch_a_command_that_does_not_exist() -> None:
    assert check_command_line("lorafleet wroker")
    assert check_command_line("ray start --adress=ray-head:6379")
    assert check_command_line("lorafleet serve --prot 8000")


def test_every_lorafleet_variable_is_a_settings_field_and_the_values_validate(
    services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in services.items():
        env = _env(service)
        unknown = [k for k in env if k.startswith(ENV_PREFIX) and settings_field(k) is None]
        assert not unknown, f"{name} sets {unknown}, which fleet.settings.Settings does not have"
        lorafleet_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        if not lorafleet_env:
            continue
        for k, v in lorafleet_env.items():
            monkeypatch.setenv(k, v)
        Settings()  # the values parse and pass Settings' own checks
        for k in lorafleet_env:
            monkeypatch.delenv(k)


def test_no_secret_has_a_default_and_compose_refuses_to_start_without_it() -> None:
    found = {}
    for variable, operator, argument in interpolations(COMPOSE_FILE.read_text()):
        if SECRET_NAME.search(variable):
            found[variable] = found.get(variable, set()) | {operator}
            assert operator == ":?" and argument.strip(), f"${{{variable}}} must be written ${{{variable}:?message}}"
    assert set(found) == SECRETS


def test_secrets_are_passed_only_as_interpolations(services: dict) -> None:
    secret_settings = {"LORAFLEET_ADMIN_KEY", "LORAFLEET_S3_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD",
                       "REDIS_PASSWORD", "RAY_AUTH_TOKEN"}
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if key in secret_settings:
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key} must come from the host"


def test_lorafleet_logs_in_to_redis_as_its_acl_user(services: dict) -> None:
    redis = services["redis"]
    script = " ".join(_command_lines(redis))
    assert "--aclfile" in script and "redis-acl.sh" in script, "Redis must start with the ACL file"
    assert "REDIS_PASSWORD" in redis["environment"]
    port = re.search(r"^port\s+(\d+)", (ROOT / "infra/redis.conf").read_text(), re.MULTILINE)[1]
    healthcheck = " ".join(redis["healthcheck"]["test"])
    assert f"-p {port}" in healthcheck and "--user lorafleet" in healthcheck
    for name in ("api", "dispatcher"):
        url = urlsplit(_env(services[name])["LORAFLEET_REDIS_URL"])
        assert (url.username, url.password) == ("lorafleet", FAKE_ENV["REDIS_PASSWORD"]), name
        assert (url.hostname, str(url.port)) == ("redis", port), f"{name} must reach the redis service"
        assert "redis" in services[name]["depends_on"]


def test_object_store_is_the_minio_service_and_its_bucket(services: dict) -> None:
    init = " ".join(_command_lines(services["minio-bucket"]))
    for name in ("api", "dispatcher"):
        env = _env(services[name])
        endpoint = urlsplit(env["LORAFLEET_S3_ENDPOINT_URL"])
        assert (endpoint.hostname, endpoint.port) == ("minio", 9000)  # minio server's default address
        assert f"mb --ignore-existing local/{env['LORAFLEET_S3_BUCKET']}" in init
        assert services[name]["depends_on"]["minio-bucket"] == {"condition": "service_completed_successfully"}
        assert env["LORAFLEET_S3_SECRET_ACCESS_KEY"] == FAKE_ENV["MINIO_ROOT_PASSWORD"]


def test_api_port_published_served_and_health_checked_agree(services: dict) -> None:
    api = services["api"]
    (line,) = _command_lines(api)
    served = shlex.split(line)[shlex.split(line).index("--port") + 1]
    published = {p.split(":")[-1] for p in api["ports"]}
    assert published == {served}
    assert f"127.0.0.1:{served}/healthz" in " ".join(api["healthcheck"]["test"])
    dockerfile = (ROOT / "infra/Dockerfile").read_text()
    assert f"EXPOSE {served}" in dockerfile and f'"--port", "{served}"' in dockerfile


def test_ray_nodes_and_dispatchers_join_the_head_with_the_shared_token(services: dict) -> None:
    from ray.scripts.scripts import cli

    (head_line,) = _command_lines(services["ray-head"])
    gcs_port = _option(head_line, "--port")
    head_address = f"ray-head:{gcs_port}"
    for name in ("ray-gpu", "dispatcher"):
        (line,) = _command_lines(services[name])
        assert _option(line, "--address") == head_address, f"{name} must join {head_address}"
        assert services[name]["depends_on"]["ray-head"] == {"condition": "service_healthy"}
    for name in ("ray-head", "ray-gpu", "dispatcher"):
        env = _env(services[name])
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == FAKE_ENV["RAY_AUTH_TOKEN"], name
    assert _env(services["dispatcher"])["LORAFLEET_RAY_ADDRESS"] == "auto"  # the raylet it just started
    dashboard_port = next(p.default for p in cli.commands["start"].params if p.name == "dashboard_port")
    assert {p.split(":")[-1] for p in services["ray-head"]["ports"]} == {str(dashboard_port)}
    assert f"--address=127.0.0.1:{gcs_port}" in services["ray-head"]["healthcheck"]["test"]


def test_gpu_workers_reserve_the_gpus_ray_is_told_about(services: dict) -> None:
    gpu = services["ray-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    (line,) = _command_lines(gpu)
    assert _option(line, "--num-gpus") == str(device["count"])
    assert _env(services["dispatcher"])["LORAFLEET_USE_GPU"] == "true"
    for name in ("ray-head", "dispatcher"):  # no GPU there: Ray must not hand one out
        assert _option(_command_lines(services[name])[0], "--num-gpus") == "0"


def test_dispatchers_get_time_to_hand_their_job_back(services: dict) -> None:
    grace = services["dispatcher"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= 30


def test_every_dependency_with_a_health_condition_has_a_healthcheck(services: dict) -> None:
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for target, condition in (depends.items() if isinstance(depends, dict) else []):
            assert target in services, f"{name} depends on unknown {target}"
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no check"


def test_the_models_and_data_volume_are_shared_by_every_ray_node_and_dispatcher(services: dict) -> None:
    mounts = {name: set(services[name]["volumes"]) for name in ("ray-head", "ray-gpu", "dispatcher")}
    assert mounts["ray-head"] == mounts["ray-gpu"] == mounts["dispatcher"]
    data_dir = _env(services["dispatcher"])["LORAFLEET_DATA_DIR"]
    assert any(v.endswith(f":{data_dir}") and not v.startswith(".") for v in mounts["dispatcher"])
    catalog = Path(_env(services["dispatcher"])["LORAFLEET_CATALOG_FILE"])
    assert any(v.split(":")[1] == str(catalog) for v in mounts["dispatcher"])
