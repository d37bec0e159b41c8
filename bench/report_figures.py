"""What report.html's figures cost in a compile: the CPU time of a default ResNet-20 compile,
and of writing its report files with the figures and without them (--no-figures), in one
process with 1 thread (the first drawing imports matplotlib, as a command does). CPU seconds (time.process_time) are the figures to read on a shared
machine; the report files are timed best of 3.

    PYTHONPATH=. python bench/report_figures.py [--model M] [--data D] [--data-range 932:]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = next(path for path in (REPO.parent / "shared", REPO.parents[1] / "shared", REPO / "shared") if path.is_dir())


def best_cpu(action, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        action()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx"))
    parser.add_argument("--data", default=str(SHARED / "data/cifar10/cifar10_test_jpeg_q75.npz"))
    parser.add_argument("--data-range", default="932:")
    options = parser.parse_args()
    import quanos_onnx as qn
    from quanos_onnx import report
    from quanos_onnx.commands.options import data_range_from_text

    start = time.process_time()
    result = qn.compile(options.model, options.data, data_range=data_range_from_text(options.data_range))
    compile_cpu = time.process_time() - start
    without = best_cpu(lambda: report.report_files(result.report, result.run, figures=False))
    first = best_cpu(lambda: report.report_files(result.report, result.run, figures=True), repeats=1)
    with_figures = best_cpu(lambda: report.report_files(result.report, result.run, figures=True))
    print(f"compile (everything but writing files): {compile_cpu:.1f} CPU s")
    print(f"report files with figures: {with_figures:.2f} CPU s (best of 3; the first call, importing matplotlib: "
          f"{first:.2f}); with --no-figures: {without:.2f} CPU s")
    print(f"the figures: {first - without:.2f} CPU s in a run (matplotlib's import included), "
          f"{100 * (first - without) / (compile_cpu + first):.0f}% of the compile with them")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
