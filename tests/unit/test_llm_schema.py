from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from ai_worker.content import schemas
from ai_worker.llm.schema import strict_json_schema

ALL_SCHEMAS: list[type[BaseModel]] = [
    schemas.WorldDescription,
    schemas.CharacterBatch,
    schemas.CharacterSpec,
    schemas.PostBatch,
    schemas.PostContent,
    schemas.Location,
]


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every dict node of a schema tree (properties maps are walked through, not returned)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        found.append(node)
        for key, value in node.items():
            if key == "properties":
                for sub in value.values():
                    found.extend(_walk(sub))
            else:
                found.extend(_walk(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_walk(item))
    return found


@pytest.mark.parametrize("model", ALL_SCHEMAS, ids=lambda m: m.__name__)
def test_every_object_closed_and_fully_required(model: type[BaseModel]) -> None:
    schema = strict_json_schema(model)
    objects = [n for n in _walk(schema) if n.get("type") == "object"]
    assert objects, "expected at least one object"
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert sorted(obj["required"]) == sorted(obj["properties"])
    for node in _walk(schema):
        assert "title" not in node
        assert "default" not in node
        assert "$ref" not in node
    assert "$defs" not in schema


def test_nested_models_are_inlined() -> None:
    schema = strict_json_schema(schemas.CharacterBatch)
    item = schema["properties"]["characters"]["items"]
    assert item["type"] == "object"
    assert "username" in item["properties"]
    location = strict_json_schema(schemas.WorldDescription)["properties"]["locations"]["items"]
    assert location["required"] == ["name", "description"]


class _Inner(BaseModel):
    value: int


class _WithOptional(BaseModel):
    note: str | None = None
    inner: _Inner | None = None
    title: str = "kept as a property"
    count: int = 3


def test_optional_fields_stay_nullable_and_become_required() -> None:
    schema = strict_json_schema(_WithOptional)
    assert schema["required"] == ["note", "inner", "title", "count"]
    assert {"type": "null"} in schema["properties"]["note"]["anyOf"]
    inner_options = schema["properties"]["inner"]["anyOf"]
    assert {"type": "null"} in inner_options
    inner = next(o for o in inner_options if o.get("type") == "object")
    assert inner["additionalProperties"] is False
    assert inner["required"] == ["value"]
    # A property called "title" is data, not the dropped keyword.
    assert "title" in schema["properties"]
    assert "default" not in schema["properties"]["count"]


def test_descriptions_are_kept() -> None:
    schema = strict_json_schema(schemas.PostContent)
    assert "description" in schema["properties"]["caption"]


class _Node(BaseModel):
    children: list[_Node]


def test_recursive_models_are_rejected() -> None:
    with pytest.raises(ValueError, match="recursive"):
        strict_json_schema(_Node)


class _FreeForm(BaseModel):
    extra: dict[str, str]


def test_free_form_mappings_are_rejected() -> None:
    with pytest.raises(ValueError, match="free-form"):
        strict_json_schema(_FreeForm)
