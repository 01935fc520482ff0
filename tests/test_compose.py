"""docker-compose.yml is valid Compose and runs commands that exist in this project."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from config.settings import VARIABLES
from tests.support import ROOT

SPEC = ROOT.parent / "shared" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_validates_against_the_compose_spec(compose):
    if not SPEC.exists():
        pytest.skip(f"the Compose JSON schema is not at {SPEC}")
    jsonschema.Draft7Validator(json.loads(SPEC.read_text())).validate(compose)


def test_redis_is_durable_and_healthchecked(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["healthcheck"]["test"] and redis["volumes"]


def test_gpu_worker_reserves_gpus_and_cpu_variant_exists(compose):
    gpu = compose["services"]["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["driver"] == "nvidia" and devices["capabilities"] == ["gpu"]
    assert "deploy" not in compose["services"]["worker-cpu"]
    for name in ("web", "worker", "worker-cpu"):
        assert compose["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", ["worker", "worker-cpu"])
def test_worker_commands_exist(compose, service):
    command = compose["services"][service]["command"]
    assert command[:3] == ["python", "-m", "worker"]
    out = subprocess.run([sys.executable, *command[1:], "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_flower_requires_basic_auth_and_its_command_exists(compose):
    flower = compose["services"]["flower"]
    command = flower["command"]
    assert any(part.startswith("--basic-auth=${FLOWER_BASIC_AUTH:?") for part in command)
    assert command[0] == "celery" and "flower" in command
    out = subprocess.run([sys.executable, "-m", "celery", "flower", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "Celery clusters" in out.stdout, out.stderr
    check = "import flower.options, tornado.options; assert 'basic_auth' in tornado.options.options.as_dict()"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT).returncode == 0
    assert "AS flower" in (ROOT / "Dockerfile").read_text()


def test_web_command_is_the_one_the_docs_document(compose):
    command = compose["services"]["web"]["command"]
    documented = (ROOT / "docs" / "operating" / "scale-out.md").read_text()
    assert shlex.join(command).replace("'", "") in documented.replace("'", "")
    assert (ROOT / command[2]).exists()  # the gunicorn config file
    out = subprocess.run([sys.executable, "-m", "gunicorn", "--check-config", "-c", command[2], command[3]],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_dockerfile_builds_the_targets_compose_uses(compose):
    dockerfile = (ROOT / "Dockerfile").read_text()
    for service in ("web", "worker"):
        assert f"AS {compose['services'][service]['build']['target']}" in dockerfile
    assert Path(ROOT / "pyproject.toml").exists()


def test_ha_profile_has_a_replica_and_three_sentinels_watching_the_master(compose):
    services = compose["services"]
    assert "--replicaof redis 6379" in " ".join(services["redis-replica"]["command"])
    sentinels = [name for name, service in services.items() if "--sentinel" in " ".join(service.get("command", []))]
    assert sorted(sentinels) == ["sentinel-1", "sentinel-2", "sentinel-3"]
    for name in ["redis-replica", *sentinels]:
        assert services[name]["profiles"] == ["ha"]
        assert "sentinel monitor mymaster redis 6379 2" in " ".join(services[name]["command"]) or name == "redis-replica"
    env = compose["x-bloomq-env"]
    assert {"BLOOMQ_REDIS_URL", "BLOOMQ_REDIS_SENTINEL_MASTER", "BLOOMQ_REDIS_MIN_REPLICAS"} <= set(env)


def _interpolated(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}`` substitution (the only form this file uses)."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], value)


def test_every_bloomq_variable_compose_sets_is_one_bloomq_reads(compose):
    read = {variable for _, variable, _ in VARIABLES} | {"BLOOMQ_HOST", "BLOOMQ_PORT"}  # those two: gunicorn's
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        unknown = {key for key in environment if key.startswith("BLOOMQ_")} - read
        assert not unknown, (name, unknown)


def test_api_keys_reach_the_web_from_the_shell_and_nothing_is_set_when_the_shell_sets_nothing(compose):
    web = compose["services"]["web"]["environment"]
    shell = {"BLOOMQ_API_KEYS": "k1,k2", "BLOOMQ_OPERATOR_KEYS": "ops", "BLOOMQ_SECRET_KEY": "s" * 64}
    for variable, value in shell.items():
        assert _interpolated(web[variable], shell) == value
        assert _interpolated(web[variable], {}) == ""  # read as unset: auth stays off


def test_every_port_but_the_webs_is_published_on_loopback_unless_an_address_is_named(compose):
    # Flower, Prometheus and Grafana show the operator's view (Prometheus scrapes /metrics with an operator
    # key, unauthenticated itself): only the machine itself reaches them unless an operator opts in.
    published = {name: service["ports"] for name, service in compose["services"].items() if service.get("ports")}
    assert set(published) == {"redis", "web", "flower", "prometheus", "grafana"}
    for name, ports in published.items():
        for mapping in ports:
            if name == "web":
                assert _interpolated(mapping, {}) == "5000:5000"  # the service itself: every interface
                continue
            assert _interpolated(mapping, {}).startswith("127.0.0.1:"), name
            variable = mapping.split("${", 1)[1].split(":-", 1)[0]
            assert _interpolated(mapping, {variable: "10.0.0.5:7000"}).startswith("10.0.0.5:7000:"), name


def test_redis_is_published_on_loopback_unless_an_address_is_named(compose):
    (ports,) = compose["services"]["redis"]["ports"]
    assert _interpolated(ports, {}).startswith("127.0.0.1:")
    assert _interpolated(ports, {"REDIS_PUBLISH": "10.0.0.5:6379"}) == "10.0.0.5:6379:6379"
