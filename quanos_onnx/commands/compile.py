"""`quanos compile`: load -> data -> plan (QUANOS, bits or plan file) -> QDQ -> the model,
plan, energy and report in memory; `CompileResult.save` writes them as the CLI does."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..errors import UsageError, arg
from ..layers import Layer, list_layers
from ..model import check_finite_initializers, check_finite_outputs, refuse_quantized
from ..plan import MAX_BITS, MIN_BITS, Plan
from ..progress import ProgressFactory, no_progress
from ..quantize import quantize
from .options import (
    check_data_range,
    AttackOptions,
    Calibration,
    DataSource,
    ModelSource,
    PlanSource,
    Storage,
    ans_samples,
    api_command_line,
    data_entry,
    first_samples,
    input_paths,
    load_data,
    read_model,
    read_plan_input,
    rounded,
    weights_and_biases,
)
from .results import check_output_dir, save_files

if TYPE_CHECKING:
    from ..report import RunInfo

MODEL_FILE = "model.quanos.onnx"
PLAN_FILE = "plan.json"


@dataclass(frozen=True, kw_only=True)
class CompileOptions(AttackOptions):
    """Everything compile takes besides its inputs (model, data, plan). Without `bits` or a
    plan, QUANOS: the ANS attack (AttackOptions), Eqn 3 from `k_init`/`k_min`, optionally a
    budget (`target_avg_bits`) and iterative `rounds`. Then calibration and QDQ insertion."""

    bits: int | None = None
    quantize_output: bool = False
    calibration: Calibration = "minmax"
    percentile: float = 99.99
    calibration_samples: int = 512
    storage: Storage = "int8"
    k_init: int = 16
    k_min: int = 2
    rounds: int = 1
    target_avg_bits: float | None = None

    def __post_init__(self) -> None:
        from ..allocate import check_bit_range

        super().__post_init__()
        if self.bits is not None and not MIN_BITS <= self.bits <= MAX_BITS:
            raise UsageError(f"{arg('bits')} {self.bits} is outside {MIN_BITS}..{MAX_BITS}")
        if self.calibration_samples < 1:
            raise UsageError(f"{arg('calibration_samples')} {self.calibration_samples} must be at least 1")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"{arg('percentile')} {self.percentile} is outside (50, 100]")
        check_bit_range(self.k_init, self.k_min)
        if self.rounds < 1:
            raise UsageError(f"{arg('rounds')} {self.rounds} must be at least 1")
        if self.target_avg_bits is not None and not MIN_BITS <= self.target_avg_bits <= self.k_init:
            raise UsageError(
                f"{arg('target_avg_bits')} {self.target_avg_bits} is outside {MIN_BITS}..{self.k_init} ({arg('k_init')})"
            )


@dataclass(frozen=True)
class CompileResult:
    """The compiled model and everything the CLI writes beside it, in memory.

    `model` is the QDQ model (plan in its metadata), `plan` the aligned plan (ANS and energy
    in its details), `report` the report document (report.json), `run` the run's provenance.
    """

    model: onnx.ModelProto
    plan: Plan
    layers: tuple[Layer, ...]
    report: Mapping[str, Any]
    run: RunInfo
    inputs: tuple[Path, ...] = ()
    written: tuple[Path, ...] = ()

    @property
    def energy(self) -> Mapping[str, Any]:
        """The quanos-energy document of the plan (docs/hardware.md)."""
        return self.plan.details["energy"]  # type: ignore[no-any-return]

    def files(self) -> dict[str, bytes | str]:
        """The files the CLI writes, by name: model.quanos.onnx, plan.json and the report."""
        from .. import report

        return {
            MODEL_FILE: self.model.SerializeToString(),
            PLAN_FILE: self.plan.dumps(),
            **report.report_files(self.report, self.run),
        }

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write files() into `directory`, all or nothing; never over an input file."""
        return save_files(directory, self.files(), self.inputs)

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
            "outputs": [str(path) for path in self.written],
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
    model: ModelSource,
    data: DataSource,
    options: CompileOptions,
    *,
    plan: PlanSource | None = None,
    save_to: str | os.PathLike[str] | None = None,
    command_line: Sequence[str] | None = None,
    progress: ProgressFactory = no_progress,
) -> CompileResult:
    """load -> data -> plan (QUANOS, `bits` or `plan`) -> align -> calibrate -> QDQ.

    Everything is computed before the first file is written (with `save_to`, whose
    directory is checked first), so a failure leaves nothing.
    """
    from .. import __version__, report
    from ..errors import ModelError
    from ..model import stamp_producer
    from ..plan import validate_plan
    from ..device import using_device
    from ..threads import using_threads

    clock = report.RunClock.start(api_command_line() if command_line is None else command_line)
    inputs = input_paths(model, data, plan)
    check_output_dir(save_to, inputs, names=(MODEL_FILE, PLAN_FILE, *report.REPORT_FILES))
    if options.bits is not None and plan is not None:
        raise UsageError(f"{arg('bits')} and {arg('plan')} exclude each other")
    source = read_model(model, input_shape=options.input_shape)
    refuse_quantized(source.proto, source.name)
    layers = list_layers(source.proto)
    if not layers:
        raise ModelError(
            f"{source.name}: no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a constant weight)"
        )
    check_finite_initializers(source.proto, weights_and_biases(layers), source.name)
    given_plan = None if plan is None else read_plan_input(plan)
    with using_threads(options.threads, torch=options.bits is None and given_plan is None), using_device(options.device):
        dataset = load_data(data, options, source.proto, model_name=source.name)
        check_data_range(options.input_range, dataset, attacked=options.bits is None and given_plan is None)
        calibration = [x for x, _ in first_samples(dataset, options.calibration_samples, options.batch_size)]
        check_finite_outputs(source.proto, calibration[0], source.name)
        if options.bits is not None:
            chosen = Plan.uniform(layers, options.bits, keep_output_float=not options.quantize_output)
        elif given_plan is not None:
            chosen = validate_plan(given_plan.plan, layers, given_plan.name)
        else:
            chosen = _quanos_plan(options, source.proto, layers, dataset, calibration, progress)
        quantized = quantize(
            source.proto,
            chosen,
            calibration,
            layers=layers,
            method=options.calibration,
            percentile=options.percentile,
            storage=options.storage,
        )
    energy, baselines = report.energy_sections(layers, quantized.plan)
    final_plan = quantized.plan.with_details(energy=energy)
    compiled = stamp_producer(_with_plan(quantized.model, final_plan), __version__)
    files: dict[str, bytes | str] = {MODEL_FILE: compiled.SerializeToString(), PLAN_FILE: final_plan.dumps()}
    document = report.report_document(
        "compile",
        models=[source.report_entry()],
        data=data_entry(data, dataset, dataset.count),
        plan_file=None if given_plan is None else given_plan.report_entry(),
        seed=options.seed,
        settings=options.settings(),
        layers=report.layer_rows(layers, final_plan, final_plan.details.get("ans")),
        summary=report.plan_summary(layers, final_plan),
        ans=final_plan.details.get("ans"),
        energy=energy,
        baselines=baselines,
        outputs=[report.output_entry(name, content) for name, content in files.items()],
    )
    result = CompileResult(compiled, final_plan, tuple(layers), document, clock.finish(), tuple(inputs))
    return result if save_to is None else replace(result, written=result.save(save_to))


def _quanos_plan(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    dataset: Any,
    calibration: Sequence[np.ndarray],
    progress: ProgressFactory,
) -> Plan:
    """Attack -> ANS -> Eqn 3 (budgeted and/or iterative when asked)."""
    from ..allocate import allocate, allocate_budgeted, allocate_iterative
    from ..harness.ans import measure_ans

    attack = options.ans_attack()
    count = ans_samples(options.samples, dataset)

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
