"""One exception hierarchy for every failure a user can cause.

The CLI turns any QuanosError into a single line and an exit code; anything else is a bug
and keeps its traceback (shown with --debug). Messages name the culprit (file, node, op,
array or option) so a user can act without reading code.

An option is named in a message through `arg(name)`, `name` being the Python API's
argument (`input_range`). `str(error)` shows it as that argument; the CLI renders the same
error with `message(naming)`, where naming maps the argument to its flag (`--input-range`).
So one raise serves both, and the stages never need to know who called them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ARGUMENT = re.compile("\x1f([A-Za-z_][A-Za-z0-9_]*)\x1f")

Naming = Callable[[str], str]
"""How a caller names an option: the API argument name -> the name its user typed."""


def arg(name: str) -> str:
    """The option `name` (the API argument) inside an error message or hint."""
    return f"\x1f{name}\x1f"


def api_name(name: str) -> str:
    """The Python API's naming: the argument as written in the call."""
    return name



class QuanosError(Exception):
    """A failure caused by the user's input, reported as one line.

    `hint` says what to do about it; without one the class's `default_hint` is shown, so
    every line a user sees ends with a next step.
    """

    exit_code = 1
    default_hint = "run with --debug for the traceback"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    @property
    def arguments(self) -> tuple[str, ...]:
        """The options the message names (API argument names), the culprit first."""
        return tuple(_ARGUMENT.findall(self.args[0] if self.args else ""))

    def message(self, naming: Naming = api_name) -> str:
        """The message with each option named by `naming`."""
        return _render(self.args[0] if self.args else "", naming)

    def __str__(self) -> str:
        return self.message()

    def one_line(self, naming: Naming = api_name) -> str:
        text = printable(self.message(naming))
        hint = printable(_render(self.hint or self.default_hint, naming))
        return f"{text} (hint: {hint})"


def printable(text: str) -> str:
    """One line that cannot drive a terminal: whitespace runs become one space and every
    other control or format character (ESC, bidi overrides) is written as an escape.

    Node, tensor and file names come from the user's files; a name holding ESC [31m
    would otherwise recolour (or rewrite) the user's terminal.
    """
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in " ".join(text.split()))


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _render(text: str, naming: Naming) -> str:
    return _ARGUMENT.sub(lambda match: naming(match.group(1)), text)


class ModelError(QuanosError):
    """The ONNX model cannot be read, normalized or run."""

    default_hint = "quanos reads float ONNX classifiers (opset 7-25); re-export the model or check it with onnx.checker"


class UnsupportedOpError(ModelError):
    """An op the tool (or the torch twin) has no implementation for."""

    default_hint = "export the model with standard ONNX ops (default domain)"


class ParityError(ModelError):
    """The torch twin does not reproduce onnxruntime on this model."""

    default_hint = "a gap in quanos' torch twin, not in the model: please report it with the model"


class DataError(QuanosError):
    """Input data cannot be read or does not fit the model."""

    default_hint = "--help lists the --data formats and the --layout/--scale/--data-range options"


class PlanError(QuanosError):
    """A bit plan is malformed or does not fit the model."""

    default_hint = "start from a plan.json that quanos compile wrote (format in docs/json.md)"


class ProfileError(QuanosError):
    """A hardware profile file is malformed."""

    default_hint = "copy a built-in profile (docs/hardware.md) and change its numbers"


class OutputError(QuanosError):
    """An output location cannot be written (or would overwrite the input)."""

    default_hint = "choose another -o/--output location"


class UsageError(QuanosError):
    """A command-line option is out of range or inconsistent."""

    exit_code = 2
    default_hint = "--help gives each option's range"
