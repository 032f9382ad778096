"""The deployment files agree with the settings: no missing required variable, no typo in a name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from ai_worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" list form
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _names(field_name: str) -> set[str]:
    info = Settings.model_fields[field_name]
    names = {info.alias} if info.alias else set()
    if isinstance(info.validation_alias, str):
        names.add(info.validation_alias)
    elif isinstance(info.validation_alias, AliasChoices):
        names.update(c for c in info.validation_alias.choices if isinstance(c, str))
    return names or {field_name.upper()}


KNOWN = set().union(*(_names(name) for name in Settings.model_fields))
REQUIRED = {min(_names(name)) for name, info in Settings.model_fields.items() if info.is_required()}


@pytest.fixture(scope="module")
def worker_env() -> dict[str, str]:
    return _environment(_compose()["services"]["worker"])


def test_services_exist() -> None:
    services = _compose()["services"]
    for name in ("kafka", "mongodb", "minio", "consul", "platform", "worker"):
        assert name in services, f"service {name} missing"
    assert services["worker"]["command"] == ["run"]
    assert services["platform"]["command"][:1] == ["platform"]
    assert "--public-url" in services["platform"]["command"]


def test_required_settings_are_set(worker_env: dict[str, str]) -> None:
    assert REQUIRED, "expected some required settings (MONGODB_URI, KAFKA_BROKERS)"
    missing = (REQUIRED | {"OPENROUTER_API_KEY"}) - set(worker_env)
    assert not missing, f"worker environment lacks {sorted(missing)}"
    # Without the key compose must refuse to start rather than run a worker that cannot call the LLM.
    assert worker_env["OPENROUTER_API_KEY"].startswith("${OPENROUTER_API_KEY:?")


def test_default_image_model_key_is_asked_for(worker_env: dict[str, str]) -> None:
    # The default image model is on Runware: compose refuses when RUNWARE_API_KEY is unset, but an empty
    # value (`?` without `:`) lets IMAGE_MODEL pick an OpenRouter image model instead.
    assert worker_env["RUNWARE_API_KEY"].startswith("${RUNWARE_API_KEY?")
    assert "IMAGE_MODEL" in worker_env["RUNWARE_API_KEY"]
    assert worker_env["IMAGE_MODEL"] == "${IMAGE_MODEL:-}"


def test_every_worker_variable_is_a_setting(worker_env: dict[str, str]) -> None:
    unknown = set(worker_env) - KNOWN
    assert not unknown, f"not Settings variables (typo?): {sorted(unknown)}"


def test_worker_points_at_the_compose_services(worker_env: dict[str, str]) -> None:
    services = _compose()["services"]
    kafka_env = _environment(services["kafka"])
    assert f"PLAINTEXT://{worker_env['KAFKA_BROKERS']}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert worker_env["MONGODB_URI"].startswith("mongodb://mongodb:")
    for var in ("CHARACTER_SERVICE_ADDR", "MEDIA_SERVICE_ADDR", "POST_SERVICE_ADDR", "WORLD_SERVICE_ADDR"):
        assert worker_env[var] == "platform:50051"
    assert worker_env["CONSUL_ADDRESS"] == "consul:8500"
    depends = services["worker"]["depends_on"]
    assert {"kafka", "mongodb", "platform"} <= set(depends)


def test_dockerfile_runs_unprivileged_without_secrets() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")  # join continued lines
    lines = [ln.strip() for ln in text.splitlines()]
    users = [ln.split(None, 1)[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users, "Dockerfile has no USER line"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"final USER is {user}"
    for ln in lines:
        if re.match(r"(ENV|ARG)\s", ln, re.IGNORECASE):
            secret = re.search(r"KEY|SECRET|PASSWORD|TOKEN", ln, re.IGNORECASE)
            assert not secret, f"secret in Dockerfile: {ln}"
    assert 'ENTRYPOINT ["ai-worker"]' in lines
    assert "EXPOSE 8081" in lines


def _healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    return " ".join(test[1:])


def test_dockerfile_healthcheck_is_liveness() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    checks = [ln.strip() for ln in text.splitlines() if ln.strip().upper().startswith("HEALTHCHECK")]
    assert len(checks) == 1, checks
    assert "/health'" in checks[0] and "/ready" not in checks[0]  # a restart cures a stuck loop, not an outage
    assert "SERVICE_PORT" in checks[0]


def test_compose_healthchecks() -> None:
    services = _compose()["services"]
    assert "/ready" in _healthcheck_command(services["worker"])
    port = _environment(services["worker"])["SERVICE_PORT"]
    assert f"127.0.0.1:{port}/ready" in _healthcheck_command(services["worker"])
    assert "50051" in _healthcheck_command(services["platform"])  # the platform serves no /health
    assert services["worker"]["depends_on"]["platform"]["condition"] == "service_healthy"


def test_containers_listen_on_every_interface_explicitly(worker_env: dict[str, str]) -> None:
    """The defaults are 127.0.0.1 (SERVICE_HOST, platform --host); containers must opt in to 0.0.0.0."""
    assert Settings.model_fields["service_host"].default == "127.0.0.1"
    assert worker_env["SERVICE_HOST"] == "0.0.0.0"
    command = _compose()["services"]["platform"]["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^\s*SERVICE_HOST=0\.0\.0\.0\b", text, re.MULTILINE), "the image must set SERVICE_HOST=0.0.0.0"
