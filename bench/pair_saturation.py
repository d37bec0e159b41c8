"""What onnxruntime's int16 pair saturation does to ResNet-20 at 8 bits, and what the twin makes of it.

On x86 CPUs with AVX2 but without VNNI, onnxruntime's u8 x s8 kernels (QLinearConv, QGemm,
QLinearMatMul) add adjacent products in int16 with saturation (VPMADDUBSW; docs/twin.md).
This compares, on the exact 932 CIFAR-10 test images: the default session against one with
session.x64quantprecision=1 (onnxruntime then converts int8 weights to uint8, which is exact);
uniform 8 bits against 7-bit weights with 8-bit activations (no pair can saturate); and the
twin against the default session, with its forward time with and without the pair emulation.
Writes (or replaces) its section of docs/benchmarks.md.

    python bench/pair_saturation.py [--shared ../shared] [--rounds 20]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from quanos_onnx.layers import list_layers  # noqa: E402
from quanos_onnx.model import load_model, make_session  # noqa: E402
from quanos_onnx.plan import LayerPlan, Plan  # noqa: E402
from quanos_onnx.quantize import quantize  # noqa: E402
from quanos_onnx.twin import build_twin, fusion  # noqa: E402
from report_section import machine, write_section  # noqa: E402

MODEL = Path("models/cifar10/resnet20_cifar10_akamaster.onnx")
TEST = Path("data/cifar10/cifar10_test_first932.npz")
CALIBRATION = Path("data/cifar10/cifar10_test_jpeg_q75.npz")
CALIBRATION_START, CALIBRATION_COUNT = 932, 256
HEADING = "## Pair saturation: ResNet-20 at 8 bits on a CPU without VNNI"
EXACT_KERNELS = (("session.x64quantprecision", "1"),)


def nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def seven_bit_weights(layers: Sequence) -> Plan:
    return Plan(tuple(
        LayerPlan(layer.name, None, None, keep_float=True) if layer.is_output else LayerPlan(layer.name, 7, 8)
        for layer in layers
    ), method="weights-7-activations-8")


def logits(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 100]})[0] for i in range(0, len(x), 100)])


def median_seconds(runs: dict[Any, Callable[[], object]], rounds: int) -> dict[Any, float]:
    """Median CPU seconds per call, the runs interleaved in rotating order (one thread each)."""
    names, samples = list(runs), {name: [] for name in runs}
    for run in runs.values():
        run()
    for index in range(rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            start = time.process_time()
            runs[name]()
            samples[name].append(time.process_time() - start)
    return {name: float(np.median(values)) for name, values in samples.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    command = ("python bench/pair_saturation.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    torch.set_num_threads(1)

    test = np.load(args.shared / TEST)
    x, y = nchw(test["x"]), test["y"].astype(np.int64)
    calibration = nchw(np.load(args.shared / CALIBRATION)["x"][CALIBRATION_START : CALIBRATION_START + CALIBRATION_COUNT])
    normalized = load_model(args.shared / MODEL)
    layers = list_layers(normalized)
    batches = [calibration[i : i + 64] for i in range(0, len(calibration), 64)]
    models = {
        "uniform 8": quantize(normalized, Plan.uniform(layers, 8), batches).model,
        "weights 7, activations 8": quantize(normalized, seven_bit_weights(layers), batches).model,
    }
    probe = fusion.pair_saturation()
    sessions = {
        (label, kernels): make_session(model, config=config, threads=1)
        for label, model in models.items()
        for kernels, config in (("default", ()), ("x64quantprecision", EXACT_KERNELS))
    }
    feed = {normalized.graph.input[0].name: x[:32]}
    timings = median_seconds({key: (lambda run=run: run.run(None, feed)) for key, run in sessions.items()}, args.rounds)
    rows = []
    for label in models:
        deployed, reference = logits(sessions[label, "default"], x), logits(sessions[label, "x64quantprecision"], x)
        rows.append(
            f"| {label} | {np.mean(deployed.argmax(1) == y):.2%} | {np.mean(reference.argmax(1) == y):.2%} "
            f"| {int(np.sum(deployed.argmax(1) != reference.argmax(1)))} "
            f"| {np.abs(deployed - reference).max() / np.abs(reference).max():.3f} "
            f"| {timings[label, 'default'] * 1e3:.1f} | {timings[label, 'x64quantprecision'] * 1e3:.1f} |"
        )

    model = models["uniform 8"]
    twin = build_twin(model)
    saturating = len(fusion.fused_kernels(model).saturating_pairs)
    with torch.no_grad():
        twin_logits = np.concatenate([twin(torch.from_numpy(x[i : i + 64])).numpy() for i in range(0, len(x), 64)])
    deployed = logits(make_session(model, threads=1), x)
    exact_twin = _twin_assuming(model, fusion.PairSaturation())
    batch = torch.from_numpy(x[:64])
    with torch.no_grad():
        twin_times = median_seconds(
            {"with pair emulation": lambda: twin(batch), "without": lambda: exact_twin(batch)}, max(args.rounds // 4, 3)
        )

    lines = [
        HEADING,
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}; onnxruntime {ort.__version__}, torch {torch.__version__}; one thread",
        f"- command: `{command}`",
        f"- probe (`twin.fusion.pair_saturation()`): {probe}",
        f"- models: {MODEL} quantized by `quantize` (minmax, {CALIBRATION_COUNT} calibration images from "
        f"cifar10_test_jpeg_q75.npz index {CALIBRATION_START}..), classifier float; accuracy on the exact 932 test images",
        "- default = plain onnxruntime session; x64quantprecision = `session.x64quantprecision=1` (exact integer kernels)",
        "",
        "| model | top-1 default | top-1 x64quantprecision | argmaxes that differ | max logit difference / max logit "
        "| CPU ms default | CPU ms x64quantprecision |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"CPU ms: per batch of 32, median of {args.rounds} rounds, all four sessions interleaved in rotating order.",
        "",
        f"Twin of the uniform 8-bit model ({saturating} layers emulated with pair saturation) against the default "
        f"session: argmaxes agree on {np.mean(twin_logits.argmax(1) == deployed.argmax(1)):.2%} of the 932 images, "
        f"max abs logit difference {np.abs(twin_logits - deployed).max():.3g}. Twin forward, CPU ms per batch of 64: "
        + ", ".join(f"{name} {seconds * 1e3:.0f}" for name, seconds in twin_times.items())
        + ".",
    ]
    section = "\n".join(lines) + "\n"
    write_section(args.output, HEADING, section)
    print(section)
    return 0


def _twin_assuming(model: onnx.ModelProto, saturation: fusion.PairSaturation) -> torch.nn.Module:
    """The twin built as on a CPU whose probe gives `saturation`."""
    probe = fusion.pair_saturation
    fusion.pair_saturation = lambda: saturation
    try:
        return build_twin(model)
    finally:
        fusion.pair_saturation = probe


if __name__ == "__main__":
    sys.exit(main())
