"""report.text: terminal tables, with names from the model unable to drive the terminal."""

from __future__ import annotations

from quanos_onnx.report.text import format_table


def test_numbers_align_right_and_names_left() -> None:
    table = format_table([{"layer": "conv0", "bits": 8}, {"layer": "fc", "bits": 16}])
    assert table.splitlines() == ["layer  bits", "-----  ----", "conv0     8", "fc       16"]


def test_control_characters_in_a_cell_are_escaped() -> None:
    table = format_table([{"layer": "evil\x1b[2J\u202e", "bits": 4}])
    assert "\x1b" not in table and "\u202e" not in table
    assert "evil\\x1b[2J\\u202e" in table
