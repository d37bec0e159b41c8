"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019) of the float model.

For Conv1 -> act -> Conv2, where act commutes with a positive per-channel scale (none,
Relu, LeakyRelu, PRelu, Clip with min 0 and no max), output channel i of Conv1 may be
divided by s_i and input channel i of Conv2 multiplied by it without changing the function.
With s_i = sqrt(r1_i / r2_i) (r: the channel's largest |weight| in each conv) both get the
range sqrt(r1_i r2_i), which evens out the channels of depthwise convs whose ranges differ
by orders of magnitude, the case where quantization of MobileNet-like models breaks down.
Sweeps repeat until the scales settle, so chains of three or more convs balance too.

Bounded activations (ReLU6 as Clip(0, 6)) do not commute with a per-channel scale: the
bound would have to become 6 / s_i per channel, which Clip cannot express and which would
break onnxruntime's Conv + Clip fusion, so those pairs are left as they are (AIMET replaces
ReLU6 by ReLU first, which changes the float model; this pass never does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

log = logging.getLogger(__name__)

SCALING_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip"})
MAX_SWEEPS = 20
SETTLED = 1e-3
"""A sweep whose scales all lie within 1 +- SETTLED ends the iteration."""


@dataclass(frozen=True)
class _Pair:
    first: ir.Node
    second: ir.Node


class CrossLayerEqualizationPass(ir.passes.InPlacePass):
    """Rescale the weights of every equalizable Conv -> act -> Conv pair in place."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pairs = _pairs(model.graph)
        for _ in range(MAX_SWEEPS):
            largest = max((_equalize(pair) for pair in pairs), default=0.0)
            if largest <= SETTLED:
                break
        log.info("equalized %d conv pairs", len(pairs))
        return ir.passes.PassResult(model, bool(pairs))


def equalize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the float model with its conv pairs equalized (same function)."""
    model = ir.serde.deserialize_model(proto)
    CrossLayerEqualizationPass()(model)
    return ir.serde.serialize_model(model)


def _pairs(graph: ir.Graph) -> list[_Pair]:
    found = []
    for node in graph:
        if not _plain_conv(node):
            continue
        value = node.outputs[0]
        consumer = _only_consumer(value)
        if consumer is not None and consumer.op_type in SCALING_OPS and _commutes(consumer):
            value = consumer.outputs[0]
            consumer = _only_consumer(value)
        if consumer is not None and _plain_conv(consumer) and consumer.inputs[0] is value:
            found.append(_Pair(node, consumer))
    return found


def _plain_conv(node: ir.Node) -> bool:
    """A standard-domain Conv whose weight (and bias) are constants read by no other node."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    constants = [v for v in node.inputs[1:] if v is not None]
    return all(v.const_value is not None and len(v.uses()) == 1 and not v.is_graph_input() for v in constants)


def _only_consumer(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    return uses[0][0]


def _commutes(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type != "Clip":
        return True
    if "min" in node.attributes or "max" in node.attributes:
        low = node.attributes["min"].as_float() if "min" in node.attributes else None
        return low == 0.0 and "max" not in node.attributes
    low = node.inputs[1] if len(node.inputs) > 1 else None
    high = node.inputs[2] if len(node.inputs) > 2 else None
    if high is not None:
        return False
    return low is not None and low.const_value is not None and float(low.const_value.numpy()) == 0.0


def _equalize(pair: _Pair) -> float:
    """Equalize one pair in place; returns the largest |log s| applied (0 when settled)."""
    first_weight = pair.first.inputs[1].const_value.numpy().astype(np.float64)
    second_weight = pair.second.inputs[1].const_value.numpy().astype(np.float64)
    channels = first_weight.shape[0]
    groups = pair.second.attributes["group"].as_int() if "group" in pair.second.attributes else 1
    per_group = second_weight.shape[1]
    if per_group * groups != channels:
        return 0.0
    outputs_per_group = second_weight.shape[0] // groups
    grouped = second_weight.reshape(groups, outputs_per_group, per_group, -1)
    first_range = np.abs(first_weight.reshape(channels, -1)).max(axis=1)
    second_range = np.abs(grouped).max(axis=(1, 3)).reshape(channels)
    usable = (first_range > 0) & (second_range > 0)
    scale = np.ones(channels)
    scale[usable] = np.sqrt(first_range[usable] / second_range[usable])
    shape = (channels,) + (1,) * (first_weight.ndim - 1)
    _set(pair.first.inputs[1], first_weight / scale.reshape(shape))
    bias = pair.first.inputs[2] if len(pair.first.inputs) > 2 else None
    if bias is not None:
        _set(bias, bias.const_value.numpy().astype(np.float64) / scale)
    scaled = grouped * scale.reshape(groups, 1, per_group, 1)
    _set(pair.second.inputs[1], scaled.reshape(second_weight.shape))
    return float(np.abs(np.log(scale)).max(initial=0.0))


def _set(value: ir.Value, array: np.ndarray) -> None:
    dtype = value.const_value.numpy().dtype
    value.const_value = ir.tensor(array.astype(dtype), name=value.name)
