"""report.html: one self-contained page (inline CSS, figures as base64 PNG, no scripts).

It opens from a mail attachment or an artifact store with no network and no other file;
a Content-Security-Policy that allows only inline styles and data: images says so to the
browser as well.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from html import escape
from typing import Any

from .content import Content, Table, build_content
from .document import RunInfo
from .plots import Plot
from .plots import figures as draw_figures

SECTION_ORDER = ("verification", "pareto", "ans", "bits", "layers", "layer-cost", "totals", "accuracy", "outputs")
"""Figures and tables with the same key share a section: what the artifact does first, then
sensitivity, then what it bought."""

POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
:root { color-scheme: light; }
body { margin: 0; background: #f8fafc; color: #0f172a;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 2px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #e2e8f0; }
.subtitle { color: #475569; margin: 0 0 18px; }
.highlights { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 10px; margin: 0; }
.highlights div { background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 10px 14px; }
.highlights dt { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: #64748b; }
.highlights dd { margin: 2px 0 0; font-weight: 600; }
nav { margin: 18px 0 0; font-size: 14px; }
nav a { color: #2563eb; margin-right: 14px; text-decoration: none; }
figure { margin: 0; background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 12px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: #475569; font-size: 13.5px; margin-top: 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 13.5px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid #e2e8f0; vertical-align: top; }
th { background: #f1f5f9; font-weight: 600; }
.number { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.note { color: #475569; font-size: 13px; }
.provenance td:first-child { white-space: nowrap; color: #475569; width: 1%; }
.provenance td { word-break: break-all; }
h3 { font-size: 15px; margin: 18px 0 8px; color: #334155; }
.settings { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 0 16px; margin: 0;
            background: #fff; border: 1px solid #e2e8f0; border-radius: 8px; padding: 8px 12px; font-size: 13px; }
.settings div { display: flex; justify-content: space-between; gap: 8px; padding: 3px 0; border-bottom: 1px solid #f1f5f9; }
.settings dt { font-family: ui-monospace, "DejaVu Sans Mono", monospace; color: #475569; }
.settings dd { margin: 0; font-weight: 600; text-align: right; word-break: break-all; }
footer { margin-top: 40px; color: #94a3b8; font-size: 12px; }
"""


def render_html(document: Mapping[str, Any], run: RunInfo, *, figures: bool = True) -> str:
    """The page; without `figures` the sections keep their tables and say the figures were
    left out, and matplotlib is never imported (docs/benchmarks.md: the figures are a
    sizeable part of a small model's compile)."""
    content = build_content(document, run)
    plots = {plot.key: plot for plot in draw_figures(document)} if figures else {}
    tables = {table.key: table for table in content.tables}
    ordered = [key for key in SECTION_ORDER if key in plots or key in tables]
    # per-model sections (the robustness audit's) come first, in the order content gives them
    audit_keys = [table.key for table in content.tables if table.key not in SECTION_ORDER]
    sections = [(key, plots[key].title if key in plots else tables[key].title) for key in [*audit_keys, *ordered]]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(content.title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body><main>",
        *_header(content, sections),
        *([] if figures else ['<p class="note">Figures left out (--no-figures); the tables hold every number.</p>']),
        *(part for key, title in sections for part in _section(key, title, plots, content)),
        *_section(content.provenance.key, content.provenance.title, {}, content, css_class="provenance"),
        *_settings(content),
        f"<footer>{escape(content.subtitle)}; started {escape(run.started_at)}</footer>",
        "</main></body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _header(content: Content, sections: list[tuple[str, str]]) -> list[str]:
    cards = "".join(
        f"<div><dt>{escape(label)}</dt><dd>{escape(value)}</dd></div>" for label, value in content.highlights
    )
    links = [*sections, (content.provenance.key, content.provenance.title)]
    nav = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title in links)
    return [
        f"<h1>{escape(content.title)}</h1>",
        f'<p class="subtitle">{escape(content.subtitle)}</p>',
        f'<dl class="highlights">{cards}</dl>',
        f"<nav>{nav}</nav>",
    ]


def _section(key: str, title: str, plots: Mapping[str, Plot], content: Content, css_class: str = "") -> list[str]:
    """A heading, then the figure and the table that share the key (either may be absent)."""
    parts = [f'<section id="{key}">', f"<h2>{escape(title)}</h2>"]
    if key in plots:
        parts.append(_figure(plots[key]))
    table = next((t for t in (*content.tables, content.provenance) if t.key == key), None)
    if table is not None:
        parts.extend(_table(table, css_class))
    parts.append("</section>")
    return parts


def _settings(content: Content) -> list[str]:
    if not content.settings:
        return []
    items = "".join(
        f"<div><dt>{escape(option)}</dt><dd>{escape(value)}</dd></div>" for option, value in content.settings
    )
    return ['<h3>Settings</h3>', f'<dl class="settings">{items}</dl>']


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(plot.title)}">'
        f"<figcaption>{escape(plot.caption)}</figcaption></figure>"
    )


def _table(table: Table, css_class: str = "") -> list[str]:
    numeric = [all(_looks_numeric(row[i]) for row in table.rows) for i in range(len(table.columns))]
    head = ""
    if any(table.columns):
        head = "<thead><tr>" + "".join(_cell(c, number, "th") for c, number in zip(table.columns, numeric)) + "</tr></thead>"
    body = "".join(
        "<tr>" + "".join(_cell(cell, number) for cell, number in zip(row, numeric)) + "</tr>" for row in table.rows
    )
    css = f' class="{css_class}"' if css_class else ""
    parts = [f'<div class="scroll"><table{css}>{head}<tbody>{body}</tbody></table></div>']
    if table.note:
        parts.append(f'<p class="note">{escape(table.note)}</p>')
    return parts


def _cell(text: str, number: bool, tag: str = "td") -> str:
    css = ' class="number"' if number else ""
    return f"<{tag}{css}>{escape(text)}</{tag}>"


def _looks_numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("%", "").replace("-", "", 1).strip()
    return stripped in ("", "float") or stripped.replace(".", "", 1).isdigit()
