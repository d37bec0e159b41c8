"""All-or-nothing output directories.

A command computes everything first and writes at the end; each file is written
atomically and, if any write fails or the run is interrupted, the files this run already
wrote are removed again, so a failed run leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import OutputError
from .model import write_bytes_atomic


class OutputDir:
    def __init__(self, path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.path = Path(path)
        self.inputs = [Path(p) for p in inputs]
        self.check()

    def check(self) -> None:
        """Fail before any work when the directory cannot be written or is an input."""
        for original in self.inputs:
            if original.exists() and self.path.resolve() == original.resolve():
                raise OutputError(f"{self.path}: output directory is the input file")
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path}: output exists and is not a directory")
        existing = self.path.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"{self.path}: output directory is not writable, '{existing}' is a file")
        if not _can_create_files_in(existing):
            raise OutputError(f"{self.path}: output directory is not writable")

    def write(self, files: Mapping[str, bytes | str]) -> list[Path]:
        created_dir = not self.path.exists()
        written: list[Path] = []
        try:
            for name, content in files.items():
                target = self.path / name
                if any(target.resolve() == original.resolve() for original in self.inputs):
                    raise OutputError(f"{target}: refusing to overwrite an input file")
                data = content.encode() if isinstance(content, str) else content
                write_bytes_atomic(target, data)
                written.append(target)
        except BaseException:
            for target in written:
                target.unlink(missing_ok=True)
            if created_dir and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()
            raise
        return written


def _can_create_files_in(directory: Path) -> bool:
    """Try it: permission bits do not tell for root, read-only mounts or full disks."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False
