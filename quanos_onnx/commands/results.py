"""What the results of the commands share: writing their files like the CLI does."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def save_files(
    directory: str | os.PathLike[str], files: Mapping[str, bytes | str], inputs: Sequence[Path]
) -> tuple[Path, ...]:
    """Write `files` into `directory` all or nothing (outputs.OutputDir), never over an input.

    The CLI writes through this too, so `result.save(directory)` gives the same bytes as
    the command line for the same settings and seed.
    """
    from ..outputs import OutputDir

    return tuple(OutputDir(directory, inputs=inputs, names=files).write(files))


def check_output_dir(
    directory: str | os.PathLike[str] | None, inputs: Sequence[Path], names: Sequence[str] = ()
) -> None:
    """Fail before any work when `directory` cannot take the outputs (the CLI's -o), or
    when an input is one of the files `names` the command will write there."""
    from ..outputs import OutputDir

    if directory is not None:
        OutputDir(directory, inputs=inputs, names=names)
