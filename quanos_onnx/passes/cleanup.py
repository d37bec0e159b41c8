"""Numerically neutral rewrites that give every layer the shape onnxruntime fuses.

A Conv followed by a separate bias Add (CNTK, some TF converters) or by an unfolded
BatchNormalization cannot become QLinearConv, and its weight would be quantized before
the normalization scales it. Folding them into the Conv's weight and bias first fixes both
without changing what the model computes (up to float rounding).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .initializers import unique_initializer


def _sole_user(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _take_over_output(graph: ir.Graph, layer: ir.Node, absorbed: ir.Node) -> None:
    """The layer's output takes the absorbed node's output name and users."""
    layer_output, absorbed_output = layer.outputs[0], absorbed.outputs[0]
    name = absorbed_output.name
    absorbed_output.replace_all_uses_with(layer_output, replace_graph_outputs=True)
    graph.remove(absorbed, safe=True)
    layer_output.name = name


def _channel_vector(array: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
    """The per-channel vector an Add constant broadcasts along `axis`, if that is all it does."""
    if array.size != channels or array.ndim > rank:
        return None
    padded = (1,) * (rank - array.ndim) + array.shape
    if padded[axis] != channels and channels != 1:
        return None
    return array.reshape(channels)


class FuseBiasAddPass(ir.passes.InPlacePass):
    """Conv/Gemm without bias followed by Add(per-channel constant) -> bias input."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                continue
            weight = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
            user = _sole_user(node.outputs[0])
            if weight is None or user is None or user.op_type != "Add":
                continue
            other = user.inputs[1] if user.inputs[0] is node.outputs[0] else user.inputs[0]
            constant = _constant(other)
            if constant is None:
                continue
            channels, rank, axis = self._channels(node, weight)
            vector = _channel_vector(constant, channels, rank, axis)
            if vector is None:
                continue
            bias = unique_initializer(graph, f"{node.name}.bias", vector.astype(weight.dtype))
            node.resize_inputs(3)
            node.replace_input_with(2, bias)
            _take_over_output(graph, node, user)
            modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _channels(node: ir.Node, weight: np.ndarray) -> tuple[int, int, int]:
        if node.op_type == "Conv":
            return weight.shape[0], weight.ndim, 1
        trans_b = node.attributes.get("transB")
        transposed = bool(trans_b.as_int()) if trans_b is not None else False
        return (weight.shape[0] if transposed else weight.shape[1]), 2, 1


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Conv followed by inference BatchNormalization -> Conv with scaled weight and bias."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            weight = _constant(node.inputs[1])
            user = _sole_user(node.outputs[0])
            if weight is None or user is None or user.op_type != "BatchNormalization":
                continue
            if len(user.outputs) != 1 or user.inputs[0] is not node.outputs[0]:
                continue
            stats = [_constant(v) for v in user.inputs[1:5]]
            if any(s is None for s in stats):
                continue
            scale, shift, mean, variance = (s.astype(np.float64) for s in stats)
            epsilon_attr = user.attributes.get("epsilon")
            epsilon = epsilon_attr.as_float() if epsilon_attr is not None else 1e-5
            factor = scale / np.sqrt(variance + epsilon)
            old_bias = _constant(node.inputs[2]) if len(node.inputs) > 2 else None
            bias = (old_bias.astype(np.float64) if old_bias is not None else 0.0) - mean
            new_weight = weight.astype(np.float64) * factor.reshape(-1, *([1] * (weight.ndim - 1)))
            new_bias = bias * factor + shift
            node.replace_input_with(1, unique_initializer(graph, f"{node.name}.weight_bn", new_weight.astype(weight.dtype)))
            node.resize_inputs(3)
            node.replace_input_with(2, unique_initializer(graph, f"{node.name}.bias_bn", new_bias.astype(weight.dtype)))
            _take_over_output(graph, node, user)
            modified = True
        return ir.passes.PassResult(model, modified)
