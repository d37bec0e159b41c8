"""Post-training quantization methods x bits: clean top-1 and wall time (docs/benchmarks.md).

ResNet-20 (CIFAR-10): calibration on 512 JPEG-q75 test images from index 932, test on the
exact first 932 test images. EfficientNet-Lite0 / MobileNetV2 (ImageNet): val1300 images in
file order, the first 256 calibrate, the other 1044 test (224x224 bilinear, RGB in [0, 1]).
Plans are uniform (Plan.uniform: the classifier stays float); W/A configurations set the
weight and activation bits apart. onnxruntime.quantization.quantize_static runs beside at
the bit widths it has (8 bits; 4 bits through TensorQuantOverrides), with its own
calibration methods. Each row is appended to a JSON-lines file as soon as it is measured,
and rows already there are skipped, so an interrupted run resumes:

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/ptq.py --model resnet20 --out /tmp/ptq.jsonl
    PYTHONPATH=. python bench/ptq.py --model resnet20 --out /tmp/ptq.jsonl --table
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner, load_model, save_model
from quanos_onnx.passes.points import output_readers
from quanos_onnx.plan import FirstOutputBits, LayerPlan, Plan
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.quantize import quantize

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W5A5": (5, 5), "W4A8": (4, 8), "W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4)}
ORT_CONFIGS = ("W8A8", "W4A8", "W4A4")
"""onnxruntime.quantization has 4, 8 and 16 bits only."""

METHODS: dict[str, dict[str, Any]] = {
    "nearest, minmax (before)": {"act_range": "minmax", "weight_clipping": "absmax", "bias_correction": False},
    "percentile 99.99": {"act_range": "percentile", "weight_clipping": "absmax", "bias_correction": False},
    "entropy": {"act_range": "entropy", "weight_clipping": "absmax", "bias_correction": False},
    "mse": {"act_range": "mse", "weight_clipping": "absmax", "bias_correction": False},
    "mse + weight-mse clip": {"act_range": "mse", "weight_clipping": "mse", "bias_correction": False},
    "mse + output clip": {"act_range": "mse", "weight_clipping": "output", "bias_correction": False},
    "mse + output clip + bias corr.": {"act_range": "mse", "weight_clipping": "output", "bias_correction": True},
    "auto + output clip + bias corr.": {"act_range": "auto", "weight_clipping": "output", "bias_correction": True},
    "entropy + output clip": {"act_range": "entropy", "weight_clipping": "output", "bias_correction": False},
    "minmax + output clip + bias corr.": {"act_range": "minmax", "weight_clipping": "output", "bias_correction": True},
    "entropy + output clip + bias corr.": {"act_range": "entropy", "weight_clipping": "output", "bias_correction": True},
    "auto + output clip + brecq + bias corr.": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
    },
    "auto + output clip + adaround + bias corr.": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True, "rounding": "adaround",
    },
    "auto + output clip + gptq + bias corr.": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True, "rounding": "gptq",
    },
    "auto + output clip + gptq + bias corr., first/last W8A8": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True, "rounding": "gptq",
        "first_layer_bits": 8, "last_layer_bits": 8,
    },
    "mse + output clip + bias corr. + equalize": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "equalize": True,
    },
    "auto + output clip + bias corr. + equalize": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True, "equalize": True,
    },
    "auto + output clip + bias corr., first conv W8A8": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True, "first_layer_bits": 8,
    },
    "auto + output clip + bias corr., first/last W8A8": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8,
    },
    "mse + output clip + bias corr., first/last W8A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8,
    },
    "percentile 99.99 + output clip + bias corr., first/last W8A8": {
        "act_range": "percentile", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8,
    },
    "minmax + output clip + bias corr., first/last W8A8": {
        "act_range": "minmax", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8,
    },
    "mse + output clip + gptq + bias corr., first/last W8A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "gptq",
        "first_layer_bits": 8, "last_layer_bits": 8,
    },
    "mse + output clip + brecq 100 it. + bias corr., first/last W8A8, 64 calib.": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 100, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
    },
    "mse + output clip + brecq 200 it. + bias corr., first/last W8A8, 64 calib.": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 200, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
    },
    "probe + output clip + brecq 200 it. + bias corr., first/last W8A8, 64 calib.": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 200, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
    },
    "probe + output clip + brecq 200 it. seed 1 + bias corr., first/last W8A8, 64 calib.": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 200, "seed": 1, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
    },
    "probe + output clip + brecq 300 it. + bias corr., first/last W8A8, 64 calib.": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 300, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
    },
    "mse + output clip + brecq 100 it. + bias corr., first/last W8A8, 256 calib.": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 100, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 256,
    },
    "mse + output clip + brecq 300 it. + bias corr., first/last W8A8, 256 calib.": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 300, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 256,
    },
    "mse + output clip + bias corr., first/last W8A8, joins A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8, "join_operand_bits": 8,
    },
    "probe + output clip + bias corr., first/last W8A8, joins A8": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8, "join_operand_bits": 8,
    },
    "probe + output clip + bias corr., first/last W8A8": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8,
    },
    "mse + output clip + gptq + bias corr., first/last W8A8, joins A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "gptq",
        "first_layer_bits": 8, "last_layer_bits": 8, "join_operand_bits": 8,
    },
    "mse + output clip + brecq 100 it. + bias corr., first/last W8A8, 64 calib., joins A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 100, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
        "join_operand_bits": 8,
    },
    "mse + output clip + brecq 100 it. + bias corr., first/last W8A8, 256 calib., joins A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 100, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 256,
        "join_operand_bits": 8,
    },
    "probe + output clip + brecq 200 it. + bias corr., first/last W8A8, 64 calib., joins A8": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 200, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
        "join_operand_bits": 8,
    },
    "mse + output clip + bias corr., first/last W8A8, first output A8, joins A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8, "first_output_bits": 8, "join_operand_bits": 8,
    },
    "mse + output clip + gptq + bias corr., first/last W8A8, first output A8, joins A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "gptq",
        "first_layer_bits": 8, "last_layer_bits": 8, "first_output_bits": 8, "join_operand_bits": 8,
    },
    "mse + output clip + brecq 100 it. + bias corr., first/last W8A8, 64 calib., first output A8, joins A8": {
        "act_range": "mse", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 100, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
        "first_output_bits": 8, "join_operand_bits": 8,
    },
    "probe + output clip + bias corr., first/last W8A8, first output A8": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8, "first_output_bits": 8,
    },
    "probe + output clip + bias corr., first/last W8A8, first output A8, joins A8": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8, "first_output_bits": 8, "join_operand_bits": 8,
    },
    "probe + output clip + brecq 200 it. + bias corr., first/last W8A8, 64 calib., first output A8, joins A8": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 200, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
        "first_output_bits": 8, "join_operand_bits": 8,
    },
    "probe + output clip + brecq 300 it. + bias corr., first/last W8A8, 64 calib., first output A8": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 300, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
        "first_output_bits": 8,
    },
    "probe + output clip + brecq 300 it. seed 1 + bias corr., first/last W8A8, 64 calib., first output A8": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 300, "seed": 1, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
        "first_output_bits": 8,
    },
    "probe + output clip + brecq 300 it. seed 1 + bias corr., first/last W8A8, 64 calib.": {
        "act_range": "probe", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 300, "seed": 1, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
    },
    "auto + output clip + bias corr., first/last W8A8, 64 calib.": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True,
        "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
    },
    "auto + output clip + brecq 100 it. + bias corr., first/last W8A8, 64 calib.": {
        "act_range": "auto", "weight_clipping": "output", "bias_correction": True, "rounding": "brecq",
        "rounding_iterations": 100, "first_layer_bits": 8, "last_layer_bits": 8, "calibration_images": 64,
    },
}
"""Each row names its settings in full, so a later change of PtqSettings' defaults does not
change what a row measured. `auto` is entropy up to 6 activation bits, min/max above;
`probe` is min/max above 6 bits and, at 6 and fewer, entropy or mse as its probe on the
calibration images chooses (docs/quantization.md).
Bench-only keys: first_layer_bits / last_layer_bits put the first quantized layer / the
classifier at WkAk (the papers' 8-bit first and last layers); calibration_images uses the
first that many calibration images only (the test images stay the same)."""
ONLY_AT = {
    "percentile 99.99": ("W8A8", "W4A4", "W3A3"),
    "entropy": ("W8A8", "W4A4", "W3A3"),
    "mse + weight-mse clip": ("W8A8", "W4A4", "W3A3"),
    "mse + output clip": ("W8A8", "W4A4", "W3A3"),
    "auto + output clip + bias corr., first conv W8A8": ("W6A6", "W4A4", "W3A3", "W2A4"),
    "minmax + output clip + bias corr.": ("W6A6", "W5A5"),
    "entropy + output clip": ("W6A6", "W5A5", "W4A4", "W3A3", "W2A4"),
    "mse + output clip + bias corr. + equalize": ("W4A4", "W3A3"),
    "entropy + output clip + bias corr.": ("W6A6", "W5A5", "W4A4", "W3A3", "W2A4"),
    "auto + output clip + brecq + bias corr.": ("W4A4", "W2A4", "W3A3"),
    "auto + output clip + adaround + bias corr.": ("W4A4",),
    "auto + output clip + bias corr., first/last W8A8": ("W4A8", "W4A4"),
    "auto + output clip + gptq + bias corr., first/last W8A8": ("W4A8", "W4A4", "W3A3", "W2A4"),
    "mse + output clip + bias corr., first/last W8A8": ("W4A4",),
    "percentile 99.99 + output clip + bias corr., first/last W8A8": ("W4A4",),
    "minmax + output clip + bias corr., first/last W8A8": ("W4A4",),
    "mse + output clip + gptq + bias corr., first/last W8A8": ("W4A4",),
    "mse + output clip + brecq 100 it. + bias corr., first/last W8A8, 64 calib.": ("W4A4",),
    "mse + output clip + brecq 200 it. + bias corr., first/last W8A8, 64 calib.": ("W4A4",),
    "probe + output clip + brecq 200 it. + bias corr., first/last W8A8, 64 calib.": ("W4A4",),
    "probe + output clip + brecq 200 it. seed 1 + bias corr., first/last W8A8, 64 calib.": ("W4A4",),
    "probe + output clip + brecq 300 it. + bias corr., first/last W8A8, 64 calib.": ("W4A4",),
    "mse + output clip + brecq 100 it. + bias corr., first/last W8A8, 256 calib.": ("W4A4",),
    "mse + output clip + brecq 300 it. + bias corr., first/last W8A8, 256 calib.": ("W4A4",),
    "auto + output clip + bias corr., first/last W8A8, 64 calib.": ("W4A8", "W4A4"),
    "auto + output clip + brecq 100 it. + bias corr., first/last W8A8, 64 calib.": ("W4A8", "W4A4"),
}
"""Diagnostic rows run at a few configurations only (the 2-core machine is shared)."""
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
ORT_ONLY_AT = {"MinMax": ORT_CONFIGS, "Entropy": ("W8A8",), "Percentile": ("W8A8",)}


@dataclass(frozen=True)
class Setup:
    model: onnx.ModelProto
    calibration: list[np.ndarray]
    test_x: np.ndarray
    test_y: np.ndarray
    label_offset: int = 0
    input_name: str = "input"
    extra: dict[str, Any] = field(default_factory=dict)


def cifar(shared: Path, calibration: int) -> Setup:
    test = np.load(shared / "data/cifar10/cifar10_test_first932.npz")
    jpeg = np.load(shared / "data/cifar10/cifar10_test_jpeg_q75.npz")
    calib = jpeg["x"][932 : 932 + calibration].transpose(0, 3, 1, 2).astype(np.float32) / 255
    return Setup(
        load_model(shared / "models/cifar10/resnet20_cifar10_akamaster.onnx"),
        [calib[i : i + 128] for i in range(0, len(calib), 128)],
        np.ascontiguousarray(test["x"].transpose(0, 3, 1, 2).astype(np.float32) / 255),
        test["y"],
    )


def imagenet(shared: Path, name: str, calibration: int, cache: Path) -> Setup:
    arrays = cache / "val1300_224.npz"
    if not arrays.exists():
        from PIL import Image

        folder = shared / "data/imagenet/val1300"
        with open(folder / "labels.csv") as handle:
            rows = [row for row in csv.reader(handle) if row and row[0] != "file"]
        images = np.stack(
            [
                np.asarray(Image.open(folder / "images" / file).convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.uint8)
                for file, _ in rows
            ]
        )
        cache.mkdir(parents=True, exist_ok=True)
        # Written under another name and renamed: a second run beside this one must never read half a file.
        partial = arrays.with_name(f"{arrays.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, x=images, y=np.array([int(label) for _, label in rows]))
        os.replace(partial, arrays)
    data = np.load(arrays)
    x = data["x"].transpose(0, 3, 1, 2)
    file = {"efficientnet": "efficientnet_lite0.onnx", "mobilenetv2": "tf2_mobilenet_v2_1.0_224_ptq_deq.onnx"}[name]
    calib = x[:calibration].astype(np.float32) / 255
    return Setup(
        load_model(shared / "models/imagenet" / file),
        [calib[i : i + 32] for i in range(0, len(calib), 32)],
        x[calibration:],
        data["y"][calibration:],
        label_offset=1 if name == "mobilenetv2" else 0,
    )


EXACT_KERNELS = (("session.x64quantprecision", "1"),)
"""onnxruntime's exact u8 x s8 kernels on x86 CPUs without VNNI (docs/quantization.md)."""


def top1(setup: Setup, model: onnx.ModelProto, config: tuple[tuple[str, str], ...] = ()) -> float:
    runner = Runner(model, config=config)
    correct = 0
    for start in range(0, len(setup.test_x), 128):
        x = setup.test_x[start : start + 128]
        x = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x
        logits = runner.run(x)[0]
        correct += int(np.sum(logits.argmax(1) - setup.label_offset == setup.test_y[start : start + 128]))
    return correct / len(setup.test_x)


def uniform_plan(
    model: onnx.ModelProto, weight_bits: int, act_bits: int, first_layer_bits: int | None, last_layer_bits: int | None = None
) -> Plan:
    layers = list_layers(model)
    plan = Plan.uniform(layers, weight_bits)
    entries = [LayerPlan(e.name, weight_bits, act_bits) if e.quantized else e for e in plan.layers]
    if first_layer_bits is not None:
        entries[0] = LayerPlan(entries[0].name, first_layer_bits, first_layer_bits)
    if last_layer_bits is not None:
        output = next(i for i, layer in enumerate(layers) if layer.is_output)
        entries[output] = LayerPlan(entries[output].name, last_layer_bits, last_layer_bits)
    return plan.with_layers(entries)


def first_output_at(model: onnx.ModelProto, plan: Plan, bits: int) -> Plan:
    """The first layer's output at `bits` as `--first-last-bits` writes it (plan.FirstOutputBits):
    BRECQ's `set_first_last_layer_to_8bit` puts the first layer's *output* quantizer at 8 bits."""
    layers = list_layers(model)
    return FirstOutputBits(output_readers(model, layers, layers[0].name), bits).apply(plan)


def ours(setup: Setup, method: str, config: str) -> tuple[onnx.ModelProto, float]:
    options = dict(METHODS[method])
    first, last = options.pop("first_layer_bits", None), options.pop("last_layer_bits", None)
    first_output = options.pop("first_output_bits", None)
    images = options.pop("calibration_images", None)
    calibration = setup.calibration if images is None else _first_images(setup.calibration, images)
    plan = uniform_plan(setup.model, *CONFIGS[config], first, last)
    if first_output is not None:
        plan = first_output_at(setup.model, plan, first_output)
    start = time.perf_counter()
    quantized = quantize(setup.model, plan, calibration, ptq=PtqSettings(**options)).model
    return quantized, time.perf_counter() - start


def _first_images(batches: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The first `count` images of the calibration batches, in batches of the same size."""
    images = np.concatenate(batches)[:count]
    size = len(batches[0])
    return [images[i : i + size] for i in range(0, len(images), size)]


def ort(setup: Setup, method: str, config: str) -> tuple[onnx.ModelProto, float]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantType, quantize_static

    from quanos_onnx.export import ort_quantize_options, to_ort_overrides

    weight_bits, act_bits = CONFIGS[config]
    plan = uniform_plan(setup.model, weight_bits, act_bits, None)
    document, _ = to_ort_overrides(
        quantize(setup.model, plan, setup.calibration[:1], ptq=PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=False)).model
    )
    batches = setup.calibration
    input_name = setup.model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({input_name: batch} for batch in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    options = ort_quantize_options(document)
    options.update(
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod[method],
    )
    with tempfile.TemporaryDirectory() as directory:
        source = save_model(setup.model, Path(directory) / "float.onnx")
        target = Path(directory) / "ort.onnx"
        start = time.perf_counter()
        quantize_static(str(source), str(target), Reader(), **options)
        seconds = time.perf_counter() - start
        return onnx.load(str(target)), seconds


def done(out: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    if not out.exists():
        return {}
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {(r["model"], r["method"], r["config"]): r for r in rows}


def table(out: Path, model: str) -> str:
    rows = [r for r in done(out).values() if r["model"] == model]
    floats = [r for r in rows if r["method"] == "float"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "float"))
    lines = [
        f"float: {floats[0]['top1']:.1%}" if floats else "",
        "",
        "| method | " + " | ".join(CONFIGS) + " |",
        "|---|" + "---:|" * len(CONFIGS),
    ]
    by_key = {(r["method"], r["config"]): r for r in rows}
    for method in methods:
        cells = [
            f"{by_key[(method, c)]['top1']:.1%} ({by_key[(method, c)]['seconds']:.0f} s)" if (method, c) in by_key else "—"
            for c in CONFIGS
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "efficientnet", "mobilenetv2"), default="resnet20")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "quanos_ptq_bench")
    parser.add_argument("--methods", default=";".join([*METHODS, *(f"ort {m}" for m in ORT_METHODS)]), help="';'-separated")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--calibration", type=int, default=None, help="calibration images (512 CIFAR, 256 ImageNet)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    parser.add_argument(
        "--exact-kernels", action="store_true",
        help="score with session.x64quantprecision=1; rows are recorded as 'METHOD [exact kernels]'",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("quanos_onnx.ptq.reconstruct").setLevel(logging.INFO)
    for quiet in ("quanos_onnx.twin", "onnx_ir", "quanos_onnx.passes"):
        logging.getLogger(quiet).setLevel(logging.WARNING)
    if args.table:
        print(table(args.out, args.model))
        return
    if args.model == "resnet20":
        setup = cifar(args.shared, args.calibration or 512)
    else:
        setup = imagenet(args.shared, args.model, args.calibration or 256, args.cache)
    measured = done(args.out)

    session_config = EXACT_KERNELS if args.exact_kernels else ()

    def record(method: str, config: str, run: Callable[[], tuple[onnx.ModelProto, float]]) -> None:
        method = f"{method} [exact kernels]" if args.exact_kernels else method
        if (args.model, method, config) in measured:
            return
        cpu = time.process_time()
        model, seconds = run()
        cpu = time.process_time() - cpu
        row = {
            "model": args.model, "method": method, "config": config, "top1": top1(setup, model, session_config),
            "seconds": seconds, "cpu_seconds": cpu,
        }
        with open(args.out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    record("float", "-", lambda: (setup.model, 0.0))
    for method in args.methods.split(";"):
        for config in args.configs.split(","):
            if method.startswith("ort "):
                if config in ORT_ONLY_AT[method.removeprefix("ort ")]:
                    record(method, config, lambda m=method, c=config: ort(setup, m.removeprefix("ort "), c))
            elif config in ONLY_AT.get(method, CONFIGS):
                record(method, config, lambda m=method, c=config: ours(setup, m, c))


if __name__ == "__main__":
    main()
