"""Checking documents against the shipped JSON Schemas (quanos_onnx/schemas, the schemas of
docs/json.md) with the jsonschema package, draft 2020-12, `urn:quanos:*` references resolved
among them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema
import referencing

from quanos_onnx.schemas import load_schemas as shipped_schemas


def load_schemas() -> dict[str, dict[str, Any]]:
    """Every shipped schema by its $id."""
    return shipped_schemas()


def validate(instance: Any, schema_id: str, schemas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """All the ways `instance` breaks the schema `schema_id`, as 'path: message' lines."""
    registry: referencing.Registry = referencing.Registry().with_resources(
        (key, referencing.Resource.from_contents(schema)) for key, schema in schemas.items()
    )
    validator = jsonschema.Draft202012Validator(schemas[schema_id], registry=registry)
    return sorted(f"{error.json_path}: {error.message}" for error in validator.iter_errors(instance))
