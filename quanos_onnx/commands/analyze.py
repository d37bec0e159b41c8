"""`quanos analyze`: audit a model without quantizing it (ANS per layer, accuracy under attack)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..layers import list_layers
from ..model import check_finite_initializers, load_model
from ..progress import ProgressFactory, no_progress
from .options import DataOptions, ans_samples, eps_list, first_samples, load_data, make_attack, rounded, settings_json, weights_and_biases


ANALYSIS_FILE = "analysis.json"


@dataclass(frozen=True)
class AnalyzeOptions(DataOptions):
    """`quanos analyze`: the ANS attack and data options of compile, plus accuracy grids."""

    model_path: str
    data_path: str | None = None
    output_dir: str | None = None
    fgsm_eps: str = "0.05,0.1,0.2"
    pgd_eps: str = "2/255,8/255"
    as_json: bool = False
    eps: str = "0.05"
    samples: int | None = None
    attack: str = "fgsm"
    pgd_steps: int = 10
    pgd_alpha: str | None = None
    input_range: str = "0,1"
    batch_size: int = 64


@dataclass(frozen=True)
class AnalyzeResult:
    document: Mapping[str, Any]
    written: tuple[str, ...]

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
    options: AnalyzeOptions,
    command_line: Sequence[str] = (),
    progress: ProgressFactory = no_progress,
) -> AnalyzeResult:
    """Audit a model without quantizing it: ANS per layer and clean/FGSM/PGD accuracy."""
    from .. import report
    from ..errors import ModelError
    from ..harness.ans import measure_ans
    from ..harness.attacks import InputRange, parse_eps
    from ..harness.evaluate import attack_grid, evaluate
    from ..outputs import OutputDir

    clock = report.RunClock.start(command_line)
    inputs = [p for p in (options.model_path, options.data_path) if p]
    output = OutputDir(options.output_dir, inputs=inputs) if options.output_dir else None
    model = load_model(options.model_path)
    layers = list_layers(model)
    if not layers:
        raise ModelError(f"{options.model_path}: no quantizable layer to analyze")
    check_finite_initializers(model, weights_and_biases(layers), options.model_path)
    dataset = load_data(options, model)
    attack = make_attack(options)
    count = ans_samples(options, dataset)
    input_range = InputRange.parse(options.input_range)
    attacks = (
        *attack_grid(["fgsm"], eps_list(options.fgsm_eps, "--fgsm-eps", parse_eps), input_range=input_range),
        *attack_grid(["pgd"], eps_list(options.pgd_eps, "--pgd-eps", parse_eps), steps=options.pgd_steps, input_range=input_range),
    )
    with progress(f"ANS ({attack.describe()})", count) as advance:
        ans = measure_ans(model, layers, first_samples(dataset, count, options.batch_size), attack, seed=options.seed, progress=advance)
    with progress("accuracy under attack", count) as advance:
        evaluation = evaluate(model, first_samples(dataset, count, options.batch_size), attacks, seed=options.seed, progress=advance)
    document = {
        "format": "quanos-analysis",
        "version": 1,
        "model": options.model_path,
        "data": {"source": dataset.source, "samples": count},
        "ans": ans.to_json(),
        "evaluation": evaluation.to_json(),
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
        )
        files = {ANALYSIS_FILE: report.dumps(document), **report.report_files(report_document, clock.finish())}
        written = tuple(str(p) for p in output.write(files))
    return AnalyzeResult(document, written)
