"""report.md: the report as Markdown tables, readable in a terminal and on a code host.

The figures live in report.html; the numbers behind them are all here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .content import Table, build_content
from .document import RunInfo


def render_markdown(document: Mapping[str, Any], run: RunInfo) -> str:
    content = build_content(document, run)
    lines = [f"# {content.title}", "", f"_{content.subtitle}. Figures: report.html._", ""]
    lines += [f"- **{label}**: {_escape(value)}" for label, value in content.highlights]
    for table in (*content.tables, content.provenance):
        lines += ["", f"## {table.title}", "", *_table(table)]
        if table.note:
            lines += ["", f"_{_escape(table.note)}_"]
    if content.settings:
        lines += ["", "Settings: " + " ".join(f"`{option} {value}`" for option, value in content.settings)]
    return "\n".join(lines) + "\n"


def _table(table: Table) -> list[str]:
    columns = table.columns if any(table.columns) else ("item", "value")
    lines = [_row(columns), _row(["---"] * len(columns))]
    lines += [_row(cells) for cells in table.rows]
    return lines


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_escape(cell) for cell in cells) + " |"


def _escape(text: str) -> str:
    """Keep table cells in one cell: pipes and newlines would break the row."""
    return " ".join(str(text).split()).replace("|", "\\|")
