"""compile(): the stages in plain order. Each stage is a module; this file only wires them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .data import DEFAULT_EVAL_FRACTION
from .layers import Join, Layer, find_joins, list_layers
from .model import check_finite_initializers, load_model
from .plan import MAX_BITS, MIN_BITS, Plan
from .progress import ProgressFactory, no_progress
from .quantize import quantize
from .verify import DEFAULT_EVAL_ATTACKS, DEFAULT_MAX_ACCURACY_DROP, DEFAULT_ROBUST_SAMPLES

if TYPE_CHECKING:
    from .data import Dataset
    from .hwmodel import HardwareProfile
    from .report import RunClock
    from .verify import Verification, VerifySettings

log = logging.getLogger(__name__)


MODEL_FILE = "model.quanos.onnx"
PLAN_FILE = "plan.json"
ENERGY_FILE = "energy.json"
DEFAULT_ANS_SAMPLES = 1000


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """How every command reads and slices its data (cli.data_options); keyword-only, so
    each command's own options keep their positions."""

    layout: str = "auto"
    scale: str | None = None
    mean: str | None = None
    std: str | None = None
    data_range: str | None = None
    seed: int = 0


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
    eval_data: str | None = None
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    eval_attacks: str = DEFAULT_EVAL_ATTACKS
    eval_samples: int = DEFAULT_ROBUST_SAMPLES
    no_eval: bool = False
    max_accuracy_drop: float | None = DEFAULT_MAX_ACCURACY_DROP


@dataclass(frozen=True)
class CompileResult:
    layers: tuple[Layer, ...]
    plan: Plan
    written: tuple[str, ...]
    verification: Verification | None = None
    """The artifact against float and uniform (verify.py); None with --no-eval."""

    @property
    def passed(self) -> bool:
        """False when the compiled model broke the accuracy guard (its outputs are written)."""
        return self.verification is None or self.verification.passed

    @property
    def warnings(self) -> tuple[str, ...]:
        from .verify import kernel_warnings

        return self.verification.warnings if self.verification else tuple(kernel_warnings(self.plan))

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
            "verification": None if self.verification is None else self.verification.to_json(),
            "outputs": list(self.written),
        }

    def summary_text(self) -> str:
        from .report.text import format_table

        from .report.content import guard_text

        params = {layer.name: layer.params for layer in self.layers}
        verified = self.verification
        lines = [
            *([verified.headline(), f"accuracy guard: {guard_text(verified.to_json())}", ""] if verified else []),
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
    inputs = [p for p in (options.model_path, options.data_path, options.plan_path, options.eval_data) if p]
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
    checks = None if options.no_eval else _verify_settings(options)
    dataset, evaluation = _split_data(options, model, _load_data(options, model))
    calibration = [x for x, _ in _first(dataset, options.calibration_samples, options.batch_size)]
    if options.bits is not None:
        plan = Plan.uniform(layers, options.bits, keep_output_float=not options.quantize_output)
    elif options.plan_path is not None:
        plan = validate_plan(read_plan(options.plan_path), layers, options.plan_path)
    else:
        plan = _quanos_plan(options, model, layers, dataset, calibration, progress)
    def quantize_plan(chosen: Plan) -> Any:
        return quantize(
            model,
            chosen,
            calibration,
            layers=layers,
            method=options.calibration,
            percentile=options.percentile,
            storage=options.storage,
        )

    quantized = quantize_plan(plan)
    energy, baselines = report.energy_sections(layers, quantized.plan)
    final_plan = quantized.plan.with_details(energy=energy)
    model_bytes = _with_plan(quantized.model, final_plan).SerializeToString()
    verification = None
    if checks is not None and evaluation is not None:
        from .verify import verify

        verification = verify(
            model, quantized.model, final_plan, lambda chosen: quantize_plan(chosen).model, evaluation, checks,
            layers=layers, progress=progress,
        )
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
        verification=None if verification is None else verification.to_json(),
        outputs=[report.output_entry(name, content) for name, content in files.items()],
    )
    guard = None if verification is None else verification.guard.to_json()
    files.update(report.report_files(document, replace(clock.finish(), accuracy_guard=guard)))
    written = output.write(files)
    return CompileResult(tuple(layers), final_plan, tuple(str(p) for p in written), verification)


def _verify_settings(options: CompileOptions) -> VerifySettings:
    """The checks of the compiled model, validated before any work is done."""
    from .harness.attacks import InputRange, parse_eps
    from .verify import VerifySettings, evaluation_attacks

    attacks = evaluation_attacks(options.eval_attacks, parse_eps(options.eps), InputRange.parse(options.input_range))
    return VerifySettings(
        attacks,
        robust_samples=options.eval_samples,
        max_accuracy_drop=options.max_accuracy_drop,
        batch_size=options.batch_size,
        seed=options.seed,
    )


def _split_data(options: CompileOptions, model: onnx.ModelProto, dataset: Dataset) -> tuple[Dataset, Dataset | None]:
    """(what the compiler may see, what only verification sees): --eval-data, else a held-out
    part of --data (data.split_held_out); with --no-eval all of --data and nothing."""
    from .data import load_dataset, split_held_out
    from .errors import UsageError
    from .model import input_spec, num_classes

    if options.no_eval:
        if options.eval_data is not None:
            raise UsageError("--eval-data and --no-eval exclude each other")
        return dataset, None
    if options.eval_data is None:
        split = split_held_out(dataset, options.eval_fraction, seed=options.seed)
        return split.calibration, split.evaluation
    evaluation = load_dataset(
        options.eval_data,
        input_spec(model),
        layout=options.layout,
        scale=options.scale,
        mean=options.mean,
        std=options.std,
        num_classes=num_classes(model),
    )
    return dataset, evaluation


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
class AnalyzeOptions(DataOptions):
    """`quanos analyze`: the ANS attack and data options of compile, plus accuracy grids."""

    model_path: str
    data_path: str | None = None
    output_dir: str | None = None
    fgsm_eps: str = "0.05,0.1,0.2"
    pgd_eps: str = "2/255,8/255"
    as_json: bool = False
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


EVALUATION_FILE = "evaluation.json"
PAPER_FGSM_EPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
PAPER_PGD_EPS = (8 / 255, 16 / 255, 32 / 255)
PAPER_PGD_STEPS = 7
PAPER_PGD_ALPHA = 2 / 255


@dataclass(frozen=True)
class EvaluateOptions(DataOptions):
    """`quanos evaluate`: models side by side under one attack grid on one data set."""

    model_paths: tuple[str, ...]
    data_path: str | None = None
    output_dir: str | None = None
    attack: str = "fgsm,pgd"
    eps: str | None = None
    pgd_steps: int = 10
    pgd_alpha: str | None = None
    paper: bool = False
    samples: int | None = None
    as_json: bool = False
    input_range: str = "0,1"
    batch_size: int = 64


@dataclass(frozen=True)
class EvaluateResult:
    document: Mapping[str, Any]
    written: tuple[str, ...]

    def rows(self) -> list[dict[str, object]]:
        """One row per model for clean inputs and one per model and attack."""
        rows: list[dict[str, object]] = []
        for entry in self.document["models"]:
            evaluation = entry["evaluation"]
            common = {"model": entry["name"], "bits": entry["average_weight_bits"]}
            rows.append({**common, "attack": "clean", "eps": None, "accuracy": evaluation["clean_accuracy"], "adversarial_loss": None})
            for result in evaluation["attacks"]:
                attack = result["method"] if result["method"] == "fgsm" else f"pgd-{result['steps']}"
                rows.append(
                    {**common, "attack": attack, "eps": eps_label(result["eps"]), "accuracy": result["accuracy"], "adversarial_loss": result["adversarial_loss"]}
                )
        return rows

    def summary_text(self) -> str:
        from .report.text import format_table

        doc = self.document
        lines = [
            f"accuracy on {doc['data']['samples']} samples of {doc['data']['source']} (labels from {doc['data']['labels']}); "
            "attacks white-box through each model's twin, accuracy counted by onnxruntime",
            format_table(self.rows()),
            *(f"{entry['name']}: {entry['path']} ({entry['kind']})" for entry in doc["models"]),
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def eps_label(eps: float) -> str:
    """0.05 stays 0.05; multiples of 1/255 read as n/255, as the paper writes PGD strengths."""
    steps = eps * 255
    if abs(steps - round(steps)) < 1e-6 and abs(eps * 20 - round(eps * 20)) > 1e-6:
        return f"{round(steps)}/255"
    return f"{eps:g}"


def evaluation_attacks(options: EvaluateOptions) -> tuple[Any, ...]:
    """The attack grid: --attack x --eps, or the paper's (--paper)."""
    from .errors import UsageError
    from .harness.attacks import METHODS, InputRange, parse_eps
    from .harness.evaluate import attack_grid

    input_range = InputRange.parse(options.input_range)
    methods = [part.strip().lower() for part in options.attack.split(",") if part.strip()]
    if methods == ["none"]:
        if options.eps is not None or options.paper:
            raise UsageError("--attack none measures clean accuracy alone: leave out --eps and --paper")
        return ()
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UsageError(f"--attack {unknown[0]!r} is not one of {', '.join(METHODS)}")
    if options.paper:
        if options.eps is not None or options.pgd_alpha is not None:
            raise UsageError("--paper sets eps and the PGD step itself: leave out --eps and --pgd-alpha")
        grid: list[Any] = []
        if "fgsm" in methods:
            grid += attack_grid(["fgsm"], PAPER_FGSM_EPS, input_range=input_range)
        if "pgd" in methods:
            grid += attack_grid(["pgd"], PAPER_PGD_EPS, steps=PAPER_PGD_STEPS, alpha=PAPER_PGD_ALPHA, input_range=input_range)
        return tuple(grid)
    if options.eps is None:
        raise UsageError("--eps is required (or --paper for the paper's grid)", hint="e.g. --eps 0.05,0.1 or --eps 8/255")
    alpha = parse_eps(options.pgd_alpha, "--pgd-alpha") if options.pgd_alpha else None
    return attack_grid(
        methods, _eps_list(options.eps, "--eps", parse_eps), steps=options.pgd_steps, alpha=alpha, input_range=input_range
    )


def run_evaluate(
    options: EvaluateOptions,
    command_line: Sequence[str] = (),
    progress: ProgressFactory = no_progress,
) -> EvaluateResult:
    """Clean and adversarial accuracy of every model on the same inputs and attacks.

    A compiled (QDQ) model is attacked through its fake-quant twin; all accuracies are
    counted by onnxruntime on the attacked inputs, so they describe the deployed files.
    With an output directory: evaluation.json and the report files.
    """
    from pathlib import Path

    from . import report
    from .errors import DataError, UsageError
    from .finetune.graph import compiled_plan, float_model_of
    from .harness.evaluate import evaluate
    from .model import input_shape
    from .outputs import OutputDir

    clock = report.RunClock.start(command_line)
    if not options.model_paths:
        raise UsageError("give at least one MODEL to evaluate")
    inputs = [*options.model_paths, *([options.data_path] if options.data_path else [])]
    output = OutputDir(options.output_dir, inputs=inputs) if options.output_dir else None
    attacks = evaluation_attacks(options)
    models = [(path, load_model(path)) for path in options.model_paths]
    first_path, first_model = models[0]
    dataset = _load_data(options, first_model)  # type: ignore[arg-type]
    count = dataset.count if options.samples is None else _ans_samples(options, dataset)  # type: ignore[arg-type]
    names = _short_names([path for path, _ in models])
    entries = []
    evaluations = []
    labels = "data"
    for (path, model), name in zip(models, names):
        if input_shape(model)[1:] != input_shape(first_model)[1:]:
            raise DataError(
                f"{path}: input shape {list(input_shape(model))} differs from {first_path}'s "
                f"{list(input_shape(first_model))}; evaluate models of one input shape together"
            )
        plan = compiled_plan(model)
        with progress(f"{name} ({len(attacks)} attacks)", count) as advance:
            evaluation = evaluate(model, _first(dataset, count, options.batch_size), attacks, seed=options.seed, progress=advance)
        labels = evaluation.labels
        evaluations.append((path, evaluation))
        entries.append(
            {
                "name": name,
                "path": str(Path(path)),
                "kind": "float" if plan is None else f"compiled ({plan.method})",
                "method": None if plan is None else plan.method,
                "average_weight_bits": None if plan is None else _average_bits(plan, float_model_of(model)),
                "evaluation": evaluation.to_json(),
            }
        )
    document = {
        "format": "quanos-evaluation",
        "version": 1,
        "data": {"source": dataset.source, "samples": count, "labels": labels},
        "attacks": [attack.to_json() for attack in attacks],
        "models": entries,
    }
    written: tuple[str, ...] = ()
    if output is not None:
        files = {
            EVALUATION_FILE: report.dumps(document),
            **report.evaluation_report_files(
                evaluations,
                run=clock.finish(),
                data=report.data_input(options.data_path, count, dataset.selection),
                seed=options.seed,
                settings=settings_json(options, exclude=("model_paths", "data_path", "output_dir", "as_json")),
            ),
        }
        written = tuple(str(p) for p in output.write(files))
    return EvaluateResult(document, written)


def _average_bits(plan: Plan, float_model: onnx.ModelProto) -> float:
    params = {layer.name: layer.params for layer in list_layers(float_model)}
    return round(plan.average_weight_bits({name: params.get(name, 0) for name in (e.name for e in plan.layers)}), 2)


def _short_names(paths: Sequence[str]) -> list[str]:
    """File names, or parent/file where file names repeat (quanos-out/model.quanos.onnx)."""
    from pathlib import Path

    names = [Path(path).name for path in paths]
    if len(set(names)) == len(names):
        return names
    return [str(Path(Path(path).parent.name) / Path(path).name) for path in paths]


@dataclass(frozen=True)
class FinetuneOptions(DataOptions):
    """`quanos finetune`: fake-quant (and adversarial) fine-tuning at a plan; see finetune/."""

    model_path: str
    output_path: str
    epochs: int
    plan_path: str | None = None
    data_path: str | None = None
    val_path: str | None = None
    val_split: float | None = None
    lr: float | None = None
    optimizer: str = "adam"
    batch_size: int = 64
    adv_train: str | None = None
    adv_eps: str = "8/255"
    adv_steps: int = 7
    adv_alpha: str | None = None
    adv_weight: float = 0.5
    input_range: str = "0,1"
    calibration: str = "minmax"
    percentile: float = 99.99
    calibration_samples: int = 512
    storage: str = "int8"
    as_json: bool = False


@dataclass(frozen=True)
class FinetuneRunResult:
    document: Mapping[str, Any]
    written: tuple[str, ...]

    def summary_text(self) -> str:
        from .report.text import format_table

        doc = self.document
        rows = [
            {key: record[key] for key in ("epoch", "train_loss", "train_accuracy", "train_adversarial_accuracy", "val_accuracy", "val_adversarial_accuracy")}
            for record in doc["history"]
        ]
        trip = doc["round_trip"]
        lines = [
            format_table(rows),
            "",
            f"kept epoch {doc['best_epoch']} ({doc['selected_by']})",
            f"round trip on {trip['samples']} samples: twin and onnxruntime agree on "
            f"{trip['prediction_agreement']:.2%} of predictions, max |difference| {trip['max_abs_diff']:.3g}",
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def run_finetune(
    options: FinetuneOptions,
    progress: ProgressFactory = no_progress,
    on_epoch: Callable[[Any], None] | None = None,
) -> FinetuneRunResult:
    """Fine-tune MODEL at its plan and write the compiled model of the best epoch.

    MODEL is a float model (then --plan is required) or a quanos-compile output, whose
    float graph and plan are recovered from it (--plan overrides the stored plan).
    """
    from pathlib import Path

    from .errors import ModelError, UsageError
    from .finetune import FinetuneSettings, compiled_plan, finetune, float_model_of
    from .model import guard_output, write_bytes_atomic
    from .outputs import OutputDir
    from .plan import read_plan, validate_plan

    inputs = [p for p in (options.model_path, options.data_path, options.val_path, options.plan_path) if p]
    target = Path(options.output_path)
    if target.is_dir():
        raise UsageError(f"-o {target}: is a directory; give the output model's file name (e.g. out.onnx)")
    OutputDir(target.parent, inputs=inputs)
    guard_output(target, [Path(p) for p in inputs])
    if options.val_path is not None and options.val_split is not None:
        raise UsageError("--val and --val-split exclude each other")
    loaded = load_model(options.model_path)
    stored_plan = compiled_plan(loaded)
    float_model = loaded if stored_plan is None else float_model_of(loaded)
    layers = list_layers(float_model)
    if not layers:
        raise ModelError(f"{options.model_path}: no quantizable layer to fine-tune")
    if options.plan_path is not None:
        plan = validate_plan(read_plan(options.plan_path), layers, options.plan_path)
    elif stored_plan is not None:
        plan = validate_plan(stored_plan, layers, f"{options.model_path} (stored plan)")
    else:
        raise UsageError(
            "--plan is required for a float model",
            hint="write one with `quanos-compile MODEL --data DATA` (or --bits K), or pass its compiled model",
        )
    train, val = _finetune_data(options, float_model)
    settings = FinetuneSettings(
        epochs=options.epochs,
        learning_rate=options.lr,
        optimizer=options.optimizer,
        batch_size=options.batch_size,
        adversarial=_training_attack(options),
        adversarial_weight=options.adv_weight,
        seed=options.seed,
        calibration_samples=options.calibration_samples,
        calibration_method=options.calibration,
        percentile=options.percentile,
        storage=options.storage,
    )
    result = finetune(float_model, plan, train, settings, val=val, progress=progress, on_epoch=on_epoch)
    write_bytes_atomic(target, result.model.SerializeToString())
    document = {
        "format": "quanos-finetune",
        "version": 1,
        "model": options.model_path,
        "started_from": "float model" if stored_plan is None else "compiled model (dequantized weights)",
        "plan_method": result.plan.method,
        "data": {"train": f"{train.source} ({train.count} samples)", "val": None if val is None else f"{val.source} ({val.count} samples)"},
        **result.to_json(),
        "output": str(target),
    }
    return FinetuneRunResult(document, (str(target),))


def _finetune_data(options: FinetuneOptions, model: onnx.ModelProto) -> tuple[Any, Any]:
    """Training data in a seeded shuffled order (so the calibration samples are a fair mix
    even for files sorted by class) and the validation data: --val, --val-split or none."""
    from .data import Dataset, load_dataset
    from .errors import DataError, UsageError
    from .model import input_spec, num_classes

    if options.data_path is None:
        raise UsageError("--data is required: fine-tuning trains on it")
    preprocessing = dict(layout=options.layout, scale=options.scale, mean=options.mean, std=options.std)
    spec, classes = input_spec(model), num_classes(model)
    train = load_dataset(
        options.data_path, spec, data_range=options.data_range, seed=options.seed, shuffle=True,
        num_classes=classes, **preprocessing,
    )
    if options.val_path is not None:
        return train, load_dataset(options.val_path, spec, num_classes=classes, **preprocessing)
    if options.val_split is None:
        return train, None
    if not 0.0 < options.val_split < 1.0:
        raise UsageError(f"--val-split {options.val_split} must be a fraction between 0 and 1")
    held_out = round(train.count * options.val_split)
    if held_out < 1 or held_out >= train.count:
        raise DataError(f"--val-split {options.val_split} of {train.count} samples leaves no training or no validation data")
    kept = train.count - held_out
    return (
        Dataset(train.x[:kept], train.y[:kept], train.source, f"{train.selection}, first {kept}"),
        Dataset(train.x[kept:], train.y[kept:], train.source, f"{train.selection}, last {held_out} (--val-split)"),
    )


def _training_attack(options: FinetuneOptions) -> Any:
    """The attack of adversarial fine-tuning (PGD with a random start), or None."""
    from .errors import UsageError
    from .harness.attacks import Attack, InputRange, parse_eps

    if options.adv_train is None:
        return None
    input_range = InputRange.parse(options.input_range)
    eps = parse_eps(options.adv_eps, "--adv-eps")
    if options.adv_train == "fgsm":
        return Attack.fgsm(eps, input_range)
    if options.adv_train == "pgd":
        alpha = parse_eps(options.adv_alpha, "--adv-alpha") if options.adv_alpha else None
        return Attack.pgd(eps, steps=options.adv_steps, alpha=alpha, random_start=True, input_range=input_range)
    raise UsageError(f"--adv-train {options.adv_train!r} is not fgsm or pgd")
