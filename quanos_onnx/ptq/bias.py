"""Bias correction: remove the mean output shift each layer's own quantization causes.

Quantizing a layer's weights (W -> Wq) and its input (x -> xq: rounding, and clipping at
the calibrated range) moves the mean of its output, and at 2-4 bits that shift is a large
part of the error (Nagel et al., "Data-Free Quantization", 2019; the empirical variant of
AIMET). Measured here, in one onnxruntime pass over the calibration data through the QDQ
model itself: for every quantized Conv/ConvTranspose/Gemm with a bias, the per-channel mean
of W * x (the float weight on the tensor the quantizer reads) minus that of Wq * xq (what
the layer computes) is added to the bias. Each layer corrects only the shift its own
quantizers add, on the inputs the quantized model really gives it, so one pass corrects all
layers without counting an upstream shift twice. Where a transparent op (MaxPool, Pad,
Slice) sits between the quantizer and the layer, x is the quantized tensor and only the
weight part is corrected.

Conv and Gemm are linear in their input, so the mean of W * x over samples and output
positions is W applied to the mean of each input patch element: per input channel and
kernel offset, the sum of the inputs that offset reads over all output positions (zero
padding reads nothing). Those sums are a few reductions of x, where computing W * x is a
whole convolution (on EfficientNet-Lite0, mostly 1x1 convolutions, the probes were half of
the time of a quantize). ConvTranspose crops its output at the borders, so there two probe
copies of the node compute W * x and Wq * xq in onnxruntime and their outputs are averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import DataError
from ..layers import Layer, spatial_pads
from ..model import ACTIVATION_CHUNK, Runner
from ..passes.qdq import WeightGrid
from ..plan import Plan
from ..progress import ProgressFactory, no_progress

CORRECTED_OPS = ("Conv", "ConvTranspose", "Gemm")
BIAS_SAMPLES = 128
"""Calibration samples the shifts are measured on: a mean over samples x positions settles
long before that."""


@dataclass(frozen=True)
class _Probe:
    """What one layer's shift is measured from: the tensors to fetch and how to reduce them.

    `linear`: the float and quantized inputs and the quantized (dequantized) weight, reduced
    to patch sums; otherwise the outputs of the two probe nodes, reduced to channel sums."""

    layer: Layer
    node: onnx.NodeProto
    float_input: str
    quantized_input: str
    linear: bool

    @property
    def fetched(self) -> tuple[str, ...]:
        if self.linear:
            return (self.float_input, self.quantized_input)
        return (f"{self.layer.name}/bias_probe_float", f"{self.layer.name}/bias_probe_quantized")


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
    producers = {out: node for node in quantized.graph.node for out in node.output}
    entries = plan.by_name()
    probes = [
        _Probe(
            layer, nodes[layer.name], _before_quantizer(nodes[layer.name].input[0], producers),
            nodes[layer.name].input[0], layer.op != "ConvTranspose",
        )
        for layer in layers
        if layer.op in CORRECTED_OPS
        and entries.get(layer.name) is not None
        and entries[layer.name].quantized
        and _has_bias(nodes[layer.name])
    ]
    if not probes:
        return {}
    model = _with_probe_nodes(quantized, float_weights, [p for p in probes if not p.linear])
    weights = [p.node.input[1] for p in probes if p.linear]
    names = list(dict.fromkeys(name for probe in probes for name in probe.fetched))
    runner = Runner(model, names + weights)
    wanted = names + weights  # the dequantized weights are constants: fetched with the first chunk only
    sums: dict[str, list[np.ndarray]] = {}
    counts = dict.fromkeys((probe.layer.name for probe in probes), 0)
    quantized_weights: dict[str, np.ndarray] = {}
    with progress("bias correction", min(total, BIAS_SAMPLES)) as advance:
        seen = 0
        for batch in calibration:
            if seen >= BIAS_SAMPLES:
                break
            batch = batch[: BIAS_SAMPLES - seen]
            seen += len(batch)
            for start in range(0, len(batch), ACTIVATION_CHUNK):  # every layer's tensors of a few samples at a time
                values = dict(zip(wanted, runner.run(batch[start : start + ACTIVATION_CHUNK], wanted)))
                if wanted != names:
                    quantized_weights, wanted = {name: values[name] for name in weights}, names
                for probe in probes:
                    reduced, count = _reduce(probe, values)
                    previous = sums.get(probe.layer.name)
                    sums[probe.layer.name] = reduced if previous is None else [a + b for a, b in zip(previous, reduced)]
                    counts[probe.layer.name] += count
                del values
            advance(len(batch))
    if not any(counts.values()):
        raise DataError("calibration data is empty")
    return {probe.layer.name: _shift(probe, sums[probe.layer.name], counts[probe.layer.name], float_weights, quantized_weights) for probe in probes}


def _reduce(probe: _Probe, values: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
    """The float and quantized sums this chunk adds, and how many outputs per channel they cover."""
    first, second = (values[name] for name in probe.fetched)
    if not probe.linear:
        axis = 1
        return [_channel_sums(first, axis), _channel_sums(second, axis)], first.size // first.shape[axis]
    if probe.layer.op == "Gemm":
        rows = 1 if _attribute(probe.node, "transA", 0) else 0
        return [first.sum(axis=rows, dtype=np.float64), second.sum(axis=rows, dtype=np.float64)], first.shape[rows]
    selections, outputs = _patch_selections(probe.node, first.shape[2:], probe.layer.kernel)
    return [_patch_sums(first, selections), _patch_sums(second, selections)], len(first) * outputs


def _shift(
    probe: _Probe,
    sums: Sequence[np.ndarray],
    count: int,
    float_weights: Mapping[str, np.ndarray],
    quantized_weights: Mapping[str, np.ndarray],
) -> np.ndarray:
    """E[W x] - E[Wq xq] per output channel from the reduced sums."""
    if not probe.linear:
        return (sums[0] - sums[1]) / count
    weights = (float_weights[probe.layer.weight], quantized_weights[probe.node.input[1]])
    if probe.layer.op == "Gemm":
        alpha = float(_attribute(probe.node, "alpha", 1.0))
        transposed = bool(_attribute(probe.node, "transB", 0))
        means = [alpha * (total @ (weight.T if transposed else weight).astype(np.float64)) for total, weight in zip(sums, weights)]
    else:
        groups = int(_attribute(probe.node, "group", 1))
        means = [_grouped_dot(weight, total, groups) for total, weight in zip(sums, weights)]
    return (means[0] - means[1]) / count


def _channel_sums(values: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).sum(axis=1, dtype=np.float64)


def _patch_selections(node: onnx.NodeProto, sizes: Sequence[int], kernel: Sequence[int]) -> tuple[list[np.ndarray], int]:
    """Per spatial axis, a (kernel offsets x input positions) 0/1 matrix: which input positions
    kernel offset k reads over all output positions (positions in the zero padding read none),
    and the number of output positions."""
    spatial = len(kernel)
    strides = list(_attribute(node, "strides", [1] * spatial))
    dilations = list(_attribute(node, "dilations", [1] * spatial))
    padding = {"auto_pad": _attribute(node, "auto_pad", "NOTSET"), "pads": list(_attribute(node, "pads", [0] * (2 * spatial)))}
    pads = spatial_pads(padding, sizes, kernel, strides, dilations)
    selections, outputs = [], 1
    for size, extent, stride, dilation, (begin, end) in zip(sizes, kernel, strides, dilations, pads):
        count = (size + begin + end - dilation * (extent - 1) - 1) // stride + 1
        positions = np.arange(count)[None, :] * stride + np.arange(extent)[:, None] * dilation - begin
        selection = np.zeros((extent, size))
        for offset in range(extent):
            inside = positions[offset][(positions[offset] >= 0) & (positions[offset] < size)]
            selection[offset, inside] = 1.0
        selections.append(selection)
        outputs *= count
    return selections, outputs


def _patch_sums(values: np.ndarray, selections: Sequence[np.ndarray]) -> np.ndarray:
    """Per input channel and kernel offset, the sum over samples and output positions of the
    input that offset reads: input channels x kernel offsets."""
    summed = values.sum(axis=0, dtype=np.float64)
    for selection in selections:  # each spatial axis in turn becomes its kernel-offset axis
        summed = np.tensordot(summed, selection, axes=([1], [1]))
    return summed


def _grouped_dot(weight: np.ndarray, sums: np.ndarray, groups: int) -> np.ndarray:
    """sum over (input channel, offset) of W[c, i, k] * sums[i of c's group, k], per output channel c."""
    outputs, per_group = weight.shape[0], weight.shape[1]
    shaped_weight = weight.reshape(groups, outputs // groups, per_group, -1).astype(np.float64)
    shaped_sums = sums.reshape(groups, per_group, -1)
    return np.einsum("goik,gik->go", shaped_weight, shaped_sums).reshape(outputs)


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


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


def _with_probe_nodes(
    quantized: onnx.ModelProto, float_weights: Mapping[str, np.ndarray], probes: Sequence[_Probe]
) -> onnx.ModelProto:
    """The QDQ model with, per probed layer, two copies of its node: the float weight on the
    float input, and the layer's own (dequantized) weight on its own input, both without bias."""
    if not probes:
        return quantized
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    for probe in probes:
        weight_name = f"{probe.layer.name}/bias_probe_weight"
        model.graph.initializer.append(onnx.numpy_helper.from_array(float_weights[probe.layer.weight], weight_name))
        pairs = ([probe.float_input, weight_name], [probe.quantized_input, probe.node.input[1]])
        for output, inputs in zip(probe.fetched, pairs):
            copy = onnx.NodeProto()
            copy.CopyFrom(probe.node)
            copy.name = output
            del copy.input[:]
            copy.input.extend(inputs)
            del copy.output[:]
            copy.output.append(output)
            model.graph.node.append(copy)
    return model


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
