"""The default compile (milp allocation + verification) against a plain `bits=8` compile.

Issue 16's cost target: allocation plus verification at most 3x the time of a plain compile
on ResNet-20; its size target: the default compile within 1 point of float at most 6 average
bits. Each compile runs in a fresh child process through
the API, `qn.compile(model, (tune_x, tune_y), eval_data=(test_x, test_y), **options)`, on
bench/study_data.py's setups (ResNet-20: tune = JPEG q75 test images from index 932, test =
the exact first 932; fashion: the CNN trained there, tune = the first 5000 training images,
test = t10k). CPU seconds are the compile call's (process_time: every thread; torch is
imported and the data loaded before it); the stage times are CPU seconds inside the library's stage functions (ANS, sensitivity table, search, verification).
Every compile is a JSON cell under bench/cache/compile-cost/, so a rerun resumes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/compile_cost.py --model resnet20 --model fashion [--write]

`--model efficientnet|mobilenetv2`: the ImageNet compile of docs/benchmarks.md ("ImageNet"):
EfficientNet-Lite0 or MobileNetV2 (label offset 1) on val1300 images 0..1279 as a folder
(224x224), 256 calibration and 256 ANS samples, verified on its own held-out 20%.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study_data import SHARED, cached, load_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench/cache/compile-cost"
COMPILES = {"default": {"threads": 1}, "bits8": {"threads": 1, "bits": 8}}
"""One thread each (the tool's default is every core since the eighth session), so that CPU
seconds compare across cells and with the earlier ones."""
TWO_THREADS = {"default-2threads": {"threads": 2}}
"""`--two-threads`: the default compile with torch's and onnxruntime's intra-op threads at 2
(both cores of the 2-core VM): its wall time is issue 18's 10-minute figure."""
BUDGETS = {f"budget{bits}": {"threads": 1, "budget": f"avg-bits={bits}", "max_accuracy_drop": None} for bits in (3, 4, 5, 6)}
"""`--budgets`: the milp compile at each average-bits budget (issue 16's iso-size comparison, no repair:
the kept plan, solved or uniform, against uniform of its size on the same test images)."""
SEEDED = {"default-seed1": {"threads": 1, "seed": 1}}
"""`--child MODEL default-seed1`: the default compile at seed 1, which for the ImageNet models
also draws another held-out 20% (docs/benchmarks.md, "The guard's margin")."""
IMAGENET = {
    "efficientnet": ("efficientnet_lite0.onnx", 0),
    "mobilenetv2": ("tf2_mobilenet_v2_1.0_224_ptq_deq.onnx", 1),
}
"""The ImageNet models (file under shared/models/imagenet, label offset: MobileNetV2 has 1001
classes with 0 = background)."""
STAGES = {
    "ANS": ("quanos_onnx.harness.ans", "measure_ans"),
    "sensitivity table": ("quanos_onnx.allocate.sensitivity", "measure"),
    "search": ("quanos_onnx.allocate.search", "smallest_within_guard"),
    "verification": ("quanos_onnx.verify", "verify"),
}


def _timed_stages() -> dict[str, float]:
    """Wrap each stage function so that its CPU seconds add up in the returned dict."""
    import importlib

    seconds: dict[str, float] = {}

    def wrap(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.process_time() - started

        return timed

    for label, (module_name, name) in STAGES.items():
        module = importlib.import_module(module_name)
        setattr(module, name, wrap(label, getattr(module, name)))
    return seconds


def compile_options(kind: str) -> dict[str, Any]:
    """A kind's qn.compile options; a `+joins<N>` suffix adds join_operand_bits=N, and
    `+joinspaper` join_operand_bits=None (the paper's rule; the default is 8)."""
    base, _, joins = kind.partition("+joins")
    options = dict({**COMPILES, **BUDGETS, **TWO_THREADS, **SEEDED}[base])
    if not joins:
        return options
    return {**options, "join_operand_bits": None if joins == "paper" else int(joins)}


def run_one(model: str, kind: str) -> dict[str, Any]:
    """One compile in this process (the child)."""
    import torch

    torch.set_num_threads(1)
    import quanos_onnx as qn

    stages = _timed_stages()
    if model in IMAGENET:
        # docs/benchmarks.md's ImageNet compile: val1300 as a folder, its own held-out 20%
        file, label_offset = IMAGENET[model]
        wall, cpu = time.perf_counter(), time.process_time()
        result = qn.compile(
            str(SHARED / "models/imagenet" / file), str(SHARED / "data/imagenet/val1300/images"),
            labels=str(SHARED / "data/imagenet/val1300/labels.csv"), resize=224, data_range=(0, 1280),
            calibration_samples=256, samples=256, label_offset=label_offset, **compile_options(kind),
        )
        test_samples = result.verification.samples
    else:
        setup = load_setup(model)
        wall, cpu = time.perf_counter(), time.process_time()
        result = qn.compile(
            str(setup.model_path), (setup.tune_x, setup.tune_y), eval_data=(setup.test_x, setup.test_y),
            **compile_options(kind),
        )
        test_samples = int(len(setup.test_y))
    models = {m["name"]: m for m in result.verification.to_json()["models"]}
    params = {layer.name: layer.params for layer in result.layers}
    allocation = result.plan.details.get("allocation", {})
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "stages_cpu_s": stages,
        "average_bits": result.plan.average_weight_bits(params),
        "guard": result.verification.guard.to_json(),
        "models": {name: {"clean": m["clean_accuracy"], "average": m["average_weight_bits"]} for name, m in models.items()},
        "search": result.plan.details.get("search"),
        "how": allocation.get("how"),
        "uniform_check": result.plan.details.get("uniform_check"),
        "test_samples": test_samples,
    }


def measured(model: str, kind: str) -> dict[str, Any]:
    """The cached cell, else a child process of this script that computes it."""
    return cell_in_child(__file__, CACHE / model / f"{kind}.json", model, kind)


def cell_in_child(script: str, path: Path, model: str, kind: str) -> dict[str, Any]:
    """The JSON cell at `path`, else `script --child MODEL KIND` run in a fresh process (its
    last stdout line), with the peak RSS of the children so far and the machine added."""

    def compute() -> dict[str, Any]:
        output = subprocess.run(
            [sys.executable, script, "--child", model, kind], check=True, capture_output=True, text=True
        ).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cell = json.loads(output.strip().splitlines()[-1])
        cell["peak_rss_mib"] = after.ru_maxrss / 1024
        cell["machine"] = machine()
        return cell

    return cached(path, compute)


def render(models: list[str], two_threads: bool = False, joins: str = "") -> str:
    lines = [
        f"## The default compile against a plain one (bench/compile_cost.py{_joins_title(joins)})",
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=. python bench/compile_cost.py --model resnet20 --model fashion{_joins_flag(joins)} --write`: "
        "`qn.compile(model, (tune_x, tune_y), eval_data=(test_x, test_y))` with the defaults (milp: ANS on 1000 images, "
        "the sensitivity table, the smallest plan within 1 point of float on the search split, verification) and with "
        "`bits=8` (verification only), each in a fresh child process, 1 thread (`default-2threads`, with `--two-threads` "
        "for the ImageNet models: `threads=2`, both cores; its CPU s add up both threads). CPU s and wall s: the compile call "
        "(torch already imported, the data already loaded); stage CPU s: inside the stage functions.",
        "",
        "| model | compile | average bits | clean % (test) | float % | uniform of its bits % | guard | CPU s | wall s | ANS | table | search | verification | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for model in models:
        kinds = [*COMPILES, *(TWO_THREADS if two_threads and model in IMAGENET else ())]
        cells = {kind: measured(model, kind + joins) for kind in kinds}
        for kind, cell in cells.items():
            rows = cell["models"]
            uniform = next((v["clean"] for k, v in rows.items() if k.startswith("uniform") and k != "uniform 8"), rows.get("uniform 8", {}).get("clean"))
            stage = cell["stages_cpu_s"]
            lines.append(
                f"| {model} | {kind} | {cell['average_bits']:.2f} | {100 * rows['compiled']['clean']:.1f} | "
                f"{100 * rows['float']['clean']:.1f} | {'' if uniform is None else f'{100 * uniform:.1f}'} | "
                f"{'passed' if cell['guard']['passed'] else 'FAILED'} | {cell['cpu_s']:.0f} | {cell['wall_s']:.0f} | "
                + " | ".join(f"{stage.get(label, 0.0):.1f}" for label in STAGES)
                + f" | {cell['machine']} |"
            )
        default = cells["default"]
        drop = default["guard"]["accuracy_drop"]
        ratios.append(
            f"{model}: the default compile took {default['cpu_s'] / cells['bits8']['cpu_s']:.1f}x "
            f"the CPU time of the plain one and {default['wall_s'] / cells['bits8']['wall_s']:.1f}x its wall time "
            f"({default['test_samples']} test images); it wrote {default['average_bits']:.2f} "
            f"average bits, float minus compiled {drop:+.2f} points ({'within' if default['guard']['passed'] else 'beyond'} the 1-point guard)."
        )
        if "default-2threads" in cells:
            ratios.append(
                f"{model}: at threads=2 the default compile took {cells['default-2threads']['wall_s']:.0f} s wall "
                f"against {default['wall_s']:.0f} s wall ({default['cpu_s']:.0f} CPU s) at one thread; the same plan and "
                f"accuracies: {'yes' if cells['default-2threads']['models'] == default['models'] else 'no'}."
            )
    return "\n".join([*lines, "", *ratios, ""])


def render_budgets(models: list[str], cached_only: bool = False, joins: str = "") -> str:
    """`cached_only`: rows for the cells already measured (an ImageNet budget compile is about
    20 CPU minutes), the others listed as not measured."""
    flags = " ".join(f"--model {model}" for model in models) + (" --cached-only" if cached_only else "") + _joins_flag(joins)
    lines = [
        f"## A budget against uniform of its size (bench/compile_cost.py --budgets{_joins_title(joins)})",
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=. python bench/compile_cost.py {flags} --budgets --write`: "
        "`qn.compile(model, (tune_x, tune_y), eval_data=(test_x, test_y), budget=\"avg-bits=B\")`, the data of the "
        "table above (ImageNet models: the \"ImageNet\" command's data, 256 held-out test images). The search split "
        "(the tune images after calibration) decides between the solved plan and "
        "uniform B (`no_worse_than_uniform`, docs/method.md); clean % of the kept plan and of uniform B are the "
        "verification's, on the test images, both written with the compile's PTQ.",
        "",
        "| model | budget | kept | average bits | clean % (test) | uniform B % (test) | kept - uniform, points | search split: solved % / uniform % | CPU s | machine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    differences, missing = [], []
    for model in models:
        for kind in BUDGETS:
            bits = int(kind.removeprefix("budget"))
            if cached_only and not (CACHE / model / f"{kind}{joins}.json").exists():
                missing.append(f"{model} avg-bits={bits}")
                continue
            cell = measured(model, kind + joins)
            rows = cell["models"]
            uniform = rows.get(f"uniform {bits}", rows["compiled"])["clean"]
            check = cell.get("uniform_check") or {}
            kept = check.get("kept", "solved (uniform)" if not check else "solved")
            search = (
                f"{100 * check['solved_accuracy']:.1f} / {100 * check['uniform_accuracy']:.1f}" if check else "the solved plan is uniform"
            )
            differences.append(rows["compiled"]["clean"] - uniform)
            lines.append(
                f"| {model} | avg-bits={bits} | {kept} | {cell['average_bits']:.2f} | {100 * rows['compiled']['clean']:.1f} | "
                f"{100 * uniform:.1f} | {100 * (rows['compiled']['clean'] - uniform):+.1f} | {search} | {cell['cpu_s']:.0f} | {cell['machine']} |"
            )
    at_least = sum(difference >= 0 for difference in differences)
    summary = [f"The kept plan is at least as accurate as uniform B on the test images in {at_least} of {len(differences)} budgets."]
    if missing:
        summary.append(f"Not measured yet: {', '.join(missing)}.")
    return "\n".join([*lines, "", *summary, ""])


def _joins_flag(joins: str) -> str:
    return f" --join-operand-bits {joins.removeprefix('+joins')}" if joins else ""


def _joins_title(joins: str) -> str:
    return f", `--join-operand-bits {joins.removeprefix('+joins')}`" if joins else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=("resnet20", "fashion", *IMAGENET))
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--budgets", action="store_true", help="the milp compile at avg-bits 3..6 against uniform instead")
    parser.add_argument("--cached-only", action="store_true", help="--budgets: only the cells already measured")
    parser.add_argument("--two-threads", action="store_true", help="ImageNet models: also the default compile at threads=2")
    parser.add_argument("--join-operand-bits", default=None, help="every compile with join_operand_bits=N, or paper (None)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(run_one(*options.child)), flush=True)
        return
    models = options.model or ["resnet20"]
    joins = "" if options.join_operand_bits is None else f"+joins{options.join_operand_bits}"
    section = (
        render_budgets(models, options.cached_only, joins) if options.budgets else render(models, options.two_threads, joins)
    )
    print(section)
    if options.write:
        write_section(REPO / "docs/benchmarks.md", section.splitlines()[0], section)


if __name__ == "__main__":
    main()
