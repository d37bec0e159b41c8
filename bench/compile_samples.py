"""How many samples the default compile's sensitivity table and ANS need (issue 16's cost target).

The default compile (`qn.compile(model, (tune_x, tune_y), eval_data=(test_x, test_y))`) spends
most of its time measuring: ANS on `samples` images, the sensitivity table on the first
`sensitivity_samples` calibration images, then the search. This measures, on bench/study_data.py's
setups, what fewer samples cost in plan quality and save in time:

- the default compile (the smallest plan within 1 point of float) at each sensitivity sample
  count and ANS sample count: average bits, clean accuracy of the written model on the test
  images, CPU seconds per stage;
- the compile at each average-bits budget (3..6, no repair) with the same table sizes: the
  solved plan's accuracy on the search split (`uniform_check.solved_accuracy`: what the table
  is for) and the kept model's on the test images.

Each compile runs in a fresh child process (one thread), cached as JSON under
bench/cache/compile-samples/; a rerun resumes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/compile_samples.py --model resnet20 --model fashion [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_cost import _timed_stages, cell_in_child  # noqa: E402
from report_section import machine, write_section  # noqa: E402
from study_data import load_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench/cache/compile-samples"
SENSITIVITY_SAMPLES = (32, 64, 128, 256)
ANS_SAMPLES = (256, 1000)
BUDGET_BITS = (3, 4, 5, 6)


def kinds() -> dict[str, dict[str, Any]]:
    """Every compile of the table, by cell name."""
    cells: dict[str, dict[str, Any]] = {"bits8": {"bits": 8}, "default-probe": {"calibration": "probe"}}
    for sensitivity in SENSITIVITY_SAMPLES:
        for ans in ANS_SAMPLES:
            cells[f"default-s{sensitivity}-a{ans}"] = {"sensitivity_samples": sensitivity, "samples": ans}
        for bits in BUDGET_BITS:
            cells[f"budget{bits}-s{sensitivity}"] = {
                "sensitivity_samples": sensitivity, "budget": f"avg-bits={bits}", "max_accuracy_drop": None,
            }
    return cells


def run_one(model: str, kind: str) -> dict[str, Any]:
    """One compile in this process (the child)."""
    import torch

    torch.set_num_threads(1)
    import quanos_onnx as qn

    stages = _timed_stages()
    setup = load_setup(model)
    wall, cpu = time.perf_counter(), time.process_time()
    result = qn.compile(
        str(setup.model_path), (setup.tune_x, setup.tune_y), eval_data=(setup.test_x, setup.test_y), threads=1, **kinds()[kind]
    )
    params = {layer.name: layer.params for layer in result.layers}
    models = {m["name"]: m["clean_accuracy"] for m in result.verification.to_json()["models"]}
    allocation = result.plan.details.get("allocation", {})
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "stages_cpu_s": stages,
        "average_bits": result.plan.average_weight_bits(params),
        "weight_bits": {e.name: e.weight_bits for e in result.plan.layers},
        "guard": result.verification.guard.to_json(),
        "models": models,
        "search_accuracy": allocation.get("search_accuracy"),
        "uniform_check": result.plan.details.get("uniform_check") or allocation.get("uniform_check"),
        "ans": {e.name: e.ans_mean for e in result.plan.layers if e.ans_mean is not None},
        "machine": machine(),
    }


def measured(model: str, kind: str) -> dict[str, Any]:
    """The cached cell, else a child process of this script that computes it."""
    return cell_in_child(__file__, CACHE / model / f"{kind}.json", model, kind)


def ans_agreement(model: str, sensitivity: int) -> tuple[float, float]:
    """Spearman correlation of the per-layer ANS on 256 and on 1000 images, and their largest difference."""
    from scipy.stats import spearmanr

    few = measured(model, f"default-s{sensitivity}-a256")["ans"]
    many = measured(model, f"default-s{sensitivity}-a1000")["ans"]
    names = sorted(few)
    correlation = float(spearmanr([few[n] for n in names], [many[n] for n in names])[0]) if len(names) > 2 else 1.0
    return correlation, max(abs(few[n] - many[n]) for n in names)


def render(models: list[str]) -> str:
    flags = " ".join(f"--model {model}" for model in models)
    lines = [
        "## Sample counts of the sensitivity table and ANS (bench/compile_samples.py)",
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=. python bench/compile_samples.py {flags} --write`: the default compile and the "
        "compile at each average-bits budget (no repair) with `sensitivity_samples` (the table's images, the first of the "
        "calibration images) and `samples` (ANS images) set, each in a fresh child process at one thread, on "
        "bench/study_data.py's setups (the data of \"The default compile against a plain one\"). CPU s: the compile call; "
        "stage CPU s inside the stage functions. Budget rows: the solved plan's accuracy on the search split (the 1000 "
        "tune images after calibration, which chose nothing in the table) is what the table decides.",
        "",
        "| model | compile | table samples | ANS samples | average bits | clean % (test) | float % | guard | CPU s | x plain | ANS | table | search | verification |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    budget_lines = [
        "",
        "| model | table samples | " + " | ".join(f"solved @{bits} (search split %)" for bits in BUDGET_BITS) + " | table CPU s |",
        "|---|---|" + "---|" * len(BUDGET_BITS) + "---|",
    ]
    notes = []
    for model in models:
        plain = measured(model, "bits8")
        for sensitivity in SENSITIVITY_SAMPLES:
            for ans in ANS_SAMPLES:
                cell = measured(model, f"default-s{sensitivity}-a{ans}")
                stage = cell["stages_cpu_s"]
                lines.append(
                    f"| {model} | default | {sensitivity} | {ans} | {cell['average_bits']:.2f} | "
                    f"{100 * cell['models']['compiled']:.1f} | {100 * cell['models']['float']:.1f} | "
                    f"{'passed' if cell['guard']['passed'] else 'FAILED'} | {cell['cpu_s']:.1f} | "
                    f"{cell['cpu_s'] / plain['cpu_s']:.1f} | {stage.get('ANS', 0):.1f} | {stage.get('sensitivity table', 0):.1f} | {stage.get('search', 0):.1f} | "
                    f"{stage.get('verification', 0):.1f} |"
                )
        probe = measured(model, "default-probe")
        lines.append(
            f"| {model} | default, `calibration=\"probe\"` | 256 | 1000 | {probe['average_bits']:.2f} | "
            f"{100 * probe['models']['compiled']:.1f} | {100 * probe['models']['float']:.1f} | "
            f"{'passed' if probe['guard']['passed'] else 'FAILED'} | {probe['cpu_s']:.1f} | {probe['cpu_s'] / plain['cpu_s']:.1f} | "
            f"{probe['stages_cpu_s'].get('ANS', 0):.1f} | {probe['stages_cpu_s'].get('sensitivity table', 0):.1f} | "
            f"{probe['stages_cpu_s'].get('search', 0):.1f} | {probe['stages_cpu_s'].get('verification', 0):.1f} |"
        )
        lines.append(
            f"| {model} | bits=8 | | | 8.00 | {100 * plain['models']['compiled']:.1f} | {100 * plain['models']['float']:.1f} | "
            f"{'passed' if plain['guard']['passed'] else 'FAILED'} | {plain['cpu_s']:.1f} | 1.0 | | | | "
            f"{plain['stages_cpu_s'].get('verification', 0):.1f} |"
        )
        for sensitivity in SENSITIVITY_SAMPLES:
            cells = [measured(model, f"budget{bits}-s{sensitivity}") for bits in BUDGET_BITS]
            solved = []
            for cell in cells:
                check = cell.get("uniform_check")
                solved.append(f"{100 * check['solved_accuracy']:.1f}" if check else "uniform")
            table = sum(c["stages_cpu_s"].get("sensitivity table", 0) for c in cells) / len(cells)
            budget_lines.append(f"| {model} | {sensitivity} | " + " | ".join(solved) + f" | {table:.1f} |")
        ans = [ans_agreement(model, sensitivity) for sensitivity in SENSITIVITY_SAMPLES]
        same_plans = sum(
            measured(model, f"default-s{sensitivity}-a256")["weight_bits"] == measured(model, f"default-s{sensitivity}-a1000")["weight_bits"]
            for sensitivity in SENSITIVITY_SAMPLES
        )
        notes.append(
            f"{model}: plain `bits=8` compile {plain['cpu_s']:.1f} CPU s; ANS on 256 against 1000 images: Spearman "
            f"{min(a[0] for a in ans):.3f}-{max(a[0] for a in ans):.3f} over the layers, largest difference "
            f"{max(a[1] for a in ans):.3f}; the same plan in {same_plans} of {len(SENSITIVITY_SAMPLES)} table sizes; "
            f"machine: {plain['machine']}."
        )
    return "\n".join([*lines, *budget_lines, "", *notes, "", *cheapest(models), ""])


def cheapest(models: list[str]) -> list[str]:
    """The cheapest default compile per model that kept the guard, and what the table cannot save."""
    found = []
    for model in models:
        plain = measured(model, "bits8")
        cells = [
            (measured(model, f"default-s{s}-a{a}"), s, a) for s in SENSITIVITY_SAMPLES for a in ANS_SAMPLES
        ]
        passing = [c for c in cells if c[0]["guard"]["passed"]]
        if not passing:
            continue
        cell, sensitivity, ans = min(passing, key=lambda c: c[0]["cpu_s"])
        stage = cell["stages_cpu_s"]
        fixed = stage.get("search", 0) + stage.get("verification", 0)
        found.append(
            f"{model}: the cheapest default compile that kept its guard ({sensitivity} table images, ANS on {ans}) took "
            f"{cell['cpu_s']:.1f} CPU s, {cell['cpu_s'] / plain['cpu_s']:.1f}x the plain compile; its search and "
            f"verification alone took {fixed:.1f} s ({fixed / plain['cpu_s']:.1f}x), and its table {stage.get('sensitivity table', 0):.1f} s."
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=("resnet20", "fashion"))
    parser.add_argument("--kind", action="append", help="measure only these cells (by name), print nothing")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(run_one(*options.child)), flush=True)
        return
    models = options.model or ["resnet20"]
    if options.kind:
        for model in models:
            for kind in options.kind:
                print(model, kind, json.dumps(measured(model, kind))[:300], flush=True)
        return
    section = render(models)
    print(section)
    if options.write:
        write_section(
            REPO / "docs/benchmarks.md", section.splitlines()[0], section,
            after="## The default compile against a plain one (bench/compile_cost.py)",
        )


if __name__ == "__main__":
    main()
