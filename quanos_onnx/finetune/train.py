"""Quantization-aware fine-tuning of a planned model, optionally adversarial.

The model trained is the fake-quant training graph (graph.training_graph) of the model the
compiler writes for the plan: weights on their k-bit grids with scales re-derived from the
current weights at every step, activations on the compiler's calibrated grids, straight-
through gradients everywhere. After every epoch the float weights are written back into
the float model and compiled again at the same plan and on the same calibration data
(activation ranges re-calibrated), the training graph takes that export's activation
grids, and the export is validated in onnxruntime. The result is the export of the best
epoch on the validation data (epoch 0, the post-hoc model, included), so what was
validated is byte for byte what is written.

Adversarial fine-tuning: every batch is attacked on the current fake-quant model (the
same twin that is being trained) and the loss is (1 - w) * CE(clean) + w * CE(attacked),
w = adversarial_weight (0.5 is Goodfellow et al.'s mix, 1.0 Madry et al.'s). PGD uses a
random start during training. The best epoch is then chosen by accuracy under the same
attack on the validation data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from ..data import Dataset
from ..errors import DataError, UsageError, arg
from ..harness.attacks import Attack, perturb, predictions
from ..harness.evaluate import evaluate
from ..layers import Layer, list_layers
from ..model import Runner, dynamic_batch
from ..progress import ProgressFactory, no_progress
from ..ptq import PtqSettings
from ..quantize import Quantized, quantize
from ..plan import Plan
from ..device import current_device, on_device
from ..twin import OnnxTwin, build_twin
from .graph import training_graph

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
DEFAULT_LEARNING_RATES = {"adam": 1e-4, "sgd": 1e-3}
"""Low enough for a pretrained model: Adam at 1e-3 took ResNet-20 at uniform 5 bits from 74%
to 27% validation accuracy in one epoch, 1e-4 to 79% (docs/finetune.md)."""
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class FinetuneSettings:
    """How to train; `adversarial` is the attack of adversarial fine-tuning (None: plain)."""

    epochs: int
    learning_rate: float | None = None
    optimizer: str = "adam"
    batch_size: int = 64
    adversarial: Attack | None = None
    adversarial_weight: float = 0.5
    seed: int = 0
    calibration_samples: int = 512
    calibration_method: str = "minmax"
    percentile: float = 99.99
    storage: str = "int8"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise UsageError(f"{arg('epochs')} {self.epochs!r} must be a whole number of at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"{arg('optimizer')} {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"{arg('lr')} {self.learning_rate} must be a positive finite number")
        if self.batch_size < 1:
            raise UsageError(f"{arg('batch_size')} {self.batch_size} must be at least 1")
        if not 0.0 < self.adversarial_weight <= 1.0:
            raise UsageError(f"{arg('adv_weight')} {self.adversarial_weight} must be in (0, 1]")
        if self.calibration_samples < 1:
            raise UsageError(f"{arg('calibration_samples')} {self.calibration_samples} must be at least 1")

    @property
    def rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.optimizer]

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "optimizer": self.optimizer,
            "learning_rate": self.rate,
            "batch_size": self.batch_size,
            "adversarial": None if self.adversarial is None else self.adversarial.to_json(),
            "adversarial_weight": self.adversarial_weight if self.adversarial is not None else None,
            "seed": self.seed,
            "calibration": {
                "samples": self.calibration_samples,
                "method": self.calibration_method,
                "percentile": self.percentile,
            },
            "storage": self.storage,
        }


@dataclass(frozen=True)
class EpochRecord:
    """One epoch (0: the post-hoc model before any training). Training figures come from the
    fake-quant twin during the epoch; validation figures from onnxruntime on the export."""

    epoch: int
    train_loss: float | None
    train_accuracy: float | None
    train_adversarial_accuracy: float | None
    val_accuracy: float | None
    val_adversarial_accuracy: float | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "train_adversarial_accuracy": self.train_adversarial_accuracy,
            "val_accuracy": self.val_accuracy,
            "val_adversarial_accuracy": self.val_adversarial_accuracy,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class RoundTrip:
    """The fine-tuned twin against onnxruntime on the written model, same inputs."""

    samples: int
    prediction_agreement: float
    max_abs_diff: float

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "prediction_agreement": self.prediction_agreement,
            "max_abs_diff": self.max_abs_diff,
        }


@dataclass(frozen=True)
class FinetuneResult:
    model: onnx.ModelProto
    """The compiled QDQ model of the best epoch (plan in its metadata, as quanos-compile's)."""
    plan: Plan
    history: tuple[EpochRecord, ...]
    best_epoch: int
    selected_by: str
    round_trip: RoundTrip
    settings: FinetuneSettings
    twin: OnnxTwin = field(repr=False)
    """The fake-quant training twin holding the best epoch's weights and activation grids."""

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_json(),
            "best_epoch": self.best_epoch,
            "selected_by": self.selected_by,
            "history": [record.to_json() for record in self.history],
            "round_trip": self.round_trip.to_json(),
        }


EpochCallback = Callable[[EpochRecord], None]


def finetune(
    float_model: onnx.ModelProto,
    plan: Plan,
    train: Dataset,
    settings: FinetuneSettings,
    *,
    val: Dataset | None = None,
    progress: ProgressFactory = no_progress,
    on_epoch: EpochCallback | None = None,
) -> FinetuneResult:
    """Fine-tune `float_model` (normalized, see model.load_model) at `plan`; see the module docstring.

    Calibration uses the first `settings.calibration_samples` of `train` in order, as
    quanos-compile does with its --data.
    """
    torch.manual_seed(settings.seed)
    _check_labelled(train, "data")
    if val is not None:
        _check_labelled(val, "val")
    layers = list_layers(float_model)
    calibration = _leading_batches(train, settings.calibration_samples, settings.batch_size)
    trainer = _Trainer(float_model, layers, plan, calibration, settings)
    history: list[EpochRecord] = []
    started = time.perf_counter()
    record = trainer.validate(0, val, started)
    history.append(record)
    if on_epoch is not None:
        on_epoch(record)
    best = _Checkpoint(record, trainer.export, trainer.weights())
    rng = np.random.default_rng(settings.seed)
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        with progress(f"epoch {epoch}/{settings.epochs}", train.count) as advance:
            totals = trainer.train_epoch(epoch, train, rng, advance)
        trainer.recompile()
        record = trainer.validate(epoch, val, started, totals)
        if record.train_loss is not None and not math.isfinite(record.train_loss):
            raise UsageError(
                f"--lr {settings.rate:g}: training diverged (loss {record.train_loss} in epoch {epoch})",
                hint="lower --lr; nothing was written",
            )
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val is None or _score(record, settings) > _score(best.record, settings):
            best = _Checkpoint(record, trainer.export, trainer.weights())
    trainer.restore(best)
    round_trip = trainer.round_trip(val if val is not None else train)
    selected_by = "last epoch (no --val)" if val is None else _score_name(settings)
    final_plan = trainer.export.plan.with_details(
        finetune={**settings.to_json(), "best_epoch": best.record.epoch, "selected_by": selected_by}
    )
    return FinetuneResult(
        model=_with_plan(best.export.model, final_plan),
        plan=final_plan,
        history=tuple(history),
        best_epoch=best.record.epoch,
        selected_by=selected_by,
        round_trip=round_trip,
        settings=settings,
        twin=trainer.twin,
    )


@dataclass(frozen=True)
class _Checkpoint:
    record: EpochRecord
    export: Quantized
    weights: Mapping[str, np.ndarray]


@dataclass
class _Totals:
    loss: float = 0.0
    correct: int = 0
    adversarial_correct: int = 0
    samples: int = 0


class _Trainer:
    """The twin, its optimizer and the current export, kept in step with one another."""

    def __init__(
        self,
        float_model: onnx.ModelProto,
        layers: Sequence[Layer],
        plan: Plan,
        calibration: Sequence[np.ndarray],
        settings: FinetuneSettings,
    ) -> None:
        self.float_model = float_model
        self.layers = layers
        self.calibration = calibration
        self.settings = settings
        self.export = self._compile(float_model, plan)
        self.plan = self.export.plan
        self.twin = self._twin(float_model)
        self.trained = _trained_names(layers, self.twin.parameters_by_name())
        self.optimizer = self._optimizer()

    def _compile(self, float_model: onnx.ModelProto, plan: Plan) -> Quantized:
        settings = self.settings
        return quantize(
            float_model,
            plan,
            self.calibration,
            layers=self.layers,
            storage=settings.storage,
            ptq=self.plain_ptq(),
        )

    def plain_ptq(self) -> PtqSettings:
        """Round-to-nearest absmax weights, no bias correction: the training graph
        (finetune/graph.py) quantizes the float weights this way at every step, so the
        compiled model is exactly the function that was trained."""
        return PtqSettings(
            act_range=self.settings.calibration_method,  # type: ignore[arg-type]
            percentile=self.settings.percentile,
            weight_clipping="absmax",
            bias_correction=False,
        )

    def _twin(self, float_model: onnx.ModelProto) -> OnnxTwin:
        """The twin of the current export's training graph, holding `float_model`'s weights."""
        batch_free, _ = dynamic_batch(self.export.model)
        return build_twin(training_graph(batch_free, float_model, self.layers, self.plan)).to(current_device())

    def _optimizer(self) -> torch.optim.Optimizer:
        parameters = self.twin.parameters_by_name()
        trainable = [parameters[name].requires_grad_(True) for name in self.trained]
        if self.settings.optimizer == "adam":
            return torch.optim.Adam(trainable, lr=self.settings.rate)
        return torch.optim.SGD(trainable, lr=self.settings.rate, momentum=SGD_MOMENTUM)

    def weights(self) -> dict[str, np.ndarray]:
        parameters = self.twin.parameters_by_name()
        return {name: parameters[name].detach().cpu().numpy().copy() for name in self.trained}

    def train_epoch(
        self, epoch: int, train: Dataset, rng: np.random.Generator, advance: Callable[[int], None]
    ) -> _Totals:
        totals = _Totals()
        attack = self.settings.adversarial
        weight = self.settings.adversarial_weight
        order = rng.permutation(train.count)
        for start in range(0, train.count, self.settings.batch_size):
            self._set_learning_rate(epoch - 1 + start / train.count)
            picked = np.sort(order[start : start + self.settings.batch_size])
            x = np.asarray(train.x[picked], dtype=np.float32)
            y = np.asarray(train.y[picked], dtype=np.int64)
            targets = on_device(torch.from_numpy(y))
            if attack is None:
                logits = self.twin(on_device(torch.from_numpy(x))).reshape(len(x), -1)
                loss = torch.nn.functional.cross_entropy(logits, targets)
            else:
                attacked = perturb(self.twin, x, y, attack, rng=rng)
                both = self.twin(on_device(torch.from_numpy(np.concatenate([x, attacked])))).reshape(2 * len(x), -1)
                logits, attacked_logits = both[: len(x)], both[len(x) :]
                loss = (1 - weight) * torch.nn.functional.cross_entropy(logits, targets) + weight * torch.nn.functional.cross_entropy(attacked_logits, targets)
                totals.adversarial_correct += int((attacked_logits.argmax(1) == targets).sum())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            totals.loss += float(loss.detach()) * len(x)
            totals.correct += int((logits.argmax(1) == targets).sum())
            totals.samples += len(x)
            advance(len(x))
        return totals

    def _set_learning_rate(self, progress: float) -> None:
        """Cosine decay from the set rate to 0 over all epochs (`progress` in epochs done)."""
        rate = 0.5 * self.settings.rate * (1.0 + math.cos(math.pi * progress / self.settings.epochs))
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def recompile(self) -> None:
        """Compile the current weights at the plan (re-calibrating activation ranges) and move
        training onto that export's twin, optimizer state included."""
        updated = with_weights(self.float_model, self.weights())
        self.export = self._compile(updated, self.plan)
        state = self.optimizer.state_dict()
        self.twin = self._twin(updated)
        self.optimizer = self._optimizer()
        self.optimizer.load_state_dict(state)

    def restore(self, checkpoint: _Checkpoint) -> None:
        self.export = checkpoint.export
        self.twin = self._twin(with_weights(self.float_model, checkpoint.weights))

    def validate(self, epoch: int, val: Dataset | None, started: float, totals: _Totals | None = None) -> EpochRecord:
        clean = adversarial = None
        if val is not None:
            attacks = [] if self.settings.adversarial is None else [_validation_attack(self.settings.adversarial)]
            batches = val.batches(self.settings.batch_size)
            evaluation = evaluate(self.export.model, batches, attacks, twin=self.twin, seed=self.settings.seed)
            clean = evaluation.clean_accuracy
            adversarial = evaluation.attacks[0].accuracy if evaluation.attacks else None
        trained = totals is not None and totals.samples > 0
        record = EpochRecord(
            epoch=epoch,
            train_loss=totals.loss / totals.samples if trained else None,
            train_accuracy=totals.correct / totals.samples if trained else None,
            train_adversarial_accuracy=(
                totals.adversarial_correct / totals.samples if trained and self.settings.adversarial else None
            ),
            val_accuracy=clean,
            val_adversarial_accuracy=adversarial,
            seconds=time.perf_counter() - started,
        )
        log.info("epoch %s", record.to_json())
        return record

    def round_trip(self, data: Dataset) -> RoundTrip:
        runner = Runner(self.export.model)
        agree = samples = 0
        max_diff = 0.0
        with torch.no_grad():
            for x, _ in data.batches(self.settings.batch_size):
                (expected,) = runner.run(x)
                got = self.twin(on_device(torch.from_numpy(np.array(x, dtype=np.float32)))).cpu().numpy()
                agree += int((predictions(got) == predictions(expected)).sum())
                max_diff = max(max_diff, float(np.max(np.abs(got.reshape(expected.shape) - expected))))
                samples += len(x)
        return RoundTrip(samples, agree / samples, max_diff)


def _validation_attack(attack: Attack) -> Attack:
    """The training attack without its random start, so validation is deterministic."""
    if attack.method == "pgd":
        return Attack.pgd(attack.eps, steps=attack.steps, alpha=attack.alpha, input_range=attack.input_range)
    return attack


def _trained_names(layers: Sequence[Layer], parameters: Mapping[str, torch.nn.Parameter]) -> list[str]:
    """Every layer's weight and bias (float-kept layers too); nothing else is trained."""
    names: list[str] = []
    for layer in layers:
        for name in (layer.weight, layer.bias):
            if name and name in parameters and name not in names:
                names.append(name)
    return names


def _score(record: EpochRecord, settings: FinetuneSettings) -> float:
    value = record.val_adversarial_accuracy if settings.adversarial is not None else record.val_accuracy
    return -1.0 if value is None else value


def _score_name(settings: FinetuneSettings) -> str:
    return "val_adversarial_accuracy" if settings.adversarial is not None else "val_accuracy"


def with_weights(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the model whose named initializers hold the given arrays (same shapes)."""
    updated = onnx.ModelProto()
    updated.CopyFrom(model)
    for tensor in updated.graph.initializer:
        array = weights.get(tensor.name)
        if array is None:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.asarray(array, dtype=dtype), tensor.name))
    return updated


def _with_plan(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    from ..passes.qdq import PLAN_METADATA_KEY

    updated = onnx.ModelProto()
    updated.CopyFrom(model)
    for entry in updated.metadata_props:
        if entry.key == PLAN_METADATA_KEY:
            entry.value = plan.dumps()
    return updated


def _check_labelled(dataset: Dataset, option: str) -> None:
    if dataset.y is None:
        raise DataError(f"{arg(option)} {dataset.source}: fine-tuning needs labels and the data has none")
    if dataset.count == 0:
        raise DataError(f"{arg(option)} {dataset.source}: no samples")



def _leading_batches(dataset: Dataset, count: int, batch_size: int) -> list[np.ndarray]:
    """The first `count` inputs in order, in batches (what quanos-compile calibrates on)."""
    end = min(count, dataset.count)
    return [np.asarray(dataset.x[start : min(start + batch_size, end)]) for start in range(0, end, batch_size)]
