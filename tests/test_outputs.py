"""OutputDir: refuses bad destinations before any work, and writes all files or none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quanos_onnx import outputs
from quanos_onnx.errors import OutputError
from quanos_onnx.outputs import OutputDir


def test_writes_every_file_into_a_new_directory(tmp_path: Path) -> None:
    written = OutputDir(tmp_path / "a" / "b").write({"one.txt": "1", "two.bin": b"\x00\x01"})
    assert written == [tmp_path / "a" / "b" / "one.txt", tmp_path / "a" / "b" / "two.bin"]
    assert (tmp_path / "a" / "b" / "two.bin").read_bytes() == b"\x00\x01"


def test_refuses_the_input_file_as_the_output_directory(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    with pytest.raises(OutputError, match="output directory is the input file"):
        OutputDir(model, inputs=[model])


def test_refuses_a_directory_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not writable, '.*file' is a file"):
        OutputDir(tmp_path / "file" / "out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_refuses_a_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(OutputError, match="not writable"):
        OutputDir(locked / "out")


def test_refuses_a_directory_where_creating_files_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check tries it (a read-only mount or a full disk refuses even root)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", refuse)
    with pytest.raises(OutputError, match="not writable"):
        OutputDir(tmp_path / "out")


def test_refuses_to_overwrite_an_input_inside_the_output_directory(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    with pytest.raises(OutputError, match="refusing to overwrite an input file"):
        OutputDir(tmp_path, inputs=[plan]).write({"report.json": "{}", "plan.json": "new"})
    assert plan.read_text() == "{}"
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_a_failed_write_removes_the_files_and_the_directory_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: type[BaseException]
) -> None:
    real_write = outputs.write_bytes_atomic

    def fail_on_third(target: Path, data: bytes) -> None:
        if target.name == "three":
            raise failure()
        real_write(target, data)

    monkeypatch.setattr(outputs, "write_bytes_atomic", fail_on_third)
    with pytest.raises(failure):
        OutputDir(tmp_path / "new").write({"one": "1", "two": "2", "three": "3"})
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(failure):
        OutputDir(existing).write({"one": "1", "three": "3"})
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
