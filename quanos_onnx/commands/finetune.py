"""`quanos finetune`: fake-quant (and adversarial) fine-tuning at a plan; the stage is finetune/."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx

from ..layers import list_layers
from ..model import load_model
from ..progress import ProgressFactory, no_progress
from .options import DataOptions


@dataclass(frozen=True)
class FinetuneOptions(DataOptions):
    """`quanos finetune`: fake-quant (and adversarial) fine-tuning at a plan; see finetune/."""

    model_path: str
    output_path: str
    epochs: int
    plan_path: str | None = None
    data_path: str | None = None
    val_path: str | None = None
    val_split: float | None = None
    lr: float | None = None
    optimizer: str = "adam"
    batch_size: int = 64
    adv_train: str | None = None
    adv_eps: str = "8/255"
    adv_steps: int = 7
    adv_alpha: str | None = None
    adv_weight: float = 0.5
    input_range: str = "0,1"
    calibration: str = "minmax"
    percentile: float = 99.99
    calibration_samples: int = 512
    storage: str = "int8"
    as_json: bool = False


@dataclass(frozen=True)
class FinetuneRunResult:
    document: Mapping[str, Any]
    written: tuple[str, ...]

    def summary_text(self) -> str:
        from ..report.text import format_table

        doc = self.document
        rows = [
            {key: record[key] for key in ("epoch", "train_loss", "train_accuracy", "train_adversarial_accuracy", "val_accuracy", "val_adversarial_accuracy")}
            for record in doc["history"]
        ]
        trip = doc["round_trip"]
        lines = [
            format_table(rows),
            "",
            f"kept epoch {doc['best_epoch']} ({doc['selected_by']})",
            f"round trip on {trip['samples']} samples: twin and onnxruntime agree on "
            f"{trip['prediction_agreement']:.2%} of predictions, max |difference| {trip['max_abs_diff']:.3g}",
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def run_finetune(
    options: FinetuneOptions,
    progress: ProgressFactory = no_progress,
    on_epoch: Callable[[Any], None] | None = None,
) -> FinetuneRunResult:
    """Fine-tune MODEL at its plan and write the compiled model of the best epoch.

    MODEL is a float model (then --plan is required) or a quanos-compile output, whose
    float graph and plan are recovered from it (--plan overrides the stored plan).
    """
    from pathlib import Path

    from ..errors import ModelError, UsageError
    from ..finetune import FinetuneSettings, compiled_plan, finetune, float_model_of
    from ..model import guard_output, write_bytes_atomic
    from ..outputs import OutputDir
    from ..plan import read_plan, validate_plan

    inputs = [p for p in (options.model_path, options.data_path, options.val_path, options.plan_path) if p]
    target = Path(options.output_path)
    if target.is_dir():
        raise UsageError(f"-o {target}: is a directory; give the output model's file name (e.g. out.onnx)")
    OutputDir(target.parent, inputs=inputs)
    guard_output(target, [Path(p) for p in inputs])
    if options.val_path is not None and options.val_split is not None:
        raise UsageError("--val and --val-split exclude each other")
    loaded = load_model(options.model_path)
    stored_plan = compiled_plan(loaded)
    float_model = loaded if stored_plan is None else float_model_of(loaded)
    layers = list_layers(float_model)
    if not layers:
        raise ModelError(f"{options.model_path}: no quantizable layer to fine-tune")
    if options.plan_path is not None:
        plan = validate_plan(read_plan(options.plan_path), layers, options.plan_path)
    elif stored_plan is not None:
        plan = validate_plan(stored_plan, layers, f"{options.model_path} (stored plan)")
    else:
        raise UsageError(
            "--plan is required for a float model",
            hint="write one with `quanos-compile MODEL --data DATA` (or --bits K), or pass its compiled model",
        )
    train, val = _finetune_data(options, float_model)
    settings = FinetuneSettings(
        epochs=options.epochs,
        learning_rate=options.lr,
        optimizer=options.optimizer,
        batch_size=options.batch_size,
        adversarial=_training_attack(options),
        adversarial_weight=options.adv_weight,
        seed=options.seed,
        calibration_samples=options.calibration_samples,
        calibration_method=options.calibration,
        percentile=options.percentile,
        storage=options.storage,
    )
    result = finetune(float_model, plan, train, settings, val=val, progress=progress, on_epoch=on_epoch)
    write_bytes_atomic(target, result.model.SerializeToString())
    document = {
        "format": "quanos-finetune",
        "version": 1,
        "model": options.model_path,
        "started_from": "float model" if stored_plan is None else "compiled model (dequantized weights)",
        "plan_method": result.plan.method,
        "data": {"train": f"{train.source} ({train.count} samples)", "val": None if val is None else f"{val.source} ({val.count} samples)"},
        **result.to_json(),
        "output": str(target),
    }
    return FinetuneRunResult(document, (str(target),))


def _finetune_data(options: FinetuneOptions, model: onnx.ModelProto) -> tuple[Any, Any]:
    """Training data in a seeded shuffled order (so the calibration samples are a fair mix
    even for files sorted by class) and the validation data: --val, --val-split or none."""
    from ..data import Dataset, load_dataset
    from ..errors import DataError, UsageError
    from ..model import input_spec, num_classes

    if options.data_path is None:
        raise UsageError("--data is required: fine-tuning trains on it")
    preprocessing = dict(layout=options.layout, scale=options.scale, mean=options.mean, std=options.std)
    spec, classes = input_spec(model), num_classes(model)
    train = load_dataset(
        options.data_path, spec, data_range=options.data_range, seed=options.seed, shuffle=True,
        num_classes=classes, **preprocessing,
    )
    if options.val_path is not None:
        return train, load_dataset(options.val_path, spec, num_classes=classes, **preprocessing)
    if options.val_split is None:
        return train, None
    if not 0.0 < options.val_split < 1.0:
        raise UsageError(f"--val-split {options.val_split} must be a fraction between 0 and 1")
    held_out = round(train.count * options.val_split)
    if held_out < 1 or held_out >= train.count:
        raise DataError(f"--val-split {options.val_split} of {train.count} samples leaves no training or no validation data")
    kept = train.count - held_out
    return (
        Dataset(train.x[:kept], train.y[:kept], train.source, f"{train.selection}, first {kept}"),
        Dataset(train.x[kept:], train.y[kept:], train.source, f"{train.selection}, last {held_out} (--val-split)"),
    )


def _training_attack(options: FinetuneOptions) -> Any:
    """The attack of adversarial fine-tuning (PGD with a random start), or None."""
    from ..errors import UsageError
    from ..harness.attacks import Attack, InputRange, parse_eps

    if options.adv_train is None:
        return None
    input_range = InputRange.parse(options.input_range)
    eps = parse_eps(options.adv_eps, "--adv-eps")
    if options.adv_train == "fgsm":
        return Attack.fgsm(eps, input_range)
    if options.adv_train == "pgd":
        alpha = parse_eps(options.adv_alpha, "--adv-alpha") if options.adv_alpha else None
        return Attack.pgd(eps, steps=options.adv_steps, alpha=alpha, random_start=True, input_range=input_range)
    raise UsageError(f"--adv-train {options.adv_train!r} is not fgsm or pgd")
