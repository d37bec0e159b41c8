"""`quanos finetune`: fake-quant (and adversarial) fine-tuning at a plan; the stage is finetune/."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
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
    AttackMethod,
    Calibration,
    DataOptions,
    DataSource,
    ModelSource,
    Optimizer,
    PlanSource,
    Storage,
    input_paths,
    load_data,
    read_model,
    read_plan_input,
)

if TYPE_CHECKING:
    from ..data import Dataset
    from ..finetune import FinetuneSettings


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions(DataOptions):
    """How to fine-tune (see finetune/): `epochs` at a learning rate `lr` (default per
    optimizer) decaying on a cosine; `adv_train` attacks every batch (PGD with a random
    start); `val_split` holds out a fraction of the data to keep the best epoch on. The
    written model is compiled again with compile's calibration and storage options."""

    epochs: int
    val_split: float | None = None
    lr: float | None = None
    optimizer: Optimizer = "adam"
    adv_train: AttackMethod | None = None
    adv_eps: float = 8 / 255
    adv_steps: int = 7
    adv_alpha: float | None = None
    adv_weight: float = 0.5
    input_range: tuple[float, float] = (0.0, 1.0)
    calibration: Calibration = "minmax"
    percentile: float = 99.99
    calibration_samples: int = 512
    storage: Storage = "int8"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_split is not None and not 0.0 < self.val_split < 1.0:
            raise UsageError(f"{arg('val_split')} {self.val_split} must be a fraction between 0 and 1")
        self.training()

    def training(self) -> FinetuneSettings:
        """The stage's settings (finetune.FinetuneSettings), checked."""
        from ..finetune import FinetuneSettings

        return FinetuneSettings(
            epochs=self.epochs,
            learning_rate=self.lr,
            optimizer=self.optimizer,
            batch_size=self.batch_size,
            adversarial=self.training_attack(),
            adversarial_weight=self.adv_weight,
            seed=self.seed,
            calibration_samples=self.calibration_samples,
            calibration_method=self.calibration,
            percentile=self.percentile,
            storage=self.storage,
        )

    def training_attack(self) -> Any:
        """The attack of adversarial fine-tuning (PGD with a random start), or None."""
        from ..harness.attacks import Attack, InputRange, check_fraction

        if self.adv_train is None:
            return None
        value_range = InputRange(*self.input_range)
        eps = check_fraction(self.adv_eps, "adv_eps")
        if self.adv_train == "fgsm":
            return Attack.fgsm(eps, value_range)
        alpha = None if self.adv_alpha is None else check_fraction(self.adv_alpha, "adv_alpha")
        if self.adv_steps < 1:
            raise UsageError(f"{arg('adv_steps')} {self.adv_steps} must be at least 1")
        return Attack.pgd(eps, steps=self.adv_steps, alpha=alpha, random_start=True, input_range=value_range)


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned compiled model (the best epoch's), its plan, and the quanos-finetune
    document (docs/json.md; `output` is None until the model is saved)."""

    model: onnx.ModelProto
    plan: Plan
    document: Mapping[str, Any]
    inputs: tuple[Path, ...] = ()
    written: tuple[Path, ...] = ()

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write the model to the file `path` (atomically; never over an input file)."""
        from ..outputs import write_file

        return (write_file(check_model_output(path, self.inputs), self.model.SerializeToString(), self.inputs),)

    def summary_json(self) -> dict[str, Any]:
        """The quanos-finetune document with the written file as `output`."""
        return {**self.document, "output": str(self.written[0]) if self.written else None}

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
    model: ModelSource,
    data: DataSource,
    options: FinetuneOptions,
    *,
    plan: PlanSource | None = None,
    val: DataSource | None = None,
    save_to: str | os.PathLike[str] | None = None,
    progress: ProgressFactory = no_progress,
    on_epoch: Callable[[Any], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `model` at its plan and compile the best epoch.

    `model` is a float model (then `plan` is required) or a quanos-compile output, whose
    float graph and plan are recovered from it (`plan` overrides the stored plan).
    """
    from .. import __version__
    from ..errors import ModelError
    from ..finetune import compiled_plan, finetune, float_model_of
    from ..model import stamp_producer
    from ..plan import validate_plan
    from ..device import using_device
    from ..threads import using_threads

    inputs = input_paths(model, data, val, plan)
    if save_to is not None:
        check_model_output(save_to, inputs)
    if val is not None and options.val_split is not None:
        raise UsageError(f"{arg('val')} and {arg('val_split')} exclude each other")
    source = read_model(model, input_shape=options.input_shape)
    stored_plan = compiled_plan(source.proto)
    float_model = source.proto if stored_plan is None else float_model_of(source.proto)
    layers = list_layers(float_model)
    if not layers:
        raise ModelError(f"{source.name}: no quantizable layer to fine-tune")
    if plan is not None:
        given = read_plan_input(plan)
        chosen = validate_plan(given.plan, layers, given.name)
    elif stored_plan is not None:
        chosen = validate_plan(stored_plan, layers, f"{source.name} (stored plan)")
    else:
        raise UsageError(
            f"{arg('plan')} is required for a float model",
            hint="write one with `quanos-compile MODEL --data DATA` (or --bits K), or pass its compiled model",
        )
    with using_threads(options.threads), using_device(options.device):
        train, held_out = _finetune_data(data, val, options, float_model)
        check_data_range(options.input_range, train, attacked=options.adv_train is not None)
        result = finetune(float_model, chosen, train, options.training(), val=held_out, progress=progress, on_epoch=on_epoch)
    compiled = stamp_producer(result.model, __version__)
    document = {
        "format": "quanos-finetune",
        "version": 1,
        "model": source.name,
        "started_from": "float model" if stored_plan is None else "compiled model (dequantized weights)",
        "plan_method": result.plan.method,
        "data": {
            "train": f"{train.source} ({train.count} samples)",
            "val": None if held_out is None else f"{held_out.source} ({held_out.count} samples)",
        },
        **result.to_json(),
        "output": None,
    }
    finished = FinetuneResult(compiled, result.plan, document, tuple(inputs))
    return finished if save_to is None else replace(finished, written=finished.save(save_to))


def check_model_output(path: str | os.PathLike[str], inputs: Sequence[Path]) -> Path:
    """The output model file: not a folder, in a writable place, not an input."""
    from ..outputs import check_output_file

    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{arg('output')} {target}: is a directory; give the output model's file name (e.g. out.onnx)")
    return check_output_file(target, inputs)


def _finetune_data(
    data: DataSource, val: DataSource | None, options: FinetuneOptions, model: onnx.ModelProto
) -> tuple[Dataset, Dataset | None]:
    """Training data in a seeded shuffled order (so the calibration samples are a fair mix
    even for files sorted by class) and the validation data: `val`, `val_split` or none."""
    from ..data import Dataset, dataset_from
    from ..errors import DataError
    from ..model import input_spec, num_classes

    if data is None:
        raise UsageError(f"{arg('data')} is required: fine-tuning trains on it")
    train = load_data(data, options, model, shuffle=True)
    if val is not None:
        preprocessing = dict(layout=options.layout, scale=options.scale, mean=options.mean, std=options.std)
        return train, dataset_from(val, input_spec(model), num_classes=num_classes(model), argument="val", **preprocessing)
    if options.val_split is None:
        return train, None
    held_out = round(train.count * options.val_split)
    if held_out < 1 or held_out >= train.count:
        raise DataError(
            f"{arg('val_split')} {options.val_split} of {train.count} samples leaves no training or no validation data"
        )
    kept = train.count - held_out
    if train.y is None:
        raise DataError(f"{arg('data')} {train.source}: fine-tuning needs labels and the data has none")
    return (
        Dataset(train.x[:kept], train.y[:kept], train.source, f"{train.selection}, first {kept}"),
        Dataset(train.x[kept:], train.y[kept:], train.source, f"{train.selection}, last {held_out} (--val-split)"),
    )
