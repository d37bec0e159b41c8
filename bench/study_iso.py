"""Post-hoc, iso-size: what ANS adds to an accuracy-aware allocator (issue 20, items 1 and 4).

For each model (bench/study_data.py: `resnet20`, `fashion`, `efficientnet` with the cuts in
AUDITS) and each average of 3, 4, 5 and 6 weight bits, plans of the same size:

- `ans`: the integer program (`allocate.solve.solve`, Budget("avg-bits", B)) on the compile's
  sensitivity table (kl, PTQ grids) with ANS (FGSM 0.05) at the default weight;
- `accuracy-only`: the same program with ans_weight=0;
- `ans-w1`, `ans-w4` (with `--arms`): ANS weights 1 and 4, as the default 0.25 moves no bit on
  these two models;
- `uniform`: every layer at B bits (classifier float);

plus `float` and `compile`: the plan of `quanos_onnx.compile(model, (tune_x, tune_y))` with
every default, whatever its average. The table, ANS and calibration are bench/allocate_ptq.py's
(its `Bench`, cached under bench/cache/allocate-ptq/<model>/): 512 calibration images, the
table on the first 256 of them. Every model, the compile's plan included, is written by
`quantize(..., ptq=PtqSettings())` on those 512 images.

Per plan: clean accuracy of the written QDQ model in onnxruntime on the whole test set, and
the robustness audit `quanos analyze` runs (harness.robustness via commands.options.audit_model:
FGSM, PGD-7, APGD-CE and APGD-DLR of 50 steps, transfer of APGD-CE from the float graph, the
effort check and the large-eps probe; worst case per sample) on the first `audit` test images,
with the masking checks (harness.masking.diagnose); weight memory and energy on the standard,
DG and DVAFS profiles (hwmodel.estimate_all). Per-sample outcomes are kept, so the tables give
paired bootstrap intervals of ANS minus accuracy-only and ANS minus uniform.

Every plan is one JSON cell under bench/cache/study-iso/<model>/ keyed by its aligned bits
(identical plans are measured once); rerunning resumes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/study_iso.py --model fashion
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/study_iso.py --model resnet20
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/study_iso.py --model fashion --arms ans-w1,ans-w4
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/study_iso.py --model fashion --arms first-layer --averages 3,4,8
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/study_iso.py --model efficientnet
    PYTHONPATH=. python bench/study_iso.py --model resnet20 --model fashion --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocate_ptq import Bench, Timer, _ptq  # noqa: E402
from report_section import machine  # noqa: E402
from study_data import cached  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench/cache/study-iso"
ANS_WEIGHTS = {"ans": None, "ans-w1": 1.0, "ans-w4": 4.0, "accuracy-only": 0.0}
"""The integer program's arms: `ans` at the default weight (None: DEFAULT_ANS_WEIGHT, 0.25), two
stronger ANS weights (the default moves no layer on ResNet-20 or the Fashion CNN), and none."""
ARMS = ("ans", "accuracy-only", "uniform", "ans-w1", "ans-w4", "first-layer")
"""`first-layer` (a probe, not an iso-size arm): the first layer at B bits (weights and activations),
every other layer float, to see how much of a plan's robust accuracy is the input's bit depth."""
MAIN_ARMS = ARMS[:3]
AUDIT_BATCH = 100
BOOTSTRAP_DRAWS = 4000
PROFILES = ("standard", "dg", "dvafs")


@dataclass(frozen=True)
class AuditPlan:
    """Per model: audit samples, eps and PGD's step (the paper's PGD grid, 8/255 and 16/255 in
    7 steps of 2/255; on ImageNet and CIFAR-10 2/255 (its Table IV) and 8/255, where 8/255 already
    leaves these models near 0%), and the cuts: calibration and sensitivity images, batch size, averages,
    whether the default compile is run."""

    samples: int
    eps: tuple[float, ...]
    eps_text: tuple[str, ...]
    pgd_alpha: float | None
    calibration: int = 512
    sensitivity: int = 256
    batch: int = 128
    averages: tuple[int, ...] = (4, 5, 3, 6)
    compile: bool = True
    compile_options: tuple[tuple[str, Any], ...] = ()


AUDITS = {
    "resnet20": AuditPlan(200, (2 / 255, 8 / 255), ("2/255", "8/255"), 2 / 255),
    "fashion": AuditPlan(500, (8 / 255, 16 / 255), ("8/255", "16/255"), 2 / 255),
    "efficientnet": AuditPlan(
        50, (2 / 255, 8 / 255), ("2/255", "8/255"), 2 / 255, calibration=256, sensitivity=32, batch=32,
        averages=(4, 3, 5, 6), compile_options=(("calibration_samples", 256),),
    ),
}
"""EfficientNet-Lite0 is cut for the 2-core VM: 256 calibration images, the table on 32, the
audit on 50. Its default compile gets all 640 tune images and calibrates on 256 of them, as the
ImageNet compile of docs/benchmarks.md does (the rest: its search split and its held-out 20%)."""


def _bits_text(mask: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in mask)


def _mask(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8) == ord("1")


def plan_key(plan: Any) -> str:
    """The aligned bits of every layer: equal keys write equal models."""
    entries = [(e.name, e.weight_bits, e.act_bits, e.keep_float) for e in plan.layers]
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:12]


class IsoStudy:
    def __init__(self, name: str, audit_samples: int | None = None) -> None:
        base = AUDITS[name]
        self.bench = Bench(name, base.calibration, base.sensitivity, base.batch)
        self.name = name
        self.audit_plan = base if audit_samples is None else replace(base, samples=audit_samples)
        self.cache = CACHE / name

    # -- plans ---------------------------------------------------------------------------
    def compile_plan(self) -> Any:
        """The default compile on all tune images (its own calibration/search/held-out split)."""
        from quanos_onnx.plan import plan_from_json

        def compute() -> dict[str, Any]:
            import quanos_onnx as qn

            setup = self.bench.setup
            with Timer() as timer:
                result = qn.compile(str(setup.model_path), (setup.tune_x, setup.tune_y), **dict(self.audit_plan.compile_options))
            return {
                "plan": result.plan.to_json(), "cpu_s": timer.cpu, "wall_s": timer.wall,
                "passed": result.passed,
                "guard": None if result.verification is None else result.verification.guard.to_json(),
            }

        data = cached(self.cache / "compile-default.json", compute)
        return plan_from_json(data["plan"], "compile-default.json")

    def plan(self, arm: str, average: int) -> Any:
        from quanos_onnx.allocate.solve import DEFAULT_ANS_WEIGHT, Budget, solve
        from quanos_onnx.plan import LayerPlan, Plan

        bench = self.bench
        if arm == "uniform":
            return Plan.uniform(bench.layers, average)
        if arm == "first-layer":
            first = bench.layers[0].name
            return Plan(tuple(
                LayerPlan(layer.name, average, average) if layer.name == first
                else LayerPlan(layer.name, None, None, keep_float=True)
                for layer in bench.layers
            ))
        weight = ANS_WEIGHTS[arm]
        weight = DEFAULT_ANS_WEIGHT if weight is None else weight
        return solve(bench.layers, bench.joins, bench.sensitivity("ptq"), Budget("avg-bits", average),
                     ans=bench.ans(), ans_weight=weight)

    # -- one plan's measurements -----------------------------------------------------------
    def measure(self, label: str, plan: Any | None) -> dict[str, Any]:
        """Clean (whole test set), audit (first `samples`), masking, memory and energy of one plan."""
        from quanos_onnx.hwmodel.energy import estimate_all
        from quanos_onnx.quantize import quantize

        bench = self.bench
        key = "float" if plan is None else plan_key(plan)
        path = self.cache / f"cell-{key}-{self.audit_plan.samples}.json"

        def compute() -> dict[str, Any]:
            load = os.getloadavg()[0]
            with Timer() as writing:
                if plan is None:
                    model, aligned = bench.proto, None
                else:
                    written = quantize(bench.proto, plan, bench.calibration, layers=bench.layers, joins=bench.joins, ptq=_ptq())
                    model, aligned = written.model, written.plan
            with Timer() as cleaning:
                correct = bench.predictions(model, bench.test_x) == bench.test_y
            with Timer() as auditing:
                audit, masking = self.audit(model)
            estimates = estimate_all(bench.layers, aligned)
            print(f"[{self.name}] {label}: clean {correct.mean():.4f}, audit {auditing.cpu:.0f} s CPU "
                  f"({auditing.wall:.0f} s wall)", flush=True)
            return {
                "label": label, "key": key,
                "bits": None if aligned is None else {e.name: e.weight_bits for e in aligned.layers},
                "average": 32.0 if aligned is None else aligned.average_weight_bits(bench.params),
                "clean": _bits_text(correct),
                "worst": {str(eps): _bits_text(audit.worst_case(eps)) for eps in audit.suite.eps_values()},
                "audit": audit.to_json(), "masking": masking.to_json(),
                "memory_kb": estimates["standard"].weight_memory_bits / 8e3,
                "energy_pj": {name: estimates[name].energy_pj for name in PROFILES},
                "cpu_s": {"write": writing.cpu, "clean": cleaning.cpu, "audit": auditing.cpu},
                "audit_wall_s": auditing.wall, "load_at_start": load,
            }

        return cached(path, compute)

    def audit(self, model: Any) -> tuple[Any, Any]:
        from quanos_onnx.commands.options import AuditSettings, audit_model

        audit = self.audit_plan
        settings = AuditSettings(
            methods=("fgsm", "pgd", "apgd-ce", "apgd-dlr", "transfer"), eps=audit.eps, apgd_steps=50,
            apgd_restarts=1, large_eps=0.5, input_range=(0.0, 1.0), pgd_steps=7, pgd_alpha=audit.pgd_alpha,
        )
        x, y = self.bench.test_x[: audit.samples], self.bench.test_y[: audit.samples]
        batches = [(x[i : i + AUDIT_BATCH], y[i : i + AUDIT_BATCH]) for i in range(0, len(x), AUDIT_BATCH)]
        return audit_model(model, iter(batches), settings, seed=0, progress=None)

    # -- stages ----------------------------------------------------------------------------
    def run(self, averages: tuple[int, ...], arms: tuple[str, ...]) -> None:
        """Float, then `arms` at each average; the default compile after the second average
        when the main arms are run."""
        self.measure("float", None)
        for index, average in enumerate(averages):
            for arm in arms:
                self.measure(f"{arm}-{average}", self.plan(arm, average))
            if index == 1 and self.audit_plan.compile and set(MAIN_ARMS) <= set(arms):
                self.measure("compile", self.compile_plan())

    def rows(self, averages: tuple[int, ...]) -> dict[tuple[str, int | None], dict[str, Any]]:
        """Measured cells only (a table of an unfinished run shows what is there)."""
        rows: dict[tuple[str, int | None], dict[str, Any]] = {}

        def add(arm: str, average: int | None, plan: Any | None) -> None:
            key = "float" if plan is None else plan_key(plan)
            path = self.cache / f"cell-{key}-{self.audit_plan.samples}.json"
            if path.exists():
                rows[(arm, average)] = json.loads(path.read_text())

        add("float", None, None)
        if (self.cache / "compile-default.json").exists():
            add("compile", None, self.compile_plan())
        for average in sorted(averages):
            for arm in ARMS:
                add(arm, average, self.plan(arm, average))
        return rows


# -- tables --------------------------------------------------------------------------------

def wilson_text(mask: np.ndarray) -> str:
    from quanos_onnx.harness.robustness import wilson

    interval = wilson(int(mask.sum()), len(mask))
    return f"{100 * interval.share:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b (points) and its 95% percentile interval over resampled samples."""
    difference = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(difference), (BOOTSTRAP_DRAWS, len(difference)))
    means = difference[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return 100 * float(difference.mean()), 100 * float(low), 100 * float(high)


def _attack(row: dict[str, Any], name: str, eps: float) -> float:
    for attack in row["audit"]["attacks"]:
        if attack["name"] == name and abs(attack["eps"] - eps) < 1e-9:
            return 100 * attack["accuracy"]
    return float("nan")


def _flags(row: dict[str, Any]) -> str:
    flagged = [check["check"] for check in row["masking"]["checks"] if check["flagged"]]
    zero = row["audit"]["gradients"]
    zero_text = f"zero-grad {zero['all_zero_samples']}/{zero['samples']}, {100 * zero['zero_entry_share']:.0f}% entries"
    return (", ".join(flagged) if flagged else "none") + f"; {zero_text}"


def render(study: IsoStudy, averages: tuple[int, ...]) -> str:
    rows = study.rows(averages)
    audit = study.audit_plan
    float_row = rows.get(("float", None))
    tests = len(study.bench.test_y)
    lines = [
        f"### {study.bench.setup.description}",
        "",
        f"Clean: all {tests} test images (95% Wilson interval). Robust: worst case per sample over FGSM, PGD-7 "
        f"(step {'2/255' if audit.pgd_alpha else '2.5 eps/7'}), APGD-CE, APGD-DLR (50 steps) and transfer from "
        f"the float graph, plus the effort check, on the first {audit.samples} test images. Energy: the "
        "hwmodel's estimate per inference, relative to float on the same profile.",
        "",
        "| plan | target | avg bits | clean % [95% CI] | "
        + " | ".join(f"worst case {t} % [95% CI] | FGSM / PGD-7 {t} %" for t in audit.eps_text)
        + " | masking flags | weight memory kB | energy std / DG / DVAFS (x float) |",
        "|---|---|---|---|" + "---|---|" * len(audit.eps) + "---|---|---|",
    ]
    for (arm, average), row in sorted(rows.items(), key=lambda item: (item[0][1] or 0, item[0][0])):
        cells = [arm, "-" if average is None else str(average), f"{row['average']:.2f}", wilson_text(_mask(row["clean"]))]
        for eps in audit.eps:
            cells.append(wilson_text(_mask(row["worst"][str(eps)])))
            cells.append(f"{_attack(row, 'fgsm', eps):.1f} / {_attack(row, 'pgd-7', eps):.1f}")
        cells.append(_flags(row))
        cells.append(f"{row['memory_kb']:.1f}")
        if float_row is not None:
            cells.append(" / ".join(f"{row['energy_pj'][p] / float_row['energy_pj'][p]:.3f}" for p in PROFILES))
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences in points (the same images; 95% paired bootstrap interval, "
        f"{BOOTSTRAP_DRAWS} draws).",
        "",
        "| comparison | target | clean | " + " | ".join(f"worst case {t}" for t in audit.eps_text) + " |",
        "|---|---|---|" + "---|" * len(audit.eps),
    ]
    same: list[str] = []
    for average in sorted(averages):
        for arm, other in [(arm, other) for arm in ("ans", "ans-w1", "ans-w4") for other in ("accuracy-only", "uniform")]:
            a, b = rows.get((arm, average)), rows.get((other, average))
            if a is None or b is None:
                continue
            if a["key"] == b["key"]:
                same.append(f"{arm} = {other} at {average}")
                continue
            cells = [f"{arm} - {other}", str(average)]
            for pair in [("clean", None)] + [("worst", str(eps)) for eps in audit.eps]:
                x = _mask(a[pair[0]] if pair[1] is None else a[pair[0]][pair[1]])
                y = _mask(b[pair[0]] if pair[1] is None else b[pair[0]][pair[1]])
                mean, low, high = paired_bootstrap(x, y)
                cells.append(f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]")
            lines.append("| " + " | ".join(cells) + " |")
    if same:
        lines += ["", "Identical plans (every difference exactly 0): " + "; ".join(same) + "."]
    compile_path = study.cache / "compile-default.json"
    if compile_path.exists():
        data = json.loads(compile_path.read_text())
        lines += ["", f"The default compile: {data['cpu_s']:.0f} s CPU ({data['wall_s']:.0f} s wall), guard "
                  f"{'passed' if data['passed'] else 'failed'}."]
    cpu = [sum(row["cpu_s"].values()) for row in rows.values()]
    loads = [row["load_at_start"] for row in rows.values()]
    if cpu:
        lines += ["", f"CPU per plan (write, clean, audit): {min(cpu):.0f}-{max(cpu):.0f} s; 1-minute load average at "
                  f"the start of each cell {min(loads):.1f}-{max(loads):.1f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=tuple(AUDITS), action="append")
    parser.add_argument("--averages", help="comma-separated average bits (default per model; measured in this order)")
    parser.add_argument("--audit", type=int, help="audit samples (default per model)")
    parser.add_argument("--arms", default=",".join(MAIN_ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--table", action="store_true", help="print the tables of the cached cells")
    options = parser.parse_args()
    started = time.perf_counter()
    for name in options.model or list(AUDITS):
        study = IsoStudy(name, options.audit)
        averages = tuple(int(a) for a in options.averages.split(",")) if options.averages else study.audit_plan.averages
        if options.table:
            print(render(study, averages))
        else:
            study.run(averages, tuple(options.arms.split(",")))
    print(f"{machine()}; {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
