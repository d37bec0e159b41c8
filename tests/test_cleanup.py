"""passes/cleanup.py: BatchNormalization folding and bias-Add fusion change nothing numerically."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.layers import list_layers
from quanos_onnx.model import normalize

from tiny_models import GraphBuilder, random_inputs


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _batchnorm(builder: GraphBuilder, x: str, channels: int, name: str) -> str:
    rng = builder.rng
    stats = [
        builder.constant(f"{name}.scale", rng.uniform(0.5, 2.0, channels).astype(np.float32)),
        builder.constant(f"{name}.shift", rng.normal(0, 0.5, channels).astype(np.float32)),
        builder.constant(f"{name}.mean", rng.normal(0, 0.5, channels).astype(np.float32)),
        builder.constant(f"{name}.var", rng.uniform(0.1, 3.0, channels).astype(np.float32)),
    ]
    return builder.node("BatchNormalization", [x, *stats], name, epsilon=1e-3)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_batchnorm_folding_is_numerically_neutral(conv_bias: bool):
    builder = GraphBuilder(seed=3)
    x = builder.conv("x", 3, 6, bias=conv_bias, name="conv_a")
    x = builder.relu(_batchnorm(builder, x, 6, "bn_a"))
    x = _batchnorm(builder, builder.conv(x, 6, 6, group=3, bias=conv_bias, name="conv_b"), 6, "bn_b")
    original = builder.model(["N", 3, 6, 6], x)
    folded = normalize(original)
    assert "BatchNormalization" not in _ops(folded)
    inputs = random_inputs(original, 8)
    np.testing.assert_allclose(_run(folded, inputs), _run(original, inputs), rtol=1e-5, atol=1e-5)


def _bias_add_model(bias_shape: tuple[int, ...], nameless: bool = False) -> onnx.ModelProto:
    """Two bias-less Convs and a Gemm, each followed by Add(constant), as CNTK writes them."""
    builder = GraphBuilder(seed=4)
    x = "x"
    for index, cin in enumerate((3, 4)):
        x = builder.conv(x, cin, 4, bias=False, name=f"conv{index}")
        bias = builder.constant(f"b{index}", builder.rng.normal(size=bias_shape).astype(np.float32))
        x = builder.relu(builder.node("Add", [x, bias], f"add{index}"))
    flat = builder.node("Flatten", [x])
    weight = builder.weight("fc.w", (4 * 36, 5), 144)
    fc = builder.node("Gemm", [flat, weight], "fc")
    out = builder.node("Add", [fc, builder.constant("fc.b", np.arange(5, dtype=np.float32))], "fc_bias")
    model = builder.model(["N", 3, 6, 6], out)
    if nameless:
        for node in model.graph.node:
            node.name = ""
    return model


@pytest.mark.parametrize("bias_shape", [(4, 1, 1), (1, 4, 1, 1)])
@pytest.mark.parametrize("nameless", [False, True])
def test_bias_add_fusion_is_numerically_neutral(bias_shape: tuple[int, ...], nameless: bool):
    original = _bias_add_model(bias_shape, nameless)
    fused = normalize(original)
    assert "Add" not in _ops(fused)
    assert all(len(node.input) == 3 for node in fused.graph.node if node.op_type in ("Conv", "Gemm"))
    inputs = random_inputs(original, 8)
    np.testing.assert_allclose(_run(fused, inputs), _run(original, inputs), rtol=1e-5, atol=1e-5)
    assert [layer.bias is not None for layer in list_layers(fused)] == [True, True, True]


def test_an_add_that_is_not_per_channel_is_left_alone():
    builder = GraphBuilder(seed=5)
    conv = builder.conv("x", 3, 4, bias=False, name="conv")
    offset = builder.constant("offset", builder.rng.normal(size=(1, 4, 6, 6)).astype(np.float32))
    model = normalize(builder.model(["N", 3, 6, 6], builder.node("Add", [conv, offset], "add")))
    assert _ops(model) == ["Conv", "Add"]


def test_a_conv_output_read_twice_keeps_its_add():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1])
    add = helper.make_node("Add", ["c", "b"], ["y"], name="add")
    other = helper.make_node("Relu", ["c"], ["z"], name="relu")
    graph = helper.make_graph(
        [conv, add, other],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")],
        [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
         numpy_helper.from_array(np.ones((2, 1, 1), np.float32), "b")],
    )
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert sorted(_ops(model)) == ["Add", "Conv", "Relu"]
