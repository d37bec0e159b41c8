"""`quanos analyze`: audit a model without quantizing it: robustness under several attacks with
masking diagnostics and a verdict, ANS per layer and what it implies for Eqn 3."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..layers import list_layers
from ..model import check_finite_initializers, load_model
from ..progress import ProgressFactory, no_progress
from .options import (
    AUDIT_METHODS_DEFAULT,
    DEFAULT_AUDIT_SAMPLES,
    AuditSettings,
    DataOptions,
    ans_samples,
    audit_model,
    first_samples,
    load_data,
    make_attack,
    rounded,
    settings_json,
    weights_and_biases,
)


ANALYSIS_FILE = "analysis.json"


@dataclass(frozen=True)
class AnalyzeOptions(DataOptions):
    """`quanos analyze`: the ANS attack and data options of compile, plus the robustness audit."""

    model_path: str
    data_path: str | None = None
    output_dir: str | None = None
    audit_attacks: str = AUDIT_METHODS_DEFAULT
    audit_eps: str = "2/255,8/255"
    apgd_steps: int = 50
    apgd_restarts: int = 1
    large_eps: str = "0.5"
    as_json: bool = False
    eps: str = "0.05"
    samples: int | None = None
    attack: str = "fgsm"
    pgd_steps: int = 10
    pgd_alpha: str | None = None
    input_range: str = "0,1"
    batch_size: int = 64

    def audit_settings(self) -> AuditSettings:
        return AuditSettings(
            self.audit_attacks, self.audit_eps, self.apgd_steps, self.apgd_restarts, self.large_eps, self.input_range,
            eps_option="--audit-eps",
            methods_option="--audit-attacks",
        )


@dataclass(frozen=True)
class AnalyzeResult:
    document: Mapping[str, Any]
    written: tuple[str, ...]

    def summary_text(self) -> str:
        from ..report.audit import accuracy_rows, check_rows
        from ..report.text import format_table

        doc = self.document
        audit = doc["audit"]
        bits = audit["eqn3"]["bits"]
        ans_rows = [
            {"layer": r["layer"], "ans_mean": rounded(r["ans_mean"]), "ans_std": rounded(r["ans_std"]),
             "eqn3_bits": bits.get(r["layer"], "float")}
            for r in doc["ans"]["layers"]
        ]
        lines = [
            textwrap.fill(audit["verdict"], width=100),
            "",
            f"robust accuracy ({audit['robustness']['samples']} samples, labels from {audit['robustness']['labels']}; "
            "counted by onnxruntime on the attacked inputs)",
            format_table(accuracy_rows(audit["robustness"])),
            "",
            f"gradient-masking checks: {audit['masking']['verdict']}",
            format_table(check_rows(audit["masking"])),
            "",
            f"ANS ({doc['ans']['attack']['method']} eps={doc['ans']['attack']['eps']:.4g}, "
            f"{doc['ans']['samples']} samples); {audit['eqn3']['sentence']}",
            format_table(ans_rows),
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def run_analyze(
    options: AnalyzeOptions,
    command_line: Sequence[str] = (),
    progress: ProgressFactory = no_progress,
) -> AnalyzeResult:
    """Audit a model (float or compiled) without quantizing it: the robustness audit with
    masking diagnostics and a verdict, ANS per layer and what it implies for Eqn 3."""
    from .. import report
    from ..errors import ModelError
    from ..finetune.graph import compiled_plan, float_model_of
    from ..harness.ans import measure_ans
    from ..outputs import OutputDir
    from ..report.audit import audit_section, eqn3_implication

    clock = report.RunClock.start(command_line)
    inputs = [p for p in (options.model_path, options.data_path) if p]
    output = OutputDir(options.output_dir, inputs=inputs) if options.output_dir else None
    model = load_model(options.model_path)
    plan = compiled_plan(model)
    float_model = model if plan is None else float_model_of(model)
    layers = list_layers(float_model)
    if not layers:
        raise ModelError(f"{options.model_path}: no quantizable layer to analyze")
    check_finite_initializers(float_model, weights_and_biases(layers), options.model_path)
    dataset = load_data(options, model)
    attack = make_attack(options)
    settings = options.audit_settings()
    settings.suite(compiled=plan is not None)  # bad attack options fail before any work
    count = audit_samples(options, dataset)
    with progress(f"ANS ({attack.describe()})", count) as advance:
        ans = measure_ans(model, layers, first_samples(dataset, count, options.batch_size), attack, seed=options.seed, progress=advance)
    with progress("robustness audit", count) as advance:
        robustness, masking = audit_model(
            model, first_samples(dataset, count, options.batch_size), settings, seed=options.seed, progress=advance
        )
    kind = "float" if plan is None else f"compiled ({plan.method})"
    audit = audit_section(
        robustness.to_json(), masking.to_json(), eqn3_implication(layers, ans.to_json()["layers"]),
        model=Path(options.model_path).name, kind=kind,
    )
    document = {
        "format": "quanos-analysis",
        "version": 1,
        "model": options.model_path,
        "data": {"source": dataset.source, "samples": count},
        "ans": ans.to_json(),
        "evaluation": robustness.evaluation().to_json(),
        "audit": audit,
    }
    written: tuple[str, ...] = ()
    if output is not None:
        model_entry = report.file_input(options.model_path)
        report_document = report.report_document(
            "analyze",
            models=[model_entry],
            data=report.data_input(options.data_path, dataset.count, dataset.selection),
            seed=options.seed,
            settings=settings_json(options, exclude=("model_path", "data_path", "output_dir", "as_json")),
            layers=report.layer_rows(layers, None, document["ans"]),
            ans=document["ans"],
            evaluations=[{"model": model_entry, "evaluation": document["evaluation"]}],
            audits=[audit],
        )
        files = {ANALYSIS_FILE: report.dumps(document), **report.report_files(report_document, clock.finish())}
        written = tuple(str(p) for p in output.write(files))
    return AnalyzeResult(document, written)


def audit_samples(options: AnalyzeOptions, dataset: Any) -> int:
    """--samples, or DEFAULT_AUDIT_SAMPLES (fewer if the data has fewer)."""
    if options.samples is None:
        return min(DEFAULT_AUDIT_SAMPLES, dataset.count)
    return ans_samples(options, dataset)
