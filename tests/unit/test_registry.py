"""The model registry: the shipped file, validation errors, environment precedence, chains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ai_worker.providers.registry import (
    IMAGE_STEPS,
    LLM_STEPS,
    FlatDefaults,
    ModelChoice,
    ModelRegistry,
    RegistryError,
    load_registry,
    parse_registry,
)

KEYS = {"OPENROUTER_API_KEY": "sk-or", "RUNWARE_API_KEY": "rw"}


def table(**models: dict[str, Any]) -> dict[str, Any]:
    return {
        "defaults": {"llm": "a/llm", "image": "a/img"},
        "providers": {
            "or": {"kind": "openai", "base_url": "https://openrouter.ai/api/v1", "base_url_env": "LLM_BASE_URL",
                   "api_key_env": "OPENROUTER_API_KEY"},
            "rw": {"kind": "runware", "base_url": "https://rw.example/v1", "api_key_env": "RUNWARE_API_KEY"},
        },
        "models": {
            "a/llm": {"provider": "or", "kind": "llm", "fallbacks": ["b/llm"], "rpm": 10, "tpm": 1000,
                      "max_concurrent": 2, "price_in_per_mtok": 1.0},
            "b/llm": {"provider": "or", "kind": "llm", "steps": ["post"]},
            "a/img": {"provider": "or", "kind": "image", "base_url_env": "IMAGE_BASE_URL", "steps": ["image"]},
            "rw/img": {"provider": "rw", "kind": "image", "model": "runware:100@1", "price_per_image": 0.002,
                       "steps": ["avatar"]},
            **models,
        },
    }


def registry(data: dict[str, Any] | None = None, env: dict[str, str] | None = None, **choice: Any) -> ModelRegistry:
    return ModelRegistry(parse_registry(data or table()), choice=ModelChoice(**choice),
                         env=KEYS if env is None else env, flat=FlatDefaults(price_out_per_mtok=9.0))


def test_shipped_registry_is_valid_and_covers_every_step() -> None:
    reg = ModelRegistry(load_registry(Path(__file__).parents[2] / "models.toml"), env=KEYS)
    assignments = reg.assignments()
    assert set(assignments) == {*LLM_STEPS, *IMAGE_STEPS}
    assert reg.primary("post").id == "google/gemini-2.5-flash"
    assert [m.id for m in reg.chain("post")] == ["google/gemini-2.5-flash", "openai/gpt-4.1-mini"]
    assert reg.primary("avatar").id == "runware:100@1"
    assert reg.model("google/gemini-2.5-flash-image", "image").price_per_image == 0.039  # one setting away
    used = {reg.model(mid) for chain in assignments.values() for mid in chain}
    assert all(m.price_in_per_mtok or m.kind == "image" for m in used)


def test_steps_defaults_and_group() -> None:
    reg = registry()
    assert reg.primary("post").id == "b/llm"  # claimed by name
    assert reg.primary("world_description").id == "a/llm"  # the default
    assert reg.primary("avatar").id == "rw/img"  # claimed by name beats the "image" group
    assert reg.primary("post_image").id == "a/img"  # the group
    assert reg.primary("something_else").id == "a/llm"  # unknown steps: the default of the kind
    assert reg.primary("something_else", "image").id == "a/img"


def test_resolution_prices_limits_urls() -> None:
    reg = registry(env={**KEYS, "LLM_BASE_URL": "http://sim:1/v1"})
    a = reg.model("a/llm")
    assert (a.price_in_per_mtok, a.price_out_per_mtok) == (1.0, 9.0)  # missing price: the flat default
    assert (a.limits.rpm, a.limits.tpm, a.limits.tpd, a.max_concurrent) == (10, 1000, None, 2)
    assert a.base_url == "http://sim:1/v1" and not a.key_required and not a.openrouter_extras
    assert a.label == "openai-compatible"
    img = reg.model("a/img")
    assert img.base_url == "http://sim:1/v1"  # IMAGE_BASE_URL unset: the provider's variable applies
    assert registry(env={"IMAGE_BASE_URL": "http://img/v1"}).model("a/img").base_url == "http://img/v1"
    rw = reg.model("rw/img")
    assert (rw.name, rw.provider_kind, rw.price_per_image, rw.api_key) == ("runware:100@1", "runware", 0.002, "rw")


def test_environment_wins_over_the_file() -> None:
    reg = registry(default_llm_model="x/any", llm_model_overrides={"post": "y/cheap"})
    assert reg.primary("world_description").id == "x/any"
    assert reg.primary("post").id == "y/cheap"
    unknown = reg.model("y/cheap")
    assert unknown.provider == "or" and unknown.fallbacks == () and unknown.limits.empty
    assert registry(image_provider="offline").primary("avatar").id == "offline"
    assert registry(image_provider="offline").model("offline").price_per_image == 0.0
    assert registry(image_model="z/img").primary("world_icon").id == "z/img"
    assert registry(image_provider="rw").primary("post_image").id == "rw/img"


def test_chain_skips_fallbacks_without_their_key() -> None:
    data = table()
    data["models"]["a/llm"]["fallbacks"] = ["b/llm", "rw2"]
    data["models"]["rw2"] = {"provider": "or", "kind": "llm", "api_key_env": "OTHER_KEY"}
    reg = registry(data)
    assert [m.id for m in reg.chain("world_description")] == ["a/llm", "b/llm"]
    assert registry(data, env={**KEYS, "OTHER_KEY": "k"}).chain("world_description")[-1].id == "rw2"


def test_missing_keys_name_the_variable_and_steps() -> None:
    problems = registry(env={}).missing_keys()
    text = "\n".join(problems)
    assert "OPENROUTER_API_KEY" in text and "RUNWARE_API_KEY" in text and "avatar" in text
    assert registry(env={}, image_provider="offline", default_llm_model=None,
                    llm_model_overrides={}).missing_keys(("avatar",)) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["models"]["a/llm"].update(provider="nope"), "unknown provider 'nope'"),
        (lambda d: d["models"]["a/llm"].update(fallbacks=["ghost"]), "unknown fallback 'ghost'"),
        (lambda d: d["models"]["a/llm"].update(fallbacks=["a/img"]), "is not an llm model"),
        (lambda d: d["models"]["a/llm"].update(steps=["poem"]), "unknown step 'poem'"),
        (lambda d: d["models"]["a/llm"].update(steps=["avatar"]), "needs an image model"),
        (lambda d: d["models"]["a/llm"].update(steps=["post"]), "claimed by both"),
        (lambda d: d["models"]["a/llm"].update(rpm=-1), "greater than or equal to 0"),
        (lambda d: d["models"]["a/llm"].update(colour="red"), "colour"),
        (lambda d: d["defaults"].update(llm="a/img"), "is not an llm model"),
        (lambda d: d["models"]["b/llm"].update(provider="rw"), "only serves images"),
    ],
)
def test_invalid_tables_are_rejected_with_the_entry(change: Any, message: str) -> None:
    data = table()
    change(data)
    with pytest.raises(RegistryError) as info:
        parse_registry(data, source="x.toml")
    assert message in str(info.value)
    assert "x.toml" in str(info.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[defaults\nllm = 1")
    with pytest.raises(RegistryError, match="not valid TOML"):
        load_registry(bad)


def test_registry_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    custom = tmp_path / "models.toml"
    custom.write_text(
        '[defaults]\nllm = "m/one"\nimage = "off"\n'
        '[providers.p]\nkind = "openai"\nbase_url = "http://p/v1"\n'
        '[providers.o]\nkind = "offline"\n'
        '[models."m/one"]\nprovider = "p"\nkind = "llm"\nrpm = 5\n'
        '[models.off]\nprovider = "o"\nkind = "image"\n'
    )
    from ai_worker.config import load_settings

    monkeypatch.setenv("MODEL_REGISTRY_FILE", str(custom))
    s = load_settings(MONGODB_URI="mongodb://db", KAFKA_BROKERS="k:1")
    assert s.model_for("post") == "m/one"
    assert s.models.primary("post").limits.rpm == 5
    assert s.model_for("avatar") == "off"
    monkeypatch.setenv("MODEL_REGISTRY_FILE", str(tmp_path / "nope.toml"))
    from ai_worker.config import ConfigError

    with pytest.raises(ConfigError, match="MODEL_REGISTRY_FILE"):
        load_settings(MONGODB_URI="mongodb://db", KAFKA_BROKERS="k:1")


def test_models_list_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ai_worker.cli import app

    for name, value in {"MONGODB_URI": "mongodb://db", "KAFKA_BROKERS": "k:1", "OPENROUTER_API_KEY": "sk",
                        "LLM_MODEL_OVERRIDES": '{"post": "vendor/cheap"}', "COLUMNS": "250"}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert "vendor/cheap" in lines["post"]
    assert "google/gemini-2.5-flash" in lines["post_batch"] and "openai/gpt-4.1-mini" in lines["post_batch"]
    assert "rpm 600" in lines["post_batch"]
    assert "$0.003/Mpx" in lines["avatar"] and "runware:100@1" in lines["avatar"]
    monkeypatch.setenv("MODEL_REGISTRY_FILE", "/nonexistent/models.toml")
    assert CliRunner().invoke(app, ["models", "list"]).exit_code == 2


def test_models_list_needs_no_database_and_warns_about_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ai_worker.cli import app

    for name in ("MONGODB_URI", "KAFKA_BROKERS", "OPENROUTER_API_KEY", "LLM_BASE_URL", "IMAGE_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert "OPENROUTER_API_KEY is required" in result.output
