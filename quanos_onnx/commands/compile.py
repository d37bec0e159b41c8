"""`quanos compile`: load -> data -> plan (QUANOS, bits or plan file) -> QDQ -> the model,
plan, energy and report in memory; `CompileResult.save` writes them as the CLI does."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from ..data import DEFAULT_EVAL_FRACTION
from ..allocate.solve import DEFAULT_ANS_WEIGHT, RobustnessSignal
from ..errors import UsageError, arg
from ..layers import Layer, list_layers
from ..model import check_finite_initializers, check_finite_outputs, refuse_quantized
from ..plan import MAX_BITS, MIN_BITS, FirstOutputBits, Plan
from ..ptq.statistics import CalibrationStatistics
from ..progress import ProgressFactory, no_progress
from ..quantize import quantize
from ..verify import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_ROBUST_SAMPLES
from .options import (
    check_data_range,
    AttackMethod,
    AttackOptions,
    RunOptions,
    Calibration,
    Rounding,
    WeightClipping,
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
from .pareto import PARETO_CHART
from .results import check_output_dir, save_files

if TYPE_CHECKING:
    from ..data import Dataset
    from ..jobs import Jobs
    from ..report import RunInfo
    from ..ptq import PtqSettings
    from ..verify import Verification, VerifySettings

MODEL_FILE = "model.quanos.onnx"
PLAN_FILE = "plan.json"
SEARCH_SAMPLES = 1000
"""At most this many samples after the calibration samples judge plans during a milp search."""
MIN_SEARCH_SAMPLES = 200
"""A milp search keeps at least this many samples (or half the calibration part) out of
calibration, so its plans are judged on samples their grids were not fitted to."""
DEFAULT_JOIN_OPERAND_BITS = 8
"""What `join_operand_bits="auto"` means for every method but eqn3 and a given plan: the
operands of residual joins on 8-bit grids, the join's sum on the grid of the layer it feeds,
so a block's output is rounded once (docs/quantization.md, "Residual joins"). Every plan at
fixed bits gained or held (ResNet-20 W3A3 66.7% -> 85.8%), and only with it does the default
compile keep its guard on every shared model at GUARD_STANDARD_ERRORS (docs/benchmarks.md,
"The guard's margin"). Eqn 3 keeps the paper's rule, operands at the join's bits."""

AllocationMethod = Literal["eqn3", "milp"]
SensitivityMethod = Literal["auto", "kl", "mse", "fisher"]


@dataclass(frozen=True, kw_only=True)
class CompileOptions(AttackOptions, RunOptions):
    """Everything compile takes besides its inputs (model, data, plan). Without `bits` or a
    plan, QUANOS: the ANS attack (AttackOptions), then `method` "milp" (default) — measured
    per-layer cost of bits `k_min`..`max_bits` (`sensitivity`), the exact integer program
    under `budget` ("avg-bits=4", "bytes=N", "energy=dg:PJ", "bitops=N") with the ANS term
    weighted by `ans_weight`, plans checked on the samples after calibration against the
    accuracy guard (`max_accuracy_drop` points of float; without a budget the smallest plan
    that keeps it, with one the plan repaired until it does), `pareto` a front over
    average-bits budgets — or "eqn3": Eqn 3 from `k_init`/`k_min`, optionally a budget
    (`target_avg_bits`) and iterative `rounds`. Then calibration and QDQ insertion."""

    bits: int | None = None
    quantize_output: bool = False
    first_last_bits: int | None = None
    """The first quantized layer and, with `quantize_output`, the output layer at these bits
    (weights and input), and the first layer's output too (its readers' input,
    plan.FirstOutputBits), whatever the plan says, as the PTQ papers keep them at 8
    (plan.first_and_last_layers); the milp counts them in its budget."""
    input_bits: int | None = None
    """The model input's quantizer at no more than these bits (plan.with_input_bits), on the
    written plan and on every plan the milp search measures."""
    act_bits: int | None = None
    """Every quantized layer's activations at these bits whatever its weight bits
    (plan.with_act_bits; the first and last layers' too, after `first_last_bits`): on the
    written plan, on every plan the milp measures, in its sensitivity table and in the
    verification's uniform models. None: QUANOS's one bit-width per layer for its weights and
    its input."""
    join_operand_bits: int | Literal["auto"] | None = "auto"
    """The operands of every quantized residual join at no fewer than these bits, the join's
    sum at the bits of the layer it feeds (PtqSettings.join_operand_bits; docs/quantization.md,
    "Residual joins"). None: the paper's rule, operands at the join's bits. "auto": what a
    given plan recorded, else the paper's rule for eqn3 and DEFAULT_JOIN_OPERAND_BITS for
    the rest (operand_bits)."""
    calibration: Calibration = "auto"
    percentile: float = 99.99
    weight_clipping: WeightClipping = "output"
    bias_correction: bool = True
    equalize: bool = False
    rounding: Rounding = "nearest"
    rounding_iterations: int = 500
    calibration_samples: int = 512
    storage: Storage = "int8"
    k_init: int = 16
    k_min: int = 2
    rounds: int = 1
    target_avg_bits: float | None = None
    method: AllocationMethod = "milp"
    budget: str | None = None
    ans_weight: float = DEFAULT_ANS_WEIGHT
    robustness_signal: RobustnessSignal = "ans"
    """The milp's robustness term: ANS, the layers' Lipschitz bounds, or both (docs/method.md)."""
    sensitivity: SensitivityMethod = "auto"
    sensitivity_samples: int = 256
    max_bits: int = 8
    pareto: bool = False
    evaluate: bool = True
    """Verify the compiled model (verify.py) on held-out data: off is the CLI's --no-eval."""
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    eval_attacks: tuple[AttackMethod, ...] = ("fgsm", "pgd")
    eval_samples: int = DEFAULT_ROBUST_SAMPLES
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP

    def __post_init__(self) -> None:
        from ..allocate import check_bit_range

        super().__post_init__()
        if self.bits is not None and not MIN_BITS <= self.bits <= MAX_BITS:
            raise UsageError(f"{arg('bits')} {self.bits} is outside {MIN_BITS}..{MAX_BITS}")
        if self.first_last_bits is not None and not MIN_BITS <= self.first_last_bits <= MAX_BITS:
            raise UsageError(f"{arg('first_last_bits')} {self.first_last_bits} is outside {MIN_BITS}..{MAX_BITS}")
        if self.input_bits is not None and not MIN_BITS <= self.input_bits <= MAX_BITS:
            raise UsageError(f"{arg('input_bits')} {self.input_bits} is outside {MIN_BITS}..{MAX_BITS}")
        if self.act_bits is not None and not MIN_BITS <= self.act_bits <= MAX_BITS:
            raise UsageError(f"{arg('act_bits')} {self.act_bits} is outside {MIN_BITS}..{MAX_BITS}")
        # conform() has already refused anything but an int, "auto" or None.
        if isinstance(self.join_operand_bits, int) and not MIN_BITS <= self.join_operand_bits <= MAX_BITS:
            raise UsageError(f"{arg('join_operand_bits')} {self.join_operand_bits} is outside {MIN_BITS}..{MAX_BITS}")
        if self.calibration_samples < 1:
            raise UsageError(f"{arg('calibration_samples')} {self.calibration_samples} must be at least 1")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"{arg('percentile')} {self.percentile} is outside (50, 100]")
        self.ptq_settings()
        check_bit_range(self.k_init, self.k_min)
        if self.rounds < 1:
            raise UsageError(f"{arg('rounds')} {self.rounds} must be at least 1")
        if self.target_avg_bits is not None and not MIN_BITS <= self.target_avg_bits <= self.k_init:
            raise UsageError(
                f"{arg('target_avg_bits')} {self.target_avg_bits} is outside {MIN_BITS}..{self.k_init} ({arg('k_init')})"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise UsageError(f"{arg('eval_fraction')} {self.eval_fraction} must be a fraction between 0 and 1, e.g. 0.2")
        self.verify_settings()
        self._check_allocation()

    def _check_allocation(self) -> None:
        """Options of one allocation method are refused with the other, and checked early."""
        if self.bits is not None:
            return
        if self.method == "eqn3":
            milp_only = (
                ("budget", self.budget),
                ("pareto", self.pareto or None),
                ("robustness_signal", None if self.robustness_signal == "ans" else self.robustness_signal),
            )
            given = [name for name, value in milp_only if value is not None]
            if given:
                raise UsageError(f"{arg(given[0])} needs {arg('method')} milp (Eqn 3 takes {arg('target_avg_bits')})")
            return
        if self.target_avg_bits is not None or self.rounds != 1:
            raise UsageError(
                f"{arg('target_avg_bits')} and {arg('rounds')} are Eqn 3's; give {arg('method')} eqn3, or "
                f"{arg('budget')} avg-bits=B for the integer program"
            )
        if self.pareto and not self.evaluate:
            raise UsageError(
                f"{arg('pareto')} measures every plan of the front on the held-out split, which {arg('evaluate')} "
                "off skips; keep the evaluation on"
            )
        if self.sensitivity_samples < 1:
            raise UsageError(f"{arg('sensitivity_samples')} {self.sensitivity_samples} must be at least 1")
        if not self.k_min <= self.max_bits <= MAX_BITS:
            raise UsageError(f"{arg('max_bits')} {self.max_bits} is outside {arg('k_min')} {self.k_min}..{MAX_BITS}")
        if self.first_last_bits is not None and not self.k_min <= self.first_last_bits <= self.max_bits:
            raise UsageError(
                f"{arg('first_last_bits')} {self.first_last_bits} is outside the integer program's candidates "
                f"{arg('k_min')}..{arg('max_bits')} ({self.k_min}..{self.max_bits})"
            )
        if self.budget is not None:
            from ..allocate.solve import parse_budget

            parse_budget(self.budget)

    def first_last_layers(self, layers: Sequence[Layer]) -> dict[str, int]:
        """The layers `first_last_bits` pins, with its bits (none without it)."""
        from ..plan import first_and_last_layers

        if self.first_last_bits is None:
            return {}
        return dict.fromkeys(first_and_last_layers(layers, quantize_output=self.quantize_output), self.first_last_bits)

    def with_first_last_bits(self, plan: Plan, layers: Sequence[Layer], first_output: FirstOutputBits | None) -> Plan:
        """The chosen plan with the first/last layers and the first layer's output
        (`first_output`, from self.first_output) at `first_last_bits`, before alignment."""
        pinned = self.first_last_layers(layers)
        if not pinned or self.first_last_bits is None:
            return plan
        readers = [] if first_output is None else list(first_output.readers)
        plan = plan.with_bits(tuple(pinned), self.first_last_bits)
        return (plan if first_output is None else first_output.apply(plan)).with_details(
            first_last_bits={"bits": self.first_last_bits, "layers": list(pinned), "output_readers": readers}
        )

    def first_output(self, model: onnx.ModelProto, layers: Sequence[Layer]) -> FirstOutputBits | None:
        """The first pinned layer's output at `first_last_bits` (None without it)."""
        from ..passes.points import output_readers
        from ..plan import FirstOutputBits, first_and_last_layers

        pinned = first_and_last_layers(layers, quantize_output=self.quantize_output)
        if self.first_last_bits is None or not pinned:
            return None
        return FirstOutputBits(output_readers(model, layers, pinned[0]), self.first_last_bits)

    def with_activation_bits(self, plan: Plan, layers: Sequence[Layer]) -> Plan:
        """The plan with every activation at `act_bits` and the model input at no more than
        `input_bits` (plan.with_activation_bits; unchanged without either)."""
        from ..plan import with_activation_bits

        return with_activation_bits(plan, layers, act_bits=self.act_bits, input_bits=self.input_bits)

    def ptq_settings(self, *, rounding: bool = True) -> PtqSettings:
        """How the plan's grids are chosen (ptq/); without `rounding`, round-to-nearest,
        for the many trial plans of a search."""
        from ..ptq import PtqSettings

        return PtqSettings(
            act_range=self.calibration,
            percentile=self.percentile,
            weight_clipping=self.weight_clipping,
            bias_correction=self.bias_correction,
            equalize=self.equalize,
            rounding=self.rounding if rounding else "nearest",
            rounding_iterations=self.rounding_iterations,
            seed=self.seed,
            join_operand_bits=self.operand_bits(),
        )

    def operand_bits(self) -> int | None:
        """`join_operand_bits` with "auto" resolved by the method (a given plan's own is
        resolved by compile before any grid is chosen)."""
        if self.join_operand_bits != "auto":
            return self.join_operand_bits
        return None if self.method == "eqn3" else DEFAULT_JOIN_OPERAND_BITS

    def verify_settings(self) -> VerifySettings:
        """The checks of the compiled model (verify.py): the eval attacks at the ANS eps."""
        from ..verify import VerifySettings, evaluation_attacks

        return VerifySettings(
            evaluation_attacks(",".join(self.eval_attacks) or "none", self.eps, self.value_range()),
            robust_samples=self.eval_samples,
            max_accuracy_drop=self.max_accuracy_drop,
            batch_size=self.batch_size,
            seed=self.seed,
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
    verification: Verification | None = None
    """The artifact against float and uniform on held-out data (verify.py); None when not evaluated."""
    figures: bool = True
    """Whether report.html draws the figures (the `figures` option)."""

    @property
    def passed(self) -> bool:
        """False when the compiled model broke the accuracy guard (its files are still complete)."""
        return self.verification is None or self.verification.passed

    @property
    def warnings(self) -> tuple[str, ...]:
        """What a user must know before shipping the model (verify.py), with or without evaluation."""
        from ..verify import kernel_warnings

        return self.verification.warnings if self.verification else tuple(kernel_warnings(self.plan))

    @property
    def energy(self) -> Mapping[str, Any]:
        """The quanos-energy document of the plan (docs/hardware.md)."""
        return self.plan.details["energy"]  # type: ignore[no-any-return]

    def files(self) -> dict[str, bytes | str]:
        """The files the CLI writes, by name: model.quanos.onnx, plan.json, pareto.png with
        --pareto, and the report."""
        from .. import report
        from ..report.plots import pareto_plot

        chart = {PARETO_CHART: pareto_plot(self.report["pareto"]).png} if self.report.get("pareto") else {}
        return {
            MODEL_FILE: self.model.SerializeToString(),
            PLAN_FILE: self.plan.dumps(),
            **chart,
            **report.report_files(self.report, self.run, figures=self.figures),
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
            "allocation": self.plan.details.get("allocation"),
            "energy": self.plan.details.get("energy"),
            "verification": None if self.verification is None else self.verification.to_json(),
            "outputs": [str(path) for path in self.written],
        }

    def summary_text(self) -> str:
        from ..report.text import format_table

        from ..report.content import guard_text

        params = {layer.name: layer.params for layer in self.layers}
        verified = self.verification
        lines = [
            *([verified.headline(), f"accuracy guard: {guard_text(verified.to_json())}", ""] if verified else []),
            format_table(self.rows()),
            "",
            f"method {self.plan.method}; parameter-weighted average weight bits "
            f"{self.plan.average_weight_bits(params):.2f}",
            *_allocation_lines(self.plan.details.get("allocation")),
            *_energy_lines(self.plan.details.get("energy")),
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def _allocation_lines(allocation: Mapping[str, Any] | None) -> list[str]:
    if not allocation:
        return []
    moved = allocation["moved_from_eqn3"]
    lines = [
        f"allocation: {allocation['how']}; {moved['layers_changed']} of {moved['layers']} layers differ from "
        f"Eqn 3 (mean |change| {moved['mean_abs_bits']:.2f} bits, Eqn 3 average {moved['eqn3_average_bits']:.2f})"
    ]
    search = allocation.get("search_accuracy")
    if search is not None:
        lines.append(
            f"search split ({allocation['search_samples']} samples): {100 * search:.2f}% vs float "
            f"{100 * allocation['float_accuracy']:.2f}%"
        )
    return lines


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
    eval_data: DataSource | None = None,
    save_to: str | os.PathLike[str] | None = None,
    command_line: Sequence[str] | None = None,
    progress: ProgressFactory = no_progress,
) -> CompileResult:
    """load -> data -> plan (QUANOS, `bits` or `plan`) -> align -> calibrate -> QDQ -> verify.

    Verification (options.evaluate) measures the compiled model against float and uniform
    models on `eval_data`, else on a held-out part of `data` that nothing else sees; a broken
    accuracy guard is in `result.passed` and the report, and raises nothing.
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
    inputs = input_paths(model, data, plan, eval_data)
    chart = (PARETO_CHART,) if options.pareto else ()
    check_output_dir(save_to, inputs, names=(MODEL_FILE, PLAN_FILE, *chart, *report.REPORT_FILES))
    if options.bits is not None and plan is not None:
        raise UsageError(f"{arg('bits')} and {arg('plan')} exclude each other")
    if eval_data is not None and not options.evaluate:
        raise UsageError(
            f"{arg('eval_data')} is given but evaluation is turned off",
            hint="leave out --no-eval (evaluate=False), or the evaluation data",
        )
    source = read_model(model, input_shape=options.input_shape)
    refuse_quantized(source.proto, source.name)
    layers = list_layers(source.proto)
    if not layers:
        raise ModelError(
            f"{source.name}: no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a constant weight)"
        )
    check_finite_initializers(source.proto, weights_and_biases(layers), source.name)
    given_plan = None if plan is None else read_plan_input(plan)
    if options.join_operand_bits == "auto":
        # A given plan brings its joins' rule along, so its uniform baselines follow it too;
        # resolved here so that report.json's settings say which rule ran.
        operand_bits = options.operand_bits() if given_plan is None else given_plan.plan.join_operand_bits
        options = replace(options, join_operand_bits=operand_bits)
    checks = options.verify_settings() if options.evaluate else None
    attacked = options.bits is None and given_plan is None
    with using_threads(options.threads, torch=attacked or bool(checks and checks.attacks)), using_device(options.device):
        dataset, evaluation = _split_data(
            load_data(data, options, source.proto, model_name=source.name), eval_data, options, source
        )
        attacked = (options.bits is None and given_plan is None) or (options.evaluate and bool(options.eval_attacks))
        check_data_range(options.input_range, dataset, attacked=attacked)
        searched = options.method == "milp" and options.bits is None and given_plan is None
        calibration_count = calibration_samples(options.calibration_samples, dataset.count, searched=searched)
        calibration = [x for x, _ in first_samples(dataset, calibration_count, options.batch_size)]
        check_finite_outputs(source.proto, calibration[0], source.name)
        statistics = CalibrationStatistics(source.proto, calibration, equalized=options.equalize)
        first_output = options.first_output(source.proto, layers)
        if options.bits is not None:
            chosen = Plan.uniform(layers, options.bits, keep_output_float=not options.quantize_output)
        elif given_plan is not None:
            chosen = validate_plan(given_plan.plan, layers, given_plan.name)
        elif options.method == "milp":
            chosen = _milp_plan(options, source.proto, layers, dataset, statistics, first_output, progress)
        else:
            chosen = _quanos_plan(options, source.proto, layers, dataset, statistics, progress)
        chosen = options.with_activation_bits(options.with_first_last_bits(chosen, layers, first_output), layers)

        def quantize_plan(wanted: Plan) -> Any:
            return quantize(
                source.proto,
                wanted,
                calibration,
                layers=layers,
                storage=options.storage,
                ptq=options.ptq_settings(),
                statistics=statistics,
                progress=progress,
            )

        quantized = quantize_plan(chosen)
        energy, baselines = report.energy_sections(layers, quantized.plan)
        final_plan = quantized.plan.with_details(energy=energy, **_range_details(options, statistics))
        compiled = stamp_producer(_with_plan(quantized.model, final_plan), __version__)
        verification = None
        if checks is not None and evaluation is not None:
            from ..verify import verify

            verification = verify(
                source.proto, compiled, final_plan, lambda wanted: quantize_plan(wanted).model, evaluation, checks,
                layers=layers, progress=progress,
            )
        pareto = None
        if options.pareto and "pareto" in final_plan.details.get("allocation", {}) and verification and checks:
            from .pareto import measured_front

            pareto = measured_front(
                source.proto, layers, final_plan, lambda wanted: quantize_plan(wanted).model, evaluation, checks,
                verification, candidates=range(options.k_min, options.max_bits + 1), profile=_front_profile(options),
                quantize_output=options.quantize_output, input_bits=options.input_bits, act_bits=options.act_bits,
                first_output=first_output,
                progress=progress,
            )
            final_plan = final_plan.with_details(allocation={**final_plan.details["allocation"], "pareto": pareto})
            compiled = _with_plan(compiled, final_plan)
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
        verification=None if verification is None else verification.to_json(),
        pareto=pareto,
        outputs=[report.output_entry(name, content) for name, content in files.items()],
    )
    guard = None if verification is None else verification.guard.to_json()
    run = replace(clock.finish(options.threads), accuracy_guard=guard)
    result = CompileResult(
        compiled, final_plan, tuple(layers), document, run, tuple(inputs), verification=verification, figures=options.figures
    )
    return result if save_to is None else replace(result, written=result.save(save_to))


def _range_details(options: CompileOptions, statistics: CalibrationStatistics) -> dict[str, Any]:
    """plan.json's `activation_ranges`: probe's method at 6 bits and fewer and the measurement
    that chose it, when the compile wrote any plan with such activations (else nothing)."""
    from ..ptq import chosen_low_bits_range

    chosen = chosen_low_bits_range(statistics, options.ptq_settings())
    return {} if chosen is None else {"activation_ranges": chosen.to_json()}


def _front_profile(options: CompileOptions) -> Any:
    """The hardware profile the front's energy axis uses: the energy budget's, else standard."""
    from ..allocate.solve import parse_budget
    from ..hwmodel.profiles import load_profile

    budget = None if options.budget is None else parse_budget(options.budget)
    return budget.profile if budget is not None and budget.profile is not None else load_profile("standard")


def _split_data(dataset: Dataset, eval_data: DataSource | None, options: CompileOptions, source: Any) -> tuple[Dataset, Dataset | None]:
    """(what the compiler may see, what only verification sees): `eval_data`, else a held-out
    part of `data` (data.split_held_out); without evaluation all of `data` and nothing."""
    from ..data import dataset_from, split_held_out
    from ..model import input_spec, num_classes

    if not options.evaluate:
        return dataset, None
    if eval_data is None:
        split = split_held_out(dataset, options.eval_fraction, seed=options.seed)
        return split.calibration, split.evaluation
    read = {**options.read_options(), "data_range": None}  # the range slices `data` only
    evaluation = dataset_from(
        eval_data, input_spec(source.proto), num_classes=num_classes(source.proto, source.name), argument="eval_data", **read
    )
    return dataset, evaluation


def _quanos_plan(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    dataset: Any,
    statistics: CalibrationStatistics,
    progress: ProgressFactory,
) -> Plan:
    """Attack -> ANS -> Eqn 3 (budgeted and/or iterative when asked)."""
    from ..allocate import allocate, allocate_budgeted, allocate_iterative

    measure = _measure_ans(options, layers, dataset, progress)
    first = measure(model, f"ANS ({options.ans_attack().describe()})")
    allocation = dict(k_init=options.k_init, k_min=options.k_min, quantize_output=options.quantize_output)
    if options.rounds > 1:
        plan = allocate_iterative(
            layers,
            first.layers,
            quantize=lambda p: quantize(
                model, p, statistics.batches, layers=layers, ptq=options.ptq_settings(rounding=False), statistics=statistics,
            ).model,
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


def _measure_ans(
    options: CompileOptions, layers: Sequence[Layer], dataset: Any, progress: ProgressFactory
) -> Callable[[onnx.ModelProto, str], Any]:
    """The ANS measurement of the options (attack, sample count, batches, seed)."""
    from ..harness.ans import measure_ans

    attack = options.ans_attack()
    count = ans_samples(options.samples, dataset)

    def measure(proto: onnx.ModelProto, label: str) -> Any:
        with progress(label, count) as advance:
            batches = first_samples(dataset, count, options.batch_size)
            return measure_ans(proto, layers, batches, attack, seed=options.seed, progress=advance)

    return measure


def _milp_plan(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    dataset: Any,
    statistics: CalibrationStatistics,
    first_output: FirstOutputBits | None,
    progress: ProgressFactory,
) -> Plan:
    """ANS -> measured sensitivity -> integer program -> plans checked on a search split.

    With --budget: the exact optimum within it, then repaired (bits raised) until the search
    split's accuracy is within --max-accuracy-drop of float when that is given. Without a
    budget: the smallest average-bits budget whose plan keeps the guard (default 1 point).
    The search split is the data after the calibration samples (up to 1000), so the plans
    are judged on samples calibration did not see; with no such samples, the calibration
    samples themselves (logged).
    """
    import logging

    from ..allocate import allocate
    from ..allocate.search import no_worse_than_uniform, pareto_front, repair, smallest_within_guard
    from ..allocate.sensitivity import auto_method, check_candidate_bits, measure
    from ..allocate.solve import Budget, parse_budget, solve
    from ..layers import find_joins

    joins = find_joins(model, layers)
    candidates = check_candidate_bits(list(range(options.k_min, options.max_bits + 1)))
    measure_ans = _measure_ans(options, layers, dataset, progress)
    ans = measure_ans(model, f"ANS ({options.ans_attack().describe()})")
    ans_means = {result.layer: result.mean for result in ans.layers}
    eqn3 = allocate(layers, ans.layers, k_init=options.k_init, k_min=options.k_min, quantize_output=options.quantize_output)
    sensitivity_batches = list(first_samples(dataset, min(options.sensitivity_samples, dataset.count), options.batch_size))
    method = options.sensitivity
    if method == "auto":
        method = auto_method(layers, candidates, sum(len(x) for x, _ in sensitivity_batches), options.quantize_output)
    with progress(f"sensitivity ({method})", 1) as advance:
        table = measure(
            method, model, layers, joins, [x for x, _ in sensitivity_batches],
            labels=None if any(y is None for _, y in sensitivity_batches) else [y for _, y in sensitivity_batches],
            bits=candidates, quantize_output=options.quantize_output, ptq=options.ptq_settings(rounding=False),
            statistics=statistics, act_bits=options.act_bits, first_output=first_output,
        )
        advance(1)
    trial, search = _search_split(options, model, layers, joins, dataset, statistics, first_output)
    evaluate = trial.accuracy
    jobs = options.jobs()
    minimum = search.float_accuracy - (options.max_accuracy_drop if options.max_accuracy_drop is not None else 1.0) / 100
    lipschitz = None
    if options.robustness_signal != "ans":
        from ..harness.lipschitz import operator_bounds

        with progress("Lipschitz bounds", len(layers)) as advance:
            lipschitz = {bound.layer: bound.bound for bound in operator_bounds(model, layers, seed=options.seed)}
            advance(len(layers))
    solve_options = dict(
        ans=ans_means, ans_weight=options.ans_weight, lipschitz=lipschitz,
        robustness_signal=options.robustness_signal, quantize_output=options.quantize_output,
        fixed=options.first_last_layers(layers),
    )
    # One connection for every round of trial plans (one Ray instance with --ray local).
    with jobs.open() if options.budget is None or options.pareto else nullcontext():
        if options.budget is not None:
            budget = parse_budget(options.budget)
            solved = solve(layers, joins, table, budget, **solve_options)
            compared = no_worse_than_uniform(
                solved, evaluate(solved), layers, budget, candidates, evaluate,
                quantize_output=options.quantize_output, fixed=solve_options["fixed"],
            )
            plan, accuracy = compared.plan, compared.accuracy
            how = f"integer program within {budget.describe()}"
            if plan.details.get("uniform_check", {}).get("kept") == "uniform":
                check = plan.details["uniform_check"]
                how += (
                    f"; uniform {check['uniform_bits']} bits kept, more accurate on the search split than the solved plan "
                    f"({100 * check['uniform_accuracy']:.1f}% against {100 * check['solved_accuracy']:.1f}%)"
                )
            if options.max_accuracy_drop is not None:
                checked = repair(
                    plan, layers, joins, table, evaluate, minimum, budget=budget, accuracy=accuracy, fixed=solve_options["fixed"]
                )
                plan, accuracy, how = checked.plan, checked.accuracy, how + f", repaired in {len(checked.steps)} step(s)"
        else:
            checked = smallest_within_guard(
                layers, joins, table, evaluate, minimum, **solve_options,
                evaluate_many=_evaluate_many(jobs, trial), parallel=jobs.slots(),
            )
            if not checked.passed:
                logging.getLogger(__name__).warning(
                    "no plan with bits %d..%d keeps the search split within the guard; writing the widest, repaired as far as it went",
                    candidates[0], candidates[-1],
                )
            plan, accuracy = checked.plan, checked.accuracy
            how = f"smallest average-bits budget within {100 * (search.float_accuracy - minimum):.2g} point(s) of float"
            if checked.steps:
                how += f" (the widest plans failed; repaired in {len(checked.steps)} step(s))"
        details: dict[str, Any] = {
            "how": how,
            "sensitivity": table.to_json(),
            "ans_weight": options.ans_weight,
            "robustness_signal": options.robustness_signal,
            "float_accuracy": search.float_accuracy,
            "search_accuracy": accuracy,
            "search_samples": search.samples,
            "search_source": search.source,
            "moved_from_eqn3": moved_from_eqn3(layers, eqn3, plan),
        }
        if options.pareto:
            budgets = [Budget("avg-bits", float(b)) for b in candidates]
            points = pareto_front(
                layers, joins, table, evaluate, budgets, **solve_options, evaluate_many=_evaluate_many(jobs, trial)
            )
            details["pareto"] = [point.to_json() for point in points]  # measured on the written models by compile()
    return plan.with_details(ans=ans.to_json(), allocation=details)


@dataclass(frozen=True)
class _SearchSplit:
    samples: int
    source: str
    float_accuracy: float


def parse_join_operand_bits(text: str) -> int | Literal["auto"] | None:
    """`--join-operand-bits N`, `paper` (None: the paper's rule) or `auto`."""
    word = text.strip().lower()
    if word == "auto":
        return "auto"
    if word == "paper":
        return None
    try:
        return int(word)
    except ValueError:
        raise UsageError(f"{arg('join_operand_bits')} {text!r} is not a number of bits, 'paper' or 'auto'") from None


def calibration_samples(wanted: int, available: int, *, searched: bool) -> int:
    """How many of the calibration part's samples calibrate: `wanted`, except that a milp
    search needs samples of its own (MIN_SEARCH_SAMPLES, or half of a small part).

    Judged on its own calibration samples, a search picks plans that fit those samples'
    ranges and loses points on new data (the bundled MNIST example: 98% on the 200
    calibration samples, 94% held out, at 2.06 bits)."""
    if not searched or available >= wanted + MIN_SEARCH_SAMPLES:
        return wanted
    return max(1, min(wanted, max(available - MIN_SEARCH_SAMPLES, available // 2)))


GUARD_STANDARD_ERRORS = 2.0
"""How many standard errors of its paired difference from float a plan's search accuracy is
lowered by (guarded_accuracy). The bisection judges five to seven plans and keeps the
smallest that passes, so one lucky split is enough to keep a plan that loses on new data: at
1.0, MobileNetV2's default compile kept a 5.00-bit plan that measured exactly float's
accuracy on its 768 search images and lost 4.3 points on the held-out ones (docs/benchmarks.md,
"The guard's margin"). At 2.0 every shared model's default compile keeps its guard on the
held-out images; with the paper's join rule ResNet-20's plan then grows to 7.34 bits, which
is one reason the default rounds the joins once (DEFAULT_JOIN_OPERAND_BITS)."""


def guarded_accuracy(float_correct: np.ndarray, plan_correct: np.ndarray) -> float:
    """A plan's accuracy on the search split, lowered by GUARD_STANDARD_ERRORS standard
    errors of its paired difference from float (sqrt(discordant samples) / n each).

    The search keeps the smallest plan within the guard; judged on the point estimate of a
    few hundred samples, it keeps the plan that was lucky on them (the bundled MNIST
    example: 1 point below float on 100 search samples, 4 points below on the held-out
    ones). The bound shrinks as the split grows, so large splits are judged nearly as is."""
    accuracy = float(plan_correct.mean())
    discordant = int(np.count_nonzero(plan_correct != float_correct))
    return accuracy - GUARD_STANDARD_ERRORS * float(np.sqrt(discordant)) / len(plan_correct)


def _search_split(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    joins: Sequence[Any],
    dataset: Any,
    statistics: CalibrationStatistics,
    first_output: FirstOutputBits | None,
) -> tuple[_SearchTrial, _SearchSplit]:
    """What compiles a plan and measures its clean accuracy on the search split."""
    import logging

    from ..model import output_names

    calibration = statistics.batches
    first = sum(len(x) for x in calibration)
    if dataset.count > first:
        x = np.asarray(dataset.x[first : first + SEARCH_SAMPLES])
        y = None if dataset.y is None else dataset.y[first : first + SEARCH_SAMPLES]
        source = f"samples {first}..{first + len(x) - 1} (after the calibration samples)"
    else:
        logging.getLogger(__name__).warning(
            "all %d samples calibrate; plans are judged on the calibration samples (give more data)", dataset.count
        )
        x, y = np.concatenate(list(calibration)), None if dataset.y is None else dataset.y[:first]
        source = "the calibration samples"
    name = output_names(model)[0]
    float_predictions = _predictions(model, name, x, options.batch_size)
    labels = float_predictions if y is None else np.asarray(y)
    trial = _SearchTrial(
        model, statistics, tuple(layers), tuple(joins), options.ptq_settings(rounding=False),
        x, labels, float_predictions == labels, name, options.batch_size, options.input_bits, options.act_bits,
        first_output,
    )
    return trial, _SearchSplit(len(x), source, float((float_predictions == labels).mean()))


@dataclass(frozen=True, eq=False)
class _SearchTrial:
    """Everything a trial plan's accuracy needs, in one object so that a job in another
    process (Ray) gets it once: the float model, the calibration samples with their
    statistics (filled by the sensitivity table), the PTQ settings and the search split with
    float's correctness on it."""

    model: onnx.ModelProto
    statistics: CalibrationStatistics
    layers: tuple[Layer, ...]
    joins: tuple[Any, ...]
    ptq: Any
    x: np.ndarray
    labels: np.ndarray
    float_correct: np.ndarray
    output: str
    batch_size: int
    input_bits: int | None
    act_bits: int | None
    first_output: FirstOutputBits | None

    def accuracy(self, plan: Plan) -> float:
        """The plan compiled (with the compile's activation and input bits, and the first
        layer's output at --first-last-bits) and judged on the search split (guarded_accuracy)."""
        from ..plan import with_activation_bits

        plan = with_activation_bits(
            plan, self.layers, act_bits=self.act_bits, input_bits=self.input_bits, first_output=self.first_output
        )
        quantized = quantize(
            self.model, plan, self.statistics.batches, layers=self.layers, joins=self.joins, ptq=self.ptq,
            statistics=self.statistics,
        )
        correct = _predictions(quantized.model, self.output, self.x, self.batch_size) == self.labels
        return guarded_accuracy(self.float_correct, correct)


def _trial_accuracy(trial: _SearchTrial, plan: Plan, progress: ProgressFactory) -> float:
    """One trial plan's job (jobs.py)."""
    return trial.accuracy(plan)


def _evaluate_many(jobs: Jobs, trial: _SearchTrial) -> Callable[[Sequence[Plan]], list[float]]:
    """Independent trial plans measured as jobs: in this process one by one, or on Ray,
    with the trial's model and samples put into the object store once."""
    if jobs.ray is None:
        return lambda plans: [trial.accuracy(plan) for plan in plans]
    shared = jobs.share(trial)
    return lambda plans: jobs.run(_trial_accuracy, shared, list(plans), label="trial plans")


def _predictions(model: onnx.ModelProto, output: str, x: np.ndarray, batch_size: int) -> np.ndarray:
    from ..model import Runner

    runner = Runner(model, [output])
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return np.concatenate([runner.run(b, [output])[0].reshape(len(b), -1).argmax(1) for b in batches])


def moved_from_eqn3(layers: Sequence[Layer], eqn3: Plan, plan: Plan) -> dict[str, Any]:
    """How far the measured plan is from the paper's Eqn 3 on the same ANS (the report's
    "moved from Eqn 3" line and its layers table's Eqn 3 column)."""
    params = {layer.name: layer.params for layer in layers}
    ours, theirs = plan.by_name(), eqn3.by_name()
    changes = {
        name: (theirs[name].weight_bits, ours[name].weight_bits)
        for name in ours
        if ours[name].quantized and theirs[name].weight_bits != ours[name].weight_bits
    }
    quantized = [name for name in ours if ours[name].quantized]
    return {
        "layers": len(quantized),
        "layers_changed": len(changes),
        "mean_abs_bits": sum(abs((a or 0) - (b or 0)) for a, b in changes.values()) / max(len(quantized), 1),
        "eqn3_average_bits": eqn3.average_weight_bits(params),
        "eqn3_bits": {name: theirs[name].weight_bits for name in quantized},
    }


def _with_plan(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    from ..passes.qdq import PLAN_METADATA_KEY

    for entry in model.metadata_props:
        if entry.key == PLAN_METADATA_KEY:
            entry.value = plan.dumps()
    return model
