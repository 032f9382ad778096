"""load_settings: every configuration error names the variable to fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import AliasChoices

from ai_worker.config import OPENROUTER_BASE_URL, ConfigError, Settings, load_settings
from ai_worker.providers.registry import LLM_STEPS
from ai_worker.providers.routing import provider_slots

REPO_ROOT = Path(__file__).resolve().parents[2]


def _aliases() -> list[str]:
    names: list[str] = []
    for field in Settings.model_fields.values():
        if field.alias:
            names.append(field.alias)
        elif isinstance(field.validation_alias, AliasChoices):
            names.extend(str(c) for c in field.validation_alias.choices)
        elif isinstance(field.validation_alias, str):
            names.append(field.validation_alias)
    return names


ALIASES = _aliases()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting leaks in from the environment running the tests (names are case-insensitive)."""
    wanted = {a.upper() for a in ALIASES}
    for name in list(os.environ):
        if name.upper() in wanted:
            monkeypatch.delenv(name)


@pytest.fixture
def minimal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "mongodb://db:27017")
    monkeypatch.setenv("KAFKA_BROKERS", "kafka:9092")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    monkeypatch.setenv("RUNWARE_API_KEY", "rw-test")  # the default image model is on Runware


def test_field_aliases_were_found() -> None:
    assert "MONGODB_URI" in ALIASES
    assert "MINIO_SECURE" in ALIASES
    assert len(ALIASES) == len(set(ALIASES)) >= 40


def test_missing_mongodb_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BROKERS", "kafka:9092")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "MONGODB_URI" in str(info.value)
    assert "KAFKA_BROKERS" not in str(info.value)


def test_all_missing_required_variables_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "MONGODB_URI" in str(info.value)
    assert "KAFKA_BROKERS" in str(info.value)


@pytest.mark.usefixtures("minimal_env")
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_CONCURRENT_TASKS", "abc"),
        ("MAX_CONCURRENT_TASKS", "0"),
        ("SERVICE_PORT", "70000"),
        ("LLM_TIMEOUT_S", "-1"),
        ("LOG_LEVEL", "LOUD"),
        ("IMAGE_PROVIDER", "dalle"),
        ("TASK_MAX_ATTEMPTS", '{"generate_post": "many"}'),
    ],
)
def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value)


@pytest.mark.usefixtures("minimal_env")
@pytest.mark.parametrize("name", ["TASK_MAX_ATTEMPTS", "LLM_MODEL_OVERRIDES"])
def test_mapping_that_is_not_json_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "post=vendor/model")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value)


@pytest.mark.usefixtures("minimal_env")
def test_invalid_integer_message_shows_the_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CONCURRENT_TASKS", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "MAX_CONCURRENT_TASKS" in str(info.value)
    assert "'abc'" in str(info.value)


def test_openrouter_without_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "mongodb://db")
    monkeypatch.setenv("KAFKA_BROKERS", "kafka:9092")
    monkeypatch.setenv("LLM_BASE_URL", OPENROUTER_BASE_URL)
    monkeypatch.setenv("IMAGE_PROVIDER", "offline")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "OPENROUTER_API_KEY" in str(info.value)
    assert "LLM_BASE_URL" in str(info.value)


def test_openrouter_images_without_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "mongodb://db")
    monkeypatch.setenv("KAFKA_BROKERS", "kafka:9092")
    monkeypatch.setenv("LLM_BASE_URL", "http://localhost:8000/v1")
    monkeypatch.setenv("IMAGE_BASE_URL", OPENROUTER_BASE_URL)
    monkeypatch.setenv("IMAGE_MODEL", "google/gemini-2.5-flash-image")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "OPENROUTER_API_KEY" in str(info.value)
    assert "IMAGE_BASE_URL" in str(info.value)
    assert "post_image" in str(info.value)
    assert "world_description" not in str(info.value)


def test_runware_without_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "mongodb://db")
    monkeypatch.setenv("KAFKA_BROKERS", "kafka:9092")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-x")
    monkeypatch.setenv("IMAGE_PROVIDER", "runware")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "RUNWARE_API_KEY" in str(info.value)
    monkeypatch.setenv("RUNWARE_API_KEY", "rw-x")
    assert load_settings().model_for("avatar") == "runware:100@1"


def test_other_endpoints_need_no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", "mongodb://db")
    monkeypatch.setenv("KAFKA_BROKERS", "kafka:9092")
    monkeypatch.setenv("LLM_BASE_URL", "http://localhost:8000/v1")
    monkeypatch.setenv("IMAGE_PROVIDER", "offline")
    settings = load_settings()
    assert settings.openrouter_api_key is None
    assert settings.models.primary("post").base_url == "http://localhost:8000/v1"
    assert settings.models.primary("post").openrouter_extras is False
    assert settings.model_for("post_image") == "offline"


@pytest.mark.usefixtures("minimal_env")
def test_model_overrides_with_unknown_step_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_MODEL_OVERRIDES", json.dumps({"post": "a/b", "poem": "c/d"}))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "LLM_MODEL_OVERRIDES" in str(info.value)
    assert "poem" in str(info.value)


@pytest.mark.usefixtures("minimal_env")
def test_defaults_with_minimal_env() -> None:
    s = load_settings()
    assert s.mongodb_uri == "mongodb://db:27017"
    assert s.kafka_bootstrap == ["kafka:9092"]
    assert s.max_concurrent_tasks is None  # derived from the provider slots
    slots = provider_slots(s)
    assert (slots.llm, slots.image, slots.explicit) == (8, 4, frozenset())  # the registry's max_concurrent
    assert s.task_slots(slots.llm + slots.image) == 2 * 12 + 8
    assert s.window(32) == 1000
    assert s.llm_base_url == OPENROUTER_BASE_URL
    assert s.models.primary("post").openrouter_extras is True
    assert s.llm_model_overrides == {}
    assert all(s.model_for(step) == "google/gemini-2.5-flash" for step in LLM_STEPS)
    assert s.model_for("post_image") == "runware:100@1"


def test_full_valid_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "SERVICE_NAME": "ai-worker-2",
        "SERVICE_PORT": "9000",
        "WORKER_ID": "w-7",
        "LOG_LEVEL": "DEBUG",
        "MONGODB_URI": "mongodb://user:pw@db:27017/?replicaSet=rs0",
        "MONGODB_DATABASE": "worlds",
        "KAFKA_BROKERS": "k1:9092, k2:9092,,",
        "KAFKA_TOPIC_TASKS": "tasks",
        "KAFKA_GROUP_ID": "grp",
        "KAFKA_ENABLE_IDEMPOTENCE": "true",
        "OPENROUTER_API_KEY": "sk-or-123",
        "DEFAULT_LLM_MODEL": "vendor/default",
        "LLM_MODEL_OVERRIDES": json.dumps({"post": "vendor/cheap", "world_description": "vendor/smart"}),
        "LLM_TIMEOUT_S": "30.5",
        "IMAGE_PROVIDER": "openrouter",
        "MAX_CONCURRENT_TASKS": "4",
        "TASK_MAX_ATTEMPTS": json.dumps({"generate_post": 5}),
        "RETRY_BASE_DELAY_S": "0.5",
        "MINIO_SECURE": "1",
        "CHARACTER_SERVICE_ADDR": "character:9090",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert s.service_name == "ai-worker-2"
    assert s.service_port == 9000
    assert s.worker_id == "w-7"
    assert s.log_level == "DEBUG"
    assert s.mongodb_database == "worlds"
    assert s.kafka_bootstrap == ["k1:9092", "k2:9092"]
    assert s.kafka_topic_tasks == "tasks"
    assert s.kafka_group_id == "grp"
    assert s.kafka_enable_idempotence is True
    assert s.llm_timeout_s == 30.5
    assert s.max_concurrent_tasks == 4
    assert s.task_max_attempts == {"generate_post": 5}
    assert s.retry_base_delay_s == 0.5
    assert s.minio_use_ssl is True
    assert s.character_service_addr == "character:9090"
    assert s.model_for("post") == "vendor/cheap"
    assert s.model_for("world_description") == "vendor/smart"
    assert s.model_for("character_batch") == "vendor/default"
    assert s.model_for("post_batch") == "vendor/default"
    assert "sk-or-123" not in repr(s)


@pytest.mark.usefixtures("minimal_env")
def test_keyword_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CONCURRENT_TASKS", "3")
    assert load_settings(MAX_CONCURRENT_TASKS=9).max_concurrent_tasks == 9


def test_every_variable_is_documented_in_readme() -> None:
    """The README configuration table lists every variable Settings reads."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in ALIASES if name not in readme]
    assert not missing, f"README.md does not document: {missing}"


@pytest.mark.usefixtures("minimal_env")
def test_empty_variables_mean_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_LLM_MODEL", "")
    monkeypatch.setenv("IMAGE_PROVIDER", "")
    s = load_settings()
    assert s.default_llm_model is None and s.image_provider is None
    assert s.model_for("post") == "google/gemini-2.5-flash"


@pytest.mark.usefixtures("minimal_env")
def test_explicit_provider_slots_win_over_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CONCURRENT_LLM_REQUESTS", "15")
    monkeypatch.setenv("MAX_CONCURRENT_IMAGE_REQUESTS", "10")
    monkeypatch.setenv("MAX_CONCURRENT_TASKS", "64")
    s = load_settings()
    slots = provider_slots(s)
    assert (slots.llm, slots.image, slots.explicit) == (15, 10, frozenset({"llm", "image"}))
    assert s.task_slots(25) == 64


@pytest.mark.usefixtures("minimal_env")
@pytest.mark.parametrize("name", ["TASK_MAX_ATTEMPTS", "TASK_TIMEOUTS_S"])
def test_policy_overrides_of_unknown_task_types_are_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, json.dumps({"generate_pots": 3}))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value) and "generate_pots" in str(info.value)
