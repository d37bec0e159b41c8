"""The JSON Schemas of docs/json.md and a small validator for the subset they use.

The project does not depend on the jsonschema package; this covers the keywords docs/json.md
uses (type, const, enum, properties, required, additionalProperties, items, minItems,
maxItems, minimum, maximum, exclusiveMinimum, pattern, oneOf, $ref to `urn:quanos:*` and
`#/$defs/*`) with JSON Schema's semantics: object keywords apply to objects only, number
keywords to numbers only, and so on. An unknown keyword fails loudly so the doc cannot use
one this validator would silently ignore.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DOCS_JSON = Path(__file__).resolve().parents[1] / "docs" / "json.md"

_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}
_KNOWN = _ANNOTATIONS | {
    "type", "const", "enum", "properties", "required", "additionalProperties", "items",
    "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum", "pattern", "oneOf", "$ref",
}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def load_schemas(path: Path = DOCS_JSON) -> dict[str, dict[str, Any]]:
    """Every ```json block of the page that declares a $schema, keyed by its $id."""
    schemas = {}
    for block in re.findall(r"```json\n(.*?)```", path.read_text(), flags=re.S):
        document = json.loads(block)
        if "$schema" in document:
            schemas[document["$id"]] = document
    return schemas


def validate(instance: Any, schema_id: str, schemas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """All the ways `instance` breaks the schema `schema_id`, as 'path: reason' lines."""
    root = schemas[schema_id]
    return _check(instance, root, root, schemas, "$")


def _check(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any], schemas: Mapping[str, Any], where: str) -> list[str]:
    unknown = set(schema) - _KNOWN
    if unknown:
        raise ValueError(f"schema at {where} uses unsupported keywords {sorted(unknown)}")
    if "$ref" in schema:
        target, target_root = _resolve(schema["$ref"], root, schemas)
        return _check(value, target, target_root, schemas, where)
    errors: list[str] = []
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[name](value) for name in allowed):
            return [f"{where}: {type(value).__name__} is not {' or '.join(allowed)}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "oneOf" in schema:
        matches = sum(not _check(value, option, root, schemas, where) for option in schema["oneOf"])
        if matches != 1:
            errors.append(f"{where}: matches {matches} of the oneOf alternatives, not exactly one")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{where}: {value} <= exclusiveMinimum {schema['exclusiveMinimum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where}: {len(value)} items")
        if "items" in schema:
            for index, item in enumerate(value):
                errors += _check(item, schema["items"], root, schemas, f"{where}[{index}]")
    if isinstance(value, dict):
        errors += [f"{where}: missing '{key}'" for key in schema.get("required", []) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += _check(item, properties[key], root, schemas, f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}: undocumented key '{key}'")
            elif isinstance(extra, dict):
                errors += _check(item, extra, root, schemas, f"{where}.{key}")
    return errors


def _resolve(reference: str, root: Mapping[str, Any], schemas: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    base, _, fragment = reference.partition("#")
    target_root = schemas[base] if base else root
    target = target_root
    for part in filter(None, fragment.split("/")):
        target = target[part]
    return target, target_root
