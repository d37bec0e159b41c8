"""All-or-nothing outputs: a run replaces the previous one only when it is complete.

A command computes everything first and writes at the end. The files of a run are written
into a temporary sibling directory and swapped into place only once every one of them is
whole on disk, so a failed run (a full disk during report.html, Ctrl-C) leaves the output
folder exactly as it found it: the previous run's files, the user's other files, and no
new parent folders. Output paths that name anything but a directory or a regular file
(a device node, a named pipe, a socket) are refused before any work, so `-o /dev/null`
never replaces a device.

The module also keeps the list of files this process has put in place (written_files),
so the command line can tell, when stdout breaks or Ctrl-C arrives at the very end,
whether the outputs exist. It imports nothing heavy: the CLI reads that list.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

_written: list[Path] = []
"""Files this process has put in place since forget_written(), in order."""


def written_files() -> tuple[Path, ...]:
    """The outputs this process has completed since the command started."""
    return tuple(_written)


def forget_written() -> None:
    """Start a new command: nothing written yet (the CLI calls this once per command)."""
    _written.clear()


class OutputDir:
    """An output directory checked before any work and written all at once at the end.

    `names` are the files the command will write: an input with one of those names inside
    the directory is refused up front, not after the work.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        inputs: Iterable[str | os.PathLike[str]] = (),
        names: Iterable[str] = (),
    ) -> None:
        self.path = Path(path)
        self.inputs = [Path(p) for p in inputs]
        self.names = tuple(names)
        self.check()

    def check(self) -> None:
        """Fail before any work when the directory cannot be written or is an input."""
        for original in self.inputs:
            if original.exists() and self.path.resolve() == original.resolve():
                raise OutputError(f"{self.path}: output directory is the input file")
        kind = _special_kind(self.path)
        if kind is not None:
            raise OutputError(f"{self.path}: output exists and is {kind}, not a directory")
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path}: output exists and is not a directory")
        for name in self.names:
            self._refuse_input(self.path / name)
        existing = _nearest_existing(self.path)
        if not existing.is_dir():
            raise OutputError(f"{self.path}: output directory is not writable, '{existing}' is a file")
        if not _can_create_files_in(existing):
            raise OutputError(f"{self.path}: output directory is not writable")

    def write(self, files: Mapping[str, bytes | str]) -> list[Path]:
        """Write every file, then swap them in; on any failure the folder is as it was."""
        for name in files:
            self._refuse_input(self.path / name)
        staging = _staging_directory(self.path)
        try:
            for name, content in files.items():
                data = content.encode() if isinstance(content, str) else content
                try:
                    write_file_bytes(staging / name, data)
                except OSError as exc:
                    raise OutputError(
                        f"{self.path / name}: cannot write: {_reason(exc)}; {self.path} is as it was"
                    ) from exc
            targets = _swap_in(staging, self.path, list(files))
        except BaseException:
            _remove_tree(staging)
            raise
        _remove_tree(staging)
        _written.extend(targets)
        return targets

    def _refuse_input(self, target: Path) -> None:
        if any(original.exists() and target.resolve() == original.resolve() for original in self.inputs):
            raise OutputError(f"{target}: refusing to overwrite an input file")


def check_output_file(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse, before any work, an output file that is an input, a directory or a special file."""
    target = Path(path)
    kind = _special_kind(target)
    if kind is not None:
        raise OutputError(f"{target}: output exists and is {kind}, not a regular file")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory; give the output file's name")
    for original in inputs:
        if Path(original).exists() and target.resolve() == Path(original).resolve():
            raise OutputError(f"{target}: refusing to overwrite an input file")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise OutputError(f"{target}: cannot write here, '{existing}' is a file")
    if not _can_create_files_in(existing):
        raise OutputError(f"{target}: the directory is not writable")
    return target


def write_file(path: str | os.PathLike[str], data: bytes, inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """One output file, whole or not at all; a failure leaves no new parent folders."""
    target = check_output_file(path, inputs)
    parent = target.parent
    created = _make_parents(parent)
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
        os.close(handle)
        temporary = Path(temp_name)
        try:
            write_file_bytes(temporary, data)
            os.chmod(temporary, 0o666 & ~_umask())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    except BaseException as exc:
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise OutputError(f"{target}: cannot write: {_reason(exc)}") from exc
        raise
    _written.append(target)
    return target


def write_file_bytes(path: Path, data: bytes) -> None:
    """Write one staged file (tests replace this to simulate a full disk)."""
    with open(path, "wb") as stream:
        stream.write(data)


def _special_kind(path: Path) -> str | None:
    """'a named pipe', 'a device' or 'a socket' when `path` (followed) is one, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return None


def _nearest_existing(path: Path) -> Path:
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return existing


def _staging_directory(destination: Path) -> Path:
    """A private directory beside the destination (same file system, so renames are
    atomic); inside an existing destination whose parent cannot be written."""
    parent = _nearest_existing(destination.parent)
    prefix = f".{destination.absolute().name}.quanos-"
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        if destination.is_dir():
            try:
                return Path(tempfile.mkdtemp(prefix=prefix, dir=destination))
            except OSError:
                pass
        raise OutputError(f"{destination}: cannot write here: {_reason(exc)}") from exc


def _swap_in(staging: Path, destination: Path, names: list[str]) -> list[Path]:
    """Move the staged files into `destination`: a new folder is renamed into place whole;
    into an existing one file by file, the previous files kept until every move succeeded."""
    for name in names:
        os.chmod(staging / name, 0o666 & ~_umask())
    if not destination.exists():
        created = _make_parents(destination.parent)
        contents = Path(tempfile.mkdtemp(prefix=".contents.", dir=staging))
        try:
            for name in names:
                os.rename(staging / name, contents / name)
            os.chmod(contents, 0o777 & ~_umask())
            os.rename(contents, destination)
            return [destination / name for name in names]
        except FileExistsError:
            pass  # another run created it meanwhile: join it file by file
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                _remove_empty(created)
                raise OutputError(f"{destination}: cannot create: {_reason(exc)}") from exc
        except BaseException:
            _remove_empty(created)
            raise
        for name in names:
            if (contents / name).exists():
                os.rename(contents / name, staging / name)
    return _replace_files(staging, destination, names)


def _replace_files(staging: Path, destination: Path, names: list[str]) -> list[Path]:
    previous = staging / ".previous"
    previous.mkdir()
    replaced: list[str] = []
    try:
        for name in names:
            target = destination / name
            if os.path.lexists(target) and not target.is_dir():
                _keep_copy(target, previous / name)
            os.replace(staging / name, target)
            replaced.append(name)
    except BaseException as exc:
        for name in reversed(replaced):
            if (previous / name).exists():
                os.replace(previous / name, destination / name)
            else:
                (destination / name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            culprit = destination / names[len(replaced)] if len(replaced) < len(names) else destination
            raise OutputError(f"{culprit}: cannot write: {_reason(exc)}; {destination} is as it was") from exc
        raise
    return [destination / name for name in names]


def _keep_copy(target: Path, backup: Path) -> None:
    """A second name for the previous file (a hard link, else a copy) to restore it from."""
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:
        shutil.copy2(target, backup, follow_symlinks=False)


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last) so a failure can remove them."""
    missing: list[Path] = []
    current = directory.absolute()
    while not current.exists():
        missing.append(current)
        current = current.parent
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except FileExistsError:
        pass
    except BaseException as exc:
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise OutputError(f"{directory}: cannot create: {_reason(exc)}") from exc
        raise
    return created


def _remove_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log.warning("could not remove the temporary folder %s", path)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _can_create_files_in(directory: Path) -> bool:
    """Try it: permission bits do not tell for root, read-only mounts or full disks."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False
