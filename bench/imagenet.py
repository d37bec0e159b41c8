"""ImageNet-scale models end to end on the shared CPU machine: EfficientNet-Lite0 and
MobileNetV2 (1001 classes) on val1300, read from the image folder with its labels file,
resized to 224. Writes the '## ImageNet' section of docs/benchmarks.md.

- evaluate: clean + FGSM + PGD-10 accuracy of the first 100 images (eps 1/255), the
  issue's target 3 minutes;
- compile: a default QUANOS compile (FGSM ANS, Eqn 3) with 256 calibration images and 256
  attacked images, target 10 minutes;
- gradient: one batch of 16 through the twin (forward + backward, as every attack step),
  NCHW against channels-last memory, the figure behind the attacks' memory format.

Every run is `python -m quanos_onnx.cli ...` in a child process: wall time, CPU time
(the child's user + system time) and peak RSS (its ru_maxrss) from wait4. The machine is
shared by several engineers, so CPU time is the steadier figure; wall time is stated too.

    PYTHONPATH=. python bench/imagenet.py [--only evaluate,compile,gradient] [--models lite0,mobilenet]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = next(path for path in (REPO.parent / "shared", REPO.parents[1] / "shared", REPO / "shared") if path.is_dir())
BENCHMARKS = REPO / "docs/benchmarks.md"
IMAGES = SHARED / "data/imagenet/val1300/images"
LABELS = SHARED / "data/imagenet/val1300/labels.csv"
MODELS = {
    "lite0": ("EfficientNet-Lite0", SHARED / "models/imagenet/efficientnet_lite0.onnx", []),
    "mobilenet": ("MobileNetV2 1.0 (1001 classes)", SHARED / "models/imagenet/tf2_mobilenet_v2_1.0_224_ptq_deq.onnx", ["--label-offset", "1"]),
}
DATA = ["--data", str(IMAGES), "--labels", str(LABELS), "--resize", "224"]


@dataclass(frozen=True)
class Measured:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    output: str


def run(arguments: list[str]) -> Measured:
    """One CLI run in a child process, with its wall and CPU time and peak memory."""
    command = [sys.executable, "-m", "quanos_onnx.cli", *arguments]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    output = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {shlex.join(arguments)}\n{output[-3000:]}")
    measured = Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, output)
    print(
        f"{as_written(arguments)}: wall {measured.wall_s:.0f} s, CPU {measured.cpu_s:.0f} s, "
        f"peak RSS {measured.peak_rss_mib:.0f} MiB",
        flush=True,
    )
    return measured


def as_written(arguments: list[str]) -> str:
    """The command line as a user in the checkout types it (../shared beside it)."""
    return "quanos " + shlex.join(arguments).replace(str(SHARED), "../shared")


def evaluate_command(key: str) -> list[str]:
    _, model, extra = MODELS[key]
    return ["evaluate", str(model), *DATA, *extra, "--samples", "100", "--attack", "fgsm,pgd", "--eps", "1/255", "--pgd-steps", "10"]


def compile_command(key: str, out: Path) -> list[str]:
    _, model, extra = MODELS[key]
    return ["compile", str(model), *DATA, *extra, "--calibration-samples", "256", "--samples", "256", "-o", str(out)]


GRADIENT = """
import sys, time, numpy as np, torch
torch.set_num_threads(1)
from quanos_onnx.commands.options import read_model
from quanos_onnx.harness.attacks import loss_gradient
from quanos_onnx.twin import build_twin
twin = build_twin(read_model(sys.argv[1]).proto)
x = torch.from_numpy(np.random.default_rng(0).random((16, 3, 224, 224), np.float32))
y = torch.zeros(16, dtype=torch.int64)
inputs = {"NCHW": x, "channels-last": x.contiguous(memory_format=torch.channels_last)}
loss_gradient(twin, x, y)
times = {name: [] for name in inputs}
for _ in range(3):
    for name, batch in inputs.items():
        start = time.process_time()
        loss_gradient(twin, batch, y)
        times[name].append(time.process_time() - start)
print(" ".join(f"{name}={min(values):.2f}" for name, values in times.items()))
"""


def gradient_rows(keys: list[str]) -> list[str]:
    rows = []
    for key in keys:
        name, model, _ = MODELS[key]
        result = subprocess.run([sys.executable, "-c", GRADIENT, str(model)], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
        figures = dict(item.split("=") for item in result.stdout.split())
        rows.append(f"| {name} | {figures['NCHW']} | {figures['channels-last']} |")
    return rows


def accuracy_lines(output: str) -> str:
    """The evaluate table's rows, for the record."""
    return "\n".join(line for line in output.splitlines() if line.strip() and not line.startswith(("note", "warning")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="evaluate,compile,gradient")
    parser.add_argument("--models", default="lite0,mobilenet")
    options = parser.parse_args()
    parts, keys = options.only.split(","), options.models.split(",")
    lines = [
        "## ImageNet",
        "",
        f"Machine: {machine()}. `PYTHONPATH=. python bench/imagenet.py --only {options.only} --models {options.models}`; "
        "each command below runs as a child process (`--threads 1`, the default); CPU is its user + system time, "
        "peak RSS its ru_maxrss. Data: the first images of `../shared/data/imagenet/val1300` (labels.csv order), "
        "read lazily from the folder, shorter side resized 227->224 (bilinear).",
        "",
    ]
    if "evaluate" in parts or "compile" in parts:
        lines += ["| model | run | target | wall s | CPU s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    commands: list[str] = []
    details: list[str] = []

    def flush(extra: list[str]) -> None:
        """Write what is measured so far (a long run's first figures survive its end)."""
        command_block = ["", "Commands:", "", "```", *commands, "```", "", *details] if commands else []
        write_section(BENCHMARKS, "## ImageNet", "\n".join([*lines, *command_block, *extra]))

    for key in keys:
        name = MODELS[key][0]
        if "evaluate" in parts:
            arguments = evaluate_command(key)
            measured = run(arguments)
            lines.append(f"| {name} | evaluate: clean + FGSM + PGD-10, 100 images, eps 1/255 | 180 s | {measured.wall_s:.0f} | {measured.cpu_s:.0f} | {measured.peak_rss_mib:.0f} |")
            commands.append(as_written(arguments))
            details.append(f"{name}, evaluate:\n\n```\n{accuracy_lines(measured.output)}\n```")
            flush([])
        if "compile" in parts:
            with tempfile.TemporaryDirectory() as folder:
                arguments = compile_command(key, Path(folder) / "out")
                measured = run(arguments)
            lines.append(f"| {name} | compile: QUANOS, 256 calibration + 256 attacked images | 600 s | {measured.wall_s:.0f} | {measured.cpu_s:.0f} | {measured.peak_rss_mib:.0f} |")
            commands.append(as_written(arguments).replace(folder, "/tmp"))
            details.append(f"{name}, compile:\n\n```\n{accuracy_lines(measured.output)[-2500:]}\n```")
            flush([])
    gradient: list[str] = []
    if "gradient" in parts:
        gradient = [
            "",
            "One attack step's gradient (twin forward + backward, batch 16 at 224x224, 1 thread), CPU seconds, best of 3:",
            "",
            "| model | NCHW | channels-last |",
            "|---|---|---|",
            *gradient_rows(keys),
        ]
    flush(gradient)
    print(BENCHMARKS.read_text().split("## ImageNet", 1)[1])


if __name__ == "__main__":
    main()
