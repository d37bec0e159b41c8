"""File size and onnxruntime behaviour of the weight storage modes on ResNet-20 (CIFAR-10).

Compiles ../shared/models/cifar10/resnet20_cifar10_akamaster.onnx at a uniform 4-bit plan
and a mixed 2..8-bit plan with each storage mode, checks that all containers give the
same outputs, and prints the Markdown tables that docs/interop.md quotes:

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/storage_sizes.py [--shared ../shared]

Calibration: 200 images of cifar10_test_jpeg_q75.npz with index >= 932; accuracy: the
exact first 932 test images. Latency is one thread, batch 64, median of 5 runs, on
whatever machine runs it (indicative only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from quanos_onnx import quantize as quantize_stage
from quanos_onnx.export import to_qonnx
from quanos_onnx.layers import list_layers
from quanos_onnx.model import load_model, make_session
from quanos_onnx.plan import LayerPlan, Plan

MODEL = "models/cifar10/resnet20_cifar10_akamaster.onnx"
CALIBRATION = "data/cifar10/cifar10_test_jpeg_q75.npz"
TEST = "data/cifar10/cifar10_test_first932.npz"
STORAGES = ("int8", "int4", "int2")
MIXED_STAGE_BITS = {"/m/conv1/": 8, "/m/layer1/": 5, "/m/layer2/": 4, "/m/layer3/": 2}
"""The mixed plan: bits fall with depth, as a QUANOS plan of a deep-sensitive net does."""


def images(path: Path, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    x = data["x"][start:stop].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return np.ascontiguousarray(x), data["y"][start:stop]


def mixed_plan(model: onnx.ModelProto) -> Plan:
    entries = []
    for layer in list_layers(model):
        bits = next((b for prefix, b in MIXED_STAGE_BITS.items() if layer.name.startswith(prefix)), None)
        entries.append(LayerPlan(layer.name, bits, bits) if bits else LayerPlan(layer.name, None, None, keep_float=True))
    return Plan(tuple(entries), method="mixed-2..8")


def serialized_size(model: onnx.ModelProto) -> int:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.onnx"
        onnx.save(model, str(path))
        return path.stat().st_size


def run_profile(model: onnx.ModelProto, x: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Median ms per batch of 64, QLinearConv count after onnxruntime's fusions, outputs."""
    with tempfile.TemporaryDirectory() as directory:
        optimized = str(Path(directory) / "optimized.onnx")
        session = make_session(model, optimized_model_path=optimized, threads=1)
        fused = Counter(n.op_type for n in onnx.load(optimized).graph.node)["QLinearConv"]
    batch = x[:64]
    session.run(None, {"input": batch})
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, {"input": batch})
        times.append(time.perf_counter() - start)
    outputs = np.concatenate([session.run(None, {"input": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
    return 1000 * float(np.median(times)), fused, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    shared = parser.parse_args().shared
    source = shared / MODEL
    model = load_model(source)
    calibration, _ = images(shared / CALIBRATION, 932, 1132)
    test_x, test_y = images(shared / TEST, 0, 932)
    plans = {"uniform 4-bit": Plan.uniform(list_layers(model), 4), "mixed 2..8-bit": mixed_plan(model)}
    float_ms, _, float_out = run_profile(model, test_x)
    float_size = source.stat().st_size
    print(f"float model: {float_size} bytes on disk, top-1 {np.mean(float_out.argmax(1) == test_y):.1%}, {float_ms:.1f} ms\n")
    size_rows = []
    run_rows = []
    for label, plan in plans.items():
        sizes = {}
        reference = None
        for storage in STORAGES:
            quantized = quantize_stage.quantize(model, plan, [calibration[:100], calibration[100:]], storage=storage)
            sizes[storage] = serialized_size(quantized.model)
            ms, fused, outputs = run_profile(quantized.model, test_x)
            reference = outputs if reference is None else reference
            accuracy = np.mean(outputs.argmax(1) == test_y)
            run_rows.append(
                f"| {label} | {storage} | {fused} | {ms:.1f} | {accuracy:.1%} | {np.abs(outputs - reference).max():.1e} |"
            )
        qonnx_size = serialized_size(to_qonnx(quantized.model))
        size_rows.append(
            f"| {label} | {float_size:,} | "
            + " | ".join(f"{sizes[s]:,} ({float_size / sizes[s]:.2f}x)" for s in STORAGES)
            + f" | {qonnx_size:,} |"
        )
    print("| plan | float | int8 container | int4 storage | int2 storage | QONNX export |")
    print("|---|---|---|---|---|---|")
    print("\n".join(size_rows))
    print()
    print("| plan | storage | QLinearConv after fusion | ms / 64 images | top-1 (932) | max abs diff vs int8 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(run_rows))


if __name__ == "__main__":
    main()
