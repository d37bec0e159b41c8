"""Verification: what the compiled model does, next to the float model and uniform models.

A compile is only useful if its artifact is still a good model. This stage measures the
written model on an evaluation part of the data that calibration, ANS and any search never
saw, and puts it beside

- the float model it came from,
- uniform k-bit at the plan's parameter-weighted average (nearest integer): the same size,
- uniform 8-bit, the safe default a deployment engineer would otherwise ship,

the uniform models calibrated and quantized exactly as the compiled one (the caller passes
the one function that does it). Clean top-1 is counted by onnxruntime on the whole
evaluation part; robust accuracy under each attack (white-box through each model's twin,
fake-quant for QDQ models, counted by onnxruntime) on its first `robust_samples`, of which
only those classified correctly are attacked, each until its first iterate that fools the
twin (harness.evaluate's `until_fooled`). Beside
each accuracy sit the model's weight memory and energy per image (hwmodel/).

Without labels in the data, the labels are the float model's clean predictions, so every
accuracy is agreement with the float model (and the float model's clean figure is 100%).

The guard compares clean accuracy against float in percentage points, with a paired 95%
interval of the drop; the warnings say what a user must know before shipping the artifact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .errors import UsageError, arg
from .harness.attacks import METHODS, Attack, InputRange
from .harness.evaluate import AttackAccuracy, Evaluation, evaluate
from .layers import Layer, list_layers
from .model import Runner, output_names
from .plan import MAX_BITS, MIN_BITS, Plan, with_act_bits
from .progress import ProgressFactory, no_progress

if TYPE_CHECKING:
    from .data import Dataset

DEFAULT_MAX_ACCURACY_DROP = 1.0
"""Points of clean accuracy the compiled model may lose against float (`--max-accuracy-drop`)."""
DEFAULT_ROBUST_SAMPLES = 64
"""Evaluation samples attacked per model (`--eval-samples`); clean accuracy uses them all.
One batch: with four models under two attacks it keeps verification within the time of the
compile itself on ResNet-20 (docs/benchmarks.md)."""
DEFAULT_EVAL_ATTACKS = "fgsm,pgd"
EVAL_PGD_STEPS = 7
"""PGD steps of the verification attack: the paper's evaluation setting (Section IV)."""
INTEGER_KERNEL_BITS = 8
"""Widest layer onnxruntime runs on its integer kernels (QLinearConv, MatMulInteger)."""

EXACT_KERNELS = (("session.x64quantprecision", "1"),)
"""The onnxruntime session entry under which its u8 x s8 kernels are exact on x86 CPUs
without VNNI (docs/quantization.md, "8-bit layers on x86 CPUs without VNNI")."""

LABELS_FROM_DATA = "data"
LABELS_FROM_FLOAT = "float model"

Quantizer = Callable[[Plan], onnx.ModelProto]
"""A plan -> its QDQ model, calibrated and quantized as the compile did it."""


@dataclass(frozen=True)
class VerifySettings:
    """How the artifact is checked; `max_accuracy_drop` None turns the guard off."""

    attacks: tuple[Attack, ...]
    robust_samples: int = DEFAULT_ROBUST_SAMPLES
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.robust_samples < 1:
            raise UsageError(f"{arg('eval_samples')} {self.robust_samples} must be at least 1")
        if self.max_accuracy_drop is not None and not (
            math.isfinite(self.max_accuracy_drop) and self.max_accuracy_drop >= 0
        ):
            raise UsageError(
                f"{arg('max_accuracy_drop')} {self.max_accuracy_drop} must be a non-negative number of points, or none"
            )


@dataclass(frozen=True)
class ModelRow:
    """One model of the comparison: its accuracies and what it costs."""

    name: str
    kind: str
    """'compiled', 'float' or 'uniform'."""
    average_weight_bits: float
    clean_accuracy: float
    attacks: tuple[AttackAccuracy, ...]
    robust_clean_accuracy: float
    """Clean accuracy on the attacked subset, the reference for its adversarial loss."""
    weight_memory_bits: int
    energy_pj: Mapping[str, float]
    """Energy per image on each hardware profile, by profile name."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "average_weight_bits": round(self.average_weight_bits, 4),
            "clean_accuracy": self.clean_accuracy,
            "robust_clean_accuracy": self.robust_clean_accuracy,
            "attacks": [result.to_json() for result in self.attacks],
            "weight_memory_bits": self.weight_memory_bits,
            "energy_pj": dict(self.energy_pj),
        }


@dataclass(frozen=True)
class Guard:
    """Clean accuracy of the compiled model against float, in percentage points."""

    max_accuracy_drop: float | None
    accuracy_drop: float
    """float - compiled, points (negative when the compiled model is more accurate)."""
    interval: tuple[float, float]
    """95% interval of `accuracy_drop` (paired_drop_interval). The guard judges the measured
    drop; the interval says how far the same model could measure on other samples (on 256
    ImageNet images, 2-4 points either way), which a user weighing a failed guard needs."""

    @property
    def enabled(self) -> bool:
        return self.max_accuracy_drop is not None

    @property
    def passed(self) -> bool:
        return self.max_accuracy_drop is None or self.accuracy_drop <= self.max_accuracy_drop + 1e-9

    def to_json(self) -> dict[str, Any]:
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "accuracy_drop": round(self.accuracy_drop, 4),
            "accuracy_drop_interval": [round(bound, 4) for bound in self.interval],
            "passed": self.passed,
        }


def paired_drop_interval(reference: np.ndarray, compared: np.ndarray) -> tuple[float, float]:
    """95% interval, in points, of the accuracy of `reference` minus that of `compared`, from
    their outcomes (correct or not) on the same samples.

    Only the samples on which exactly one model is right carry the difference: b where only
    the reference is, c where only the compared one is, so the drop is (b - c) / n. The
    interval is Bonett and Price's adjusted Wald interval for paired proportions (2012): with
    p_b = (b + 1) / (n + 2) and p_c = (c + 1) / (n + 2), (p_b - p_c) +/- z sqrt((p_b + p_c -
    (p_b - p_c)^2) / (n + 2)). Pairing is what makes it narrow: the two models agree on most
    samples, and independent intervals of each accuracy would count those samples' noise
    twice. Chosen over the interval conditional on b + c (Wilson's for b of b + c, behind
    McNemar's test), which covered a true 3-point drop on 256 samples only 92% of the time
    (tests/test_verify.py) and is empty of width when the models never disagree.
    """
    from .harness.robustness import CONFIDENCE

    reference, compared = np.asarray(reference, bool), np.asarray(compared, bool)
    if reference.shape != compared.shape or reference.ndim != 1 or len(reference) == 0:
        raise ValueError(f"outcomes of shapes {reference.shape} and {compared.shape} are not paired samples")
    total = len(reference) + 2
    only_reference = (np.count_nonzero(reference & ~compared) + 1) / total
    only_compared = (np.count_nonzero(compared & ~reference) + 1) / total
    difference = only_reference - only_compared
    z = float(NormalDist().inv_cdf(0.5 + CONFIDENCE / 2))
    half = z * math.sqrt(max(only_reference + only_compared - difference**2, 0.0) / total)
    return float(100 * (difference - half)), float(100 * (difference + half))


@dataclass(frozen=True)
class Verification:
    """The compiled model (first row), float and uniform rows, the guard and the warnings."""

    source: str
    selection: str
    samples: int
    robust_samples: int
    labels: str
    attacks: tuple[Attack, ...]
    rows: tuple[ModelRow, ...]
    guard: Guard
    warnings: tuple[str, ...]

    @property
    def compiled(self) -> ModelRow:
        return self.rows[0]

    @property
    def float_row(self) -> ModelRow:
        return next(row for row in self.rows if row.kind == "float")

    @property
    def uniform_rows(self) -> tuple[ModelRow, ...]:
        return tuple(row for row in self.rows if row.kind == "uniform")

    @property
    def passed(self) -> bool:
        return self.guard.passed

    def headline(self) -> str:
        """'compiled: clean 91.2% (float 91.6%, uniform 4: 66.3%, uniform 8: 91.3%); PGD-7 ...'."""
        from .report.content import verification_headline

        return verification_headline(self.to_json())

    def guard_line(self) -> str:
        """One line for a guard that broke: the drop, the limit, and what to try."""
        metric = "agreement with the float model" if self.labels == LABELS_FROM_FLOAT else "clean accuracy"
        return (
            f"accuracy guard: the compiled model's {metric} is {_percent(self.compiled.clean_accuracy)}, "
            f"{self.guard.accuracy_drop:.1f} points below float ({_percent(self.float_row.clean_accuracy)}) on "
            f"{self.samples} evaluation samples (95% interval of the drop: {self.guard.interval[0]:.1f} to "
            f"{self.guard.interval[1]:.1f} points); --max-accuracy-drop is {self.guard.max_accuracy_drop:g}. "
            "The outputs were written for inspection and marked as failing the guard "
            "(hint: give more bits, e.g. --budget avg-bits=8 or --bits 8, or --max-accuracy-drop none to accept it)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "data": {
                "source": self.source,
                "selection": self.selection,
                "samples": self.samples,
                "robust_samples": self.robust_samples,
            },
            "labels": self.labels,
            "attacks": [attack.to_json() for attack in self.attacks],
            "models": [row.to_json() for row in self.rows],
            "guard": self.guard.to_json(),
            "warnings": list(self.warnings),
        }


def evaluation_attacks(methods: str, eps: float, input_range: InputRange | None = None) -> tuple[Attack, ...]:
    """`--eval-attacks fgsm,pgd` (or `none`) at the ANS eps; PGD takes EVAL_PGD_STEPS steps."""
    names = [name.strip().lower() for name in methods.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise UsageError(f"{arg('eval_attacks')} {methods!r} is not a list of {', '.join(METHODS)}, or none")
    input_range = input_range or InputRange()
    return tuple(
        Attack.fgsm(eps, input_range) if name == "fgsm" else Attack.pgd(eps, steps=EVAL_PGD_STEPS, input_range=input_range)
        for name in dict.fromkeys(names)
    )


def parse_max_accuracy_drop(text: str | float | None) -> float | None:
    """`--max-accuracy-drop 1.0` (points) or `none` (no guard)."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{arg('max_accuracy_drop')} {text!r} is not a number of points or 'none'") from None
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{arg('max_accuracy_drop')} {text} must be a non-negative number of points, or none")
    return value


def uniform_bits_near(plan: Plan, layers: Sequence[Layer]) -> int | None:
    """The plan's parameter-weighted average weight bits, rounded half up to an integer
    within MIN_BITS..MAX_BITS; None when no layer is quantized."""
    if not any(entry.quantized for entry in plan.layers):
        return None
    average = plan.average_weight_bits(_params(layers))
    return min(MAX_BITS, max(MIN_BITS, math.floor(average + 0.5)))


def verify(
    float_model: onnx.ModelProto,
    compiled: onnx.ModelProto,
    plan: Plan,
    quantize_plan: Quantizer,
    evaluation: Dataset,
    settings: VerifySettings,
    *,
    layers: Sequence[Layer] | None = None,
    progress: ProgressFactory = no_progress,
) -> Verification:
    """Evaluate the compiled model, the float model and the uniform models on `evaluation`."""
    from .hwmodel.energy import uniform_baseline

    layers = list_layers(float_model) if layers is None else layers
    labels, labels_from = _labels(float_model, evaluation, settings.batch_size)
    robust = min(settings.robust_samples, evaluation.count)
    candidates: list[tuple[str, str, onnx.ModelProto, Plan | None]] = [
        ("compiled", "compiled", compiled, plan),
        ("float", "float", float_model, None),
    ]
    near = uniform_bits_near(plan, layers)
    act_bits = plan.details.get("act_bits", {}).get("bits")
    for bits in dict.fromkeys(b for b in (near, INTEGER_KERNEL_BITS) if b is not None):
        # A plan whose activations are all at one width is compared with uniform weights at that width too.
        uniform = uniform_baseline(layers, plan, bits)
        if act_bits is not None:
            uniform = with_act_bits(uniform, act_bits)
        model = compiled if _same_bits(uniform, plan) else quantize_plan(uniform)
        candidates.append((uniform_name(bits, act_bits), "uniform", model, uniform))
    measured: dict[int, tuple[Evaluation, Evaluation | None]] = {}
    rows = []
    for name, kind, model, model_plan in candidates:
        if id(model) not in measured:
            measured[id(model)] = _accuracies(model, evaluation.x, labels, robust, settings, name, progress)
        clean, attacked = measured[id(model)]
        rows.append(_row(name, kind, model_plan, layers, clean.clean_accuracy, attacked))
    guard = Guard(
        settings.max_accuracy_drop,
        100 * (rows[1].clean_accuracy - rows[0].clean_accuracy),
        paired_drop_interval(measured[id(float_model)][0].clean_outcomes, measured[id(compiled)][0].clean_outcomes),
    )
    return Verification(
        source=evaluation.source,
        selection=evaluation.selection,
        samples=evaluation.count,
        robust_samples=robust,
        labels=labels_from,
        attacks=settings.attacks,
        rows=tuple(rows),
        guard=guard,
        warnings=tuple(
            comparison_warnings(rows)
            + kernel_warnings(plan)
            + saturation_warnings(compiled, plan, evaluation.x, labels, rows[0].clean_accuracy, settings.batch_size)
        ),
    )


def uniform_name(bits: int, act_bits: int | None = None) -> str:
    """'uniform 4', or 'uniform 4 (activations 8)' for uniform weights under other activation bits."""
    return f"uniform {bits}" if act_bits is None or act_bits == bits else f"uniform {bits} (activations {act_bits})"


def measure_plans(
    float_model: onnx.ModelProto,
    plans: Sequence[tuple[str, str, Plan]],
    quantize_plan: Quantizer,
    evaluation: Dataset,
    settings: VerifySettings,
    *,
    layers: Sequence[Layer] | None = None,
    progress: ProgressFactory = no_progress,
) -> list[ModelRow]:
    """(name, kind, plan) -> each plan's written model measured as verify measures the
    compiled one (clean on all of `evaluation`, the attacks on its first samples)."""
    layers = list_layers(float_model) if layers is None else layers
    labels, _ = _labels(float_model, evaluation, settings.batch_size)
    robust = min(settings.robust_samples, evaluation.count)
    rows = []
    for name, kind, plan in plans:
        clean, attacked = _accuracies(quantize_plan(plan), evaluation.x, labels, robust, settings, name, progress)
        rows.append(_row(name, kind, plan, layers, clean.clean_accuracy, attacked))
    return rows


def comparison_warnings(rows: Sequence[ModelRow]) -> list[str]:
    """The compiled model (rows[0]) against the uniform rows: less accurate than uniform of
    about its size; dearer than uniform 8-bit (memory, or energy on a profile) and no better.

    A uniform row that is the compiled model itself has equal figures and never warns.
    """
    compiled = rows[0]
    same_size = math.floor(compiled.average_weight_bits + 0.5)
    warnings = []
    for row in rows[1:]:
        if row.kind != "uniform":
            continue
        bits = int(row.name.split()[1])
        if bits == same_size and compiled.clean_accuracy < row.clean_accuracy:
            warnings.append(
                f"the compiled model ({compiled.average_weight_bits:.2f} average bits) is less accurate than "
                f"uniform {bits}-bit of about its size: clean {_percent(compiled.clean_accuracy)} against "
                f"{_percent(row.clean_accuracy)}"
            )
        dearer = _dearer(compiled, row)
        if bits == INTEGER_KERNEL_BITS and dearer and compiled.clean_accuracy <= row.clean_accuracy:
            warnings.append(
                f"the compiled model costs more than uniform 8-bit ({', '.join(dearer)}) without being more "
                f"accurate (clean {_percent(compiled.clean_accuracy)} against {_percent(row.clean_accuracy)})"
            )
    return warnings


def kernel_warnings(plan: Plan) -> list[str]:
    """Layers above 8 bits run outside onnxruntime's integer kernels (int16 Q/DQ around a
    float Conv), so the model is slower than an int8 one; needs no evaluation."""
    wide = [
        entry.name
        for entry in plan.layers
        if entry.quantized and max(entry.weight_bits or 0, entry.act_bits or 0) > INTEGER_KERNEL_BITS
    ]
    if not wide:
        return []
    shown = ", ".join(wide[:3]) + (f" and {len(wide) - 3} more" if len(wide) > 3 else "")
    return [
        f"{len(wide)} layer(s) above {INTEGER_KERNEL_BITS} bits ({shown}) leave onnxruntime's integer kernels "
        "and run as float convolutions between int16 Q/DQ: expect the model to be slower than an int8 one"
    ]


def saturation_warnings(
    compiled: onnx.ModelProto, plan: Plan, x: np.ndarray, labels: np.ndarray, clean_here: float, batch_size: int
) -> list[str]:
    """On an x86 CPU without VNNI, onnxruntime's default kernels add u8 x s8 products in
    int16 pairs with saturation, so layers with 8-bit weights compute differently here than
    on a VNNI or ARM CPU (EfficientNet-Lite0 at W8A8: 3.5 points lower here). The measured
    accuracy is this machine's; when exact kernels score differently on the same data, the
    user must know before shipping, and what to do about it."""
    from .twin.fusion import pair_saturation

    saturation = pair_saturation()
    eight_bit = [e.name for e in plan.layers if e.quantized and e.weight_bits == INTEGER_KERNEL_BITS]
    if not (saturation.conv or saturation.gemm) or not eight_bit:
        return []
    runner = Runner(compiled, config=EXACT_KERNELS)
    name = output_names(compiled)[0]
    correct = 0
    for batch, batch_labels in _batches(x, labels, batch_size):
        predictions = runner.run(batch, [name])[0].reshape(len(batch), -1).argmax(axis=1)
        correct += int(np.sum(predictions == batch_labels))
    exact = correct / max(len(x), 1)
    if exact == clean_here:
        return []
    return [
        f"this CPU's onnxruntime adds u8 x s8 products in int16 pairs with saturation (AVX2 without VNNI), so the "
        f"{len(eight_bit)} layer(s) with 8-bit weights compute differently here: clean {_percent(clean_here)} here, "
        f"{_percent(exact)} with exact kernels (session option session.x64quantprecision=1, or a CPU with VNNI or "
        "ARM); deploy with that option, or give those layers 7-bit weights (docs/quantization.md)"
    ]


def _dearer(compiled: ModelRow, uniform8: ModelRow) -> list[str]:
    dearer = []
    if compiled.weight_memory_bits > uniform8.weight_memory_bits:
        dearer.append(f"{compiled.weight_memory_bits / uniform8.weight_memory_bits:.2f}x the weight memory")
    for profile, energy in compiled.energy_pj.items():
        reference = uniform8.energy_pj.get(profile)
        if reference and energy > reference * (1 + 1e-9):
            dearer.append(f"{energy / reference:.2f}x the energy on {profile}")
    return dearer


def _same_bits(uniform: Plan, plan: Plan) -> bool:
    """Whether the plan already is this uniform plan (then its model is reused, not rebuilt)."""
    mine = {e.name: (e.weight_bits, e.act_bits, e.keep_float) for e in plan.layers}
    return all(mine.get(e.name) == (e.weight_bits, e.act_bits, e.keep_float) for e in uniform.layers)


def _labels(model: onnx.ModelProto, data: Dataset, batch_size: int) -> tuple[np.ndarray, str]:
    """The data's labels, or else the float model's clean predictions (agreement with float)."""
    if data.y is not None:
        return np.asarray(data.y, np.int64), LABELS_FROM_DATA
    runner = Runner(model)
    name = output_names(model)[0]
    predictions = [
        runner.run(x, [name])[0].reshape(len(x), -1).argmax(axis=1) for x, _ in data.batches(batch_size)
    ]
    return np.concatenate(predictions).astype(np.int64), LABELS_FROM_FLOAT


def _accuracies(
    model: onnx.ModelProto,
    x: np.ndarray,
    labels: np.ndarray,
    robust: int,
    settings: VerifySettings,
    name: str,
    progress: ProgressFactory,
) -> tuple[Evaluation, Evaluation | None]:
    """The clean evaluation of every sample, then the attacks' on the first `robust`."""
    with progress(f"verify {name}: clean", len(x)) as advance:
        clean = evaluate(model, _batches(x, labels, settings.batch_size), (), progress=advance)
    with progress(f"verify {name}: {len(settings.attacks)} attack(s)", robust) as advance:
        attacked = evaluate(
            model, _batches(x[:robust], labels[:robust], settings.batch_size), settings.attacks,
            seed=settings.seed, progress=advance, until_fooled=True,
        ) if settings.attacks else None
    return clean, attacked


def _row(
    name: str, kind: str, plan: Plan | None, layers: Sequence[Layer], clean: float, attacked: Any
) -> ModelRow:
    from .hwmodel import builtin_profiles, estimate
    from .hwmodel.energy import FLOAT_BITS

    estimates = {profile.name: estimate(layers, plan, profile) for profile in builtin_profiles()}
    first = next(iter(estimates.values()))
    return ModelRow(
        name=name,
        kind=kind,
        average_weight_bits=float(FLOAT_BITS) if plan is None else plan.average_weight_bits(_params(layers)),
        clean_accuracy=clean,
        attacks=() if attacked is None else attacked.attacks,
        robust_clean_accuracy=clean if attacked is None else attacked.clean_accuracy,
        weight_memory_bits=first.weight_memory_bits,
        energy_pj={profile: result.energy_pj for profile, result in estimates.items()},
    )


def _batches(x: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(x), batch_size):
        yield np.asarray(x[start : start + batch_size]), labels[start : start + batch_size]


def _params(layers: Sequence[Layer]) -> dict[str, int]:
    return {layer.name: layer.params for layer in layers}


def _name(row: ModelRow) -> str:
    return row.name if row.kind != "uniform" else f"{row.name}:"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"
