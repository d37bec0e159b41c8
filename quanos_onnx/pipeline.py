"""compile(): the stages in plain order. Each stage is a module; this file only wires them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .layers import Join, Layer, find_joins, list_layers
from .model import check_finite_initializers, load_model
from .passes.align import align_plan
from .passes.calibrate import Range, collect_ranges
from .passes.points import plan_points
from .passes.qdq import activation_quantizer, check_storage, insert_qdq
from .plan import MAX_BITS, MIN_BITS, Plan

if TYPE_CHECKING:
    from .hwmodel import HardwareProfile
    from .report import RunClock


@dataclass(frozen=True)
class Quantized:
    model: onnx.ModelProto
    plan: Plan


def quantize(
    model: onnx.ModelProto,
    plan: Plan,
    calibration: Iterable[np.ndarray],
    *,
    layers: Sequence[Layer] | None = None,
    joins: Sequence[Join] | None = None,
    method: str = "minmax",
    percentile: float = 99.99,
    storage: str = "int8",
) -> Quantized:
    """Align the plan, calibrate its quantizers in onnxruntime, and write the QDQ model.

    `storage` picks the weight containers (passes.qdq.STORAGES); values are the same in all.
    """
    check_storage(storage)
    layers = list_layers(model) if layers is None else layers
    joins = find_joins(model, layers) if joins is None else joins
    aligned = align_plan(plan, layers, joins)
    points = plan_points(model, layers, aligned)
    tensors = sorted({t for group in points.groups for t in group.tensors})
    ranges = collect_ranges(model, tensors, calibration, method=method, percentile=percentile)
    quantizers = {
        group.name: activation_quantizer(group.bits, _union(ranges[t] for t in group.tensors))
        for group in points.groups
    }
    return Quantized(insert_qdq(model, layers, aligned, points, quantizers, storage=storage), aligned)


def _union(ranges: Iterable[Range]) -> Range:
    collected = list(ranges)
    return Range(min(r.low for r in collected), max(r.high for r in collected))


MODEL_FILE = "model.quanos.onnx"
PLAN_FILE = "plan.json"
ENERGY_FILE = "energy.json"
DEFAULT_ANS_SAMPLES = 1000


@dataclass(frozen=True)
class CompileOptions:
    """Everything `quanos-compile` takes; the CLI maps its options onto these fields."""

    model_path: str
    data_path: str | None = None
    output_dir: str = "quanos-out"
    bits: int | None = None
    plan_path: str | None = None
    quantize_output: bool = False
    calibration: str = "minmax"
    percentile: float = 99.99
    calibration_samples: int = 512
    as_json: bool = False
    layout: str = "auto"
    scale: str | None = None
    mean: str | None = None
    std: str | None = None
    data_range: str | None = None
    seed: int = 0
    k_init: int = 16
    k_min: int = 2
    eps: str = "0.05"
    samples: int | None = None
    attack: str = "fgsm"
    pgd_steps: int = 10
    pgd_alpha: str | None = None
    rounds: int = 1
    target_avg_bits: float | None = None
    input_range: str = "0,1"
    batch_size: int = 64
    storage: str = "int8"


ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]
"""(label, total) -> a context whose value is called with each finished batch's size."""


@contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda done: None


@dataclass(frozen=True)
class CompileResult:
    layers: tuple[Layer, ...]
    plan: Plan
    written: tuple[str, ...]

    def rows(self) -> list[dict[str, object]]:
        entries = self.plan.by_name()
        return [
            {
                "layer": layer.name,
                "op": layer.op,
                "weight_bits": entries[layer.name].weight_bits,
                "act_bits": entries[layer.name].act_bits,
                "params": layer.params,
                "group": entries[layer.name].group,
                "ans_mean": _rounded(entries[layer.name].ans_mean),
                "ans_std": _rounded(entries[layer.name].ans_std),
            }
            for layer in self.layers
        ]

    def summary_json(self) -> dict[str, object]:
        params = {layer.name: layer.params for layer in self.layers}
        return {
            "format": "quanos-compile",
            "version": 1,
            "layers": self.rows(),
            "average_weight_bits": round(self.plan.average_weight_bits(params), 4),
            "method": self.plan.method,
            "energy": self.plan.details.get("energy"),
            "outputs": list(self.written),
        }

    def summary_text(self) -> str:
        from .report.text import format_table

        params = {layer.name: layer.params for layer in self.layers}
        lines = [
            format_table(self.rows()),
            "",
            f"method {self.plan.method}; parameter-weighted average weight bits "
            f"{self.plan.average_weight_bits(params):.2f}",
            *_energy_lines(self.plan.details.get("energy")),
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _energy_lines(energy: Mapping[str, Any] | None) -> list[str]:
    if not energy:
        return []
    lines = []
    for name, profile in energy["profiles"].items():
        totals = profile["totals"]
        versus = ", ".join(
            f"{row['energy_ratio']:.2f}x energy / {row['memory_ratio']:.2f}x memory of uniform {row['bits']}-bit"
            for row in profile["vs_uniform"]
        )
        lines.append(
            f"{name}: {totals['energy_pj'] / 1e6:.4g} uJ/image, weight memory "
            f"{totals['weight_memory_bits'] / 8e3:.4g} kB ({versus})"
        )
    return lines


def run_compile(
    options: CompileOptions,
    command_line: Sequence[str] = (),
    progress: ProgressFactory = no_progress,
) -> CompileResult:
    """load -> data -> plan (QUANOS, --bits or --plan) -> align -> calibrate -> QDQ -> write.

    Everything is computed before the first file is written, so a failure leaves nothing.
    """
    from . import report
    from .errors import ModelError, UsageError
    from .outputs import OutputDir
    from .plan import read_plan, validate_plan

    clock = report.RunClock.start(command_line)
    inputs = [p for p in (options.model_path, options.data_path, options.plan_path) if p]
    output = OutputDir(options.output_dir, inputs=inputs)
    if options.bits is not None and options.plan_path is not None:
        raise UsageError("--bits and --plan exclude each other")
    if options.bits is not None and not MIN_BITS <= options.bits <= MAX_BITS:
        raise UsageError(f"--bits {options.bits} is outside {MIN_BITS}..{MAX_BITS}")
    if options.calibration_samples < 1:
        raise UsageError(f"--calibration-samples {options.calibration_samples} must be at least 1")
    model = load_model(options.model_path)
    layers = list_layers(model)
    if not layers:
        raise ModelError(
            f"{options.model_path}: no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a constant weight)"
        )
    check_finite_initializers(model, _weights_and_biases(layers), options.model_path)
    dataset = _load_data(options, model)
    calibration = [x for x, _ in _first(dataset, options.calibration_samples, options.batch_size)]
    if options.bits is not None:
        plan = Plan.uniform(layers, options.bits, keep_output_float=not options.quantize_output)
    elif options.plan_path is not None:
        plan = validate_plan(read_plan(options.plan_path), layers, options.plan_path)
    else:
        plan = _quanos_plan(options, model, layers, dataset, calibration, progress)
    quantized = quantize(
        model,
        plan,
        calibration,
        layers=layers,
        method=options.calibration,
        percentile=options.percentile,
        storage=options.storage,
    )
    energy, baselines = report.energy_sections(layers, quantized.plan)
    final_plan = quantized.plan.with_details(energy=energy)
    model_bytes = _with_plan(quantized.model, final_plan).SerializeToString()
    files: dict[str, bytes | str] = {MODEL_FILE: model_bytes, PLAN_FILE: final_plan.dumps()}
    document = report.report_document(
        "compile",
        models=[report.file_input(options.model_path)],
        data=report.data_input(options.data_path, dataset.count, dataset.selection),
        plan_file=report.file_input(options.plan_path) if options.plan_path else None,
        seed=options.seed,
        settings=settings_json(options, exclude=("model_path", "data_path", "plan_path", "output_dir", "as_json")),
        layers=report.layer_rows(layers, final_plan, final_plan.details.get("ans")),
        summary=report.plan_summary(layers, final_plan),
        ans=final_plan.details.get("ans"),
        energy=energy,
        baselines=baselines,
        outputs=[report.output_entry(name, content) for name, content in files.items()],
    )
    files.update(report.report_files(document, clock.finish()))
    written = output.write(files)
    return CompileResult(tuple(layers), final_plan, tuple(str(p) for p in written))


def settings_json(options: Any, *, exclude: Sequence[str]) -> dict[str, Any]:
    """A command's options for the report: all but the paths (listed with their sha256)."""
    return {key: value for key, value in asdict(options).items() if key not in exclude}


def load_profiles(names: Sequence[str]) -> tuple[HardwareProfile, ...]:
    """`--hw` values: built-in names, 'all' (the three built-ins) or profile files; one per name."""
    from .errors import UsageError
    from .hwmodel import BUILTIN_PROFILES, load_profile

    profiles: list[HardwareProfile] = []
    for name in names:
        for profile in [load_profile(n) for n in BUILTIN_PROFILES] if name.lower() == "all" else [load_profile(name)]:
            known = next((p for p in profiles if p.name == profile.name), None)
            if known is None:
                profiles.append(profile)
            elif known.source != profile.source:
                raise UsageError(
                    f"--hw: profiles {known.source} and {profile.source} are both named '{profile.name}'",
                    hint='give each profile file its own "name"',
                )
    return tuple(profiles)


def energy_outputs(
    model_path: str,
    plan_path: str | None,
    layers: Sequence[Layer],
    plan: Plan | None,
    profiles: Sequence[HardwareProfile],
    clock: RunClock,
) -> dict[str, str]:
    """`quanos energy -o`: energy.json (the quanos-energy document) and the report files."""
    from . import report

    energy, baselines = report.energy_sections(layers, plan, profiles)
    document = report.report_document(
        "energy",
        models=[report.file_input(model_path)],
        plan_file=report.file_input(plan_path) if plan_path else None,
        settings={"hw": [profile.source for profile in profiles]},
        layers=report.layer_rows(layers, plan),
        summary=report.plan_summary(layers, plan) if plan is not None else None,
        energy=energy,
        baselines=baselines,
    )
    return {ENERGY_FILE: report.dumps(energy), **report.report_files(document, clock.finish())}


def _weights_and_biases(layers: Sequence[Layer]) -> list[str]:
    return [name for layer in layers for name in (layer.weight, layer.bias) if name]


def _load_data(options: CompileOptions, model: onnx.ModelProto) -> Any:
    from .data import load_dataset
    from .errors import UsageError
    from .model import input_spec, num_classes

    if options.data_path is None:
        raise UsageError("--data is required: attacks and calibration run on it")
    return load_dataset(
        options.data_path,
        input_spec(model),
        layout=options.layout,
        scale=options.scale,
        mean=options.mean,
        std=options.std,
        data_range=options.data_range,
        seed=options.seed,
        num_classes=num_classes(model),
    )


def make_attack(options: CompileOptions) -> Any:
    """The ANS attack of the options (FGSM by default, as in the paper)."""
    from .errors import UsageError
    from .harness.attacks import Attack, InputRange, parse_eps

    input_range = InputRange.parse(options.input_range)
    eps = parse_eps(options.eps)
    if options.attack == "fgsm":
        return Attack.fgsm(eps, input_range)
    if options.attack == "pgd":
        alpha = parse_eps(options.pgd_alpha, "--pgd-alpha") if options.pgd_alpha else None
        return Attack.pgd(eps, steps=options.pgd_steps, alpha=alpha, input_range=input_range)
    raise UsageError(f"--attack {options.attack!r} is not fgsm or pgd")


def _ans_samples(options: CompileOptions, dataset: Any) -> int:
    from .errors import DataError, UsageError

    if options.samples is None:
        return min(DEFAULT_ANS_SAMPLES, dataset.count)
    if options.samples < 1:
        raise UsageError(f"--samples {options.samples} must be at least 1")
    if options.samples > dataset.count:
        raise DataError(
            f"--samples {options.samples} is more than the {dataset.count} samples in {dataset.source}"
        )
    return options.samples


def _quanos_plan(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    dataset: Any,
    calibration: Sequence[np.ndarray],
    progress: ProgressFactory,
) -> Plan:
    """Attack -> ANS -> Eqn 3 (budgeted and/or iterative when asked)."""
    from .allocate import allocate, allocate_budgeted, allocate_iterative, check_bit_range
    from .errors import UsageError
    from .harness.ans import measure_ans

    check_bit_range(options.k_init, options.k_min)
    if options.rounds < 1:
        raise UsageError(f"--rounds {options.rounds} must be at least 1")
    if options.target_avg_bits is not None and not MIN_BITS <= options.target_avg_bits <= options.k_init:
        raise UsageError(
            f"--target-avg-bits {options.target_avg_bits} is outside {MIN_BITS}..{options.k_init} (--k-init)"
        )
    attack = make_attack(options)
    count = _ans_samples(options, dataset)

    def measure(proto: onnx.ModelProto, label: str) -> Any:
        with progress(label, count) as advance:
            batches = _first(dataset, count, options.batch_size)
            return measure_ans(proto, layers, batches, attack, seed=options.seed, progress=advance)

    first = measure(model, f"ANS ({attack.describe()})")
    allocation = dict(k_init=options.k_init, k_min=options.k_min, quantize_output=options.quantize_output)
    if options.rounds > 1:
        plan = allocate_iterative(
            layers,
            first.layers,
            quantize=lambda p: quantize(model, p, calibration, layers=layers).model,
            measure=lambda q: measure(q, "ANS on the quantized model").layers,
            rounds=options.rounds,
            target_average_bits=options.target_avg_bits,
            **allocation,
        )
    elif options.target_avg_bits is not None:
        plan = allocate_budgeted(layers, first.layers, options.target_avg_bits, **allocation)
    else:
        plan = allocate(layers, first.layers, **allocation)
    return plan.with_details(ans=first.to_json())


def _with_plan(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    from .passes.qdq import PLAN_METADATA_KEY

    for entry in model.metadata_props:
        if entry.key == PLAN_METADATA_KEY:
            entry.value = plan.dumps()
    return model


def _first(dataset: Any, count: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The first `count` samples of the dataset in batches."""
    taken = 0
    for x, y in dataset.batches(batch_size):
        if taken >= count:
            break
        keep = min(len(x), count - taken)
        taken += keep
        yield x[:keep], (None if y is None else y[:keep])


ANALYSIS_FILE = "analysis.json"


@dataclass(frozen=True)
class AnalyzeOptions:
    """`quanos analyze`: the ANS attack and data options of compile, plus accuracy grids."""

    model_path: str
    data_path: str | None = None
    output_dir: str | None = None
    fgsm_eps: str = "0.05,0.1,0.2"
    pgd_eps: str = "2/255,8/255"
    as_json: bool = False
    layout: str = "auto"
    scale: str | None = None
    mean: str | None = None
    std: str | None = None
    data_range: str | None = None
    seed: int = 0
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
        from .report.text import format_table

        doc = self.document
        ans_rows = [
            {"layer": r["layer"], "ans_mean": _rounded(r["ans_mean"]), "ans_std": _rounded(r["ans_std"])}
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
    from . import report
    from .errors import ModelError
    from .harness.ans import measure_ans
    from .harness.attacks import InputRange, parse_eps
    from .harness.evaluate import attack_grid, evaluate
    from .outputs import OutputDir

    clock = report.RunClock.start(command_line)
    inputs = [p for p in (options.model_path, options.data_path) if p]
    output = OutputDir(options.output_dir, inputs=inputs) if options.output_dir else None
    model = load_model(options.model_path)
    layers = list_layers(model)
    if not layers:
        raise ModelError(f"{options.model_path}: no quantizable layer to analyze")
    check_finite_initializers(model, _weights_and_biases(layers), options.model_path)
    dataset = _load_data(options, model)  # type: ignore[arg-type]
    attack = make_attack(options)  # type: ignore[arg-type]
    count = _ans_samples(options, dataset)  # type: ignore[arg-type]
    input_range = InputRange.parse(options.input_range)
    attacks = (
        *attack_grid(["fgsm"], _eps_list(options.fgsm_eps, "--fgsm-eps", parse_eps), input_range=input_range),
        *attack_grid(["pgd"], _eps_list(options.pgd_eps, "--pgd-eps", parse_eps), steps=options.pgd_steps, input_range=input_range),
    )
    with progress(f"ANS ({attack.describe()})", count) as advance:
        ans = measure_ans(model, layers, _first(dataset, count, options.batch_size), attack, seed=options.seed, progress=advance)
    with progress("accuracy under attack", count) as advance:
        evaluation = evaluate(model, _first(dataset, count, options.batch_size), attacks, seed=options.seed, progress=advance)
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


def _eps_list(text: str, option: str, parse: Callable[[str, str], float]) -> list[float]:
    return [parse(part, option) for part in text.split(",") if part.strip()]
