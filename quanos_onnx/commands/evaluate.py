"""`quanos evaluate`: clean and adversarial accuracy of models side by side."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from ..errors import UsageError, arg
from ..layers import list_layers
from ..plan import Plan
from ..progress import ProgressFactory, no_progress
from .options import (
    check_data_range,
    AuditMethod,
    AuditSettings,
    audit_model,
    RunOptions,
    DataSource,
    ModelInput,
    ModelSource,
    ans_samples,
    api_command_line,
    data_entry,
    first_samples,
    input_paths,
    load_data,
    read_model,
    samples_in_memory,
)
from .results import check_output_dir, save_files

if TYPE_CHECKING:
    from ..data import Dataset
    from ..harness.evaluate import Evaluation
    from ..report import RunInfo

EVALUATION_FILE = "evaluation.json"
PAPER_FGSM_EPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
PAPER_PGD_EPS = (8 / 255, 16 / 255, 32 / 255)
PAPER_PGD_STEPS = 7
PAPER_PGD_ALPHA = 2 / 255


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions(RunOptions):
    """One attack grid for every model: each method of `attack` at each `eps`, or the
    paper's grid (`paper`); no method (`attack=()`, the CLI's `--attack none`) measures
    clean accuracy alone; `samples` evaluates the first N (default: all).

    `audit` (or any of apgd-ce, apgd-dlr, transfer in `attack`) runs the robustness audit
    instead: the worst case per sample, masking checks and a verdict per model, APGD with
    `apgd_steps` and `apgd_restarts`, the `large_eps` probe (docs/method.md)."""

    attack: tuple[AuditMethod, ...] = ("fgsm", "pgd")
    eps: tuple[float, ...] | None = None
    pgd_steps: int = 10
    pgd_alpha: float | None = None
    paper: bool = False
    samples: int | None = None
    input_range: tuple[float, float] = (0.0, 1.0)
    audit: bool = False
    apgd_steps: int = 50
    apgd_restarts: int = 1
    large_eps: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"{arg('samples')} {self.samples} must be at least 1")
        if self.paper and self.audits():
            raise UsageError(
                f"{arg('paper')} is the paper's FGSM/PGD grid; for the audit and APGD/transfer attacks give {arg('eps')}"
            )
        self.attacks()
        if self.audits():
            self.audit_settings().suite(compiled=True)

    def audits(self) -> bool:
        """The robustness audit runs with `audit` or when an APGD or transfer attack is asked for."""
        return self.audit or any(method not in ("fgsm", "pgd") for method in self.attack)

    def audit_settings(self) -> AuditSettings:
        return AuditSettings(
            self.attack, self.eps or (), self.apgd_steps, self.apgd_restarts, self.large_eps, self.input_range,
            pgd_steps=self.pgd_steps, pgd_alpha=self.pgd_alpha,
        )

    def attacks(self) -> tuple[Any, ...]:
        """The attack grid: `attack` x `eps`, or the paper's (`paper`)."""
        from ..harness.attacks import InputRange
        from ..harness.evaluate import attack_grid

        value_range = InputRange(*self.input_range)
        if not self.attack:
            if self.eps is not None or self.paper:
                raise UsageError(
                    f"no {arg('attack')} (none) measures clean accuracy alone: leave out {arg('eps')} and {arg('paper')}"
                )
            return ()
        if self.paper:
            if self.eps is not None or self.pgd_alpha is not None:
                raise UsageError(
                    f"{arg('paper')} sets eps and the PGD step itself: leave out {arg('eps')} and {arg('pgd_alpha')}"
                )
            grid: list[Any] = []
            if "fgsm" in self.attack:
                grid += attack_grid(["fgsm"], PAPER_FGSM_EPS, input_range=value_range)
            if "pgd" in self.attack:
                grid += attack_grid(
                    ["pgd"], PAPER_PGD_EPS, steps=PAPER_PGD_STEPS, alpha=PAPER_PGD_ALPHA, input_range=value_range
                )
            return tuple(grid)
        if self.eps is None:
            raise UsageError(
                f"{arg('eps')} is required (or {arg('paper')} for the paper's grid)",
                hint=f"e.g. {arg('eps')} 0.05,0.1 or {arg('eps')} 8/255",
            )
        grid_methods = [method for method in self.attack if method in ("fgsm", "pgd")]
        if not grid_methods:
            return ()
        return attack_grid(grid_methods, self.eps, steps=self.pgd_steps, alpha=self.pgd_alpha, input_range=value_range)


@dataclass(frozen=True)
class EvaluateResult:
    """`document` is the quanos-evaluation document (evaluation.json), `report` the report's."""

    document: Mapping[str, Any]
    report: Mapping[str, Any]
    run: RunInfo
    inputs: tuple[Path, ...] = ()
    written: tuple[Path, ...] = ()
    figures: bool = True
    """Whether report.html draws the figures (the `figures` option)."""

    def files(self) -> dict[str, bytes | str]:
        """The files `quanos evaluate -o` writes: evaluation.json and the report."""
        from .. import report

        return {
            EVALUATION_FILE: report.dumps(self.document),
            **report.report_files(self.report, self.run, figures=self.figures),
        }

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write files() into `directory`, all or nothing; never over an input file."""
        return save_files(directory, self.files(), self.inputs)

    def rows(self) -> list[dict[str, object]]:
        """One row per model for clean inputs and one per model and attack."""
        rows: list[dict[str, object]] = []
        for entry in self.document["models"]:
            evaluation = entry["evaluation"]
            common = {"model": entry["name"], "bits": entry["average_weight_bits"]}
            rows.append({**common, "attack": "clean", "eps": None, "accuracy": evaluation["clean_accuracy"], "adversarial_loss": None})
            for result in evaluation["attacks"]:
                attack = result["method"] if result["method"] == "fgsm" else f"pgd-{result['steps']}"
                rows.append(
                    {**common, "attack": attack, "eps": eps_label(result["eps"]), "accuracy": result["accuracy"], "adversarial_loss": result["adversarial_loss"]}
                )
        return rows

    def summary_text(self) -> str:
        from ..report.text import format_table

        doc = self.document
        lines = [
            f"accuracy on {doc['data']['samples']} samples of {doc['data']['source']} (labels from {doc['data']['labels']}); "
            "attacks white-box through each model's twin, accuracy counted by onnxruntime",
            format_table(self.rows()),
            *(f"{entry['name']}: {entry['path']} ({entry['kind']})" for entry in doc["models"]),
        ]
        for entry in doc["models"]:
            if "audit" in entry:
                lines += ["", *_audit_lines(entry["audit"])]
        lines += [f"wrote {path}" for path in self.written]
        return "\n".join(lines)


def _audit_lines(audit: Mapping[str, Any]) -> list[str]:
    """One model's verdict, robust-accuracy table (worst case per eps) and masking checks."""
    import textwrap

    from ..report.audit import accuracy_rows, check_rows
    from ..report.text import format_table

    return [
        textwrap.fill(audit["verdict"], width=100),
        format_table(accuracy_rows(audit["robustness"])),
        f"gradient-masking checks: {audit['masking']['verdict']}",
        format_table(check_rows(audit["masking"])),
    ]


def eps_label(eps: float) -> str:
    """0.05 stays 0.05; multiples of 1/255 read as n/255, as the paper writes PGD strengths."""
    steps = eps * 255
    if abs(steps - round(steps)) < 1e-6 and abs(eps * 20 - round(eps * 20)) > 1e-6:
        return f"{round(steps)}/255"
    return f"{eps:g}"


def run_evaluate(
    models: ModelSource | Sequence[ModelSource],
    data: DataSource,
    options: EvaluateOptions,
    *,
    save_to: str | os.PathLike[str] | None = None,
    command_line: Sequence[str] | None = None,
    progress: ProgressFactory = no_progress,
) -> EvaluateResult:
    """Clean and adversarial accuracy of every model on the same inputs and attacks.

    A compiled (QDQ) model is attacked through its fake-quant twin; all accuracies are
    counted by onnxruntime on the attacked inputs, so they describe the deployed files.
    """
    from .. import report
    from ..errors import DataError
    from ..finetune.graph import compiled_plan, float_model_of
    from ..model import input_shape
    from ..device import using_device
    from ..threads import using_threads

    clock = report.RunClock.start(api_command_line() if command_line is None else command_line)
    given = _model_list(models)
    inputs = input_paths(*given, data)
    check_output_dir(save_to, inputs, names=(EVALUATION_FILE, *report.REPORT_FILES))
    attacks = options.attacks()
    sources = [read_model(model, "models", f"<onnx.ModelProto #{index}>", options.input_shape) for index, model in enumerate(given)]
    first = sources[0]
    names = _short_names([source.name for source in sources])
    entries = []
    evaluations = []
    audits: list[dict[str, Any]] = []
    labels = "data"
    jobs = options.jobs()
    with using_threads(options.threads), using_device(options.device), jobs.open():
        dataset = load_data(data, options, first.proto, model_name=first.name)
        check_data_range(options.input_range, dataset, attacked=bool(attacks) or options.audits())
        count = ans_samples(options.samples, dataset, default=None)
        for source in sources:
            if input_shape(source.proto)[1:] != input_shape(first.proto)[1:]:
                raise DataError(
                    f"{source.name}: input shape {list(input_shape(source.proto))} differs from {first.name}'s "
                    f"{list(input_shape(first.proto))}; evaluate models of one input shape together"
                )
        samples = dataset if jobs.ray is None else samples_in_memory(dataset, count, options.batch_size)
        shared = _EvaluateShared(samples, count, options, attacks)
        measured = jobs.run(_evaluate_model, shared, list(zip(sources, names)), progress=progress, label="models")
    for source, name, (evaluation, audit) in zip(sources, names, measured):
        plan = compiled_plan(source.proto)
        if audit is not None:
            audits.append(audit)
        labels = evaluation.labels
        evaluations.append((source.report_entry(), evaluation))
        entries.append(
            {
                "name": name,
                "path": source.name if source.path is None else str(source.path),
                "kind": "float" if plan is None else f"compiled ({plan.method})",
                "method": None if plan is None else plan.method,
                "average_weight_bits": None if plan is None else _average_bits(plan, float_model_of(source.proto)),
                "evaluation": evaluation.to_json(),
                **({} if audit is None else {"audit": audit}),
            }
        )
    document = {
        "format": "quanos-evaluation",
        "version": 1,
        "data": {"source": dataset.source, "samples": count, "labels": labels},
        "attacks": [attack.to_json() for attack in attacks],
        "models": entries,
    }
    report_document = report.evaluation_report(
        evaluations, data=data_entry(data, dataset, count), seed=options.seed, settings=options.settings(), audits=audits
    )
    result = EvaluateResult(document, report_document, clock.finish(options.threads), tuple(inputs), figures=options.figures)
    return result if save_to is None else replace(result, written=result.save(save_to))


@dataclass(frozen=True)
class _EvaluateShared:
    """What every model's evaluation job shares: the samples, how many, the options and the attack grid."""

    dataset: Dataset
    count: int
    options: EvaluateOptions
    attacks: tuple[Any, ...]


def _evaluate_model(
    shared: _EvaluateShared, model: tuple[ModelInput, str], progress: ProgressFactory
) -> tuple[Evaluation, dict[str, Any] | None]:
    """One model's job: its Evaluation under the attack grid, or its robustness audit (with
    the audit's report section) when the options ask for one."""
    from ..finetune.graph import compiled_plan
    from ..harness.evaluate import evaluate
    from ..report.audit import audit_section

    source, name = model
    options, count = shared.options, shared.count
    batches = first_samples(shared.dataset, count, options.batch_size)
    if not options.audits():
        with progress(f"{name} ({len(shared.attacks)} attacks)", count) as advance:
            return evaluate(source.proto, batches, shared.attacks, seed=options.seed, progress=advance), None
    plan = compiled_plan(source.proto)
    kind = "float" if plan is None else f"compiled ({plan.method})"
    with progress(f"{name} (robustness audit)", count) as advance:
        robustness, masking = audit_model(source.proto, batches, options.audit_settings(), seed=options.seed, progress=advance)
    return robustness.evaluation(), audit_section(robustness.to_json(), masking.to_json(), None, model=name, kind=kind)


def _model_list(models: ModelSource | Sequence[ModelSource]) -> list[ModelSource]:
    """One model or several, as a list; at least one."""
    given = [models] if isinstance(models, (str, os.PathLike, onnx.ModelProto)) else list(models)
    if not given:
        raise UsageError(f"give at least one model in {arg('models')}")
    return given


def _average_bits(plan: Plan, float_model: onnx.ModelProto) -> float:
    params = {layer.name: layer.params for layer in list_layers(float_model)}
    return round(plan.average_weight_bits({name: params.get(name, 0) for name in (e.name for e in plan.layers)}), 2)


def _short_names(paths: Sequence[str]) -> list[str]:
    """File names, or parent/file where file names repeat (quanos-out/model.quanos.onnx)."""
    names = [Path(path).name for path in paths]
    if len(set(names)) == len(names):
        return names
    return [str(Path(Path(path).parent.name) / Path(path).name) for path in paths]
