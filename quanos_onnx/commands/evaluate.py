"""`quanos evaluate`: clean and adversarial accuracy of models side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from ..layers import list_layers
from ..model import load_model
from ..plan import Plan
from ..progress import ProgressFactory, no_progress
from .options import DataOptions, ans_samples, eps_list, first_samples, load_data, settings_json


EVALUATION_FILE = "evaluation.json"
PAPER_FGSM_EPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
PAPER_PGD_EPS = (8 / 255, 16 / 255, 32 / 255)
PAPER_PGD_STEPS = 7
PAPER_PGD_ALPHA = 2 / 255


@dataclass(frozen=True)
class EvaluateOptions(DataOptions):
    """`quanos evaluate`: models side by side under one attack grid on one data set."""

    model_paths: tuple[str, ...]
    data_path: str | None = None
    output_dir: str | None = None
    attack: str = "fgsm,pgd"
    eps: str | None = None
    pgd_steps: int = 10
    pgd_alpha: str | None = None
    paper: bool = False
    samples: int | None = None
    as_json: bool = False
    input_range: str = "0,1"
    batch_size: int = 64


@dataclass(frozen=True)
class EvaluateResult:
    document: Mapping[str, Any]
    written: tuple[str, ...]

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
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def eps_label(eps: float) -> str:
    """0.05 stays 0.05; multiples of 1/255 read as n/255, as the paper writes PGD strengths."""
    steps = eps * 255
    if abs(steps - round(steps)) < 1e-6 and abs(eps * 20 - round(eps * 20)) > 1e-6:
        return f"{round(steps)}/255"
    return f"{eps:g}"


def evaluation_attacks(options: EvaluateOptions) -> tuple[Any, ...]:
    """The attack grid: --attack x --eps, or the paper's (--paper)."""
    from ..errors import UsageError
    from ..harness.attacks import METHODS, InputRange, parse_eps
    from ..harness.evaluate import attack_grid

    input_range = InputRange.parse(options.input_range)
    methods = [part.strip().lower() for part in options.attack.split(",") if part.strip()]
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UsageError(f"--attack {unknown[0]!r} is not one of {', '.join(METHODS)}")
    if options.paper:
        if options.eps is not None or options.pgd_alpha is not None:
            raise UsageError("--paper sets eps and the PGD step itself: leave out --eps and --pgd-alpha")
        grid: list[Any] = []
        if "fgsm" in methods:
            grid += attack_grid(["fgsm"], PAPER_FGSM_EPS, input_range=input_range)
        if "pgd" in methods:
            grid += attack_grid(["pgd"], PAPER_PGD_EPS, steps=PAPER_PGD_STEPS, alpha=PAPER_PGD_ALPHA, input_range=input_range)
        return tuple(grid)
    if options.eps is None:
        raise UsageError("--eps is required (or --paper for the paper's grid)", hint="e.g. --eps 0.05,0.1 or --eps 8/255")
    alpha = parse_eps(options.pgd_alpha, "--pgd-alpha") if options.pgd_alpha else None
    return attack_grid(
        methods, eps_list(options.eps, "--eps", parse_eps), steps=options.pgd_steps, alpha=alpha, input_range=input_range
    )


def run_evaluate(
    options: EvaluateOptions,
    command_line: Sequence[str] = (),
    progress: ProgressFactory = no_progress,
) -> EvaluateResult:
    """Clean and adversarial accuracy of every model on the same inputs and attacks.

    A compiled (QDQ) model is attacked through its fake-quant twin; all accuracies are
    counted by onnxruntime on the attacked inputs, so they describe the deployed files.
    With an output directory: evaluation.json and the report files.
    """
    from pathlib import Path

    from .. import report
    from ..errors import DataError, UsageError
    from ..finetune.graph import compiled_plan, float_model_of
    from ..harness.evaluate import evaluate
    from ..model import input_shape
    from ..outputs import OutputDir

    clock = report.RunClock.start(command_line)
    if not options.model_paths:
        raise UsageError("give at least one MODEL to evaluate")
    inputs = [*options.model_paths, *([options.data_path] if options.data_path else [])]
    output = OutputDir(options.output_dir, inputs=inputs) if options.output_dir else None
    attacks = evaluation_attacks(options)
    models = [(path, load_model(path)) for path in options.model_paths]
    first_path, first_model = models[0]
    dataset = load_data(options, first_model)
    count = dataset.count if options.samples is None else ans_samples(options, dataset)
    names = _short_names([path for path, _ in models])
    entries = []
    evaluations = []
    labels = "data"
    for (path, model), name in zip(models, names):
        if input_shape(model)[1:] != input_shape(first_model)[1:]:
            raise DataError(
                f"{path}: input shape {list(input_shape(model))} differs from {first_path}'s "
                f"{list(input_shape(first_model))}; evaluate models of one input shape together"
            )
        plan = compiled_plan(model)
        with progress(f"{name} ({len(attacks)} attacks)", count) as advance:
            evaluation = evaluate(model, first_samples(dataset, count, options.batch_size), attacks, seed=options.seed, progress=advance)
        labels = evaluation.labels
        evaluations.append((path, evaluation))
        entries.append(
            {
                "name": name,
                "path": str(Path(path)),
                "kind": "float" if plan is None else f"compiled ({plan.method})",
                "method": None if plan is None else plan.method,
                "average_weight_bits": None if plan is None else _average_bits(plan, float_model_of(model)),
                "evaluation": evaluation.to_json(),
            }
        )
    document = {
        "format": "quanos-evaluation",
        "version": 1,
        "data": {"source": dataset.source, "samples": count, "labels": labels},
        "attacks": [attack.to_json() for attack in attacks],
        "models": entries,
    }
    written: tuple[str, ...] = ()
    if output is not None:
        files = {
            EVALUATION_FILE: report.dumps(document),
            **report.evaluation_report_files(
                evaluations,
                run=clock.finish(),
                data=report.data_input(options.data_path, count, dataset.selection),
                seed=options.seed,
                settings=settings_json(options, exclude=("model_paths", "data_path", "output_dir", "as_json")),
            ),
        }
        written = tuple(str(p) for p in output.write(files))
    return EvaluateResult(document, written)


def _average_bits(plan: Plan, float_model: onnx.ModelProto) -> float:
    params = {layer.name: layer.params for layer in list_layers(float_model)}
    return round(plan.average_weight_bits({name: params.get(name, 0) for name in (e.name for e in plan.layers)}), 2)


def _short_names(paths: Sequence[str]) -> list[str]:
    """File names, or parent/file where file names repeat (quanos-out/model.quanos.onnx)."""
    from pathlib import Path

    names = [Path(path).name for path in paths]
    if len(set(names)) == len(names):
        return names
    return [str(Path(Path(path).parent.name) / Path(path).name) for path in paths]
