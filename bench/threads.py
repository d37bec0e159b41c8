"""The `--threads` default: ResNet-20 compiles at threads 1 and 2 against the libraries'
defaults (`--threads 0`: torch and onnxruntime each pick one thread per core), wall and CPU
time side by side. Writes the '## Threads' section of docs/benchmarks.md.

Each run is `python -m quanos_onnx.cli compile` in a child process (CPU time = the child's
user + system time from wait4); settings are interleaved and repeated, the table shows the
median and the range.

    PYTHONPATH=. python bench/threads.py [--samples 256] [--repeats 3] \\
        [--model ../shared/models/cifar10/resnet20_cifar10_akamaster.onnx] \\
        [--data ../shared/data/cifar10/cifar10_test_jpeg_q75.npz]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402

from quanos_onnx.threads import DEFAULT_THREADS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BENCHMARKS = REPO / "docs/benchmarks.md"
THREADS = (("1", ""), ("2", ""), ("0", " (library defaults)"))
WORKLOADS = (("--bits 4", ["--bits", "4", "--max-accuracy-drop", "none"]), ("default (milp allocation, verification)", []))


def run_once(model: Path, data: Path, samples: int, extra: list[str], threads: str, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one compile in a child process."""
    command = [
        sys.executable, "-m", "quanos_onnx.cli", "compile", str(model), "--data", str(data), "--data-range", "932:",
        "--samples", str(samples), "--calibration-samples", str(samples), "--threads", threads, "-q", "-o", str(out), *extra,
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode() if child.stderr else ''}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(model: Path, data: Path, samples: int, repeats: int) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Every (workload, threads) `repeats` times, interleaved so load changes hit all alike."""
    timings: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            for workload, extra in WORKLOADS:
                for threads, _ in THREADS:
                    out = Path(scratch) / f"{repeat}-{len(timings)}"
                    timing = run_once(model, data, samples, extra, threads, out)
                    timings.setdefault((workload, threads), []).append(timing)
                    print(f"{workload}, --threads {threads}: wall {timing[0]:.1f} s, CPU {timing[1]:.1f} s", flush=True)
    return timings


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def section(
    timings: dict[tuple[str, str], list[tuple[float, float]]], samples: int, repeats: int, command: str, host: str
) -> str:
    rows = [
        "| compile | --threads | wall s | CPU s | CPU / wall |",
        "|---|---|---|---|---|",
    ]
    for workload, _ in WORKLOADS:
        for threads, label in THREADS:
            runs = timings[(workload, threads)]
            walls, cpus = [wall for wall, _ in runs], [cpu for _, cpu in runs]
            ratio = statistics.median(cpu / wall for wall, cpu in runs)
            rows.append(f"| {workload} | {threads}{label} | {spread(walls)} | {spread(cpus)} | {ratio:.2f} |")
    return "\n".join(
        [
            "## Threads",
            "",
            "`--threads N` (API: `threads=N`) sets torch's and onnxruntime's intra-op threads together;",
            "`--threads 0` (API: `threads=None`) leaves both at their defaults (one thread per core each).",
            "The tool's own onnxruntime sessions never spin between runs (`session.intra_op.allow_spinning=0`).",
            f"ResNet-20 (akamaster, CIFAR-10), {samples} samples of cifar10_test_jpeg_q75.npz `[932:]` for",
            f"calibration and ANS; each cell the median (range) of {repeats} runs, interleaved, each a fresh",
            "process (import and model load included); CPU = user + system time of the process.",
            "On a machine shared with other jobs, wall time is mostly time spent waiting for a core",
            "(CPU / wall far below 1) and the CPU time is the better comparison; on an idle machine the",
            "wall time is what the user waits for.",
            "",
            f"Machine: {host}.",
            "",
            "```",
            command,
            "```",
            "",
            *rows,
            "",
            *(fastest(timings, workload) for workload, _ in WORKLOADS),
            "",
            "The default (threads.DEFAULT_THREADS) is the number of cores the process may run on",
            f"(`os.sched_getaffinity`; {DEFAULT_THREADS} here): on an idle machine the default compile, where torch and",
            "onnxruntime run the attacks, ANS and the trial plans, finishes sooner with every core for",
            "somewhat more CPU in all. On a machine shared with other jobs, `--threads 1` costs the",
            "least CPU (docs/benchmarks.md, Threads, the earlier measurement under load).",
            "",
        ]
    )


def fastest(timings: dict[tuple[str, str], list[tuple[float, float]]], workload: str) -> str:
    """Which setting took the least wall time and which the least CPU for one workload."""
    lines = []
    for label, which in (("wall", 0), ("CPU", 1)):
        medians = {threads: statistics.median(run[which] for run in timings[(workload, threads)]) for threads, _ in THREADS}
        best = min(medians, key=medians.__getitem__)
        others = ", ".join(f"{medians[t]:.1f} s at --threads {t}" for t in medians if t != best)
        lines.append(f"least {label} at `--threads {best}`, {medians[best]:.1f} s (against {others})")
    return f"- {workload}: " + "; ".join(lines) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx")
    parser.add_argument("--data", type=Path, default=SHARED / "data/cifar10/cifar10_test_jpeg_q75.npz")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="Print the section instead of writing docs/benchmarks.md.")
    arguments = parser.parse_args()
    command = " ".join(["PYTHONPATH=. python bench/threads.py", *sys.argv[1:]])
    host = machine()
    timings = measure(arguments.model, arguments.data, arguments.samples, arguments.repeats)
    text = section(timings, arguments.samples, arguments.repeats, command, host)
    if arguments.no_write:
        print(text)
    else:
        write_section(BENCHMARKS, "## Threads", text)
        print(text)


if __name__ == "__main__":
    main()
