"""How much MobileNetV2's W4A4 loses to where its activation grids sit (docs/benchmarks.md,
MobileNetV2, "Activation grids chosen on the logits: tried, not kept").

Writes the papers' W4A4 plan (first conv and classifier W8A8; bench/ptq.py's split: the first
256 val1300 images calibrate, the other 1044 test; mse ranges, output-error weight clipping,
bias correction, round-to-nearest), then searches each 4-bit activation grid's scale on the
logits, as LAPQ (Nahshan et al. 2019) does: grids in graph order, one at a time, each scale
tried at 0.6, 0.75, 0.9, 1.1 and 1.3 times its current value (zero points kept) and kept
where the mean KL(float || quantized) of the logits on the first `--samples` calibration
images falls by more than 1e-4. The scales are fed as graph inputs, so one onnxruntime
session serves every trial (QDQ computed in float; on a CPU with exact u8 x s8 kernels the
same top-1 as the integer kernels). Prints the top-1 on the test images before and after.

    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/activation_scale_search.py [--samples 64] [--sweeps 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import ptq as bench
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.quantize import quantize

FACTORS = (0.6, 0.75, 0.9, 1.1, 1.3)
MIN_GAIN = 1e-4
TRIAL_BATCH = 32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def logits(runner: ort.InferenceSession, images: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
    name = runner.get_inputs()[0].name
    return np.concatenate(
        [runner.run(None, {name: images[i : i + TRIAL_BATCH], **feeds})[0] for i in range(0, len(images), TRIAL_BATCH)]
    )


def scale_groups(model: onnx.ModelProto, bits: int) -> dict[float, list[str]]:
    """The activation quantizers' scale initializers at `bits`, grouped by value: the Q/DQ
    pairs of one quantizer group (a residual join's operands) share their scale."""
    initializers = {t.name: t for t in model.graph.initializer}
    groups: dict[float, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and f"_q{bits}" in node.input[1]:
            value = round(float(numpy_helper.to_array(initializers[node.input[1]])), 7)
            groups.setdefault(value, []).append(node.input[1])
    return groups


def with_scale_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    copy.graph.input.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, []) for name in sorted(names))
    return copy


def with_scales(model: onnx.ModelProto, scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name in scales:
            tensor.CopyFrom(numpy_helper.from_array(scales[tensor.name], tensor.name))
    return copy


def top1(setup: bench.Setup, model: onnx.ModelProto) -> float:
    runner = session(model)
    name = runner.get_inputs()[0].name
    correct = 0
    for start in range(0, len(setup.test_x), 128):
        x = setup.test_x[start : start + 128].astype(np.float32) / 255
        predicted = runner.run(None, {name: x})[0].argmax(1) - setup.label_offset
        correct += int(np.sum(predicted == setup.test_y[start : start + 128]))
    return correct / len(setup.test_x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--sweeps", type=int, default=1)
    args = parser.parse_args()
    setup = bench.imagenet(bench.SHARED, "mobilenetv2", 256, Path("/tmp/quanos_ptq_bench"))
    plan = bench.uniform_plan(setup.model, 4, 4, 8, 8)
    settings = PtqSettings(act_range="mse", weight_clipping="output", bias_correction=True)
    written = quantize(setup.model, plan, setup.calibration, ptq=settings).model
    images = np.concatenate(setup.calibration)[: args.samples]
    target = np.exp(log_softmax(logits(session(setup.model), images, {})))
    groups = scale_groups(written, 4)
    initializers = {t.name: t for t in written.graph.initializer}
    base = {name: numpy_helper.to_array(initializers[name]) for names in groups.values() for name in names}
    runner = session(with_scale_inputs(written, set(base)))
    factor = dict.fromkeys(base, 1.0)

    def divergence() -> float:
        feeds = {name: np.asarray(base[name] * factor[name], dtype=np.float32) for name in base}
        quantized = log_softmax(logits(runner, images, feeds))
        return float((target * (np.log(target + 1e-12) - quantized)).sum(1).mean())

    start = time.perf_counter()
    best = divergence()
    print(f"{len(groups)} 4-bit activation grids; logit KL {best:.4f} on {args.samples} calibration images", flush=True)
    for sweep in range(args.sweeps):
        for names in groups.values():
            current = factor[names[0]]
            chosen = current
            for candidate in FACTORS:
                factor.update(dict.fromkeys(names, current * candidate))
                trial = divergence()
                if trial < best - MIN_GAIN:
                    best, chosen = trial, current * candidate
            factor.update(dict.fromkeys(names, chosen))
        moved = sum(1 for names in groups.values() if factor[names[0]] != 1.0)
        print(f"sweep {sweep + 1}: logit KL {best:.4f}, {moved} grids moved, {time.perf_counter() - start:.0f} s", flush=True)
    searched = with_scales(written, {name: np.asarray(base[name] * factor[name], dtype=np.float32) for name in base})
    print(f"top-1 on {len(setup.test_x)} test images: {top1(setup, written):.1%} as written, {top1(setup, searched):.1%} searched")


if __name__ == "__main__":
    main()
