"""Reports for people (text tables, Markdown, HTML) and JSON for machines.

A command that writes files adds `report_files(document, run)` to them, in the same
OutputDir.write, so a failed or interrupted run leaves no report without its model:

- report.json: the report document (document.py; deterministic: same inputs and seed, same bytes);
- run.json: when, how long, with which command line and package versions (RunInfo);
- report.md: the numbers as Markdown tables;
- report.html: one self-contained page with the figures (plots.py) embedded (tables alone
  with `figures=False`, the commands' --no-figures).

The schema of each JSON document is in docs/json.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .document import (
    RunClock,
    RunInfo,
    data_input,
    dumps,
    energy_sections,
    file_input,
    layer_rows,
    output_entry,
    plan_summary,
    report_document,
)
from .html import render_html
from .markdown import render_markdown

if TYPE_CHECKING:
    from ..harness.evaluate import Evaluation

REPORT_JSON = "report.json"
RUN_JSON = "run.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_FILES = (REPORT_JSON, RUN_JSON, REPORT_MD, REPORT_HTML)
"""The names report_files writes, for OutputDir's up-front check of the inputs."""


def report_files(document: Mapping[str, Any], run: RunInfo, *, figures: bool = True) -> dict[str, str]:
    """The four report files of a run, by file name, ready for OutputDir.write; without
    `figures` report.html has the tables alone and matplotlib is not imported."""
    return {
        REPORT_JSON: dumps(document),
        RUN_JSON: dumps(run.to_json()),
        REPORT_MD: render_markdown(document, run),
        REPORT_HTML: render_html(document, run, figures=figures),
    }


def evaluation_report(
    evaluations: Sequence[tuple[Mapping[str, Any], Evaluation]],
    *,
    data: Mapping[str, Any] | None = None,
    seed: int | None = None,
    settings: Mapping[str, Any] | None = None,
    audits: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The report document of `quanos evaluate`: one (model input, Evaluation) per model,
    the model input being file_input(path) or an entry of the same shape for a model in memory.

    `data` is data_input(path, samples, selection); `settings` the attack options; `audits`
    the robustness audits (report.audit.audit_section) when they ran. The
    report plots accuracy against eps per attack method with one line per model.
    """
    models = [dict(model) for model, _ in evaluations]
    return report_document(
        "evaluate",
        models=models,
        data=data,
        seed=seed,
        settings=settings,
        evaluations=[
            {"model": model, "evaluation": evaluation.to_json()}
            for model, (_, evaluation) in zip(models, evaluations)
        ],
        audits=audits,
    )


__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "REPORT_MD",
    "RUN_JSON",
    "RunClock",
    "RunInfo",
    "data_input",
    "dumps",
    "energy_sections",
    "evaluation_report",
    "file_input",
    "layer_rows",
    "output_entry",
    "plan_summary",
    "render_html",
    "render_markdown",
    "report_document",
    "report_files",
]
