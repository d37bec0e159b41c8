"""Where `quanos analyze` spends its time with default settings (issue 19, item 4).

Two measurements of the same model and data:

1. the command as a user runs it, in a fresh process: `python -m quanos_onnx.cli analyze
   MODEL --data DATA -o OUT` with default settings; wall time and the child's CPU time
   (user + sys);
2. the same analysis through the API in this process, split by stage: imports, reading the
   model and data, ANS, the robustness audit (and inside it each attack at each eps, the
   clean gradient, the effort check, the large-eps probe, onnxruntime's counting), the
   quantization tolerance, and writing the report (figures included). Each stage's wall and
   CPU (time.process_time: every thread of this process).

On a shared machine wall time depends on the load; CPU time is what the run costs alone on
its cores (one torch and one onnxruntime thread by default), so compare CPU figures across
runs, and wall figures only on an idle machine.

    PYTHONPATH=. python bench/audit_speed.py [--model M.onnx] [--data D.npz] [--no-cli]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = next(p for p in (REPO.parent / "shared", REPO.parents[1] / "shared", Path("/work/shared")) if p.exists())
MODEL = SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx"
DATA = SHARED / "data/cifar10/cifar10_test_first932.npz"


class Clock:
    """Wall and CPU seconds per stage, accumulated (a stage may run many times)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.order: list[str] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if name not in self.order:
                self.order.append(name)
            self.wall[name] += time.perf_counter() - wall
            self.cpu[name] += time.process_time() - cpu
            self.calls[name] += 1

    def timed(self, name_of: Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name_of(*args, **kwargs)):
                return function(*args, **kwargs)

        return wrapper

    def rows(self) -> list[tuple[str, float, float, int]]:
        return [(name, self.wall[name], self.cpu[name], self.calls[name]) for name in self.order]


def run_cli(model: Path, data: Path) -> tuple[float, float]:
    """(wall s, CPU s) of the command with default settings in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "quanos_onnx.cli", "analyze", str(model), "--data", str(data), "-o", out, "-q"],
            check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_staged(model: Path, data: Path, clock: Clock) -> Any:
    """The analysis through the API, each stage and each attack timed."""
    with clock.stage("imports (torch, onnxruntime, scipy, the package)"):
        import onnxruntime  # noqa: F401
        import scipy.stats  # noqa: F401
        import torch

        from quanos_onnx.commands import analyze as analyze_module
        from quanos_onnx.harness import robustness, tolerance
        from quanos_onnx.harness.robustness import attack_name
    torch.set_num_threads(1)
    inside: list[str] = []

    def attack_label(attack: Any, *args: Any, **kwargs: Any) -> str:
        return f"  audit: {attack_name(attack)} at eps {attack.eps:.4g}"

    original_craft, original_effort, original_apgd = robustness._craft, robustness._effort_outcome, robustness.apgd_perturb

    def craft(*args: Any, **kwargs: Any) -> Any:
        if inside:  # a transfer attack crafts its inner attack on the source: counted as the transfer
            return original_craft(*args, **kwargs)
        inside.append("craft")
        try:
            return clock.timed(attack_label, original_craft)(*args, **kwargs)
        finally:
            inside.pop()

    def effort(*args: Any, **kwargs: Any) -> Any:
        inside.append("effort")
        try:
            return clock.timed(lambda *a, **k: "  audit: effort check (APGD-CE, survivors)", original_effort)(*args, **kwargs)
        finally:
            inside.pop()

    def apgd(*args: Any, **kwargs: Any) -> Any:
        if inside:
            return original_apgd(*args, **kwargs)
        return clock.timed(lambda *a, **k: "  audit: large-eps probe", original_apgd)(*args, **kwargs)

    robustness._craft, robustness._effort_outcome, robustness.apgd_perturb = craft, effort, apgd
    robustness._clean_gradient = clock.timed(lambda *a, **k: "  audit: clean gradient (masking check, FGSM/PGD start)", robustness._clean_gradient)
    robustness._twin_misclassifies = clock.timed(lambda *a, **k: "  audit: twin/onnxruntime agreement", robustness._twin_misclassifies)
    tolerance._Suffix.float_feeds = clock.timed(lambda *a, **k: "  tolerance: float tensors at the cut", tolerance._Suffix.float_feeds)
    tolerance._Suffix.logits = clock.timed(lambda *a, **k: "  tolerance: changed tail per layer and bits", tolerance._Suffix.logits)

    @contextmanager
    def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
        with clock.stage(label):
            yield lambda done: None

    rest = "read model and data, checks, documents (the rest of run_analyze)"
    clock.order.append(rest)
    clock.calls[rest] = 1
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    result = analyze_module.run_analyze(str(model), str(data), analyze_module.AnalyzeOptions(), progress=progress)
    total_wall, total_cpu = time.perf_counter() - started_wall, time.process_time() - started_cpu
    stages = [name for name in clock.order if not name.startswith(" ") and name != rest and not name.startswith("imports")]
    clock.wall[rest] = total_wall - sum(clock.wall[name] for name in stages)
    clock.cpu[rest] = total_cpu - sum(clock.cpu[name] for name in stages)
    with tempfile.TemporaryDirectory() as out, clock.stage("write analysis.json and the report (figures)"):
        result.save(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--no-cli", action="store_true", help="only the staged in-process run")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"model {args.model}\ndata {args.data}\nload average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if not args.no_cli:
        wall, cpu = run_cli(args.model, args.data)
        print(f"\nquanos analyze MODEL --data DATA -o OUT (defaults, fresh process): wall {wall:.1f} s, CPU {cpu:.1f} s")
    clock = Clock()
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    result = run_staged(args.model, args.data, clock)
    print(f"\nstaged in-process run: wall {time.perf_counter() - started_wall:.1f} s, CPU {time.process_time() - started_cpu:.1f} s")
    print("\n| stage | wall s | CPU s | calls |\n|---|---:|---:|---:|")
    for name, wall, cpu, calls in clock.rows():
        print(f"| {name.strip() if not name.startswith(' ') else '- ' + name.strip()} | {wall:.1f} | {cpu:.1f} | {calls} |")
    audit = result.document["audit"]
    print(f"\nsamples: audit {audit['robustness']['samples']}, ANS {result.document['ans']['samples']}, "
          f"tolerance {(result.document['tolerance'] or {}).get('samples')}")
    print(audit["verdict"])


if __name__ == "__main__":
    main()
