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
    robust_samples: int
    small_eps: float
    small_eps_text: str


SETTINGS = {
    "resnet20": ModelSettings(300, 1 / 255, "1/255"),
    "fashion": ModelSettings(500, 2 / 255, "2/255"),
}


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


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=tuple(SETTINGS), action="append")
    parser.add_argument("--stage", choices=("table", "sensitivity", "compile", "guard", "bias", "write"), action="append")
    # write: render the cached cells of every --model into docs/benchmarks.md (computes what is missing)
    parser.add_argument("--sensitivity", choices=SENSITIVITY_KINDS, default="minmax")
    options = parser.parse_args()
    for name in options.model or list(SETTINGS):
        bench = Bench(name)
        for stage in options.stage or ["table"]:
            if stage == "write":
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
    if "write" in (options.stage or []):
        benches = [Bench(name) for name in options.model or list(SETTINGS)]
        section = (
            render(benches, options.sensitivity, machine()) + render_sensitivity(benches) + render_compiles(benches)
            + render_guard(benches) + render_bias(benches)
        )
        write_section(REPO / "docs/benchmarks.md", "## Allocation under the compile's PTQ", section)
    print(machine(), flush=True)


if __name__ == "__main__":
    main()
