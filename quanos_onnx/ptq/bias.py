"""Bias correction: remove the mean output shift each layer's own quantization causes.

Quantizing a layer's weights (W -> Wq) and its input (x -> xq: rounding, and clipping at
the calibrated range) moves the mean of its output, and at 2-4 bits that shift is a large
part of the error (Nagel et al., "Data-Free Quantization", 2019; the empirical variant of
AIMET). Measured here, in one onnxruntime pass over the calibration data through the QDQ
model itself: for every quantized Conv/ConvTranspose/Gemm with a bias, two probe copies of
the node compute W * x (the float weight on the tensor the quantizer reads) and Wq * xq
(what the layer computes), and the per-channel mean of their difference is added to the
bias. Each layer corrects only the shift its own quantizers add, on the inputs the
quantized model really gives it, so one pass corrects all layers without counting an
upstream shift twice. Where a transparent op (MaxPool, Pad, Slice) sits between the
quantizer and the layer, x is the quantized tensor and only the weight part is corrected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import DataError
from ..layers import Layer
from ..model import ACTIVATION_CHUNK, Runner
from ..passes.qdq import WeightGrid
from ..plan import Plan
from ..progress import ProgressFactory, no_progress

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")
BIAS_SAMPLES = 128
"""Calibration samples the shifts are measured on: a mean over samples x positions settles
long before that, and the pass runs the QDQ model with two probes per layer."""


def bias_shifts(
    quantized: onnx.ModelProto,
    float_weights: Mapping[str, np.ndarray],
    layers: Sequence[Layer],
    plan: Plan,
    calibration: Iterable[np.ndarray],
    *,
    progress: ProgressFactory = no_progress,
    total: int = 0,
) -> dict[str, np.ndarray]:
    """Per layer, E[W x] - E[Wq xq] per output channel, on the first BIAS_SAMPLES samples."""
    nodes = {node.name: node for node in quantized.graph.node}
    entries = plan.by_name()
    probes = [
        layer
        for layer in layers
        if layer.op in CORRECTED_OPS
        and entries.get(layer.name) is not None
        and entries[layer.name].quantized
        and _has_bias(nodes[layer.name])
    ]
    if not probes:
        return {}
    probe_model, outputs = _probe_model(quantized, float_weights, probes, nodes)
    runner = Runner(probe_model, [name for pair in outputs.values() for name in pair])
    sums = {layer.name: np.zeros(0) for layer in probes}
    counts = dict.fromkeys(sums, 0)
    names = [name for pair in outputs.values() for name in pair]
    with progress("bias correction", min(total, BIAS_SAMPLES)) as advance:
        seen = 0
        for batch in calibration:
            if seen >= BIAS_SAMPLES:
                break
            batch = batch[: BIAS_SAMPLES - seen]
            seen += len(batch)
            for start in range(0, len(batch), ACTIVATION_CHUNK):  # every layer's two outputs of a few samples at a time
                values = dict(zip(names, runner.run(batch[start : start + ACTIVATION_CHUNK], names)))
                for layer in probes:
                    float_name, quant_name = outputs[layer.name]
                    difference = values[float_name].astype(np.float64) - values[quant_name]
                    axis = difference.ndim - 1 if layer.op == "Gemm" else 1
                    reduced = np.moveaxis(difference, axis, 0).reshape(difference.shape[axis], -1)
                    sums[layer.name] = reduced.sum(axis=1) + (sums[layer.name] if sums[layer.name].size else 0.0)
                    counts[layer.name] += reduced.shape[1]
                del values
            advance(len(batch))
    if not any(counts.values()):
        raise DataError("calibration data is empty")
    return {name: sums[name] / counts[name] for name in sums}


def corrected_grids(
    grids: Mapping[str, WeightGrid],
    shifts: Mapping[str, np.ndarray],
    float_biases: Mapping[str, np.ndarray],
) -> dict[str, WeightGrid]:
    """The grids with `bias` = float bias + measured shift (layers without a shift unchanged)."""
    corrected = dict(grids)
    for name, shift in shifts.items():
        grid = grids[name]
        corrected[name] = WeightGrid(grid.integers, grid.scale, (float_biases[name] + shift).astype(np.float32))
    return corrected


def _has_bias(node: onnx.NodeProto) -> bool:
    return len(node.input) > 2 and bool(node.input[2])


def _probe_model(
    quantized: onnx.ModelProto,
    float_weights: Mapping[str, np.ndarray],
    probes: Sequence[Layer],
    nodes: Mapping[str, onnx.NodeProto],
) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    producers = {out: node for node in quantized.graph.node for out in node.output}
    outputs: dict[str, tuple[str, str]] = {}
    for layer in probes:
        node = nodes[layer.name]
        quantized_input, quantized_weight = node.input[0], node.input[1]
        float_input = _before_quantizer(quantized_input, producers)
        weight_name = f"{layer.name}/bias_probe_weight"
        model.graph.initializer.append(onnx.numpy_helper.from_array(float_weights[layer.weight], weight_name))
        pair = (f"{layer.name}/bias_probe_float", f"{layer.name}/bias_probe_quantized")
        for output, inputs in zip(pair, ([float_input, weight_name], [quantized_input, quantized_weight])):
            probe = onnx.NodeProto()
            probe.CopyFrom(node)
            probe.name = output
            del probe.input[:]
            probe.input.extend(inputs)
            del probe.output[:]
            probe.output.append(output)
            model.graph.node.append(probe)
        outputs[layer.name] = pair
    return model, outputs


def _before_quantizer(tensor: str, producers: Mapping[str, onnx.NodeProto]) -> str:
    """The float tensor a QDQ chain starts from: through DQ, the integer Clip, Q, the float
    Clip passes/qdq puts before a wide Q, and the DQ of a grid requantized from another."""
    node = producers.get(tensor)
    while node is not None and node.op_type == "DequantizeLinear":
        quantize = producers.get(node.input[0])
        if quantize is not None and quantize.op_type == "Clip":
            quantize = producers.get(quantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            return tensor
        tensor = quantize.input[0]
        node = producers.get(tensor)
        if node is not None and node.op_type == "Clip" and node.name == _clip_name(quantize):
            tensor = node.input[0]
            node = producers.get(tensor)
    return tensor


def _clip_name(quantize: onnx.NodeProto) -> str:
    return quantize.name.removesuffix("/QuantizeLinear") + "/Clip"
