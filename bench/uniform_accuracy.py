"""Top-1 of ResNet-20 (CIFAR-10) at uniform 16/8/6/5/4/3 bits, post-hoc (no fine-tuning).

Calibrates on 200 images of cifar10_test_jpeg_q75.npz from index 932 and tests on the
exact first 932 test images. Needs ../shared. Prints a Markdown table.

    python bench/uniform_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quanos_onnx import model as onnx_model  # noqa: E402
from quanos_onnx.layers import list_layers  # noqa: E402
from quanos_onnx.quantize import quantize  # noqa: E402
from quanos_onnx.plan import Plan  # noqa: E402

SHARED = REPO.parent / "shared"


def top1(proto, x: np.ndarray, y: np.ndarray) -> float:
    runner = onnx_model.Runner(proto)
    logits = np.concatenate([runner.run(x[i : i + 256])[0] for i in range(0, len(x), 256)])
    return float((logits.argmax(1) == y).mean())


def main() -> None:
    test = np.load(SHARED / "data/cifar10/cifar10_test_first932.npz")
    x = test["x"].transpose(0, 3, 1, 2).astype(np.float32) / 255
    y = test["y"]
    jpeg = np.load(SHARED / "data/cifar10/cifar10_test_jpeg_q75.npz")
    calibration = jpeg["x"][932:1132].transpose(0, 3, 1, 2).astype(np.float32) / 255
    model = onnx_model.load_model(SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx")
    layers = list_layers(model)
    print("| bits | top-1 (932 exact images) |\n|---|---|")
    print(f"| float | {top1(model, x, y):.1%} |")
    for bits in (16, 8, 6, 5, 4, 3):
        quantized = quantize(model, Plan.uniform(layers, bits), [calibration[:100], calibration[100:]])
        print(f"| {bits} | {top1(quantized.model, x, y):.1%} |")


if __name__ == "__main__":
    main()
