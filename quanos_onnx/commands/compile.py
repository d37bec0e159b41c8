"""`quanos compile`: load -> data -> plan (QUANOS, bits or plan file) -> QDQ -> write."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..layers import Layer, list_layers
from ..model import check_finite_initializers, load_model
from ..plan import MAX_BITS, MIN_BITS, Plan
from ..progress import ProgressFactory, no_progress
from ..quantize import quantize
from .options import DataOptions, ans_samples, first_samples, load_data, make_attack, rounded, settings_json, weights_and_biases

MODEL_FILE = "model.quanos.onnx"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class CompileOptions(DataOptions):
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
                "ans_mean": rounded(entries[layer.name].ans_mean),
                "ans_std": rounded(entries[layer.name].ans_std),
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
        from ..report.text import format_table

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
    from .. import report
    from ..errors import ModelError, UsageError
    from ..outputs import OutputDir
    from ..plan import read_plan, validate_plan

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
    check_finite_initializers(model, weights_and_biases(layers), options.model_path)
    dataset = load_data(options, model)
    calibration = [x for x, _ in first_samples(dataset, options.calibration_samples, options.batch_size)]
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


def _quanos_plan(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    dataset: Any,
    calibration: Sequence[np.ndarray],
    progress: ProgressFactory,
) -> Plan:
    """Attack -> ANS -> Eqn 3 (budgeted and/or iterative when asked)."""
    from ..allocate import allocate, allocate_budgeted, allocate_iterative, check_bit_range
    from ..errors import UsageError
    from ..harness.ans import measure_ans

    check_bit_range(options.k_init, options.k_min)
    if options.rounds < 1:
        raise UsageError(f"--rounds {options.rounds} must be at least 1")
    if options.target_avg_bits is not None and not MIN_BITS <= options.target_avg_bits <= options.k_init:
        raise UsageError(
            f"--target-avg-bits {options.target_avg_bits} is outside {MIN_BITS}..{options.k_init} (--k-init)"
        )
    attack = make_attack(options)
    count = ans_samples(options, dataset)

    def measure(proto: onnx.ModelProto, label: str) -> Any:
        with progress(label, count) as advance:
            batches = first_samples(dataset, count, options.batch_size)
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
    from ..passes.qdq import PLAN_METADATA_KEY

    for entry in model.metadata_props:
        if entry.key == PLAN_METADATA_KEY:
            entry.value = plan.dumps()
    return model
