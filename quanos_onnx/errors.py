"""One exception hierarchy for every failure a user can cause.

The CLI turns any QuanosError into a single line and an exit code; anything else is a bug
and keeps its traceback (shown with --debug). Messages name the culprit (file, node, op,
array or option) so a user can act without reading code.
"""

from __future__ import annotations


class QuanosError(Exception):
    """A failure caused by the user's input, reported as one line."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class ModelError(QuanosError):
    """The ONNX model cannot be read, normalized or run."""


class UnsupportedOpError(ModelError):
    """An op the tool (or the torch twin) has no implementation for."""


class ParityError(ModelError):
    """The torch twin does not reproduce onnxruntime on this model."""


class DataError(QuanosError):
    """Input data cannot be read or does not fit the model."""


class PlanError(QuanosError):
    """A bit plan is malformed or does not fit the model."""


class ProfileError(QuanosError):
    """A hardware profile file is malformed."""


class OutputError(QuanosError):
    """An output location cannot be written (or would overwrite the input)."""


class UsageError(QuanosError):
    """A command-line option is out of range or inconsistent."""

    exit_code = 2
