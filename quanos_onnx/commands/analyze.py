"""`quanos analyze`: audit a model without quantizing it (ANS per layer, accuracy under attack)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..layers import Layer, list_layers
from ..model import check_finite_initializers, check_finite_outputs
from ..progress import ProgressFactory, no_progress
from .options import (
    check_data_range,
    AttackOptions,
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


@dataclass(frozen=True, kw_only=True)
class AnalyzeOptions(AttackOptions):
    """The ANS attack and data options of compile, plus the accuracy grid's strengths."""

    fgsm_eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    pgd_eps: tuple[float, ...] = (2 / 255, 8 / 255)

    def __post_init__(self) -> None:
        from ..harness.attacks import check_fraction

        super().__post_init__()
        for name in ("fgsm_eps", "pgd_eps"):
            for eps in getattr(self, name):
                check_fraction(eps, name)

    def accuracy_attacks(self) -> tuple[Any, ...]:
        """FGSM at every `fgsm_eps`, PGD (`pgd_steps`) at every `pgd_eps` (either may be empty)."""
        from ..harness.evaluate import attack_grid

        value_range = self.value_range()
        fgsm = attack_grid(["fgsm"], self.fgsm_eps, input_range=value_range) if self.fgsm_eps else ()
        pgd = attack_grid(["pgd"], self.pgd_eps, steps=self.pgd_steps, input_range=value_range) if self.pgd_eps else ()
        return (*fgsm, *pgd)


@dataclass(frozen=True)
class AnalyzeResult:
    """`document` is the quanos-analysis document (analysis.json), `report` the report's."""

    document: Mapping[str, Any]
    layers: tuple[Layer, ...]
    report: Mapping[str, Any]
    run: RunInfo
    inputs: tuple[Path, ...] = ()
    written: tuple[Path, ...] = ()

    def files(self) -> dict[str, bytes | str]:
        """The files `quanos analyze -o` writes: analysis.json and the report."""
        from .. import report

        return {ANALYSIS_FILE: report.dumps(self.document), **report.report_files(self.report, self.run)}

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write files() into `directory`, all or nothing; never over an input file."""
        return save_files(directory, self.files(), self.inputs)

    def summary_text(self) -> str:
        from ..report.text import format_table

        doc = self.document
        ans_rows = [
            {"layer": r["layer"], "ans_mean": rounded(r["ans_mean"]), "ans_std": rounded(r["ans_std"])}
            for r in doc["ans"]["layers"]
        ]
        evaluation = doc["evaluation"]
        accuracy_rows = [{"attack": "clean", "eps": None, "accuracy": evaluation["clean_accuracy"]}] + [
            {"attack": a["method"], "eps": round(a["eps"], 5), "accuracy": a["accuracy"]}
            for a in evaluation["attacks"]
        ]
        lines = [
            f"ANS ({doc['ans']['attack']['method']} eps={doc['ans']['attack']['eps']:.4g}, "
            f"{doc['ans']['samples']} samples)",
            format_table(ans_rows),
            "",
            f"accuracy on {evaluation['samples']} samples (labels from {evaluation['labels']})",
            format_table(accuracy_rows),
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def run_analyze(
    model: ModelSource,
    data: DataSource,
    options: AnalyzeOptions,
    *,
    save_to: str | os.PathLike[str] | None = None,
    command_line: Sequence[str] | None = None,
    progress: ProgressFactory = no_progress,
) -> AnalyzeResult:
    """Audit a model without quantizing it: ANS per layer and clean/FGSM/PGD accuracy."""
    from .. import report
    from ..errors import ModelError
    from ..harness.ans import measure_ans
    from ..harness.evaluate import evaluate
    from ..device import using_device
    from ..threads import using_threads

    clock = report.RunClock.start(api_command_line() if command_line is None else command_line)
    inputs = input_paths(model, data)
    check_output_dir(save_to, inputs, names=(ANALYSIS_FILE, *report.REPORT_FILES))
    source = read_model(model, input_shape=options.input_shape)
    layers = list_layers(source.proto)
    if not layers:
        raise ModelError(f"{source.name}: no quantizable layer to analyze")
    check_finite_initializers(source.proto, weights_and_biases(layers), source.name)
    attack = options.ans_attack()
    attacks = options.accuracy_attacks()
    with using_threads(options.threads), using_device(options.device):
        dataset = load_data(data, options, source.proto, model_name=source.name)
        check_data_range(options.input_range, dataset, attacked=True)
        check_finite_outputs(source.proto, np.asarray(dataset.x[: options.batch_size]), source.name)
        count = ans_samples(options.samples, dataset)
        with progress(f"ANS ({attack.describe()})", count) as advance:
            ans = measure_ans(
                source.proto, layers, first_samples(dataset, count, options.batch_size), attack, seed=options.seed, progress=advance
            )
        with progress("accuracy under attack", count) as advance:
            evaluation = evaluate(
                source.proto, first_samples(dataset, count, options.batch_size), attacks, seed=options.seed, progress=advance
            )
    document = {
        "format": "quanos-analysis",
        "version": 1,
        "model": source.name,
        "data": {"source": dataset.source, "samples": count},
        "ans": ans.to_json(),
        "evaluation": evaluation.to_json(),
    }
    model_entry = source.report_entry()
    report_document = report.report_document(
        "analyze",
        models=[model_entry],
        data=data_entry(data, dataset, dataset.count),
        seed=options.seed,
        settings=options.settings(),
        layers=report.layer_rows(layers, None, document["ans"]),
        ans=document["ans"],
        evaluations=[{"model": model_entry, "evaluation": document["evaluation"]}],
    )
    result = AnalyzeResult(document, tuple(layers), report_document, clock.finish(), tuple(inputs))
    return result if save_to is None else replace(result, written=result.save(save_to))
