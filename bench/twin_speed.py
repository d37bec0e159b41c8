"""Forward+backward time of the torch twin against the torch module it was exported from.

Model: CIFAR ResNet-18 (kuangliu layout, width 64, 11.2M parameters), random weights,
batch 128 of 3x32x32, torch.set_num_threads(2). Each configuration alternates module and
twin runs after one warm-up each and reports medians; the ratio twin / module is the
figure of merit (target <= 1.2).

Configurations: the legacy export (BatchNorm folded into the convs, as exporters do in
eval mode), the dynamo export, and a legacy export with BatchNorm kept (the same ops as
the module); each for an attack step (gradient w.r.t. the input only) and a fine-tuning
step (input and weight gradients). A batch-1 row shows the per-node overhead.

Usage: python bench/twin_speed.py [--iterations 3] [--output docs/benchmarks.md]
Writes its section of docs/benchmarks.md (creating the file if needed).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import twin_zoo  # noqa: E402
from report_section import machine, write_section  # noqa: E402

from quanos_onnx.twin import build_twin  # noqa: E402

SECTION = "## Torch twin speed (bench/twin_speed.py)"
IMAGE = (3, 32, 32)


def step_seconds(network: nn.Module, images: torch.Tensor) -> float:
    inputs = images.clone().requires_grad_()
    start = time.perf_counter()
    network(inputs).sum().backward()
    elapsed = time.perf_counter() - start
    network.zero_grad(set_to_none=True)
    return elapsed


def measure(module: nn.Module, twin: nn.Module, images: torch.Tensor, iterations: int) -> tuple[float, float]:
    step_seconds(module, images)
    step_seconds(twin, images)
    module_times, twin_times = [], []
    for _ in range(iterations):
        module_times.append(step_seconds(module, images))
        twin_times.append(step_seconds(twin, images))
    return statistics.median(module_times), statistics.median(twin_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    module = twin_zoo.make_model("resnet18", width=64)
    exports = {
        "legacy, BN folded": twin_zoo.export(module, dynamo=False, opset=21, image_shape=IMAGE),
        "dynamo": twin_zoo.export(module, dynamo=True, opset=21, image_shape=IMAGE),
        "legacy, BN kept": twin_zoo.export(module, dynamo=False, opset=21, image_shape=IMAGE, fold=False),
    }
    images = torch.randn(args.batch, *IMAGE)
    rows = []
    for label, model in exports.items():
        for mode, trainable in (("input grad", False), ("input + weight grads", True)):
            module.requires_grad_(trainable)
            module_time, twin_time = measure(module, build_twin(model, trainable=trainable), images, args.iterations)
            rows.append((label, mode, args.batch, module_time, twin_time))
            print(f"{label:18s} {mode:22s} module {module_time:.3f}s twin {twin_time:.3f}s ratio {twin_time / module_time:.3f}")
    module.requires_grad_(False)
    module_time, twin_time = measure(module, build_twin(exports["legacy, BN folded"]), images[:1], 20)
    rows.append(("legacy, BN folded", "input grad", 1, module_time, twin_time))
    write_section(args.output, SECTION, render(rows, args))


def render(rows: list[tuple[str, str, int, float, float]], args: argparse.Namespace) -> str:
    lines = [
        SECTION,
        "",
        f"Machine: {machine()}; {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}.",
        f"Command: `python bench/twin_speed.py --iterations {args.iterations}`. CIFAR ResNet-18 (width 64), "
        "random weights, medians of alternating runs after a warm-up.",
        "",
        "| export | gradients | batch | torch module (s) | twin (s) | twin / module |",
        "|---|---|---|---|---|---|",
    ]
    for label, mode, batch, module_time, twin_time in rows:
        lines.append(f"| {label} | {mode} | {batch} | {module_time:.4f} | {twin_time:.4f} | {twin_time / module_time:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
