"""docker-compose.yml against the Compose Specification's JSON schema, plus the
deployment rules the schema cannot express (loopback-only ports, no literal secrets).

There is no Docker engine on the CI machines, so the file is checked statically: the
schema is the one check-jsonschema vendors from compose-spec/compose-spec, and
``${VAR:-default}`` interpolation is resolved here as Compose would with an empty .env.
"""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
OFFLINE = ROOT / "docker-compose.offline.yml"  # the registry-free CPU build (make cluster-test)

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _schema() -> dict:
    text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(text.read_text())


def _interpolate(value, env: dict[str, str]):
    """Compose's variable substitution for the forms this file uses."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m[0] == "$$":  # an escaped dollar, left for the container's shell
            return "$"
        name, op, arg = m["name"], m["op"], m["arg"]
        current = env.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise KeyError(f"{name}: {arg}")
            return current
        return current or ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def resolved(raw) -> dict:
    env = {"RAY_AUTH_TOKEN": "t" * 64, "POSTGRES_PASSWORD": "p" * 48}
    return _interpolate(raw, env)


def test_compose_file_matches_the_compose_specification(raw, resolved):
    validator = jsonschema.Draft202012Validator(_schema())
    for doc in (raw, resolved):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_check_rejects_a_misspelt_key(raw):
    # Guards the check above: the schema really is strict about service keys.
    broken = copy.deepcopy(raw)
    broken["services"]["ray-head"]["comand"] = broken["services"]["ray-head"].pop("command")
    assert not jsonschema.Draft202012Validator(_schema()).is_valid(broken)


def test_services_present(resolved):
    assert {"ray-head", "ray-worker", "mlflow", "postgres"} <= set(resolved["services"])


def test_every_published_port_binds_to_loopback_by_default(resolved):
    published = []
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            # Long syntax only: the short "8265:8265" form would bind every interface.
            assert isinstance(port, dict), f"{name}: use the long port syntax with host_ip"
            assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            published.append(int(port["target"]))
    assert {5000, 8265} <= set(published)
    assert 6379 not in published, "the GCS port must stay on the compose network"


def test_secrets_come_from_env_and_are_required(raw):
    text = COMPOSE.read_text()
    for var in ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD"):
        # Only ever ${VAR:?...}: no default that would silently run with a known secret.
        uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
        assert uses, var
        assert all(u.startswith(":?") for u in uses), (var, uses)
    with pytest.raises(KeyError, match="RAY_AUTH_TOKEN"):
        _interpolate(raw, {"POSTGRES_PASSWORD": "x"})
    # No literal credentials anywhere: passwords and tokens are interpolated.
    for line in text.splitlines():
        m = re.match(r"\s*(\w*(PASSWORD|TOKEN|SECRET)\w*)\s*:\s*(\S.*)$", line)
        if m:
            assert m[3].startswith("${"), line


def test_ray_nodes_share_token_auth_and_storage(resolved):
    nodes = ["ray-head", "ray-worker", "ray-worker-cpu"]
    for name in nodes:
        service = resolved["services"][name]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["environment"]["RAY_AUTH_TOKEN"] == "t" * 64
        assert any(v.startswith("ray-storage:") for v in service["volumes"])
    assert "ray-storage" in resolved["volumes"]
    head = " ".join(resolved["services"]["ray-head"]["command"])
    assert "--head" in head and "--block" in head and "--dashboard-port=8265" in head


def test_worker_reserves_a_gpu_and_has_no_fixed_name(resolved):
    worker = resolved["services"]["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    # container_name or a published port would make --scale ray-worker=N fail.
    assert "container_name" not in worker and "ports" not in worker


def test_mlflow_uses_postgres_and_a_served_artifact_store(resolved):
    mlflow = resolved["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "--artifacts-destination /mlflow-artifacts" in command
    hosts = re.search(r'--allowed-hosts "([^"]+)"', command)[1].split(",")
    assert {"mlflow:5000", "localhost:5000", "127.0.0.1:5000"} <= set(hosts)


def test_env_example_lists_every_variable_the_compose_file_reads():
    text = COMPOSE.read_text() + OFFLINE.read_text()
    used = {m["name"] for m in _VAR.finditer(text) if m["name"]}
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    assert used <= listed, used - listed
    # The example ships no secret values.
    assert re.search(r"^RAY_AUTH_TOKEN=$", example, flags=re.M)
    assert re.search(r"^POSTGRES_PASSWORD=$", example, flags=re.M)


def test_dockerfile_installs_the_sweep_and_vision_extras():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, flags=re.M)
    assert re.search(r"ARG BASE_IMAGE=pytorch/pytorch:\S+-cuda\S+-runtime", text)
    assert re.search(r"^ARG EXTRAS=sweep,vision$", text, flags=re.M)
    assert '".[${EXTRAS}]"' in text


def test_every_service_has_a_health_check(resolved):
    # `docker compose up --wait` (and depends_on: service_healthy) wait on these.
    for name, service in resolved["services"].items():
        assert service.get("healthcheck", {}).get("test"), name
    for name in ("ray-worker", "ray-worker-cpu"):
        assert resolved["services"][name]["depends_on"]["ray-head"] == {
            "condition": "service_healthy"
        }


@pytest.fixture(scope="module")
def offline() -> dict:
    env = {"MODLOSS_BASE_IMAGE": "modloss-base:bookworm-0123456789ab"}
    return _interpolate(yaml.safe_load(OFFLINE.read_text()), env)


def test_offline_override_builds_every_image_on_the_local_base_with_cpu_torch(offline):
    assert not jsonschema.Draft202012Validator(_schema()).is_valid({"services": {"x": {"y": 1}}})
    errors = list(jsonschema.Draft202012Validator(_schema()).iter_errors(offline))
    assert not errors, [e.message for e in errors]
    services = offline["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "ray-worker-cpu"}
    for name, service in services.items():
        assert service["build"]["args"]["BASE_IMAGE"] == "modloss-base:bookworm-0123456789ab"
        assert "ports" not in service and "environment" not in service, name
        if name != "postgres":
            # PyPI's torch 2.13.0 for Linux is a CUDA build; torchvision needs CUDA torch.
            assert service["build"]["args"]["TORCH"] == "torch==2.13.0+cpu"
            assert service["build"]["args"]["EXTRAS"] == "sweep"
    assert "postgresql-15" in services["postgres"]["build"]["dockerfile_inline"]
    with pytest.raises(KeyError, match="MODLOSS_BASE_IMAGE"):
        _interpolate(yaml.safe_load(OFFLINE.read_text()), {})


def test_offline_postgres_never_puts_the_password_on_a_command_line(offline):
    script = offline["services"]["postgres"]["entrypoint"][-1]
    assert "--pwfile=" in script and "scram-sha-256" in script
    # Only the file write names the variable; no argument carries the password.
    assert script.count("POSTGRES_PASSWORD") == 1
