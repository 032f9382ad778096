"""Turn a pydantic model into a JSON schema that strict structured-output mode accepts.

Strict mode (OpenAI, and OpenRouter for the providers that support it) wants closed objects
(`additionalProperties: false`) whose `required` lists every property; an optional value is expressed
as a nullable type (`anyOf` with `{"type": "null"}`) rather than as a missing key.

Choice made here: every `$ref` is inlined and `$defs` is removed, so the schema we send is one
self-contained tree. Recursive models cannot be inlined and are rejected with a ValueError.
`title` and `default` keys are dropped (strict mode ignores or rejects them); descriptions are kept
because they are the model's instructions for each field.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

_DROPPED_KEYS = frozenset({"title", "default"})
_DEF_PREFIX = "#/$defs/"


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The strict-mode schema of `model`: closed objects, all properties required, refs inlined."""
    raw = model.model_json_schema()
    defs: dict[str, Any] = raw.pop("$defs", {})
    result = _convert(raw, defs, ())
    if not isinstance(result, dict):  # pragma: no cover - model schemas are always objects
        raise ValueError("a model schema must be a JSON object")
    return result


def _resolve(ref: str, defs: dict[str, Any], stack: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    if not ref.startswith(_DEF_PREFIX):
        raise ValueError(f"unsupported $ref {ref!r}: only local #/$defs references are handled")
    name = ref[len(_DEF_PREFIX) :]
    if name in stack:
        raise ValueError(f"recursive model {name!r} cannot be inlined into a strict schema")
    if name not in defs:
        raise ValueError(f"$ref {ref!r} names no definition")
    target = defs[name]
    if not isinstance(target, dict):
        raise ValueError(f"definition {name!r} is not an object")
    return name, target


def _convert(node: Any, defs: dict[str, Any], stack: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_convert(item, defs, stack) for item in node]
    if not isinstance(node, dict):
        return node

    if "$ref" in node:
        name, target = _resolve(str(node["$ref"]), defs, stack)
        merged = copy.deepcopy(target)
        # Keep the referring site's own annotations (e.g. the field description) over the definition's.
        for key, value in node.items():
            if key != "$ref":
                merged[key] = value
        return _convert(merged, defs, (*stack, name))

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties" and isinstance(value, dict):
            # Property names are data here, not keywords: never drop one called "title" or "default".
            out[key] = {name: _convert(sub, defs, stack) for name, sub in value.items()}
        else:
            out[key] = _convert(value, defs, stack)

    if _is_object(out):
        properties = out.get("properties")
        extra = out.get("additionalProperties")
        if not properties and isinstance(extra, dict):
            raise ValueError("free-form mappings (dict fields) are not supported by strict structured output")
        out.setdefault("properties", {})
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    return out


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    if kind == "object":
        return True
    if isinstance(kind, list) and "object" in kind:
        return True
    return kind is None and "properties" in node
