"""`quanos analyze`: audit a model (float or compiled) without quantizing it: robustness under
several attacks with gradient-masking checks and a verdict, ANS per layer and what it implies
for Eqn 3."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..errors import UsageError, arg
from ..layers import Layer, list_layers
from ..model import check_finite_initializers, check_finite_outputs
from ..progress import ProgressFactory, no_progress
from .options import (
    check_data_range,
    AUDIT_METHODS,
    DEFAULT_AUDIT_SAMPLES,
    AttackOptions,
    RunOptions,
    AuditMethod,
    AuditSettings,
    audit_model,
    DataSource,
    ModelSource,
    ans_samples,
    api_command_line,
    data_entry,
    first_samples,
    input_paths,
    load_data,
    read_model,
    rounded,
    weights_and_biases,
)
from .results import check_output_dir, save_files

if TYPE_CHECKING:
    from ..report import RunInfo

ANALYSIS_FILE = "analysis.json"

DEFAULT_TOLERANCE_SAMPLES = 100
"""The tolerance runs one onnxruntime pass per layer and candidate (7 x the quantized layers):
on 100 samples a layer is tolerated at b bits when at most 1 prediction moves (docs/method.md)."""


@dataclass(frozen=True, kw_only=True)
class AnalyzeOptions(AttackOptions, RunOptions):
    """The ANS attack and data options of compile, plus the robustness audit: every method of
    `audit_attacks` at every `audit_eps` (FGSM, and PGD with the paper's 7 steps of 2/255),
    APGD with `apgd_steps` and `apgd_restarts`, and the `large_eps` probe. `samples` (default
    DEFAULT_AUDIT_SAMPLES) counts for ANS and the audit."""

    audit_attacks: tuple[AuditMethod, ...] = AUDIT_METHODS
    audit_eps: tuple[float, ...] = (2 / 255, 8 / 255)
    apgd_steps: int = 50
    apgd_restarts: int = 1
    large_eps: float = 0.5
    lipschitz: bool = False
    """Also each layer block's Lipschitz bound and local ratios on the ANS samples."""
    tolerance: bool = True
    """Each quantized layer's KL and top-1 agreement alone at 2..8 bits and its tolerance
    (harness.tolerance), on the first `tolerance_samples` of the audit's samples."""
    tolerance_samples: int = DEFAULT_TOLERANCE_SAMPLES

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tolerance_samples, bool) or not isinstance(self.tolerance_samples, int) or self.tolerance_samples < 1:
            raise UsageError(f"{arg('tolerance_samples')} {self.tolerance_samples!r} must be a whole number of at least 1")
        self.audit_settings().suite(compiled=True)  # bad audit options fail before any work

    def audit_settings(self) -> AuditSettings:
        return AuditSettings(
            self.audit_attacks, self.audit_eps, self.apgd_steps, self.apgd_restarts, self.large_eps,
            self.input_range, names=("audit_attacks", "audit_eps"),
        )


@dataclass(frozen=True)
class AnalyzeResult:
    """`document` is the quanos-analysis document (analysis.json), `report` the report's."""

    document: Mapping[str, Any]
    layers: tuple[Layer, ...]
    report: Mapping[str, Any]
    run: RunInfo
    inputs: tuple[Path, ...] = ()
    written: tuple[Path, ...] = ()
    figures: bool = True
    """Whether report.html draws the figures (the `figures` option)."""

    def files(self) -> dict[str, bytes | str]:
        """The files `quanos analyze -o` writes: analysis.json and the report."""
        from .. import report

        return {
            ANALYSIS_FILE: report.dumps(self.document),
            **report.report_files(self.report, self.run, figures=self.figures),
        }

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write files() into `directory`, all or nothing; never over an input file."""
        return save_files(directory, self.files(), self.inputs)

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
        if doc.get("lipschitz") is not None:
            _add_lipschitz_columns(ans_rows, doc["lipschitz"])
        if doc.get("tolerance") is not None:
            _add_tolerance_columns(ans_rows, doc["tolerance"])
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


def _add_tolerance_columns(rows: Sequence[dict[str, Any]], tolerance: Mapping[str, Any]) -> None:
    """Each quantized layer's tolerance, the allocator's bits and its KL alone at each candidate."""
    from ..report.content import tolerance_cells

    measured = {row["layer"]: row for row in tolerance["layers"]}
    header = f"kl_alone_{'/'.join(map(str, tolerance['bits']))}"
    for row in rows:
        entry = measured.get(row["layer"])
        cells = tolerance_cells(
            {"tolerance_kl": None} if entry is None
            else {"tolerance_kl": entry["kl"], "tolerance_bits": entry["tolerance_bits"], "allocator_bits": entry["allocator_bits"]}
        )
        row["tolerance_bits"], row["allocator_bits"], row[header] = cells


def _add_lipschitz_columns(rows: Sequence[dict[str, Any]], lipschitz: Mapping[str, Any]) -> None:
    """The bound and the measured local ratio beside each layer's ANS."""
    bounds = {row["layer"]: row for row in lipschitz["bounds"]}
    local = {row["layer"]: row for row in (lipschitz["local"] or {}).get("layers", [])}
    for row in rows:
        row["lipschitz_bound"] = rounded(bounds[row["layer"]]["bound"])
        if row["layer"] in local:
            row["local_mean"] = rounded(local[row["layer"]]["local_mean"])
            row["local_max"] = rounded(local[row["layer"]]["local_max"])


def run_analyze(
    model: ModelSource | Sequence[ModelSource],
    data: DataSource,
    options: AnalyzeOptions,
    *,
    save_to: str | os.PathLike[str] | None = None,
    command_line: Sequence[str] | None = None,
    progress: ProgressFactory = no_progress,
) -> AnalyzeResult | AnalyzeResults:
    """Audit a model (float or compiled) without quantizing it: the robustness audit with
    masking checks and a verdict, ANS per layer and what it implies for Eqn 3.

    Given a list of models, each one is analyzed as if alone, one job per model (on Ray with
    `options.ray`), into an AnalyzeResults whose files put each model's outputs in a folder
    of its own (`analysis_folders`)."""
    from .. import report

    command = api_command_line() if command_line is None else tuple(command_line)
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        check_output_dir(save_to, input_paths(model, data), names=(ANALYSIS_FILE, *report.REPORT_FILES))
        single = _analyze_model(_AnalyzeShared(data, options, command), model, progress)
        return single if save_to is None else replace(single, written=single.save(save_to))
    models = list(model)
    if not models:
        raise UsageError(f"give at least one model in {arg('model')}")
    folders = analysis_folders(models)
    for folder in folders:
        check_output_dir(
            None if save_to is None else Path(save_to) / folder, input_paths(*models, data),
            names=(ANALYSIS_FILE, *report.REPORT_FILES),
        )
    shared = _AnalyzeShared(_reusable(data), options, command)
    jobs = options.jobs()
    with jobs.open():
        results = jobs.run(_analyze_model, shared, models, progress=progress, label="models")
    many = AnalyzeResults(tuple(results), tuple(folders))
    return many if save_to is None else replace(many, written=many.save(save_to))


@dataclass(frozen=True)
class AnalyzeResults:
    """The analyses of several models (`run_analyze` given a list), each as its own run
    would give it; `files()` puts each model's files in its folder (`folders[i]`)."""

    results: tuple[AnalyzeResult, ...]
    folders: tuple[str, ...]
    written: tuple[Path, ...] = ()

    @property
    def document(self) -> list[Mapping[str, Any]]:
        """Every model's analysis.json document, in the models' order (the CLI's --json)."""
        return [result.document for result in self.results]

    def files(self) -> dict[str, dict[str, bytes | str]]:
        """Every model's files (analysis.json and the report) by its folder."""
        return {folder: result.files() for folder, result in zip(self.folders, self.results)}

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write each model's files into `directory`/its folder, each folder all or nothing
        (as a single-model run writes its -o); never over an input file."""
        return tuple(
            path
            for folder, result in zip(self.folders, self.results)
            for path in save_files(Path(directory) / folder, result.files(), result.inputs)
        )

    def summary_text(self) -> str:
        parts = []
        for folder, result in zip(self.folders, self.results):
            parts += [f"== {result.document['model']} ({folder}/)", result.summary_text(), ""]
        parts += [f"wrote {path}" for path in self.written]
        return "\n".join(parts).rstrip("\n")


def analysis_folders(models: Sequence[ModelSource]) -> list[str]:
    """One output folder per model: the file's stem (resnet20 for resnet20.onnx), with its
    parent folder's name in front where stems repeat (run1_model), and model1, model2 ...
    for models in memory."""
    stems = [
        f"model{index + 1}" if isinstance(model, onnx.ModelProto) else Path(model).stem.removesuffix(".quanos")
        for index, model in enumerate(models)
    ]
    if len(set(stems)) < len(stems):
        stems = [
            stem if isinstance(model, onnx.ModelProto) else f"{Path(model).resolve().parent.name}_{stem}"
            for model, stem in zip(models, stems)
        ]
    if len(set(stems)) < len(stems):
        stems = [f"{index + 1}_{stem}" for index, stem in enumerate(stems)]
    return stems


def _reusable(data: DataSource) -> DataSource:
    """Data that every model's job can read again: a path or arrays as given, an iterable of
    batches read once into a list. A CalibrationDataReader is read once and cannot be."""
    if isinstance(data, (str, os.PathLike, np.ndarray)) or (isinstance(data, tuple) and len(data) == 2):
        return data
    if hasattr(data, "get_next"):
        raise UsageError(
            f"{arg('data')} is a CalibrationDataReader, which is read once; several models need data they can each read",
            hint="give a path or numpy arrays (x, y)",
        )
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        return list(data)
    return data


@dataclass(frozen=True)
class _AnalyzeShared:
    """What every model's analysis job shares: the data as given, the options, the command line."""

    data: DataSource
    options: AnalyzeOptions
    command_line: tuple[str, ...]


def _analyze_model(shared: _AnalyzeShared, model: ModelSource, progress: ProgressFactory) -> AnalyzeResult:
    """One model's analysis, as a single-model run computes it (nothing written)."""
    from .. import report
    from ..errors import ModelError
    from ..finetune.graph import compiled_plan, float_model_of
    from ..harness.ans import measure_ans
    from ..harness.attacks import twin_of
    from ..report.audit import audit_section, eqn3_implication, tolerance_implication
    from ..device import using_device
    from ..threads import using_threads

    data, options = shared.data, shared.options
    clock = report.RunClock.start(shared.command_line)
    inputs = input_paths(model, data)
    source = read_model(model, input_shape=options.input_shape)
    plan = compiled_plan(source.proto)
    float_model = source.proto if plan is None else float_model_of(source.proto)
    layers = list_layers(float_model)
    if not layers:
        raise ModelError(f"{source.name}: no quantizable layer to analyze")
    check_finite_initializers(float_model, weights_and_biases(layers), source.name)
    attack = options.ans_attack()
    with using_threads(options.threads), using_device(options.device):
        dataset = load_data(data, options, source.proto, model_name=source.name)
        check_data_range(options.input_range, dataset, attacked=True)
        check_finite_outputs(source.proto, np.asarray(dataset.x[: options.batch_size]), source.name)
        count = ans_samples(options.samples, dataset, default=DEFAULT_AUDIT_SAMPLES)
        twin = twin_of(source.proto)  # one twin for ANS and every white-box attack
        with progress(f"ANS ({attack.describe()})", count) as advance:
            ans = measure_ans(
                source.proto, layers, first_samples(dataset, count, options.batch_size), attack,
                twin=twin, seed=options.seed, progress=advance,
            )
        with progress("robustness audit", count) as advance:
            robustness, masking = audit_model(
                source.proto, first_samples(dataset, count, options.batch_size), options.audit_settings(),
                twin=twin, seed=options.seed, progress=advance,
            )
        tolerance = None
        if options.tolerance:
            from ..allocate.sensitivity import DEFAULT_BITS
            from ..harness.tolerance import measure_tolerance

            batches = [x for x, _ in first_samples(dataset, min(options.tolerance_samples, count), options.batch_size)]
            quantized = sum(1 for layer in layers if not layer.is_output)
            with progress("quantization tolerance", len(DEFAULT_BITS) * quantized) as advance:
                tolerance = measure_tolerance(
                    float_model, layers, batches, ans={r.layer: r.mean for r in ans.layers}, progress=advance
                )
        lipschitz = None
        if options.lipschitz:
            from ..harness.lipschitz import estimate_lipschitz

            with progress("Lipschitz constants", count) as advance:
                lipschitz = estimate_lipschitz(
                    float_model, layers, first_samples(dataset, count, options.batch_size), seed=options.seed, progress=advance
                )
    kind = "float" if plan is None else f"compiled ({plan.method})"
    tolerance_json = None if tolerance is None else tolerance.to_json()
    audit = audit_section(
        robustness.to_json(), masking.to_json(), eqn3_implication(layers, ans.to_json()["layers"]),
        model=Path(source.name).name, kind=kind,
        tolerance=None if tolerance_json is None else tolerance_implication(tolerance_json),
    )
    document = {
        "format": "quanos-analysis",
        "version": 1,
        "model": source.name,
        "data": {"source": dataset.source, "samples": count},
        "ans": ans.to_json(),
        "evaluation": robustness.evaluation().to_json(),
        "audit": audit,
        "tolerance": tolerance_json,
    }
    if lipschitz is not None:
        document["lipschitz"] = lipschitz.to_json()
    model_entry = source.report_entry()
    report_document = report.report_document(
        "analyze",
        models=[model_entry],
        data=data_entry(data, dataset, dataset.count),
        seed=options.seed,
        settings=options.settings(),
        layers=report.layer_rows(layers, None, document["ans"], document.get("lipschitz"), tolerance_json),
        ans=document["ans"],
        evaluations=[{"model": model_entry, "evaluation": document["evaluation"]}],
        audits=[audit],
    )
    return AnalyzeResult(document, tuple(layers), report_document, clock.finish(options.threads), tuple(inputs), figures=options.figures)
