from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

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


# --- edge cases of the builder (each kills a mutant that changes what is sent to the provider) ---------------


class _Leaf(BaseModel):
    z: int


class _Middle(BaseModel):
    leaf: _Leaf = Field(description="the leaf, as the middle describes it")


class _Top(BaseModel):
    middle: _Middle
    anything: Any = None
    maybe: int | None = None
    bare: dict  # type: ignore[type-arg]


def test_nested_references_are_resolved_at_every_depth_with_the_referring_description() -> None:
    schema = strict_json_schema(_Top)
    leaf = schema["properties"]["middle"]["properties"]["leaf"]
    assert leaf == {"description": "the leaf, as the middle describes it", "type": "object",
                    "properties": {"z": {"type": "integer"}}, "required": ["z"], "additionalProperties": False}


def test_untyped_and_union_nodes_are_left_open() -> None:
    """Only objects are closed: `Any` and anyOf wrappers get no properties / additionalProperties."""
    schema = strict_json_schema(_Top)
    assert schema["properties"]["anything"] == {}
    assert schema["properties"]["maybe"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}


def test_a_bare_object_becomes_a_closed_empty_object() -> None:
    assert strict_json_schema(_Top)["properties"]["bare"] == {
        "type": "object", "properties": {}, "required": [], "additionalProperties": False}


class _Empty(BaseModel):
    pass


class _HasEmpty(BaseModel):
    empty: _Empty


def test_an_empty_model_is_a_closed_object_not_a_free_form_mapping() -> None:
    assert strict_json_schema(_HasEmpty)["properties"]["empty"] == {
        "type": "object", "properties": {}, "required": [], "additionalProperties": False}


class _TypedExtras(BaseModel):
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, int]
    a: int


def test_an_object_with_properties_and_typed_extras_is_closed() -> None:
    schema = strict_json_schema(_TypedExtras)
    assert schema == {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                      "additionalProperties": False}


class _Shapes(BaseModel):
    nullable_object: dict = Field(json_schema_extra={"type": ["object", "null"]})  # type: ignore[type-arg]
    untyped_with_properties: Any = Field(default=None, json_schema_extra={"properties": {"k": {"type": "string"}}})
    nullable_string: Any = Field(default=None, json_schema_extra={"type": ["string", "null"]})


def test_objects_are_recognised_by_a_type_list_or_by_their_properties() -> None:
    props = strict_json_schema(_Shapes)["properties"]
    assert props["nullable_object"] == {"type": ["object", "null"], "properties": {}, "required": [],
                                        "additionalProperties": False}
    assert props["untyped_with_properties"] == {"properties": {"k": {"type": "string"}}, "required": ["k"],
                                                "additionalProperties": False}
    assert props["nullable_string"] == {"type": ["string", "null"]}


def test_free_form_mapping_message() -> None:
    with pytest.raises(ValueError, match=r"^free-form mappings \(dict fields\) are not supported by strict "
                                         r"structured output$"):
        strict_json_schema(_FreeForm)


def _crafted(schema: Any) -> type[BaseModel]:
    """A model whose JSON schema is `schema` as given (pydantic never emits these; other generators might)."""

    class Crafted(BaseModel):
        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            return copy.deepcopy(schema)

    return Crafted


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "object", "properties": {"x": {"$ref": "#/definitions/X"}}},
     "unsupported $ref '#/definitions/X': only local #/$defs references are handled"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/Nope"}}}, "$ref '#/$defs/Nope' names no definition"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/Nope"}}, "$defs": {"Other": {"type": "string"}}},
     "$ref '#/$defs/Nope' names no definition"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/Bad"}}, "$defs": {"Bad": 3}},
     "definition 'Bad' is not an object"),
], ids=["non-local", "no-defs-at-all", "missing", "not-an-object"])
def test_unusable_schemas_are_refused_with_a_reason(schema: Any, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        strict_json_schema(_crafted(schema))
    assert str(refused.value) == message


def test_definitions_are_not_modified_by_inlining() -> None:
    shared = {"type": "object", "properties": {"v": {"type": "integer"}}}
    schema = {"type": "object", "$defs": {"S": shared},
              "properties": {"a": {"$ref": "#/$defs/S", "description": "first"}, "b": {"$ref": "#/$defs/S"}}}
    out = strict_json_schema(_crafted(schema))
    assert out["properties"]["a"]["description"] == "first" and "description" not in out["properties"]["b"]
