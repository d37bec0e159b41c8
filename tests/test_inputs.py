"""inputs: regular files only (checked without opening), bounded documents, bounded nesting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quanos_onnx import inputs
from quanos_onnx.errors import PlanError
from quanos_onnx.inputs import MAX_JSON_DEPTH, check_regular_file, json_depth, parse_json, read_document


def test_a_regular_file_gives_its_size(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    assert check_regular_file(tmp_path / "a.json", PlanError, "plan file") == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "absent.json", "absent.json: plan file not found"),
        (lambda tmp: tmp, "is a directory, not a plan file"),
        (lambda tmp: (os.mkfifo(tmp / "pipe"), tmp / "pipe")[1], "pipe: not a regular file \\(a named pipe\\)"),
        (lambda tmp: Path("/dev/zero"), "/dev/zero: not a regular file \\(a device\\)"),
    ],
)
def test_anything_else_is_refused_without_opening_it(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        read_document(make(tmp_path), PlanError, "plan file")


def test_a_document_over_the_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "MAX_DOCUMENT_BYTES", 10)
    (tmp_path / "big.json").write_text(json.dumps({"pad": "x" * 20}))
    with pytest.raises(PlanError, match="larger than the"):
        read_document(tmp_path / "big.json", PlanError, "plan file")


def test_nesting_is_bounded_whether_or_not_json_itself_overflows() -> None:
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "ok.json", PlanError) is not None
    for depth in (MAX_JSON_DEPTH + 1, 200_000):
        with pytest.raises(PlanError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
            parse_json("[" * depth + "]" * depth, "deep.json", PlanError)


def test_json_depth_counts_arrays_and_objects() -> None:
    assert json_depth(1) == 0
    assert json_depth({"a": [1, {"b": []}]}) == 4


def test_a_byte_order_mark_and_malformed_text_are_handled(tmp_path: Path) -> None:
    assert parse_json(b"\xef\xbb\xbf{\"a\": 1}", "bom.json", PlanError) == {"a": 1}
    with pytest.raises(PlanError, match="not UTF-8 text"):
        parse_json(b"\xff\xfe{", "latin.json", PlanError)
    with pytest.raises(PlanError, match="malformed JSON at line 1"):
        parse_json("{nope", "bad.json", PlanError)
