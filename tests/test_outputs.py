"""OutputDir: refuses bad destinations before any work, and replaces a previous run only
when the new one is complete; a failed run leaves the folder exactly as it found it."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from quanos_onnx import outputs
from quanos_onnx.errors import OutputError
from quanos_onnx.outputs import OutputDir, check_output_file, forget_written, write_file, written_files


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


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_on(name: str, failure: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make writing the staged file `name` fail, the others succeed."""
    real_write = outputs.write_file_bytes

    def write(target: Path, data: bytes) -> None:
        if target.name == name:
            raise failure
        real_write(target, data)

    monkeypatch.setattr(outputs, "write_file_bytes", write)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_failed_write_leaves_the_folder_as_it_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    fail_on("three", failure, monkeypatch)
    expected = KeyboardInterrupt if isinstance(failure, KeyboardInterrupt) else OutputError
    with pytest.raises(expected):
        OutputDir(tmp_path / "new").write({"one": "1", "two": "2", "three": "3"})
    with pytest.raises(expected):
        OutputDir(tmp_path / "a" / "b" / "out").write({"one": "1", "three": "3"})
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(expected):
        OutputDir(existing).write({"one": "1", "three": "3"})
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_a_disk_full_during_a_rerun_keeps_the_previous_complete_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    OutputDir(out).write({"model.onnx": b"old model", "plan.json": "old plan", "report.html": "old report"})
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(tmp_path)
    fail_on("report.html", OSError(errno.ENOSPC, "No space left on device"), monkeypatch)
    with pytest.raises(OutputError, match="report.html: cannot write: No space left on device; .* is as it was"):
        OutputDir(out).write({"model.onnx": b"new model", "plan.json": "new plan", "report.html": "new report"})
    assert snapshot(tmp_path) == before


def test_a_failed_swap_restores_the_previous_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    OutputDir(out).write({"one": "old 1", "two": "old 2"})
    before = snapshot(tmp_path)
    real_replace = os.replace

    def replace(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "two" and Path(target).parent == out:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OutputError, match="two: cannot write: Input/output error"):
        OutputDir(out).write({"one": "new 1", "two": "new 2"})
    assert snapshot(tmp_path) == before


def test_a_rerun_replaces_the_previous_files_and_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "out"
    OutputDir(out).write({"one": "old", "two": "old"})
    (out / "mine.txt").write_text("mine")
    OutputDir(out).write({"one": "new", "three": "new"})
    assert snapshot(out) == {"mine.txt": b"mine", "one": b"new", "three": b"new", "two": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_an_input_that_the_run_would_overwrite_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(OutputError, match="plan.json: refusing to overwrite an input file"):
        OutputDir(tmp_path, inputs=[tmp_path / "plan.json"], names=["model.onnx", "plan.json"])


def test_refuses_special_files_as_outputs(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a named pipe"):
        OutputDir(fifo)
    with pytest.raises(OutputError, match="is a named pipe, not a regular file"):
        check_output_file(fifo)
    with pytest.raises(OutputError, match="is a device, not a regular file"):
        check_output_file("/dev/null")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_write_file_leaves_no_new_parent_folders_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "write_file_bytes", disk_full)
    with pytest.raises(OutputError, match="No space left on device"):
        write_file(tmp_path / "a" / "b" / "model.onnx", b"x")
    assert list(tmp_path.iterdir()) == []


def test_written_files_lists_what_this_command_completed(tmp_path: Path) -> None:
    forget_written()
    OutputDir(tmp_path / "out").write({"one": "1"})
    write_file(tmp_path / "single.onnx", b"x")
    assert written_files() == (tmp_path / "out" / "one", tmp_path / "single.onnx")
    forget_written()
    assert written_files() == ()
