"""errors: one line per failure, with control characters escaped."""

from __future__ import annotations

from quanos_onnx.errors import ModelError, printable


def test_printable_collapses_whitespace_and_escapes_control_characters() -> None:
    assert printable("a\n\t b\x1b[31m c\u202e d é \U000e0001") == "a b\\x1b[31m c\\u202e d é \\U000e0001"


def test_one_line_escapes_the_message_and_the_hint() -> None:
    error = ModelError("node 'evil\x1b]0;title\x07' is bad\n  really", hint="rename\x00 it")
    assert error.one_line() == "node 'evil\\x1b]0;title\\x07' is bad really (hint: rename\\x00 it)"
    assert error.one_line().isprintable()
