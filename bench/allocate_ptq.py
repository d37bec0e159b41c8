"""Mixed (sensitivity + integer program) against uniform under the compile's PTQ defaults.

bench/allocate.py measured the allocator with a round-to-nearest min/max quantizer. Compile
now writes models with the PTQ stack (ptq/: entropy ranges up to 6 bits, output-error weight
clipping, bias correction), so this bench compares plans at 3, 4, 5 and 6 average bits with
every model written by `quantize(..., ptq=PtqSettings())`, the compile's defaults, on two
models (bench/study_data.py):

- resnet20: ResNet-20 (akamaster). Calibration, ANS, sensitivity and validation on the JPEG
  q75 CIFAR-10 test images from index 932 (calibration 932..1443, sensitivity on the first 256
  of them, validation 1444..2443); the table on the exact first 932 test images.
- fashion: the Fashion-MNIST CNN study_data.py trains and caches. Calibration on the first
  512 training images (validation: the next 1000); the table on t10k.

Stages (every cell cached as JSON under bench/cache/allocate-ptq/<model>/; delete a file to
recompute it, so a rerun resumes):
  table        float, uniform and mixed at each average: clean accuracy of the written model
               in onnxruntime, FGSM and PGD-10 at 8/255 and a smaller eps through the
               fake-quant twin, weight memory, solve and verification (quantize + evaluate)
               CPU time
  sensitivity  the sensitivity table measured with the min/max quantizer against the same
               table measured with the compile's PTQ grids: Spearman of predicted cost vs
               validation accuracy over random plans, and the validation accuracy of each
               table's integer-program plans
  compile      the default compile (`qn.compile(model, data, eval_data=test)`) and a plain
               `bits=8` compile of the same data: bits, accuracy vs float, CPU time
  audit        the table's models (float, uniform and mixed at each average, the same plans
               and PTQ-written models) under `quanos analyze`'s robustness audit: worst case per
               sample over FGSM, PGD-7, APGD-CE, APGD-DLR and a transfer attack from the float
               graph, counted in onnxruntime, with the masking diagnosis; `write-audit` renders
               it (the table's FGSM/PGD are white-box on the twin only, which quantizers mask)

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/allocate_ptq.py --model resnet20 --stage table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study_data import load_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench/cache/allocate-ptq"
CALIBRATION, VALIDATION, SENSITIVITY = 512, 1000, 256
BATCH = 128
AVERAGES = (3, 4, 5, 6)
RANDOM_PLANS = 12
SENSITIVITY_KINDS = ("minmax", "ptq")


@dataclass(frozen=True)
class ModelSettings:
    """`robust_samples`: the table's twin attacks; `audit_samples`: the audit's (its attacks
    cost about 20x the table's per sample, APGD with 50 steps and the effort check)."""

    robust_samples: int
    small_eps: float
    small_eps_text: str
    audit_samples: int


SETTINGS = {
    "resnet20": ModelSettings(300, 1 / 255, "1/255", 200),
    "fashion": ModelSettings(500, 2 / 255, "2/255", 300),
}
AUDIT_SEED = 0
AUDIT_HEADING = "## Allocation under the audit: worst-case robust accuracy, mixed vs uniform (ResNet-20, Fashion-MNIST CNN)"
PTQ_HEADING = "## Allocation under the compile's PTQ"
SIGNIFICANCE = 0.05
"""A paired difference is beyond noise when the two-sided sign test on its discordant samples gives p < 0.05."""


def _batches(x: np.ndarray, size: int = BATCH) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


class Timer:
    """Wall and CPU seconds of a block (CPU: this process, all its threads)."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


class Bench:
    """One model's cached cells. `calibration` and `sensitivity` images and the `batch` size
    default to this bench's; bench/study_iso.py passes fewer for EfficientNet-Lite0."""

    def __init__(
        self, name: str, calibration: int = CALIBRATION, sensitivity: int = SENSITIVITY, batch: int = BATCH
    ) -> None:
        from quanos_onnx.layers import find_joins, list_layers
        from quanos_onnx.model import load_model

        self.name = name
        self.settings = SETTINGS.get(name)
        self.batch, self.sensitivity_samples = batch, sensitivity
        self.setup = load_setup(name)
        tune_x, tune_y = self.setup.tune_x, self.setup.tune_y
        self.cal_x, self.cal_y = tune_x[:calibration], tune_y[:calibration]
        self.val_x = tune_x[calibration : calibration + VALIDATION]
        self.val_y = tune_y[calibration : calibration + VALIDATION]
        self.test_x, self.test_y = self.setup.test_x, self.setup.test_y
        self.proto = load_model(self.setup.model_path)
        self.layers = list_layers(self.proto)
        self.joins = find_joins(self.proto, self.layers)
        self.params = {layer.name: layer.params for layer in self.layers}
        self.calibration = _batches(self.cal_x, batch)
        self.cache = CACHE / name

    def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        path = self.cache / name
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=1))
        print(f"[{self.name}] {name}: {json.dumps(value)[:300]}", flush=True)
        return value

    # -- measurements ----------------------------------------------------------------
    def ans(self) -> dict[str, float]:
        def compute() -> dict[str, Any]:
            from quanos_onnx.harness.ans import measure_ans
            from quanos_onnx.harness.attacks import Attack

            with Timer() as timer:
                batches = list(zip(self.calibration, _batches(self.cal_y, self.batch)))
                result = measure_ans(self.proto, self.layers, batches, Attack.fgsm(0.05))
            return {"cpu_seconds": timer.cpu, "ans": {r.layer: r.mean for r in result.layers}}

        return self.cached("ans.json", compute)["ans"]

    def sensitivity(self, kind: str) -> Any:
        """The compile's default table (kl, background 7 bits) on the first `sensitivity_samples`
        (256) calibration images, with the min/max round-to-nearest quantizer or the compile's PTQ grids."""
        from quanos_onnx.allocate.sensitivity import Sensitivity, measure

        def compute() -> dict[str, Any]:
            extra = {} if kind == "minmax" else {"ptq": _ptq()}
            with Timer() as timer:
                table = measure("kl", self.proto, self.layers, self.joins, _batches(self.cal_x[: self.sensitivity_samples], self.batch), **extra)
            return {**table.to_json(), "cpu_seconds": timer.cpu, "wall_seconds": timer.wall,
                    "layers": list(table.layers), "rows": [list(r) for r in table.cost]}

        data = self.cached(f"sensitivity-{kind}.json", compute)
        return Sensitivity(tuple(data["layers"]), tuple(data["bits"]), tuple(tuple(r) for r in data["rows"]),
                           data["method"], data["samples"], data["cpu_seconds"])

    def written(self, plan: Any, bias_correction: str = "on") -> Any:
        from dataclasses import replace

        from quanos_onnx.quantize import quantize

        ptq = replace(_ptq(), bias_correction=bias_correction == "on")
        return quantize(self.proto, plan, self.calibration, layers=self.layers, joins=self.joins, ptq=ptq).model

    def clean(self, model: Any, x: np.ndarray, y: np.ndarray) -> float:
        from quanos_onnx.model import Runner, output_names

        name = output_names(model)[0]
        runner = Runner(model, [name])
        logits = np.concatenate([runner.run(b, [name])[0].reshape(len(b), -1) for b in _batches(x)])
        return float((logits.argmax(1) == y).mean())

    def robust(self, model: Any) -> dict[str, float]:
        from quanos_onnx.harness.attacks import Attack
        from quanos_onnx.harness.evaluate import evaluate

        count = self.settings.robust_samples
        attacks = []
        for eps in (8 / 255, self.settings.small_eps):
            attacks += [Attack.fgsm(eps), Attack.pgd(eps, steps=10, alpha=eps / 4)]
        batches = list(zip(_batches(self.test_x[:count]), _batches(self.test_y[:count])))
        result = evaluate(model, batches, attacks)
        names = ("fgsm8", "pgd8", "fgsm_small", "pgd_small")
        return {name: a.accuracy for name, a in zip(names, result.attacks)}

    def solve(self, table: Any, average: float) -> tuple[Any, float]:
        from quanos_onnx.allocate.solve import DEFAULT_ANS_WEIGHT, Budget, solve

        ans = self.ans()
        with Timer() as timer:
            plan = solve(self.layers, self.joins, table, Budget("avg-bits", average), ans=ans, ans_weight=DEFAULT_ANS_WEIGHT)
        return plan, timer.cpu

    def memory_kb(self, plan: Any) -> float:
        return sum(
            self.params[e.name] * (32 if e.weight_bits is None else e.weight_bits) for e in plan.layers
        ) / 8e3

    def row(self, label: str, plan: Any, extra: dict[str, Any]) -> dict[str, Any]:
        with Timer() as quantizing:
            model = self.written(plan)
        with Timer() as evaluating:
            clean = self.clean(model, self.test_x, self.test_y)
        robust = self.robust(model)
        return {
            "plan": label, "average": plan.average_weight_bits(self.params), "memory_kb": self.memory_kb(plan),
            "clean": clean, **robust, "quantize_cpu_s": quantizing.cpu, "evaluate_cpu_s": evaluating.cpu,
            "bits": {e.name: e.weight_bits for e in plan.layers}, **extra,
        }

    # -- stages ------------------------------------------------------------------------
    def table(self, kind: str) -> list[dict[str, Any]]:
        from quanos_onnx.plan import Plan

        rows = [self.cached("float.json", lambda: {
            "plan": "float", "average": 32.0, "memory_kb": sum(self.params.values()) * 32 / 8e3,
            "clean": self.clean(self.proto, self.test_x, self.test_y), **self.robust(self.proto),
        })]
        table = self.sensitivity(kind)
        for average in AVERAGES:
            rows.append({"target": average, **self.cached(
                f"uniform-{average}.json", lambda: self.row("uniform", Plan.uniform(self.layers, average), {}))})

            def mixed() -> dict[str, Any]:
                plan, seconds = self.solve(table, average)
                return self.row("mixed", plan, {"solve_cpu_s": seconds, "sensitivity": kind})

            rows.append({"target": average, **self.cached(f"mixed-{kind}-{average}.json", mixed)})
        return rows

    def audit(self, kind: str) -> list[dict[str, Any]]:
        """The table's float, uniform and mixed models under the robustness audit, one cached
        cell each (the mixed plan solved from the same cached table and ANS as the table's)."""
        from quanos_onnx.plan import Plan

        rows = [self.cached("audit-float.json", lambda: {"plan": "float", "average": 32.0, **self.audited(self.proto)})]
        table = self.sensitivity(kind)
        for average in AVERAGES:
            rows.append({"target": average, **self.cached(
                f"audit-uniform-{average}.json", lambda: self.audited_plan("uniform", Plan.uniform(self.layers, average)))})
            rows.append({"target": average, **self.cached(
                f"audit-mixed-{kind}-{average}.json", lambda: self.audited_plan("mixed", self.solve(table, average)[0]))})
            rows.append({"target": average, **self.cached(
                f"audit-mixed-input-{average}.json", lambda: self.audited_input_plan(self.solve(table, average)[0], average))})
        return rows

    def audited_input_plan(self, plan: Any, bits: int) -> dict[str, Any]:
        """The mixed plan with the model input at `bits` (compile's --input-bits, plan.with_input_bits):
        its audit and its clean accuracy on the whole test set (the table's clean column)."""
        from quanos_onnx.plan import with_input_bits

        capped = with_input_bits(plan, self.layers, bits)
        return {**self.audited_plan("mixed-input", capped), "clean_test": self.clean(self.written(capped), self.test_x, self.test_y)}

    def audit_settings(self) -> Any:
        """`quanos analyze`'s default suite (AnalyzeOptions' defaults) at the table's two eps,
        so the audit and the table's twin-only figures speak of the same perturbations."""
        from quanos_onnx.commands.analyze import AnalyzeOptions

        return AnalyzeOptions(audit_eps=(self.settings.small_eps, 8 / 255)).audit_settings()

    def audited_plan(self, label: str, plan: Any) -> dict[str, Any]:
        """The audit of the model the table writes for `plan` (same calibration, same PTQ)."""
        return {
            "plan": label, "average": plan.average_weight_bits(self.params),
            "bits": {e.name: e.weight_bits for e in plan.layers}, **self.audited(self.written(plan)),
        }

    def audited(self, model: Any) -> dict[str, Any]:
        """Audit and masking diagnosis on the first `audit_samples` test images, as `quanos
        analyze` runs them (commands.options.audit_model: a quantized model's transfer attack
        is crafted on its float graph), plus the per-sample outcomes that paired comparisons
        between plans need."""
        from quanos_onnx.commands.options import audit_model

        count = self.settings.audit_samples
        batches = zip(_batches(self.test_x[:count], self.batch), _batches(self.test_y[:count], self.batch))
        with Timer() as timer:
            audit, diagnosis = audit_model(model, iter(batches), self.audit_settings(), seed=AUDIT_SEED, progress=None)
        eps_values = audit.suite.eps_values()
        return {
            "cpu_seconds": timer.cpu, "wall_seconds": timer.wall,
            "audit": audit.to_json(), "masking": diagnosis.to_json(),
            "per_sample": {
                "eps": list(eps_values), "clean": _flags(audit.clean),
                "worst_case": [_flags(audit.worst_case(eps)) for eps in eps_values],
                "white_box": [_flags(_white_box_worst_case(audit, eps)) for eps in eps_values],
            },
        }

    def compare_sensitivity(self) -> dict[str, Any]:
        """Which table ranks plans written with the compile's PTQ better (validation split)."""
        from scipy.stats import spearmanr

        from quanos_onnx.plan import LayerPlan, Plan

        def random_plans() -> dict[str, Any]:
            rng = np.random.default_rng(0)
            rows = []
            for _ in range(RANDOM_PLANS):
                plan = Plan(tuple(
                    LayerPlan(l.name, None, None, keep_float=True) if l.is_output else LayerPlan(l.name, int(b), int(b))
                    for l, b in zip(self.layers, rng.integers(2, 8, len(self.layers)))
                ))
                rows.append({"bits": {e.name: e.weight_bits for e in plan.layers},
                             "accuracy": self.clean(self.written(plan), self.val_x, self.val_y)})
            return {"rows": rows}

        plans = self.cached("random-plans.json", random_plans)["rows"]
        result: dict[str, Any] = {}
        for kind in SENSITIVITY_KINDS:
            table = self.sensitivity(kind)
            predicted = [table.predict(_plan(row["bits"])) for row in plans]
            rho = float(spearmanr(predicted, [-row["accuracy"] for row in plans]).statistic)

            def milp_plans() -> dict[str, Any]:
                return {str(a): self.clean(self.written(self.solve(table, a)[0]), self.val_x, self.val_y) for a in AVERAGES}

            result[kind] = {"cpu_seconds": table.seconds, "spearman": rho,
                            "val_accuracy": self.cached(f"milp-val-{kind}.json", milp_plans)}
        result["uniform"] = self.cached("uniform-val.json", lambda: {
            str(a): self.clean(self.written(Plan.uniform(self.layers, a)), self.val_x, self.val_y) for a in AVERAGES})
        return result

    def guard_margins(self) -> dict[str, Any]:
        """Why the default compile lands where it does: the search's guard (one-sided 95% bound
        on the paired drop from float, compile.guarded_accuracy) for mixed plans of several
        averages, on the compile's search split (the images after calibration) of 1000 images
        as compile takes it and of 4000."""
        from quanos_onnx.commands.compile import guarded_accuracy

        def compute() -> dict[str, Any]:
            x, y = self.setup.tune_x[CALIBRATION : CALIBRATION + 4000], self.setup.tune_y[CALIBRATION : CALIBRATION + 4000]
            float_correct = self.predictions(self.proto, x) == y
            table = self.sensitivity("ptq")
            rows = []
            for average in (5.0, 5.5, 6.0, 6.5, 7.0):
                plan, _ = self.solve(table, average)
                correct = self.predictions(self.written(plan), x) == y
                for count in (1000, 4000):
                    f, c = float_correct[:count], correct[:count]
                    rows.append({
                        "average": plan.average_weight_bits(self.params), "samples": count,
                        "float": float(f.mean()), "plan": float(c.mean()), "discordant": int((f != c).sum()),
                        "guarded": guarded_accuracy(f, c),
                    })
            return {"rows": rows}

        return self.cached("guard-margins.json", compute)

    def bias_probe(self) -> dict[str, Any]:
        """Validation accuracy of the table's mixed plans and of uniform plans written with and
        without bias correction: the table is measured without it (sensitivity.QdqBuilder)."""
        from quanos_onnx.plan import Plan

        def compute() -> dict[str, Any]:
            table = self.sensitivity("ptq")
            rows = []
            for average in AVERAGES:
                for label, plan in (("mixed", self.solve(table, average)[0]), ("uniform", Plan.uniform(self.layers, average))):
                    rows.append({
                        "plan": label, "target": average, "bits": [e.weight_bits for e in plan.layers],
                        **{f"bias_correction_{flag}": self.clean(self.written(plan, flag), self.val_x, self.val_y)
                           for flag in ("on", "off")},
                    })
            return {"rows": rows}

        return self.cached("bias-probe.json", compute)

    def predictions(self, model: Any, x: np.ndarray) -> np.ndarray:
        from quanos_onnx.model import Runner, output_names

        name = output_names(model)[0]
        runner = Runner(model, [name])
        return np.concatenate([runner.run(b, [name])[0].reshape(len(b), -1).argmax(1) for b in _batches(x, self.batch)])

    def compiles(self) -> dict[str, Any]:
        """The default compile and a plain 8-bit one on the same data, verified on the test set."""
        import quanos_onnx as qn

        data, test = (self.setup.tune_x, self.setup.tune_y), (self.test_x, self.test_y)

        def run(**options: Any) -> dict[str, Any]:
            with Timer() as timer:
                result = qn.compile(str(self.setup.model_path), data, eval_data=test, **options)
            models = {m["name"]: m for m in result.verification.to_json()["models"]}
            allocation = result.plan.details.get("allocation", {})
            return {
                "cpu_s": timer.cpu, "wall_s": timer.wall,
                "average": result.plan.average_weight_bits(self.params),
                "memory_kb": self.memory_kb(result.plan),
                "guard": result.verification.guard.to_json(),
                "models": {name: {"clean": m["clean_accuracy"], "average": m["average_weight_bits"]} for name, m in models.items()},
                "how": allocation.get("how"),
                "moved_from_eqn3": allocation.get("moved_from_eqn3"),
                "bits": {e.name: e.weight_bits for e in result.plan.layers},
            }

        return {
            "default": self.cached("compile-default.json", lambda: run()),
            "plain": self.cached("compile-bits8.json", lambda: run(bits=8)),
        }


def _ptq() -> Any:
    from quanos_onnx.ptq import PtqSettings

    return PtqSettings()


def _flags(robust: np.ndarray) -> str:
    """Per-sample outcomes as a '0'/'1' string: compact in the JSON cell, exact for paired tests."""
    return "".join("1" if value else "0" for value in robust)


def _white_box_worst_case(audit: Any, eps: float) -> np.ndarray:
    """Robust at eps under every attack crafted on the model's own twin (the effort check
    included), the transfer attack left out: what a twin-only evaluation could at best see."""
    from quanos_onnx.harness.robustness import is_white_box

    robust = audit.clean.copy()
    for attack, outcome in zip(audit.suite.attacks, audit.outcomes):
        if attack.eps == eps and is_white_box(attack):
            robust &= outcome
    if audit.effort is not None and audit.suite.effort_check.eps == eps:
        robust &= audit.effort
    return robust


def _plan(bits: dict[str, int | None]) -> Any:
    from quanos_onnx.plan import LayerPlan, Plan

    return Plan(tuple(
        LayerPlan(name, None, None, keep_float=True) if b is None else LayerPlan(name, b, b) for name, b in bits.items()
    ))


def render(benches: list[Bench], kind: str, host: str) -> str:
    lines = [
        "## Allocation under the compile's PTQ: mixed vs uniform (ResNet-20, Fashion-MNIST CNN)",
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=. python bench/allocate_ptq.py --stage table --stage sensitivity --stage compile "
        f"--stage bias --sensitivity {kind}` (both models; `--model resnet20 --stage guard` for the guard table) then "
        "`--stage write`; every cell is cached under bench/cache/allocate-ptq/, so a rerun resumes. "
        f"Machine: 2-core VM ({host}), shared with four other engineers' jobs (1-minute load average 9-19 during the runs), "
        "torch and onnxruntime at 1 thread; times are CPU seconds of the bench process (all its threads), "
        "which the load does not inflate the way it inflates wall time.",
        "",
        "Every quantized model here is written by `quantize(..., ptq=PtqSettings())`, the compile's defaults "
        "(entropy activation ranges up to 6 bits, min/max above, output-error weight clipping, bias correction on "
        "layers with inputs of 4 bits or more, round-to-nearest), calibrated on the same "
        f"{CALIBRATION} images. Mixed: the integer program (`solve`, budget avg-bits=B, default ANS weight 0.25, bits "
        f"2..8) on the compile's sensitivity table (kl, background 7 bits, the first {SENSITIVITY} calibration images; "
        f"`{kind}` grids, see below) and ANS (FGSM 0.05 on the calibration images). Clean accuracy: the written QDQ "
        "model in onnxruntime on the whole test set. FGSM and PGD-10 (step eps/4, no random start): crafted "
        "white-box on each model's fake-quant twin, counted in onnxruntime, on the first test images (count per "
        "model below). Verification CPU s: writing the model (calibration and PTQ) plus its clean test accuracy.",
    ]
    for bench in benches:
        rows = bench.table(kind)
        settings = bench.settings
        lines += [
            "",
            f"### {bench.setup.description}",
            "",
            f"Calibration: the first {CALIBRATION} tune images; test: {len(bench.test_y)} images "
            f"(attacks on the first {settings.robust_samples}).",
            "",
            f"| plan | target bits | average bits | clean % | FGSM 8/255 % | PGD-10 8/255 % | FGSM {settings.small_eps_text} % "
            f"| PGD-10 {settings.small_eps_text} % | weight memory kB | solve CPU s | verification CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            cells = [
                row["plan"], str(row.get("target", "-")), f"{row['average']:.2f}",
                *(f"{100 * row[k]:.1f}" for k in ("clean", "fgsm8", "pgd8", "fgsm_small", "pgd_small")),
                f"{row['memory_kb']:.1f}",
                f"{row['solve_cpu_s']:.2f}" if "solve_cpu_s" in row else "",
                f"{row['quantize_cpu_s'] + row['evaluate_cpu_s']:.1f}" if "quantize_cpu_s" in row else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        by = {(row["plan"], row.get("target")): row for row in rows}
        gaps = ", ".join(
            f"{100 * (by[('mixed', a)]['clean'] - by[('uniform', a)]['clean']):+.1f} at {a}" for a in AVERAGES
        )
        small = ", ".join(
            f"{100 * (by[('mixed', a)]['pgd_small'] - by[('uniform', a)]['pgd_small']):+.1f} at {a}" for a in AVERAGES
        )
        lines += ["", f"Mixed minus uniform, clean points: {gaps}. PGD-10 {settings.small_eps_text}: {small}."]
    return "\n".join(lines) + "\n"


def render_sensitivity(benches: list[Bench]) -> str:
    lines = [
        "",
        "### Which grids the sensitivity table should use",
        "",
        "The table measured with min/max round-to-nearest grids (`minmax`, what the compile used) against the table "
        "measured with the compile's PTQ grids (`ptq`: each quantizer's range by the PTQ method for its bits, "
        "output-error clipped weights; without bias correction, which needs a pass per plan). Validation split "
        f"(the {VALIDATION} tune images after calibration), models written with the compile's PTQ: Spearman rank "
        f"correlation of the table's predicted cost with the accuracy drop over {RANDOM_PLANS} random plans (bits "
        "2..7 per layer), and the validation accuracy of each table's integer-program plan (ANS weight 0.25) at each "
        "average; uniform at the same bits for reference.",
        "",
        "| model | table | table CPU s | Spearman | " + " | ".join(f"{a} bits %" for a in AVERAGES) + " |",
        "|---|---|---|---|" + "---|" * len(AVERAGES),
    ]
    for bench in benches:
        if not (bench.cache / "milp-val-ptq.json").exists():
            continue
        result = bench.compare_sensitivity()
        for kind in SENSITIVITY_KINDS:
            row = result[kind]
            accuracies = " | ".join(f"{100 * row['val_accuracy'][str(a)]:.1f}" for a in AVERAGES)
            lines.append(f"| {bench.name} | {kind} | {row['cpu_seconds']:.0f} | {row['spearman']:.3f} | {accuracies} |")
        uniform = " | ".join(f"{100 * result['uniform'][str(a)]:.1f}" for a in AVERAGES)
        lines.append(f"| {bench.name} | uniform | | | {uniform} |")
    return "\n".join(lines) + "\n"


def render_compiles(benches: list[Bench]) -> str:
    lines = [
        "",
        "### The default compile against a plain one",
        "",
        "`qn.compile(model, (tune_x, tune_y), eval_data=(test_x, test_y))` with the defaults (milp: the smallest "
        "plan within 1 point of float on the search split, bits 2..8; ANS on 1000 images; 512 calibration images) "
        "and with `bits=8` (no ANS, no allocation), both verified on the whole test set (the compiled model, float, "
        "uniform of its size and uniform 8, FGSM and PGD-7 at 0.05 on 64 images). CPU s: the compile call, "
        "verification included.",
        "",
        "| model | compile | average bits | clean % (test) | float % | drop, points | guard | weight memory kB | CPU s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = [""]
    for bench in benches:
        if not (bench.cache / "compile-bits8.json").exists():
            continue
        runs = bench.compiles()
        for label, run in (("default (milp)", runs["default"]), ("bits=8", runs["plain"])):
            lines.append(
                f"| {bench.name} | {label} | {run['average']:.2f} | {100 * run['models']['compiled']['clean']:.1f} | "
                f"{100 * run['models']['float']['clean']:.1f} | {run['guard']['accuracy_drop']:.1f} | "
                f"{'passed' if run['guard']['passed'] else 'FAILED'} | {run['memory_kb']:.1f} | {run['cpu_s']:.0f} | "
                f"{run['wall_s']:.0f} |"
            )
        moved = runs["default"]["moved_from_eqn3"]
        ratio = runs["default"]["cpu_s"] / runs["plain"]["cpu_s"]
        notes += [
            f"{bench.name}: the default compile took {ratio:.1f}x the CPU time of the plain one; its plan differs from "
            f"Eqn 3 (same ANS) in {moved['layers_changed']} of {moved['layers']} layers (Eqn 3 average "
            f"{moved['eqn3_average_bits']:.2f} bits); {runs['default']['how']}.",
            "",
        ]
    return "\n".join(lines + notes) + "\n"


def render_guard(benches: list[Bench]) -> str:
    lines: list[str] = []
    for bench in benches:
        if not (bench.cache / "guard-margins.json").exists():
            continue
        rows = bench.guard_margins()["rows"]
        lines += [
            "",
            f"### Why the default compile keeps {bench.name} above 6 bits: the search's guard",
            "",
            "The search keeps the smallest plan whose accuracy on its split (the images after calibration), lowered "
            "by a one-sided 95% bound on the paired difference from float (1.645 sqrt(discordant) / n, "
            "`compile.guarded_accuracy`), is within 1 point of float. Mixed plans (PTQ table, ANS weight 0.25) written "
            "as the search writes them, on the first 1000 (the compile's split) and 4000 images after calibration:",
            "",
            "| average bits | search images | float % | plan % | discordant | guarded % | keeps the guard |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            keeps = row["guarded"] >= row["float"] - 0.01
            lines.append(
                f"| {row['average']:.2f} | {row['samples']} | {100 * row['float']:.1f} | {100 * row['plan']:.1f} | "
                f"{row['discordant']} | {100 * row['guarded']:.1f} | {'yes' if keeps else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def render_bias(benches: list[Bench]) -> str:
    lines: list[str] = []
    for bench in benches:
        if not (bench.cache / "bias-probe.json").exists():
            continue
        lines += [
            "",
            f"### Bias correction, which the table does not model ({bench.name})",
            "",
            "Validation accuracy (the 1000 tune images after calibration) of the table's mixed plans and of uniform "
            "plans, written with the compile's PTQ with bias correction (the default) and without it:",
            "",
            "| plan | target bits | bits per layer | with bias correction % | without % |",
            "|---|---|---|---|---|",
        ]
        for row in bench.bias_probe()["rows"]:
            bits = ",".join("float" if b is None else str(b) for b in row["bits"])
            lines.append(
                f"| {row['plan']} | {row['target']} | {bits} | {100 * row['bias_correction_on']:.1f} | "
                f"{100 * row['bias_correction_off']:.1f} |"
            )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PairedDifference:
    """One plan's worst-case robust accuracy minus another's on the same samples (mixed minus
    uniform, or a plan minus float): the difference in points and the two-sided sign (exact
    McNemar) test on the samples only one of the two kept."""

    points: float
    first_only: int
    second_only: int
    p_value: float

    @property
    def beyond_noise(self) -> bool:
        return self.p_value < SIGNIFICANCE

    def text(self, eps_text: str) -> str:
        if self.first_only + self.second_only == 0:
            return f"{self.points:+.1f} points at {eps_text} (no sample robust under one plan only)"
        noise = "beyond noise" if self.beyond_noise else "within noise"
        return (f"{self.points:+.1f} points at {eps_text} ({self.first_only} samples robust under it only, "
                f"{self.second_only} under uniform only, sign test p = {self.p_value:.2g}: {noise})")


def paired_difference(first: str, second: str) -> PairedDifference:
    """From the cells' '0'/'1' per-sample strings (the same images in the same order)."""
    from scipy.stats import binomtest

    a, b = (np.frombuffer(flags.encode(), np.uint8) == ord("1") for flags in (first, second))
    first_only, second_only = int((a & ~b).sum()), int((b & ~a).sum())
    discordant = first_only + second_only
    p_value = float(binomtest(first_only, discordant).pvalue) if discordant else 1.0
    return PairedDifference(float(100 * (a.mean() - b.mean())), first_only, second_only, p_value)


def _ci(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{100 * entry['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _attack_cell(audit: dict[str, Any], name: str, eps: float) -> str:
    found = [a for a in audit["attacks"] if a["name"] == name and a["eps"] == eps]
    return f"{100 * found[0]['accuracy']:.1f}" if found else "-"


def _share(flags: str) -> float:
    return flags.count("1") / len(flags)


def _flagged(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [check for check in row["masking"]["checks"] if check["flagged"]]


def _twin_table_cell(bench: Bench, row: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The table stage's cell of the same model (its twin-only PGD-10), when it is cached."""
    if row["plan"] == "mixed-input":
        return None
    name = "float.json" if row["plan"] == "float" else (
        f"uniform-{row['target']}.json" if row["plan"] == "uniform" else f"mixed-{kind}-{row['target']}.json")
    path = bench.cache / name
    return json.loads(path.read_text()) if path.exists() else None


def render_audit(benches: list[Bench], kind: str, host: str) -> str:
    """The audit section: per model a summary table, a per-attack table and the paired verdicts."""
    audits = [bench.audit(kind) for bench in benches]
    lines = [
        AUDIT_HEADING,
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=. python bench/allocate_ptq.py --stage audit --stage write-audit --sensitivity {kind}` "
        "(both models; each (model, plan) is a cached cell bench/cache/allocate-ptq/<model>/audit-*.json, so a rerun "
        f"resumes). Machine: 2-core VM ({host}), shared with other engineers' jobs, torch and onnxruntime at 1 thread; "
        "CPU s: the audit of one model (bench process, all its threads), not inflated by the load as wall time is"
        f"{_wall_ratio_text(audits)}.",
        "",
        "The models are the previous section's (same plans, written by `quantize(..., ptq=PtqSettings())` on the same "
        "512 calibration images). The previous section's FGSM and PGD-10 are crafted white-box on each model's "
        "fake-quant twin only, whose straight-through gradients a quantized model can mask; here every model goes "
        "through `quanos analyze`'s default audit (`harness.robustness.audit_robustness`, "
        "`commands.options.audit_model`) at the table's two eps: FGSM, PGD-7 (steps of 2/255), APGD-CE and APGD-DLR "
        "(50 steps, 1 restart) on the twin, and (quantized models) APGD-CE crafted on the model's float graph and "
        "transferred; the effort check (APGD-CE, 100 steps, 3 restarts on the survivors at 8/255) and the large-eps "
        "probe (APGD-CE at 0.5). Every accuracy is counted in onnxruntime; a sample is robust at an eps only if it is "
        "classified correctly clean and under every attack at that eps (worst case per sample, as AutoAttack reports), "
        "with its 95% Wilson interval. `twin only`: the same worst case without the transfer attack, the most a "
        "twin-only evaluation could find. Masking flags: `harness.masking.diagnose` (a check flags at 1% of the "
        "samples). Mixed minus uniform is paired (the same images): the samples robust under one plan only, with a "
        f"two-sided sign test (exact McNemar, `scipy.stats.binomtest`); beyond noise at p < {SIGNIFICANCE}.",
    ]
    for bench, rows in zip(benches, audits):
        lines += _render_audit_model(bench, rows, kind)
    return "\n".join(lines) + "\n"


def _wall_ratio_text(audits: list[list[dict[str, Any]]]) -> str:
    """The audits' wall time over CPU time, from the cells: how much the shared machine's load slowed them."""
    ratios = [row["wall_seconds"] / row["cpu_seconds"] for rows in audits for row in rows]
    return f" (wall time {min(ratios):.2f}-{max(ratios):.2f}x CPU time in these runs)"


def _render_audit_model(bench: Bench, rows: list[dict[str, Any]], kind: str) -> list[str]:
    settings = bench.settings
    small, large = settings.small_eps_text, "8/255"
    samples = rows[0]["audit"]["samples"]
    lines = [
        "",
        f"### {bench.setup.description}: audit",
        "",
        f"The first {samples} test images (the previous table's twin PGD-10: the first {settings.robust_samples}); "
        f"the {len(rows)} audits took {sum(row['cpu_seconds'] for row in rows):.0f} CPU s in all.",
        "",
        f"| plan | target bits | average bits | clean % | robust {small} % | robust {large} % | twin only {small} % "
        f"| twin only {large} % | table's twin PGD-10 {small} % | masking flags | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        audit, per_sample = row["audit"], row["per_sample"]
        table_cell = _twin_table_cell(bench, row, kind)
        flags = "; ".join(check["check"] for check in _flagged(row)) or "none"
        lines.append("| " + " | ".join([
            row["plan"], str(row.get("target", "-")), f"{row['average']:.2f}", _ci(audit["clean"]),
            *(_ci(entry) for entry in audit["worst_case"]),
            *(f"{100 * _share(f):.1f}" for f in per_sample["white_box"]),
            f"{100 * table_cell['pgd_small']:.1f}" if table_cell else "",
            flags, f"{row['cpu_seconds']:.0f}",
        ]) + " |")
    eps_values = rows[0]["per_sample"]["eps"]
    names = ("fgsm", "pgd-7", "apgd-ce", "apgd-dlr", "transfer")
    lines += [
        "",
        "Each attack's accuracy (%), and the two probes:",
        "",
        "| plan | target bits | " + " | ".join(f"{n} {t}" for t in (small, large) for n in names)
        + f" | effort check {large} | APGD-CE at 0.5 |",
        "|---|---|" + "---|" * (2 * len(names) + 2),
    ]
    for row in rows:
        audit = row["audit"]
        probes = [f"{100 * audit[k]['accuracy']:.1f}" if audit[k] else "-" for k in ("effort_check", "large_eps_check")]
        lines.append("| " + " | ".join([
            row["plan"], str(row.get("target", "-")),
            *(_attack_cell(audit, name, eps) for eps in eps_values for name in names), *probes,
        ]) + " |")
    lines += ["", *_audit_verdicts(bench, rows, (small, large)), "", *_input_bits_notes(bench, rows, kind, (small, large)),
              "", *_masking_notes(bench, rows, kind, small)]
    return lines


def _input_bits_notes(bench: Bench, rows: list[dict[str, Any]], kind: str, eps_texts: tuple[str, str]) -> list[str]:
    """The mixed plans again with the model input at the average's bits (compile's --input-bits B):
    the bit depth uniform B reads its input at, which no other change gives the mixed plan."""
    by = {(row["plan"], row.get("target")): row for row in rows}
    first = bench.layers[0].name
    first_bits = " or ".join(str(b) for b in sorted({by[("mixed", average)]["bits"][first] for average in AVERAGES}))
    clean = []
    for average in AVERAGES:
        table = {name: json.loads((bench.cache / f"{name}-{average}.json").read_text())["clean"]
                 for name in ("uniform", f"mixed-{kind}")}
        clean.append(f"{average} bits {100 * by[('mixed-input', average)]['clean_test']:.1f} (mixed "
                     f"{100 * table[f'mixed-{kind}']:.1f}, uniform {100 * table['uniform']:.1f})")
    return [
        f"`mixed-input` rows: the same mixed plans with the model input read at B bits (`--input-bits B`, "
        "`plan.with_input_bits`: the first layer's input activation capped, its weights and every other layer "
        "unchanged), which is the one place uniform B quantizes more coarsely than every mixed plan here (the "
        f"solver gave the first layer {first_bits} bits in these plans). Clean accuracy on the whole test set, %: "
        f"{'; '.join(clean)}.",
        "",
        *_audit_verdicts(bench, rows, eps_texts, plan="mixed-input"),
    ]


def _audit_verdicts(bench: Bench, rows: list[dict[str, Any]], eps_texts: tuple[str, str], plan: str = "mixed") -> list[str]:
    """A sentence per average (`plan` minus uniform at each eps) and issue 16's target, stated:
    a shortfall counts against the target whether or not it is beyond noise, and says which."""
    by = {(row["plan"], row.get("target")): row for row in rows}
    lines, beyond, within, held = [], [], [], []
    for average in AVERAGES:
        mixed, uniform = by[(plan, average)], by[("uniform", average)]
        differences = [
            paired_difference(m, u) for m, u in zip(mixed["per_sample"]["worst_case"], uniform["per_sample"]["worst_case"])
        ]
        for difference, text, m, u in zip(differences, eps_texts, *(r["per_sample"]["worst_case"] for r in (mixed, uniform))):
            place = f"{average} bits at {text}"
            if difference.points >= 0:
                held.append(place + (" (both 0)" if "1" not in m + u else ""))
            else:
                (beyond if difference.beyond_noise else within).append(f"{place} ({difference.points:+.1f})")
        lines.append(
            f"- {bench.name}, {average} bits ({plan} {mixed['average']:.2f}, uniform {uniform['average']:.2f} average "
            f"bits): {plan} minus uniform worst-case robust " + "; ".join(d.text(t) for d, t in zip(differences, eps_texts)) + "."
        )
    if not beyond and not within:
        verdict = "holds at every average and both eps"
    else:
        parts = [f"{plan} is below uniform beyond noise at {', '.join(beyond)}" if beyond else "",
                 f"{plan} is below uniform within noise at {', '.join(within)}" if within else ""]
        verdict = ("does not hold: " if beyond else "not shown: ") + "; ".join(p for p in parts if p) + (
            f"; {plan} is at least uniform at {', '.join(held)}" if held else "")
    return [*lines, "", f"Issue 16's robust target on {bench.name} ({plan} at least uniform at the same size), "
            f"worst case over the audit: {verdict}."]


def _transfer_only(row: dict[str, Any]) -> list[int]:
    """Per eps, the samples the transfer attack broke that every attack on the twin left standing."""
    per_sample = row["per_sample"]
    return [
        sum(w == "1" and c == "0" for w, c in zip(white, worst))
        for white, worst in zip(per_sample["white_box"], per_sample["worst_case"])
    ]


def _masking_notes(bench: Bench, rows: list[dict[str, Any]], kind: str, small: str) -> list[str]:
    """Where the twin-only figures were masking: what the transfer attack broke beyond the
    twin's attacks, which checks flagged, and the table's twin PGD-10 against the worst case."""
    quantized = [row for row in rows if row["plan"] != "float"]
    label = {id(row): f"{row['plan']} {row['target']}" for row in quantized}
    transfer = [(label[id(row)], _transfer_only(row)) for row in quantized]
    broke = [f"{name}: {counts[0]} at {small}, {counts[1]} at 8/255" for name, counts in transfer if sum(counts)]
    samples = rows[0]["audit"]["samples"]
    flagged = [f"{label.get(id(row), 'float')}: {check['check']} ({check['samples']} samples)"
               for row in rows for check in _flagged(row)]
    gaps = [
        (label.get(id(row), "float"), 100 * cell["pgd_small"], 100 * row["audit"]["worst_case"][0]["accuracy"])
        for row in rows if (cell := _twin_table_cell(bench, row, kind)) is not None
    ]
    lines = [
        f"Masking on {bench.name}. Samples (of {samples}) the transfer attack from the float graph broke that every "
        "attack on the twin left standing: " + ("; ".join(broke) if broke else "none, in every quantized model") + ". "
        "Flagged checks: " + ("; ".join(flagged) if flagged else "none") + ".",
        "",
        _against_float(rows, small),
    ]
    if gaps:
        name, table, worst = max(gaps, key=lambda gap: gap[1] - gap[2])
        over = [table - worst for _, table, worst in gaps]
        lines.append(
            f"The previous table's twin PGD-10 at {small} (step eps/4, no random start, its first "
            f"{bench.settings.robust_samples} images) against this worst case: {min(over):+.1f} to {max(over):+.1f} "
            f"points (largest: {name}, {table:.1f}% against {worst:.1f}%; float {gaps[0][1]:.1f}% against "
            f"{gaps[0][2]:.1f}%); " + _twin_gap_text(rows)
        )
    return lines


def _against_float(rows: list[dict[str, Any]], small: str) -> str:
    """Each quantized model minus float, worst case at the small eps, paired: whether a quantized
    model still looks more robust than its float model once the attacks are strong."""
    float_flags = rows[0]["per_sample"]["worst_case"][0]
    parts = []
    for row in rows[1:]:
        difference = paired_difference(row["per_sample"]["worst_case"][0], float_flags)
        parts.append(f"{row['plan']} {row['target']} {difference.points:+.1f} (p = {difference.p_value:.2g})")
    return f"Each quantized model minus float (paired, the same images), worst case at {small}: {', '.join(parts)}."


def _twin_gap_text(rows: list[dict[str, Any]]) -> str:
    """How far the twin-only worst case is from the full one: whether the transfer attack or
    the stronger attacks on the twin itself closed the table's gap (a gap under harness.masking's
    MATERIAL share of the samples is not read as masking, as its checks do)."""
    from quanos_onnx.harness.masking import MATERIAL

    widest = max(
        100 * (_share(white) - _share(worst))
        for row in rows for white, worst in zip(row["per_sample"]["white_box"], row["per_sample"]["worst_case"])
    )
    if widest < 100 * MATERIAL:
        return (f"the `twin only` column is within {widest:.1f} points of the worst case, so what the table's PGD-10 "
                "left standing, APGD on the same twin broke: the table's figures were an under-converged attack, "
                "not gradients the twin cannot give.")
    return f"the transfer attack takes up to {widest:.1f} points off the `twin only` figure: the twin's gradients mislead there."


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=tuple(SETTINGS), action="append")
    stages = ("table", "sensitivity", "compile", "guard", "bias", "audit", "write", "write-audit")
    parser.add_argument("--stage", choices=stages, action="append")
    # write: render the cached cells of every --model into docs/benchmarks.md (computes what is missing);
    # write-audit: the audit's section alone, after the PTQ section
    parser.add_argument("--sensitivity", choices=SENSITIVITY_KINDS, default="minmax")
    options = parser.parse_args()
    for name in options.model or list(SETTINGS):
        bench = Bench(name)
        for stage in options.stage or ["table"]:
            if stage in ("write", "write-audit"):
                continue
            if stage == "table":
                bench.table(options.sensitivity)
            elif stage == "sensitivity":
                print(json.dumps(bench.compare_sensitivity(), indent=1), flush=True)
            elif stage == "compile":
                print(json.dumps(bench.compiles(), indent=1), flush=True)
            elif stage == "guard":
                print(json.dumps(bench.guard_margins(), indent=1), flush=True)
            elif stage == "bias":
                print(json.dumps(bench.bias_probe(), indent=1), flush=True)
            elif stage == "audit":
                bench.audit(options.sensitivity)
    if "write" in (options.stage or []):
        benches = [Bench(name) for name in options.model or list(SETTINGS)]
        section = (
            render(benches, options.sensitivity, machine()) + render_sensitivity(benches) + render_compiles(benches)
            + render_guard(benches) + render_bias(benches)
        )
        write_section(REPO / "docs/benchmarks.md", PTQ_HEADING, section)
    if "write-audit" in (options.stage or []):
        benches = [Bench(name) for name in options.model or list(SETTINGS)]
        section = render_audit(benches, options.sensitivity, machine())
        write_section(REPO / "docs/benchmarks.md", AUDIT_HEADING, section, after=PTQ_HEADING)
    print(machine(), flush=True)


if __name__ == "__main__":
    main()
