"""quanos-onnx: QUANOS hybrid quantization as a post-hoc ONNX compiler.

The Python API (docs/api.md), one function per command of the CLI:

    import quanos_onnx as qn
    result = qn.compile("model.onnx", (x, y), bits=8)   # result.model is an onnx.ModelProto
    result.save("out")                                  # the files `quanos-compile -o out` writes

`model` is a path or an onnx.ModelProto; `data` a path (any format the CLI reads), numpy
arrays `(x, y)` or `x` alone, an iterable of `(x, y)` batches (a torch DataLoader) or an
onnxruntime.quantization CalibrationDataReader. Options are typed keyword arguments; each
command's options dataclass (quanos_onnx.commands.<command>) checks them. Failures raise
the QuanosError subclasses below, naming the argument at fault.

Nothing heavy is imported here: each function imports its command when called, so
`import quanos_onnx` costs no torch, onnxruntime or matplotlib.

`qn.finetune`, `qn.export` and `qn.layers` are the API functions; the stages of the same
name are imported by module path (`from quanos_onnx.finetune import apply_plan`).
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .errors import (
    DataError,
    ModelError,
    OutputError,
    ParityError,
    PlanError,
    ProfileError,
    QuanosError,
    UnsupportedOpError,
    UsageError,
)
from .progress import ProgressFactory, no_progress
from .threads import DEFAULT_THREADS

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .allocate.solve import RobustnessSignal
    from .commands.analyze import AnalyzeResult, AnalyzeResults
    from .commands.compile import CompileResult
    from .commands.energy import EnergyResult
    from .commands.evaluate import EvaluateResult
    from .commands.export import ExportResult
    from .commands.finetune import FinetuneResult
    from .commands.layers import LayersResult
    from .commands.options import (
        AttackMethod,
        AuditMethod,
        Calibration,
        ChannelOrder,
        Device,
        DataSource,
        ExportTarget,
        Layout,
        ModelSource,
        Optimizer,
        PlanSource,
        Rounding,
        Storage,
        WeightClipping,
    )
    from .finetune.train import EpochRecord


def compile(
    model: ModelSource,
    data: DataSource,
    *,
    plan: PlanSource | None = None,
    bits: int | None = None,
    quantize_output: bool = False,
    first_last_bits: int | None = None,
    input_bits: int | None = None,
    act_bits: int | None = None,
    join_operand_bits: int | Literal["auto"] | None = "auto",
    calibration: Calibration = "auto",
    percentile: float = 99.99,
    weight_clipping: WeightClipping = "output",
    bias_correction: bool = True,
    equalize: bool = False,
    rounding: Rounding = "nearest",
    rounding_iterations: int = 500,
    calibration_samples: int = 512,
    storage: Storage = "int8",
    k_init: int = 16,
    k_min: int = 2,
    rounds: int = 1,
    target_avg_bits: float | None = None,
    method: Literal["eqn3", "milp"] = "milp",
    budget: str | None = None,
    ans_weight: float = 0.25,
    robustness_signal: RobustnessSignal = "ans",
    sensitivity: Literal["auto", "kl", "mse", "fisher"] = "auto",
    sensitivity_samples: int = 256,
    max_bits: int = 8,
    pareto: bool = False,
    attack: AttackMethod = "fgsm",
    eps: float = 0.05,
    pgd_steps: int = 10,
    pgd_alpha: float | None = None,
    samples: int | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
    layout: Layout = "auto",
    scale: float | None = None,
    mean: float | tuple[float, ...] | None = None,
    std: float | tuple[float, ...] | None = None,
    data_range: tuple[int | None, int | None] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    threads: int | None = DEFAULT_THREADS,
    evaluate: bool = True,
    eval_data: DataSource | None = None,
    eval_fraction: float = 0.2,
    eval_attacks: tuple[AttackMethod, ...] = ("fgsm", "pgd"),
    eval_samples: int = 64,
    max_accuracy_drop: float | None = 1.0,
    input_shape: tuple[int, ...] | None = None,
    labels: str | os.PathLike[str] | None = None,
    label_offset: int = 0,
    resize: int | None = None,
    crop: int | tuple[int, int] | None = None,
    channel_order: ChannelOrder = "rgb",
    device: Device = "cpu",
    ray: str | None = None,
    figures: bool = True,
    progress: ProgressFactory = no_progress,
) -> CompileResult:
    """Compile `model` into a mixed-precision QDQ model: QUANOS (ANS of `attack` at `eps`,
    then by default `method="milp"`: measured per-layer cost of bits `k_min`..`max_bits`
    and an exact integer program, ANS (or the Lipschitz bounds, `robustness_signal`) weighted
    by `ans_weight`, under `budget` or, without
    one, the smallest plan within `max_accuracy_drop` of float on the samples after
    calibration; or `method="eqn3"`: Eqn 3 from `k_init`, floor `k_min`), or uniform
    `bits`, or a given `plan`.

    The grids come from the PTQ stack (docs/quantization.md): activation ranges by
    `calibration` ("auto": entropy up to 6 bits, min/max above; "probe": at 6 bits and
    fewer entropy or mse, chosen per model on the calibration data), per-channel weight
    clipping `weight_clipping`, `bias_correction`, cross-layer `equalize`, and `rounding`:
    "gptq" (closed form, layer by layer) or learned ("adaround", "brecq") with
    `rounding_iterations` steps per layer or block.
    `first_last_bits` keeps the first quantized layer (and the output layer when
    `quantize_output`) at those bits whatever the plan says, and the first layer's output
    too (the input of the layers reading it), as the PTQ papers keep them at 8.
    `input_bits` caps the bits of the model input's quantizer (the first layer's input
    activation) on the written plan and on every plan a milp search measures: a coarse
    input grid is what keeps uniform low-bit models robust to small perturbations
    (docs/method.md, "Input bit depth"). `act_bits` puts every quantized layer's activations
    at those bits whatever its weight bits (mixed precision of the weights alone, e.g. 8 for
    onnxruntime's CPU kernels, where narrower activations save nothing; docs/method.md,
    "Activation bits"); the milp's table, its trial plans and the verification's uniform
    models follow it. `join_operand_bits` quantizes the operands of residual joins at no
    fewer than those bits, so a block's sum is rounded once, onto the grid of the layer it
    feeds, as BRECQ and QDrop place their quantizers (docs/quantization.md, "Residual
    joins"); None keeps the paper's rule, the operands at the join's bits; "auto" (default)
    is 8, except for `method="eqn3"` (the paper's rule) and a given `plan` (its own).

    `data` calibrates the activation ranges (its first `calibration_samples`) and, for
    QUANOS, is attacked (`samples`, default up to 1000). Unless `evaluate` is False, the
    compiled model is then measured against float and uniform models (`result.verification`)
    on `eval_data`, else on a held-out `eval_fraction` of `data` that nothing else sees;
    `result.passed` is False when it lost more than `max_accuracy_drop` points of clean
    accuracy (None: no guard). See docs/api.md for every option.
    """
    from .commands.compile import CompileOptions, run_compile

    return run_compile(
        model, data, _options(CompileOptions, locals()), plan=plan, eval_data=eval_data, progress=progress
    )


def analyze(
    model: ModelSource | Sequence[ModelSource],
    data: DataSource,
    *,
    audit_attacks: tuple[AuditMethod, ...] = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "transfer"),
    audit_eps: tuple[float, ...] = (2 / 255, 8 / 255),
    apgd_steps: int = 50,
    apgd_restarts: int = 1,
    large_eps: float = 0.5,
    lipschitz: bool = False,
    tolerance: bool = True,
    tolerance_samples: int = 100,
    attack: AttackMethod = "fgsm",
    eps: float = 0.05,
    pgd_steps: int = 10,
    pgd_alpha: float | None = None,
    samples: int | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
    layout: Layout = "auto",
    scale: float | None = None,
    mean: float | tuple[float, ...] | None = None,
    std: float | tuple[float, ...] | None = None,
    data_range: tuple[int | None, int | None] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    threads: int | None = DEFAULT_THREADS,
    input_shape: tuple[int, ...] | None = None,
    labels: str | os.PathLike[str] | None = None,
    label_offset: int = 0,
    resize: int | None = None,
    crop: int | tuple[int, int] | None = None,
    channel_order: ChannelOrder = "rgb",
    device: Device = "cpu",
    ray: str | None = None,
    figures: bool = True,
    progress: ProgressFactory = no_progress,
) -> AnalyzeResult | AnalyzeResults:
    """Audit `model` (float or compiled) without quantizing it on `samples` of `data` (default
    200): robust accuracy as the worst case per sample over `audit_attacks` at each `audit_eps`
    (APGD with `apgd_steps` and `apgd_restarts`), gradient-masking checks (`large_eps` probe
    included) and a verdict, ANS per layer (`attack` at `eps`) and the bits Eqn 3 gives it;
    `lipschitz` adds each layer block's Lipschitz bound and local ratios on the ANS samples.
    `tolerance` (default on) measures each quantized layer alone at 2..8 bits on the first
    `tolerance_samples`: logit KL, top-1 agreement with float, its tolerance bits and the
    default allocator's bits (`result.document["tolerance"]`; False skips it, for speed).

    A list of models gives an AnalyzeResults: each model analyzed as if alone, one job per
    model (Ray tasks on the cluster at `ray` when given, docs/api.md)."""
    from .commands.analyze import AnalyzeOptions, run_analyze

    return run_analyze(model, data, _options(AnalyzeOptions, locals()), progress=progress)


def evaluate(
    models: ModelSource | Sequence[ModelSource],
    data: DataSource,
    *,
    attack: tuple[AuditMethod, ...] = ("fgsm", "pgd"),
    eps: tuple[float, ...] | None = None,
    pgd_steps: int = 10,
    pgd_alpha: float | None = None,
    paper: bool = False,
    audit: bool = False,
    apgd_steps: int = 50,
    apgd_restarts: int = 1,
    large_eps: float = 0.5,
    samples: int | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
    layout: Layout = "auto",
    scale: float | None = None,
    mean: float | tuple[float, ...] | None = None,
    std: float | tuple[float, ...] | None = None,
    data_range: tuple[int | None, int | None] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    threads: int | None = DEFAULT_THREADS,
    input_shape: tuple[int, ...] | None = None,
    labels: str | os.PathLike[str] | None = None,
    label_offset: int = 0,
    resize: int | None = None,
    crop: int | tuple[int, int] | None = None,
    channel_order: ChannelOrder = "rgb",
    device: Device = "cpu",
    ray: str | None = None,
    figures: bool = True,
    progress: ProgressFactory = no_progress,
) -> EvaluateResult:
    """Clean and adversarial accuracy of one model or several (float or compiled) side by
    side: every method of `attack` at every `eps`, or the paper's grid (`paper=True`). With
    `audit=True` or an apgd-ce, apgd-dlr or transfer attack, each model also gets the
    robustness audit (worst case per sample, masking checks, verdict; `document["models"][i]["audit"]`)."""
    from .commands.evaluate import EvaluateOptions, run_evaluate

    return run_evaluate(models, data, _options(EvaluateOptions, locals()), progress=progress)


def finetune(
    model: ModelSource,
    data: DataSource,
    *,
    epochs: int,
    plan: PlanSource | None = None,
    val: DataSource | None = None,
    val_split: float | None = None,
    lr: float | None = None,
    optimizer: Optimizer = "adam",
    adv_train: AttackMethod | None = None,
    adv_eps: float = 8 / 255,
    adv_steps: int = 7,
    adv_alpha: float | None = None,
    adv_weight: float = 0.5,
    input_range: tuple[float, float] = (0.0, 1.0),
    calibration: Calibration = "minmax",
    percentile: float = 99.99,
    calibration_samples: int = 512,
    storage: Storage = "int8",
    layout: Layout = "auto",
    scale: float | None = None,
    mean: float | tuple[float, ...] | None = None,
    std: float | tuple[float, ...] | None = None,
    data_range: tuple[int | None, int | None] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    threads: int | None = DEFAULT_THREADS,
    input_shape: tuple[int, ...] | None = None,
    labels: str | os.PathLike[str] | None = None,
    label_offset: int = 0,
    resize: int | None = None,
    crop: int | tuple[int, int] | None = None,
    channel_order: ChannelOrder = "rgb",
    device: Device = "cpu",
    progress: ProgressFactory = no_progress,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `model` at a plan through its fake-quant twin (optionally adversarially)
    and compile the best epoch. `model` is a float model with a `plan`, or a compiled model
    (its stored plan, unless `plan` overrides it); `val` or `val_split` picks the epoch."""
    from .commands.finetune import FinetuneOptions, run_finetune

    return run_finetune(
        model, data, _options(FinetuneOptions, locals()), plan=plan, val=val, progress=progress, on_epoch=on_epoch
    )


def energy(
    model: ModelSource,
    *,
    plan: PlanSource | None = None,
    hw: tuple[str, ...] = ("standard",),
) -> EnergyResult:
    """Memory accesses, MACs, energy and weight memory of `model` per layer and in total
    under `plan` (float without one) on the hardware profiles `hw` (docs/hardware.md)."""
    from .commands.energy import EnergyOptions, run_energy

    return run_energy(model, _options(EnergyOptions, locals()), plan=plan)


def export(model: ModelSource, *, to: ExportTarget) -> ExportResult:
    """A compiled model for another toolchain: QONNX Quant nodes (`to="qonnx"`) or
    onnxruntime.quantization TensorQuantOverrides (`to="ort-overrides"`)."""
    from .commands.export import ExportOptions, run_export

    return run_export(model, _options(ExportOptions, locals()))


def layers(
    model: ModelSource, *, input_shape: tuple[int, ...] | None = None, lipschitz: bool = False
) -> LayersResult:
    """The quantizable layers of `model` and its residual joins (`input_shape` fixes its
    dynamic input dims, e.g. (3, 224, 224)); `lipschitz` adds each block's operator-norm
    Lipschitz bound (imports torch)."""
    from .commands.layers import run_layers

    return run_layers(model, input_shape, lipschitz=lipschitz)


def _options(options_class: type[Any], arguments: dict[str, Any]) -> Any:
    """The options dataclass from a function's arguments (those named like its fields)."""
    from dataclasses import fields

    return options_class(**{field.name: arguments[field.name] for field in fields(options_class)})


_RESULTS = {
    "CompileResult": "compile",
    "AnalyzeResult": "analyze",
    "AnalyzeResults": "analyze",
    "EvaluateResult": "evaluate",
    "FinetuneResult": "finetune",
    "EnergyResult": "energy",
    "ExportResult": "export",
    "LayersResult": "layers",
    "CompileOptions": "compile",
    "AnalyzeOptions": "analyze",
    "EvaluateOptions": "evaluate",
    "FinetuneOptions": "finetune",
    "EnergyOptions": "energy",
    "ExportOptions": "export",
}


def __getattr__(name: str) -> Any:
    """Result and options classes, and Plan, imported on first use (PEP 562)."""
    import importlib

    if name in _RESULTS:
        return getattr(importlib.import_module(f".commands.{_RESULTS[name]}", __name__), name)
    if name == "Plan":
        return importlib.import_module(".plan", __name__).Plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_API_FUNCTIONS = ("compile", "analyze", "evaluate", "finetune", "energy", "export", "layers")


class _Package(types.ModuleType):
    """Importing the subpackages finetune/ and export/ and the module layers.py would make
    them attributes of this package, over the API functions of the same name; they stay
    importable by path (sys.modules), and the attributes stay the functions."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API_FUNCTIONS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "DataError",
    "ModelError",
    "OutputError",
    "ParityError",
    "PlanError",
    "ProfileError",
    "QuanosError",
    "UnsupportedOpError",
    "UsageError",
    "__version__",
    "analyze",
    "compile",
    "energy",
    "evaluate",
    "export",
    "finetune",
    "layers",
    *_RESULTS,
    "Plan",
]
