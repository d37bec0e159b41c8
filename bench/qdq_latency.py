"""Latency of the compiled ResNet-20 in onnxruntime, side by side with the float model and
onnxruntime.quantization.quantize_static (QDQ, per-channel) on the same calibration data.

Target (issue 2): the mixed plan within 1.1x of quantize_static's latency. All models run
in one process, interleaved (each round times every model once, in rotating order), and
the figure per model is the median over rounds, so load from other processes hits all
models alike. Writes (or replaces) its section of docs/benchmarks.md.

    python bench/qdq_latency.py [--shared ../shared] [--rounds 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from quanos_onnx.layers import list_layers  # noqa: E402
from quanos_onnx.model import load_model  # noqa: E402
from quanos_onnx.quantize import quantize  # noqa: E402
from quanos_onnx.plan import LayerPlan, Plan  # noqa: E402
from report_section import machine, write_section  # noqa: E402

MODEL = Path("models/cifar10/resnet20_cifar10_akamaster.onnx")
TEST = Path("data/cifar10/cifar10_test_first932.npz")
CALIBRATION = Path("data/cifar10/cifar10_test_jpeg_q75.npz")
CALIBRATION_START, CALIBRATION_COUNT = 932, 256
HEADING = "## QDQ latency: ResNet-20 (CIFAR-10) in onnxruntime"
FUSION_OPS = ("QLinearConv", "QLinearAdd", "FusedConv", "Conv", "Add", "Transpose", "QuantizeLinear", "DequantizeLinear", "Clip")
BASELINE = "quantize_static U8S8"


def nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def mixed_plan(layers: Sequence, low: int = 2, high: int = 8) -> Plan:
    """Bits low..high cycling over the layers in graph order; the classifier stays float."""
    span = high - low + 1
    return Plan(tuple(
        LayerPlan(layer.name, None, None, keep_float=True) if layer.is_output
        else LayerPlan(layer.name, low + index % span, low + index % span)
        for index, layer in enumerate(layers)
    ), method=f"cycling-{low}..{high}")


def ort_static(source: Path, calibration: np.ndarray, activation: str, workdir: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            name = onnx.load(source).graph.input[0].name
            self.samples = iter([{name: calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.samples, None)

    target = workdir / f"static_{activation}.onnx"
    quantize_static(
        source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
    )
    return onnx.load(target)


def session(model: onnx.ModelProto, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def accuracy(run: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    name = run.get_inputs()[0].name
    predictions = np.concatenate([run.run(None, {name: x[i : i + 100]})[0].argmax(1) for i in range(0, len(x), 100)])
    return float((predictions == y).mean())


def fusion_counts(model: onnx.ModelProto, workdir: Path, label: str) -> dict[str, int]:
    path = workdir / f"optimized_{label.replace(' ', '_')}.onnx"
    session(model, 1, path)
    counts = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    return {op: counts.get(op, 0) for op in FUSION_OPS}


def median_latencies(
    runs: dict[str, Callable[[], object]], rounds: int, inner: int
) -> dict[str, dict[str, float]]:
    """Median seconds per call, wall clock and this process's CPU time.

    Each round times every model once, starting at a rotating one. With one intra-op
    thread onnxruntime computes on the calling thread, so CPU time is the latency an idle
    machine would show, and it does not count time lost to other processes (this shared
    machine is often loaded); both are reported.
    """
    names = list(runs)
    for run in runs.values():
        run()
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                runs[name]()
            samples[name]["wall"].append((time.perf_counter() - wall) / inner)
            samples[name]["cpu"].append((time.process_time() - cpu) / inner)
    return {
        name: {clock: float(np.median(values)) for clock, values in clocks.items()}
        for name, clocks in samples.items()
    }


def markdown(
    command: str,
    threads: int,
    rounds: int,
    accuracies: dict[str, float],
    fusion: dict[str, dict[str, int]],
    latencies: dict[int, dict[str, dict[str, float]]],
) -> str:
    names = list(accuracies)
    lines = [
        HEADING,
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}, load average {os.getloadavg()[0]:.1f} at the end of the run; "
        f"{threads} intra-op thread(s); "
        f"onnxruntime {ort.__version__}, Python {platform.python_version()}",
        f"- command: `{command}`",
        f"- method: all models in one process, interleaved; median of {rounds} rounds "
        "(batch 1: 20 calls per round, batch 32: 2); CPU = this process's CPU time per call "
        "(what an idle machine shows with one thread), wall = wall clock",
        "- calibration: the same 256 images (cifar10_test_jpeg_q75.npz, index 932..1187) for every quantizer;"
        " accuracy on the exact 932 test images",
        "- quanos mixed 2..8: bits 2, 3, ..., 8, 2, ... over the layers in graph order, classifier float",
        "- quantize_static: QDQ format, per-channel int8 weights; U8S8 = uint8 activations "
        "(onnxruntime's x86 recommendation), S8S8 = its default int8 activations",
        "",
    ]
    for batch in (1, 32):
        times = latencies[batch]
        lines += [
            f"Batch {batch}:",
            "",
            f"| model | accuracy | CPU ms | vs float | vs {BASELINE} | wall ms | wall vs {BASELINE} |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in names:
            lines.append(
                f"| {name} | {accuracies[name]:.2%} | {times[name]['cpu'] * 1e3:.3f} "
                f"| {times[name]['cpu'] / times['float']['cpu']:.2f}x "
                f"| {times[name]['cpu'] / times[BASELINE]['cpu']:.2f}x "
                f"| {times[name]['wall'] * 1e3:.3f} "
                f"| {times[name]['wall'] / times[BASELINE]['wall']:.2f}x |"
            )
        lines.append("")
    ratios = {
        (batch, clock): latencies[batch]["quanos mixed 2..8"][clock] / latencies[batch][BASELINE][clock]
        for batch in (1, 32)
        for clock in ("cpu", "wall")
    }
    verdict = "met" if max(ratios.values()) <= 1.1 else "not met"
    lines += [
        f"Target (mixed plan within 1.1x of {BASELINE}): **{verdict}** ("
        + ", ".join(f"batch {b} {c}: {r:.2f}x" for (b, c), r in ratios.items())
        + ").",
        "",
        "Nodes in onnxruntime's optimized graph (SessionOptions.optimized_model_filepath):",
        "",
        "| model | " + " | ".join(FUSION_OPS) + " |",
        "|---|" + "---|" * len(FUSION_OPS),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(str(fusion[name][op]) for op in FUSION_OPS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    command = "python bench/qdq_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])

    test = np.load(args.shared / TEST)
    x_test, y_test = nchw(test["x"]), test["y"].astype(np.int64)
    calibration = nchw(np.load(args.shared / CALIBRATION)["x"][CALIBRATION_START : CALIBRATION_START + CALIBRATION_COUNT])
    batches = [calibration[i : i + 64] for i in range(0, len(calibration), 64)]

    source = args.shared / MODEL
    normalized = load_model(source)
    layers = list_layers(normalized)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        models = {
            "float": onnx.load(source),
            "quanos uniform 8": quantize(normalized, Plan.uniform(layers, 8), batches).model,
            "quanos mixed 2..8": quantize(normalized, mixed_plan(layers), batches).model,
            BASELINE: ort_static(source, calibration, "QUInt8", workdir),
            "quantize_static S8S8": ort_static(source, calibration, "QInt8", workdir),
        }
        fusion = {name: fusion_counts(model, workdir, name) for name, model in models.items()}
    sessions = {name: session(model, args.threads) for name, model in models.items()}
    accuracies = {name: accuracy(run, x_test, y_test) for name, run in sessions.items()}
    latencies = {}
    for batch, inner in ((1, 20), (32, 2)):
        feed = x_test[:batch]
        runs = {
            name: (lambda run=run, inputs={run.get_inputs()[0].name: feed}: run.run(None, inputs))
            for name, run in sessions.items()
        }
        latencies[batch] = median_latencies(runs, args.rounds, inner)
    section = markdown(command.strip(), args.threads, args.rounds, accuracies, fusion, latencies)
    write_section(args.output, HEADING, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
