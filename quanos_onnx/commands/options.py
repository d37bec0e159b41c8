"""What every command shares: the typed option types, the inputs (model, data, plan) a
caller may give as paths or in memory, and the helpers the commands run them through.

Options are typed values (numbers, tuples, Literals), never command-line strings; the CLI
parses its strings with the `*_from_text` functions here and builds the same dataclasses
the Python API builds. Every option dataclass checks its fields against their annotations
on construction, so `target_avg_bits="6"` fails at once as a UsageError naming the argument.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import onnx

from ..errors import UsageError, arg
from ..layers import Layer
from ..threads import DEFAULT_THREADS

if TYPE_CHECKING:
    from ..data import Dataset
    from ..jobs import Jobs
    from ..harness.attacks import Attack, InputRange
    from ..plan import Plan

Layout = Literal["auto", "nchw", "nhwc"]
ChannelOrder = Literal["rgb", "bgr"]
Device = Literal["cpu", "cuda"]
AttackMethod = Literal["fgsm", "pgd"]
Calibration = Literal["auto", "probe", "minmax", "percentile", "entropy", "mse"]
WeightClipping = Literal["absmax", "mse", "output"]
Rounding = Literal["nearest", "gptq", "adaround", "brecq"]
Storage = Literal["int8", "int4", "int2"]
Optimizer = Literal["adam", "sgd"]
ExportTarget = Literal["qonnx", "ort-overrides"]

ModelSource = Union[str, os.PathLike, onnx.ModelProto]
"""A model: an ONNX file or an onnx.ModelProto in memory."""
PlanSource = Union[str, os.PathLike, "Plan"]
"""A bit plan: a plan.json file or a plan.Plan."""
DataSource = Any
"""Data (see data.dataset_from): a path in any format the CLI reads, numpy arrays `(x, y)` or
`x` alone, an iterable of `(x, y)` batches (a torch DataLoader), or an onnxruntime
CalibrationDataReader."""

DEFAULT_ANS_SAMPLES = 1000

@dataclass(frozen=True, kw_only=True)
class Options:
    """A command's settings; construction checks (and normalizes) every field's type:
    ints where floats are asked become floats, lists where tuples are asked become tuples."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for field in fields(self):
            value = getattr(self, field.name)
            try:
                conformed = conform(value, hints[field.name])
            except TypeError:
                raise UsageError(
                    f"{arg(field.name)} {value!r} is not {describe(hints[field.name])}"
                ) from None
            object.__setattr__(self, field.name, conformed)

    def settings(self) -> dict[str, Any]:
        """The options for the report, less those that change where and how fast it runs or
        how the report is drawn, never a number (threads, ray, figures): report.json is the
        same bytes either way."""
        return {key: value for key, value in asdict(self).items() if key not in UNRECORDED_OPTIONS}


UNRECORDED_OPTIONS = ("threads", "ray", "figures")


def conform(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` wants it, or TypeError. Understands the annotations options
    use: bool, int, float, str, None, Literal, tuple[T, ...], tuple[A, B] and unions."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None:
            return None
        raise TypeError
    if origin in (Union, types.UnionType):
        for option in get_args(annotation):
            try:
                return conform(value, option)
            except TypeError:
                continue
        raise TypeError
    if origin is Literal:
        if isinstance(value, str) and value in get_args(annotation):
            return value
        raise TypeError
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            raise TypeError
        items = get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(conform(item, items[0]) for item in value)
        if len(value) != len(items):
            raise TypeError
        return tuple(conform(item, wanted) for item, wanted in zip(value, items))
    if annotation is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise TypeError
    if annotation is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        raise TypeError
    if annotation is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise TypeError


def describe(annotation: Any) -> str:
    """What an annotation accepts, in words (for the error of a wrong type)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(option) for option in get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(annotation))
    if origin is tuple:
        items = get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return f"a tuple of ({describe(items[0])})"
        return f"a tuple of {len(items)} ({', '.join(describe(item) for item in items)})"
    names = {bool: "True or False", int: "a whole number", float: "a number", str: "a string", type(None): "None"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


@dataclass(frozen=True, kw_only=True)
class DataOptions(Options):
    """How every command that runs models reads, slices and batches its data, its seed,
    and how many threads run the models (see data.py for layout, scale, mean and std).

    ``input_shape`` fixes the model's dynamic input dims (model.fix_input_shape): the
    sample dims (``(3, 224, 224)``) or all of them with the batch (``(1, 3, 224, 224)``,
    whose batch stays dynamic). ``labels`` (a CSV of ``file,label``), ``resize`` (the
    shorter side), ``crop`` (centre, one size or (height, width)) and ``channel_order``
    apply to image folders; ``label_offset`` is added to every label (1 for a 1001-class
    model whose class 0 is background)."""

    layout: Layout = "auto"
    scale: float | None = None
    mean: float | tuple[float, ...] | None = None
    std: float | tuple[float, ...] | None = None
    data_range: tuple[int | None, int | None] | None = None
    seed: int = 0
    batch_size: int = 64
    threads: int | None = DEFAULT_THREADS
    input_shape: tuple[int, ...] | None = None
    labels: str | os.PathLike | None = None
    label_offset: int = 0
    resize: int | None = None
    crop: int | tuple[int, int] | None = None
    channel_order: ChannelOrder = "rgb"
    device: Device = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..data import DataSpec
        from ..device import check_device

        check_device(self.device)

        if self.labels is not None:
            object.__setattr__(self, "labels", os.fspath(self.labels))
        if self.input_shape is not None and not all(dim >= 1 for dim in self.input_shape):
            raise UsageError(f"{arg('input_shape')} {'x'.join(map(str, self.input_shape))} must be sizes of at least 1")

        DataSpec.from_options(**self.read_options())
        if self.batch_size < 1:
            raise UsageError(f"{arg('batch_size')} {self.batch_size} must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"{arg('threads')} {self.threads} must be at least 1 (or None for the libraries' defaults)")

    def read_options(self) -> dict[str, Any]:
        """data.dataset_from's keyword arguments for these options."""
        from ..data import IndexRange

        return {
            "layout": self.layout,
            "scale": self.scale,
            "mean": self.mean,
            "std": self.std,
            "data_range": None if self.data_range is None else IndexRange(*self.data_range),
            "seed": self.seed,
            "labels": self.labels,
            "label_offset": self.label_offset,
            "resize": self.resize,
            "crop": self.crop,
            "channel_order": self.channel_order,
        }


@dataclass(frozen=True, kw_only=True)
class RunOptions(DataOptions):
    """Where a command's independent jobs run (`ray`: in this process when None, else on the
    Ray cluster at that address, jobs.py) and whether its report.html draws the figures
    (`figures`; without them matplotlib is never imported)."""

    ray: str | None = None
    figures: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..jobs import check_ray

        check_ray(self.ray)

    def jobs(self) -> Jobs:
        """The runner of the command's independent jobs, each with the command's threads and device."""
        from ..jobs import Jobs

        return Jobs(self.ray, self.threads, self.device)


@dataclass(frozen=True, kw_only=True)
class AttackOptions(DataOptions):
    """The ANS attack of compile and analyze, and how many samples it attacks."""

    attack: AttackMethod = "fgsm"
    eps: float = 0.05
    pgd_steps: int = 10
    pgd_alpha: float | None = None
    samples: int | None = None
    input_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ans_attack()
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"{arg('samples')} {self.samples} must be at least 1")

    def value_range(self) -> InputRange:
        from ..harness.attacks import InputRange

        return InputRange(*self.input_range)

    def ans_attack(self) -> Attack:
        """The ANS attack (FGSM by default, as in the paper)."""
        from ..harness.attacks import Attack

        if self.attack == "fgsm":
            return Attack.fgsm(self.eps, self.value_range())
        return Attack.pgd(self.eps, steps=self.pgd_steps, alpha=self.pgd_alpha, input_range=self.value_range())


# Inputs given as paths or in memory --------------------------------------------------------


@dataclass(frozen=True)
class ModelInput:
    """A model as the command runs it (normalized) and as the report names it."""

    proto: onnx.ModelProto
    name: str
    path: Path | None
    digest: str

    def report_entry(self) -> dict[str, Any]:
        return {"path": self.name, "sha256": self.digest}


def read_model(
    model: ModelSource,
    argument: str = "model",
    label: str = "<onnx.ModelProto>",
    input_shape: tuple[int, ...] | None = None,
) -> ModelInput:
    """The model of a command: a path (read and normalized) or a ModelProto (normalized
    copy), its dynamic input dims fixed to ``input_shape`` when given."""
    from ..model import file_sha256, fix_input_shape, load_model, normalize

    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        proto = fix_input_shape(normalize(copy, label), input_shape, label)
        return ModelInput(proto, label, None, hashlib.sha256(data).hexdigest())
    if isinstance(model, (str, os.PathLike)):
        proto = fix_input_shape(load_model(model), input_shape, str(model))
        return ModelInput(proto, str(model), Path(model), file_sha256(model))
    raise UsageError(f"{arg(argument)} {_short_repr(model)} is not a path or an onnx.ModelProto")


@dataclass(frozen=True)
class PlanInput:
    plan: Plan
    name: str
    path: Path | None
    digest: str

    def report_entry(self) -> dict[str, Any]:
        return {"path": self.name, "sha256": self.digest}


def read_plan_input(plan: PlanSource, argument: str = "plan") -> PlanInput:
    from ..model import file_sha256
    from ..plan import Plan, read_plan

    if isinstance(plan, Plan):
        return PlanInput(plan, "<Plan>", None, hashlib.sha256(plan.dumps().encode()).hexdigest())
    if isinstance(plan, (str, os.PathLike)):
        return PlanInput(read_plan(plan), str(plan), Path(plan), file_sha256(plan))
    raise UsageError(f"{arg(argument)} {_short_repr(plan)} is not a path or a quanos_onnx Plan")


def data_name(data: DataSource) -> str:
    """How the report names data: its path, or what kind of in-memory data it was."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    from ..data import describe_source

    return describe_source(data)


def data_entry(data: DataSource, dataset: Dataset, count: int) -> dict[str, Any]:
    """The report's data input: a file with its sha256, or in-memory data (no file, no hash)."""
    from .. import report

    if isinstance(data, (str, os.PathLike)):
        return report.data_input(data, count, dataset.selection)
    return {"path": data_name(data), "sha256": None, "samples": count, "selection": dataset.selection}


def input_paths(*sources: Any) -> list[Path]:
    """The inputs given as files: an output may never overwrite them."""
    return [Path(source) for source in sources if isinstance(source, (str, os.PathLike))]


def load_data(
    data: DataSource,
    options: DataOptions,
    model: onnx.ModelProto,
    argument: str = "data",
    *,
    model_name: str = "<model>",
    **extra: Any,
) -> Dataset:
    """The command's data, fitted to the model's input."""
    from ..data import dataset_from
    from ..model import input_spec, num_classes

    if data is None:
        raise UsageError(f"{arg(argument)} is required: attacks and calibration run on it")
    return dataset_from(
        data, input_spec(model), num_classes=num_classes(model, model_name), argument=argument, **options.read_options(), **extra
    )


def check_data_range(input_range: tuple[float, float], dataset: Dataset, *, attacked: bool) -> None:
    """The data against the model's declared input range (data.check_input_range): refused
    when it will be attacked (attacks clip into the range), a warning otherwise."""
    from ..data import check_input_range

    low, high = input_range
    check_input_range(dataset, low, high, attacked=attacked)


def weights_and_biases(layers: Sequence[Layer]) -> list[str]:
    return [name for layer in layers for name in (layer.weight, layer.bias) if name]


def ans_samples(samples: int | None, dataset: Dataset, default: int | None = DEFAULT_ANS_SAMPLES) -> int:
    """How many samples the attacks use: `samples`, else up to `default` (None: all)."""
    from ..errors import DataError

    if samples is None:
        return dataset.count if default is None else min(default, dataset.count)
    if samples > dataset.count:
        raise DataError(f"{arg('samples')} {samples} is more than the {dataset.count} samples in {dataset.source}")
    return samples


def first_samples(dataset: Dataset, count: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The first `count` samples of the dataset in batches."""
    taken = 0
    for x, y in dataset.batches(batch_size):
        if taken >= count:
            break
        keep = min(len(x), count - taken)
        taken += keep
        yield x[:keep], (None if y is None else y[:keep])


def samples_in_memory(dataset: Dataset, count: int, batch_size: int) -> Dataset:
    """The first `count` samples of `dataset` as arrays, for jobs in other processes (Ray):
    an image folder's files need not exist where they run."""
    from ..data import Dataset

    batches = list(first_samples(dataset, count, batch_size))
    x = np.concatenate([x for x, _ in batches])
    y = None if any(y is None for _, y in batches) else np.concatenate([y for _, y in batches])
    return Dataset(x, y, dataset.source, dataset.selection)


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def api_command_line() -> tuple[str, ...]:
    """What started an API call, for the report's provenance: the Python script."""
    return (Path(sys.executable).name, *sys.argv)


# The CLI's text forms -------------------------------------------------------------------


def eps_from_text(text: str, argument: str) -> float:
    """'0.05' or '8/255'."""
    from ..harness.attacks import parse_eps

    return parse_eps(text, argument)


def eps_list_from_text(text: str, argument: str) -> tuple[float, ...]:
    """'0.05,0.1' or '2/255,8/255'."""
    return tuple(eps_from_text(part, argument) for part in text.split(",") if part.strip())


def input_range_from_text(text: str) -> tuple[float, float]:
    """'0,1', '0,255' or '-1,1'."""
    from ..harness.attacks import InputRange

    parsed = InputRange.parse(text)
    return (parsed.low, parsed.high)


def data_range_from_text(text: str) -> tuple[int | None, int | None]:
    """'932:', ':1000' or '0:500'."""
    from ..data import IndexRange

    parsed = IndexRange.parse(text)
    return (parsed.start, parsed.stop)


def shape_from_text(text: str, argument: str = "input_shape") -> tuple[int, ...]:
    """'1x3x224x224', '3x224x224' or '3,224,224'."""
    parts = [part.strip() for part in text.replace(",", "x").lower().split("x")]
    if not parts or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise UsageError(f"{arg(argument)} {text!r} is not sizes like 3x224x224 or 1x3x224x224")
    return tuple(int(part) for part in parts)


def crop_from_text(text: str) -> int | tuple[int, int]:
    """'224' (square) or '224x192' (height x width)."""
    shape = shape_from_text(text, "crop")
    if len(shape) > 2:
        raise UsageError(f"{arg('crop')} {text!r} is one size or HEIGHTxWIDTH, e.g. 224")
    return shape[0] if len(shape) == 1 else (shape[0], shape[1])


def scale_from_text(text: str) -> float:
    """'1/255' or '0.5'."""
    from ..data import DataSpec

    return DataSpec.from_options(scale=text).scale  # type: ignore[return-value]


def floats_from_text(text: str, argument: str) -> tuple[float, ...]:
    """'0.5' or '0.485,0.456,0.406'."""
    from ..data import DataSpec

    return getattr(DataSpec.from_options(**{argument: text}), argument)  # type: ignore[no-any-return]


def methods_from_text(text: str, argument: str = "attack") -> tuple[str, ...]:
    """'fgsm,pgd'; each checked against the attack methods; 'none' is no attack at all."""
    from ..harness.attacks import METHODS

    methods = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if methods == ("none",):
        return ()
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UsageError(f"{arg(argument)} {unknown[0]!r} is not one of {', '.join(METHODS)}, or none")
    return methods


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"<{type(value).__name__}>"



# The robustness audit (analyze, evaluate) --------------------------------------------------

AuditMethod = Literal["fgsm", "pgd", "apgd-ce", "apgd-dlr", "transfer"]
AUDIT_METHODS: tuple[AuditMethod, ...] = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "transfer")

DEFAULT_AUDIT_SAMPLES = 200
"""analyze's default sample count: a robust accuracy of 0 reads as [0, 1.9%] (95% Wilson);
docs/benchmarks.md has the timings on ResNet-20."""

PAPER_PGD_STEPS = 7
PAPER_PGD_ALPHA = 2 / 255


@dataclass(frozen=True)
class AuditSettings:
    """The robustness audit's attacks, shared by analyze and evaluate (docs/method.md, robustness audit).

    Every method runs at every eps; PGD with `pgd_steps` and `pgd_alpha` (analyze: the
    paper's 7 steps of 2/255); APGD with `apgd_steps` and `apgd_restarts`; the effort check
    doubles the steps and adds two restarts; `large_eps` is the probe that should break every
    sample. `names` are the arguments that gave methods and eps, for errors.
    """

    methods: tuple[str, ...]
    eps: tuple[float, ...]
    apgd_steps: int
    apgd_restarts: int
    large_eps: float
    input_range: tuple[float, float]
    pgd_steps: int = PAPER_PGD_STEPS
    pgd_alpha: float | None = PAPER_PGD_ALPHA
    names: tuple[str, str] = ("attack", "eps")

    def suite(self, *, compiled: bool) -> Any:
        """The AttackSuite; transfer is left out for a float model (nothing to transfer from)."""
        from ..harness.attacks import InputRange, check_fraction
        from ..harness.robustness import audit_suite

        if not self.eps:
            raise UsageError(f"{arg(self.names[1])} needs at least one strength")
        for eps in (*self.eps, self.large_eps):
            check_fraction(eps, self.names[1] if eps in self.eps else "large_eps")
        return audit_suite(
            self.eps,
            self.methods,
            input_range=InputRange(*self.input_range),
            apgd_steps=self.apgd_steps,
            restarts=self.apgd_restarts,
            pgd_steps=self.pgd_steps,
            pgd_alpha=self.pgd_alpha,
            large_eps=self.large_eps,
            transfer=compiled,
            option=self.names[0],
        )


def audit_model(
    model: onnx.ModelProto,
    batches: Iterator[tuple[np.ndarray, np.ndarray | None]],
    settings: AuditSettings,
    *,
    seed: int,
    progress: Any,
    twin: Any = None,
) -> tuple[Any, Any]:
    """(RobustnessAudit, MaskingDiagnosis) of one model; a compiled model's transfer attacks
    are crafted on its float graph (finetune.graph.float_model_of). `twin` is the model's twin
    when the caller already built it (None: built here)."""
    from ..finetune.graph import compiled_plan, float_model_of
    from ..harness.attacks import twin_of
    from ..harness.masking import diagnose
    from ..harness.robustness import audit_robustness

    compiled = compiled_plan(model) is not None
    suite = settings.suite(compiled=compiled)
    source = twin_of(float_model_of(model)) if compiled and suite.needs_source() else None
    audit = audit_robustness(model, batches, suite, twin=twin, source=source, seed=seed, progress=progress)
    return audit, diagnose(audit)


def audit_methods_from_text(text: str, argument: str) -> tuple[str, ...]:
    """'fgsm,pgd,apgd-ce'; each checked against the audit's attack methods; 'none' is no attack."""
    methods = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if methods == ("none",):
        return ()
    unknown = [method for method in methods if method not in AUDIT_METHODS]
    if unknown:
        raise UsageError(f"{arg(argument)} {unknown[0]!r} is not one of {', '.join(AUDIT_METHODS)}, or none")
    return methods
