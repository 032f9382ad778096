"""The LLM output schemas convert to strict structured-output schemas: closed, every property required."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from ai_worker.content.schemas import CharacterBatch, PostBatch, PostContent, WorldDescription
from ai_worker.llm.schema import strict_json_schema

MODELS: list[type[BaseModel]] = [WorldDescription, CharacterBatch, PostBatch, PostContent]


def _objects(node: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    """Every object schema in the tree with its path; property maps are walked through."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            found.append((path, node))
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    found.extend(_objects(sub, f"{path}.{name}"))
            else:
                found.extend(_objects(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found.extend(_objects(item, f"{path}[{i}]"))
    return found


def _keys(node: Any) -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "properties":
                keys.add(key)
                keys |= _keys(value)
            else:
                for sub in value.values():
                    keys |= _keys(sub)
    elif isinstance(node, list):
        for item in node:
            keys |= _keys(item)
    return keys


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_closed_objects_with_every_property_required(model: type[BaseModel]) -> None:
    schema = strict_json_schema(model)
    assert schema["type"] == "object"
    objects = _objects(schema)
    assert objects
    for path, obj in objects:
        assert obj.get("type") == "object", path
        assert obj.get("additionalProperties") is False, path
        assert obj.get("properties"), path
        assert sorted(obj["required"]) == sorted(obj["properties"]), path


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_top_level_properties_match_model_fields(model: type[BaseModel]) -> None:
    schema = strict_json_schema(model)
    assert list(schema["properties"]) == list(model.model_fields)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_self_contained_without_refs_titles_or_defaults(model: type[BaseModel]) -> None:
    keys = _keys(strict_json_schema(model))
    assert not keys & {"$ref", "$defs", "title", "default"}


def test_nested_objects_are_inlined_and_closed() -> None:
    world = strict_json_schema(WorldDescription)
    location = world["properties"]["locations"]["items"]
    assert set(location["required"]) == {"name", "description"}
    assert location["additionalProperties"] is False

    batch = strict_json_schema(CharacterBatch)
    character = batch["properties"]["characters"]["items"]
    assert "avatar_prompt" in character["required"]
    assert character["additionalProperties"] is False
    assert character["properties"]["username"]["description"]  # field instructions are kept

    posts = strict_json_schema(PostBatch)["properties"]["posts"]["items"]
    assert sorted(posts["required"]) == ["angle", "topic"]


def test_walker_finds_every_nested_object() -> None:
    # Guard for the walker itself: CharacterBatch has the batch object plus one item object.
    assert len(_objects(strict_json_schema(CharacterBatch))) == 2
    assert len(_objects(strict_json_schema(WorldDescription))) == 2
    assert len(_objects(strict_json_schema(PostContent))) == 1
