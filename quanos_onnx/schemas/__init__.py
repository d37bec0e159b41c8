"""The JSON Schemas (draft 2020-12) of every document the tool writes or prints, as shipped
with the package: one file per `$id` (`urn:quanos:quanos-plan` -> quanos-plan.json).

docs/json.md documents the same schemas (tests/test_cli_json.py checks that they agree);
after editing a schema on that page, rewrite these files from it with

    python -m quanos_onnx.schemas docs/json.md

Validate a document with the jsonschema package (not a dependency of quanos-onnx):

    import jsonschema, referencing
    from quanos_onnx.schemas import load_schemas
    schemas = load_schemas()
    registry = referencing.Registry().with_resources(
        (key, referencing.Resource.from_contents(schema)) for key, schema in schemas.items())
    jsonschema.Draft202012Validator(schemas["urn:quanos:quanos-plan"], registry=registry).validate(document)
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

URN_PREFIX = "urn:quanos:"


def load_schemas() -> dict[str, dict[str, Any]]:
    """Every shipped schema by its `$id`."""
    schemas = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".json"):
            schema = json.loads(entry.read_text())
            schemas[schema["$id"]] = schema
    return schemas


def schemas_in_page(text: str) -> dict[str, dict[str, Any]]:
    """Every ```json block of a Markdown page that declares a `$schema`, by its `$id`."""
    found = {}
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        document = json.loads(block)
        if "$schema" in document:
            found[document["$id"]] = document
    return found


def file_name(schema_id: str) -> str:
    return schema_id.removeprefix(URN_PREFIX) + ".json"


def write_from_page(page: Path, folder: Path) -> list[Path]:
    """Rewrite folder/*.json from the schemas of `page` (docs/json.md)."""
    for old in folder.glob("*.json"):
        old.unlink()
    written = []
    for schema_id, schema in schemas_in_page(page.read_text()).items():
        target = folder / file_name(schema_id)
        target.write_text(json.dumps(schema, indent=2) + "\n")
        written.append(target)
    return written
