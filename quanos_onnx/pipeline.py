"""compile(): the stages in plain order. Each stage is a module; this file only wires them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .layers import Join, Layer, find_joins, list_layers
from .passes.align import align_plan
from .passes.calibrate import Range, collect_ranges
from .passes.points import plan_points
from .passes.qdq import activation_quantizer, insert_qdq
from .plan import MAX_BITS, MIN_BITS, Plan


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
) -> Quantized:
    """Align the plan, calibrate its quantizers in onnxruntime, and write the QDQ model."""
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
    return Quantized(insert_qdq(model, layers, aligned, points, quantizers), aligned)


def _union(ranges: Iterable[Range]) -> Range:
    collected = list(ranges)
    return Range(min(r.low for r in collected), max(r.high for r in collected))


MODEL_FILE = "model.quanos.onnx"
PLAN_FILE = "plan.json"
CALIBRATION_BATCH = 64


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
            }
            for layer in self.layers
        ]

    def summary_json(self) -> dict[str, object]:
        params = {layer.name: layer.params for layer in self.layers}
        return {
            "layers": self.rows(),
            "average_weight_bits": round(self.plan.average_weight_bits(params), 4),
            "method": self.plan.method,
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
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def run_compile(options: CompileOptions, command_line: Sequence[str] = ()) -> CompileResult:
    """load -> data -> plan -> align -> calibrate -> QDQ -> write, failing before any write."""
    from .data import load_dataset
    from .errors import ModelError, UsageError
    from .model import input_spec, load_model, num_classes
    from .outputs import OutputDir
    from .plan import read_plan, validate_plan

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
        raise ModelError(f"{options.model_path}: no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a constant weight)")
    if options.data_path is None:
        raise UsageError("--data is required: activation ranges are calibrated on it")
    dataset = load_dataset(
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
    if options.bits is not None:
        plan = Plan.uniform(layers, options.bits, keep_output_float=not options.quantize_output)
    elif options.plan_path is not None:
        plan = validate_plan(read_plan(options.plan_path), layers, options.plan_path)
    else:
        raise UsageError("give --bits N or --plan plan.json")
    calibration = [x for x, _ in _first(dataset, options.calibration_samples)]
    quantized = quantize(
        model, plan, calibration, layers=layers, method=options.calibration, percentile=options.percentile
    )
    files = {MODEL_FILE: quantized.model.SerializeToString(), PLAN_FILE: quantized.plan.dumps()}
    written = output.write(files)
    return CompileResult(tuple(layers), quantized.plan, tuple(str(p) for p in written))


def _first(dataset: object, count: int) -> Iterable[tuple[np.ndarray, np.ndarray | None]]:
    taken = 0
    for x, y in dataset.batches(CALIBRATION_BATCH):  # type: ignore[attr-defined]
        if taken >= count:
            break
        keep = min(len(x), count - taken)
        taken += keep
        yield x[:keep], (None if y is None else y[:keep])
