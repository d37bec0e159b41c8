"""`quanos compile`: load -> data -> plan (QUANOS, bits or plan file) -> QDQ -> write."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..allocate.solve import DEFAULT_ANS_WEIGHT
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
    method: str = "eqn3"
    ans_weight: float = DEFAULT_ANS_WEIGHT
    budget: str | None = None
    sensitivity: str = "kl"
    sensitivity_samples: int = 256
    max_bits: int = 8
    max_accuracy_drop: float | None = None
    pareto: bool = False


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
            "allocation": self.plan.details.get("allocation"),
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
    check_method(options)
    if options.bits is not None:
        plan = Plan.uniform(layers, options.bits, keep_output_float=not options.quantize_output)
    elif options.plan_path is not None:
        plan = validate_plan(read_plan(options.plan_path), layers, options.plan_path)
    elif options.method == "milp":
        plan = _milp_plan(options, model, layers, dataset, calibration, progress)
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
    from ..allocate import check_bit_range
    from ..errors import UsageError

    check_bit_range(options.k_init, options.k_min)
    if options.rounds < 1:
        raise UsageError(f"--rounds {options.rounds} must be at least 1")
    if options.target_avg_bits is not None and not MIN_BITS <= options.target_avg_bits <= options.k_init:
        raise UsageError(
            f"--target-avg-bits {options.target_avg_bits} is outside {MIN_BITS}..{options.k_init} (--k-init)"
        )
    measure = _measure_ans(options, layers, dataset, progress)
    first = measure(model, f"ANS ({make_attack(options).describe()})")
    return _eqn3_plan(options, model, layers, calibration, first, measure)


def _measure_ans(
    options: CompileOptions, layers: Sequence[Layer], dataset: Any, progress: ProgressFactory
) -> Callable[[onnx.ModelProto, str], Any]:
    """The ANS measurement of the options (attack, sample count, batches, seed)."""
    from ..harness.ans import measure_ans

    attack = make_attack(options)
    count = ans_samples(options, dataset)

    def measure(proto: onnx.ModelProto, label: str) -> Any:
        with progress(label, count) as advance:
            batches = first_samples(dataset, count, options.batch_size)
            return measure_ans(proto, layers, batches, attack, seed=options.seed, progress=advance)

    return measure


def _eqn3_plan(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    calibration: Sequence[np.ndarray],
    first: Any,
    measure: Callable[[onnx.ModelProto, str], Any],
) -> Plan:
    """Eqn 3 on the measured ANS (budgeted and/or iterative when asked)."""
    from ..allocate import allocate, allocate_budgeted, allocate_iterative

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


METHODS = ("eqn3", "milp")
SEARCH_SAMPLES = 1000
"""At most this many samples after the calibration samples judge plans during the search."""


def check_method(options: CompileOptions) -> None:
    """Options that only make sense with one allocation method are refused with the other."""
    from ..errors import UsageError

    if options.method not in METHODS:
        raise UsageError(f"--method {options.method!r}: use eqn3 (the paper's rule) or milp (measured, budgeted)")
    if options.method == "eqn3":
        given = [name for name, value in (("--budget", options.budget), ("--pareto", options.pareto or None),
                                          ("--max-accuracy-drop", options.max_accuracy_drop)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --method milp (Eqn 3 takes --target-avg-bits)")
        return
    if options.target_avg_bits is not None or options.rounds != 1:
        raise UsageError("--target-avg-bits and --rounds are Eqn 3's; with --method milp give --budget avg-bits=B")
    if options.max_accuracy_drop is not None and not 0 <= options.max_accuracy_drop < 100:
        raise UsageError(f"--max-accuracy-drop {options.max_accuracy_drop} must be in [0, 100) points")
    if options.sensitivity_samples < 1:
        raise UsageError(f"--sensitivity-samples {options.sensitivity_samples} must be at least 1")
    if options.budget is not None:
        from ..allocate.solve import parse_budget

        parse_budget(options.budget)


def _milp_plan(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    dataset: Any,
    calibration: Sequence[np.ndarray],
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
    import time

    from ..allocate import allocate
    from ..allocate.search import pareto_front, repair, smallest_within_guard
    from ..allocate.sensitivity import check_candidate_bits, measure
    from ..allocate.solve import Budget, parse_budget, solve
    from ..layers import find_joins

    started = time.perf_counter()
    joins = find_joins(model, layers)
    candidates = check_candidate_bits(list(range(options.k_min, options.max_bits + 1)))
    measure_ans = _measure_ans(options, layers, dataset, progress)
    ans = measure_ans(model, f"ANS ({make_attack(options).describe()})")
    ans_means = {result.layer: result.mean for result in ans.layers}
    eqn3 = allocate(layers, ans.layers, k_init=options.k_init, k_min=options.k_min, quantize_output=options.quantize_output)
    sensitivity_batches = list(first_samples(dataset, min(options.sensitivity_samples, dataset.count), options.batch_size))
    with progress(f"sensitivity ({options.sensitivity})", 1) as advance:
        table = measure(
            options.sensitivity, model, layers, joins, [x for x, _ in sensitivity_batches],
            labels=None if any(y is None for _, y in sensitivity_batches) else [y for _, y in sensitivity_batches],
            bits=candidates, quantize_output=options.quantize_output,
        )
        advance(1)
    evaluate, search = _search_split(options, model, layers, joins, dataset, calibration)
    minimum = search.float_accuracy - (options.max_accuracy_drop if options.max_accuracy_drop is not None else 1.0) / 100
    solve_options = dict(ans=ans_means, ans_weight=options.ans_weight, quantize_output=options.quantize_output)
    if options.budget is not None:
        budget = parse_budget(options.budget)
        plan = solve(layers, joins, table, budget, **solve_options)
        how = f"integer program within {budget.describe()}"
        if options.max_accuracy_drop is not None:
            checked = repair(plan, layers, joins, table, evaluate, minimum, budget=budget)
            plan, how = checked.plan, how + f", repaired in {len(checked.steps)} step(s)"
        accuracy = evaluate(plan)
    else:
        checked = smallest_within_guard(layers, joins, table, evaluate, minimum, **solve_options)
        if not checked.passed:
            logging.getLogger(__name__).warning(
                "no plan with bits %d..%d keeps the search split within the guard; writing the widest",
                candidates[0], candidates[-1],
            )
        plan, accuracy = checked.plan, checked.accuracy
        how = f"smallest average-bits budget within {100 * (search.float_accuracy - minimum):.2g} point(s) of float"
    details: dict[str, Any] = {
        "how": how,
        "sensitivity": table.to_json(),
        "ans_weight": options.ans_weight,
        "float_accuracy": search.float_accuracy,
        "search_accuracy": accuracy,
        "search_samples": search.samples,
        "search_source": search.source,
        "moved_from_eqn3": _moved(layers, eqn3, plan),
    }
    if options.pareto:
        budgets = [Budget("avg-bits", float(b)) for b in candidates]
        points = pareto_front(layers, joins, table, evaluate, budgets, **solve_options)
        details["pareto"] = [point.to_json() for point in points]
        details["pareto_uniform"] = [
            {"bits": b, "accuracy": evaluate(Plan.uniform(layers, b, keep_output_float=not options.quantize_output))}
            for b in candidates
        ]
    details["seconds"] = time.perf_counter() - started
    return plan.with_details(ans=ans.to_json(), allocation=details)


@dataclass(frozen=True)
class _SearchSplit:
    samples: int
    source: str
    float_accuracy: float


def _search_split(
    options: CompileOptions,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    joins: Sequence[Any],
    dataset: Any,
    calibration: Sequence[np.ndarray],
) -> tuple[Callable[[Plan], float], _SearchSplit]:
    """The callback that compiles a plan and returns its clean accuracy on the search split."""
    import logging

    from ..model import Runner, output_names

    first = sum(len(x) for x in calibration)
    if dataset.count > first:
        x = dataset.x[first : first + SEARCH_SAMPLES]
        y = None if dataset.y is None else dataset.y[first : first + SEARCH_SAMPLES]
        source = f"samples {first}..{first + len(x) - 1} (after the calibration samples)"
    else:
        logging.getLogger(__name__).warning(
            "all %d samples calibrate; plans are judged on the calibration samples (give more data)", dataset.count
        )
        x, y = np.concatenate(list(calibration)), None if dataset.y is None else dataset.y[:first]
        source = "the calibration samples"
    name = output_names(model)[0]

    def predictions(proto: onnx.ModelProto) -> np.ndarray:
        runner = Runner(proto, [name])
        batches = [x[i : i + options.batch_size] for i in range(0, len(x), options.batch_size)]
        return np.concatenate([runner.run(b, [name])[0].reshape(len(b), -1).argmax(1) for b in batches])

    float_predictions = predictions(model)
    labels = float_predictions if y is None else np.asarray(y)

    def evaluate(plan: Plan) -> float:
        quantized = quantize(
            model, plan, calibration, layers=layers, joins=joins,
            method=options.calibration, percentile=options.percentile,
        )
        return float((predictions(quantized.model) == labels).mean())

    return evaluate, _SearchSplit(len(x), source, float((float_predictions == labels).mean()))


def _moved(layers: Sequence[Layer], eqn3: Plan, plan: Plan) -> dict[str, Any]:
    """How far the measured plan is from the paper's Eqn 3 on the same ANS."""
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
