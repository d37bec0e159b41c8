"""A tiny residual CNN, compiled with chosen bits, for the export and storage tests.

conv1 -> Relu -> a; a -> conv2 -> Relu -> conv3; Add(conv3, a) -> Relu -> MaxPool ->
Flatten -> fc. It has a signed input, a residual join, a transparent MaxPool and a Gemm,
so every quantizer form of the QDQ pass appears (uint8 with and without Clip, zero point
0 and 128, int16 behind a float Clip). The batch is fixed at 1 because qonnx's executor
needs every shape known.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx import quantize as quantize_stage
from quanos_onnx.layers import list_layers
from quanos_onnx.model import normalize
from quanos_onnx.plan import LayerPlan, Plan

BATCH = 1
LAYERS = ("conv1", "conv2", "conv3", "fc")


def float_model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "a"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu3"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    initializers = [
        weight("w1", 4, 3, 3, 3),
        weight("b1", 4),
        weight("w2", 4, 4, 3, 3),
        weight("b2", 4),
        weight("w3", 4, 4, 3, 3),
        weight("b3", 4),
        weight("wf", 5, 64),
        weight("bf", 5),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 5])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return normalize(model, "residual")


def inputs(count: int, seed: int = 0) -> np.ndarray:
    """Signed inputs in [-1, 1), so the first quantizer is the zero-point-128 form."""
    return np.random.default_rng(seed).uniform(-1, 1, (count, 3, 8, 8)).astype(np.float32)


def plan(bits: Mapping[str, int | None]) -> Plan:
    """A plan from layer -> bits (None keeps the layer float)."""
    return Plan(
        tuple(
            LayerPlan(name, b, b) if b is not None else LayerPlan(name, None, None, keep_float=True)
            for name, b in bits.items()
        )
    )


def compiled(bits: Mapping[str, int | None], storage: str = "int8") -> quantize_stage.Quantized:
    model = float_model()
    assert [layer.name for layer in list_layers(model)] == list(LAYERS)
    calibration = [inputs(8, seed) for seed in range(2)]
    return quantize_stage.quantize(model, plan(bits), calibration, storage=storage)
