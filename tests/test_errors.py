"""errors.py: one message names an option as the API argument or, for the CLI, as its flag;
one line per failure, with control characters escaped."""

from __future__ import annotations

from quanos_onnx.errors import DataError, ModelError, UsageError, arg, printable


def flags(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_str_names_the_api_argument_and_one_line_renders_any_naming() -> None:
    error = UsageError(f"{arg('k_min')} 9 must be in 2..8 ({arg('k_init')})", hint=f"lower {arg('k_min')}")
    assert str(error) == "k_min 9 must be in 2..8 (k_init)"
    assert error.arguments == ("k_min", "k_init")
    assert error.one_line(flags) == "--k-min 9 must be in 2..8 (--k-init) (hint: lower --k-min)"
    assert error.one_line() == "k_min 9 must be in 2..8 (k_init) (hint: lower k_min)"


def test_user_text_in_a_message_is_left_alone() -> None:
    """Braces, dollars and dashes from a file name or value are not placeholders."""
    error = DataError("data/{x}$y--z.npz: no samples")
    assert str(error) == error.message(flags) == "data/{x}$y--z.npz: no samples"
    assert error.arguments == ()


def test_printable_collapses_whitespace_and_escapes_control_characters() -> None:
    assert printable("a\n\t b\x1b[31m c\u202e d é \U000e0001") == "a b\\x1b[31m c\\u202e d é \\U000e0001"


def test_one_line_escapes_the_message_and_the_hint() -> None:
    error = ModelError("node 'evil\x1b]0;title\x07' is bad\n  really", hint="rename\x00 it")
    assert error.one_line() == "node 'evil\\x1b]0;title\\x07' is bad really (hint: rename\\x00 it)"
    assert error.one_line().isprintable()
