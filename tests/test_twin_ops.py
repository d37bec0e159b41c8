"""Every registered op against onnxruntime on single-node graphs, in each opset form it has.

The cases aim at the places where ONNX and torch disagree by default: asymmetric and
SAME padding, ceil-mode pooling, pads that don't count, negative Slice steps and clamped
ends, 0 and -1 in Reshape, bidirectional Expand, integer division, attribute-vs-input
forms across opsets, and Attention's masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from quanos_onnx.twin import build_twin

RNG = np.random.default_rng(0)


def floats(*shape: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass(frozen=True)
class Runtime:
    """Feed this (non-float) array as a graph input instead of an initializer."""

    array: np.ndarray


@dataclass
class Case:
    op_type: str
    inputs: list[Any]
    opset: int = 21
    outputs: int = 1
    attrs: dict[str, Any] = field(default_factory=dict)
    label: str = ""


def case(op_type: str, *inputs: Any, opset: int = 21, outputs: int = 1, label: str = "", **attrs: Any) -> Any:
    name = f"{op_type}-{opset}" + (f"-{label}" if label else "")
    return pytest.param(Case(op_type, list(inputs), opset, outputs, attrs, label), id=name)


def single_node_model(spec: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Float arrays (and Runtime ones) become graph inputs, the rest initializers, None omitted."""
    names, graph_inputs, initializers, feeds = [], [], [], {}
    for index, value in enumerate(spec.inputs):
        if value is None:
            names.append("")
            continue
        name = f"in{index}"
        names.append(name)
        runtime = isinstance(value, Runtime) or value.dtype.kind == "f"
        array = value.array if isinstance(value, Runtime) else value
        if runtime:
            elem_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem_type, array.shape))
            feeds[name] = array
        else:
            initializers.append(numpy_helper.from_array(array, name))
    while names and names[-1] == "":
        names.pop()
    outputs = [f"out{i}" for i in range(spec.outputs)]
    node = helper.make_node(spec.op_type, names, outputs, name="node_under_test", **spec.attrs)
    graph = helper.make_graph(
        [node], "single", graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outputs], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    model.ir_version = 8 if spec.opset < 21 else 10
    return model, feeds


FLOAT_BINARY = [case(op, floats(2, 3, 4), floats(3, 1), opset=opset) for op in ("Add", "Sub", "Mul") for opset in (7, 14)]
UNARY = [
    case(op, floats(3, 4, low=low, high=high), opset=opset)
    for op, opset, low, high in [
        ("Neg", 13, -2, 2), ("Abs", 13, -2, 2), ("Reciprocal", 13, 0.5, 2), ("Sqrt", 13, 0.1, 4), ("Exp", 13, -2, 2),
        ("Log", 13, 0.1, 4), ("Floor", 13, -3, 3), ("Ceil", 13, -3, 3), ("Tanh", 13, -3, 3), ("Sigmoid", 13, -5, 5),
        ("Relu", 14, -2, 2), ("Relu", 6, -2, 2), ("Erf", 13, -2, 2), ("Sign", 13, -2, 2), ("Softsign", 1, -3, 3),
        ("Softplus", 1, -3, 3), ("Mish", 18, -3, 3), ("HardSwish", 14, -5, 5), ("Sin", 7, -3, 3), ("Cos", 7, -3, 3),
    ]
]

CASES = [
    *FLOAT_BINARY,
    case("Div", floats(2, 3, 4), floats(3, 1, low=0.5, high=2), opset=14),
    case("Div", Runtime(ints(-7, 7, -8, 9)), Runtime(ints(2, -2, 3, 4)), opset=14, label="int-trunc"),
    case("Pow", floats(2, 3, low=0.5, high=2), np.array(2.0, np.float32), opset=15, label="scalar"),
    case("Pow", floats(2, 3, low=0.5, high=2), floats(3, low=-1, high=2), opset=15, label="tensor"),
    case("Mod", Runtime(ints(-7, 7, -8, 9)), Runtime(ints(3, -3, 3, 4)), opset=13, label="int"),
    case("Mod", floats(6), floats(6, low=0.5, high=1.5), opset=13, fmod=1, label="fmod"),
    *UNARY,
    case("Round", np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.3, -0.7], np.float32), opset=11),
    case("LeakyRelu", floats(3, 4), opset=16, alpha=0.2),
    case("PRelu", floats(2, 3, 4, 4), floats(3, 1, 1), opset=16),
    case("Elu", floats(3, 4), opset=6, alpha=0.7),
    case("Celu", floats(3, 4), opset=12, alpha=1.3),
    case("Selu", floats(3, 4), opset=6),
    case("HardSigmoid", floats(3, 4, low=-5, high=5), opset=6, alpha=1 / 6, beta=0.5),
    case("Gelu", floats(3, 4, low=-4, high=4), opset=20, label="exact"),
    case("Gelu", floats(3, 4, low=-4, high=4), opset=20, approximate="tanh", label="tanh"),
    case("Clip", floats(3, 4), opset=6, min=-0.5, max=0.7, label="attrs"),
    case("Clip", floats(3, 4), np.array(-0.5, np.float32), np.array(0.7, np.float32), opset=13, label="both"),
    case("Clip", floats(3, 4), np.array(-0.5, np.float32), opset=13, label="min-only"),
    case("Clip", floats(3, 4), None, np.array(0.7, np.float32), opset=13, label="max-only"),
    case("Max", floats(2, 3), floats(3), floats(2, 1), opset=13),
    case("Min", floats(2, 3), floats(3), floats(2, 1), opset=13),
    case("Sum", floats(2, 3), floats(3), floats(2, 1), opset=13),
    case("Mean", floats(2, 3), floats(3), floats(2, 1), opset=13),
    case("Equal", Runtime(ints(1, 2, 3)), Runtime(ints(1, 0, 3)), opset=19),
    case("Less", floats(2, 3), floats(3), opset=13),
    case("Greater", floats(2, 3), floats(3), opset=13),
    case("LessOrEqual", floats(2, 3), floats(3), opset=16),
    case("GreaterOrEqual", floats(2, 3), floats(3), opset=16),
    case("And", Runtime(np.array([True, True, False])), Runtime(np.array([True, False, False])), opset=7),
    case("Or", Runtime(np.array([True, True, False])), Runtime(np.array([True, False, False])), opset=7),
    case("Xor", Runtime(np.array([True, True, False])), Runtime(np.array([True, False, False])), opset=7),
    case("Not", Runtime(np.array([True, False])), opset=1),
    case("Where", Runtime(np.array([[True], [False]])), floats(2, 3), floats(3), opset=16),
    # convolution and pooling
    case("Conv", floats(2, 3, 7, 7), floats(4, 3, 3, 3), floats(4), opset=11, pads=[1, 1, 1, 1], label="bias"),
    case("Conv", floats(2, 4, 9, 9), floats(6, 2, 3, 3), opset=22, group=2, dilations=[2, 2], strides=[2, 2], label="grouped"),
    case("Conv", floats(2, 3, 7, 8), floats(4, 3, 4, 4), opset=11, auto_pad="SAME_UPPER", strides=[2, 2], label="same-upper"),
    case("Conv", floats(2, 3, 7, 8), floats(4, 3, 4, 4), opset=11, auto_pad="SAME_LOWER", strides=[2, 2], label="same-lower"),
    case("Conv", floats(2, 3, 6, 6), floats(4, 3, 3, 3), opset=11, pads=[0, 1, 2, 0], label="asymmetric"),
    case("Conv", floats(2, 3, 9), floats(4, 3, 3), floats(4), opset=11, pads=[1, 1], label="1d"),
    case("Conv", floats(2, 4, 6, 6), floats(4, 1, 3, 3), opset=11, group=4, pads=[1, 1, 1, 1], label="depthwise"),
    case("ConvTranspose", floats(2, 3, 5, 5), floats(3, 4, 3, 3), floats(4), opset=11, strides=[2, 2],
         pads=[1, 1, 1, 1], output_padding=[1, 1], label="strided"),
    case("ConvTranspose", floats(2, 4, 5, 5), floats(4, 2, 3, 3), opset=11, group=2, pads=[0, 1, 1, 0], label="asymmetric"),
    case("MaxPool", floats(2, 3, 7, 7), opset=12, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    case("MaxPool", floats(2, 3, 8, 8), opset=12, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, label="ceil"),
    case("MaxPool", floats(2, 3, 7, 7), opset=12, kernel_shape=[2, 2], pads=[0, 0, 1, 1], label="asymmetric"),
    case("MaxPool", floats(2, 3, 9, 9), opset=12, kernel_shape=[2, 2], dilations=[2, 2], label="dilated"),
    case("MaxPool", floats(2, 3, 9), opset=12, kernel_shape=[3], strides=[2], label="1d"),
    case("MaxPool", floats(2, 3, 7, 7), opset=8, kernel_shape=[2, 2], strides=[2, 2], label="opset8"),
    case("AveragePool", floats(2, 3, 7, 7), opset=19, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], label="exclude-pad"),
    case("AveragePool", floats(2, 3, 7, 7), opset=19, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1, label="include-pad"),
    case("AveragePool", floats(2, 3, 7, 7), opset=19, kernel_shape=[2, 2], pads=[1, 0, 0, 1], label="asymmetric"),
    case("AveragePool", floats(2, 3, 7, 7), opset=19, kernel_shape=[2, 2], pads=[1, 0, 0, 1], count_include_pad=1,
         label="asymmetric-include"),
    case("AveragePool", floats(2, 3, 8, 8), opset=19, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, label="ceil"),
    case("AveragePool", floats(2, 3, 8, 8), opset=11, kernel_shape=[8, 8], label="global-like"),
    case("GlobalAveragePool", floats(2, 3, 5, 6), opset=1),
    case("GlobalMaxPool", floats(2, 3, 5, 6), opset=1),
    # normalization
    case("BatchNormalization", floats(2, 3, 4, 4), floats(3), floats(3), floats(3), floats(3, low=0.5, high=2), opset=15, epsilon=1e-3),
    case("BatchNormalization", floats(2, 3, 4, 4), floats(3), floats(3), floats(3), floats(3, low=0.5, high=2), opset=9, label="opset9"),
    case("InstanceNormalization", floats(2, 3, 4, 5), floats(3), floats(3), opset=6),
    case("LayerNormalization", floats(2, 5, 8), floats(8), floats(8), opset=17),
    case("LayerNormalization", floats(2, 3, 4, 5), floats(3, 4, 5), floats(3, 4, 5), opset=17, axis=1, label="axis1"),
    case("LayerNormalization", floats(2, 4, 5), floats(5), opset=17, axis=1, epsilon=1e-3, label="broadcast-scale"),
    # dense
    case("Gemm", floats(3, 4), floats(5, 4), floats(5), opset=13, transB=1),
    case("Gemm", floats(4, 3), floats(4, 5), floats(3, 5), opset=13, transA=1, alpha=0.5, beta=2.0, label="scaled"),
    case("Gemm", floats(3, 4), floats(4, 5), np.array(0.3, np.float32), opset=13, label="scalar-c"),
    case("Gemm", floats(3, 4), floats(4, 5), opset=13, label="no-c"),
    case("Gemm", floats(3, 4), floats(5, 4), floats(1, 5), opset=9, transB=1, alpha=2.0, label="opset9"),
    case("MatMul", floats(2, 3, 4), floats(4, 5), opset=13),
    case("MatMul", floats(4), floats(2, 4, 5), opset=13, label="vector"),
    case("Einsum", floats(2, 3, 4), floats(2, 4, 5), opset=12, equation="bij,bjk->bik"),
    case("Softmax", floats(2, 3, 4), opset=13, axis=1),
    case("Softmax", floats(2, 3, 4), opset=11, axis=1, label="coerced"),
    case("LogSoftmax", floats(2, 3, 4), opset=13),
    case("LogSoftmax", floats(2, 3, 4), opset=11, label="coerced"),
    case("Dropout", floats(2, 3), opset=13, outputs=2, label="mask"),
    # shapes and data movement
    case("Reshape", floats(2, 3, 4), ints(0, -1), opset=14),
    case("Reshape", floats(2, 3, 4), ints(4, 0, 2), opset=5, label="copy-dim"),
    case("Reshape", floats(2, 3, 4), ints(2, 12), opset=14, allowzero=1, label="allowzero"),
    case("Flatten", floats(2, 3, 4), opset=13, axis=0, label="axis0"),
    case("Flatten", floats(2, 3, 4, 5), opset=13, axis=-2, label="negative"),
    case("Transpose", floats(2, 3, 4), opset=13),
    case("Transpose", floats(2, 3, 4), opset=13, perm=[1, 2, 0], label="perm"),
    case("Concat", floats(2, 3), floats(2, 2), opset=13, axis=-1),
    case("Slice", floats(5, 6), opset=9, starts=[1, -4], ends=[100, -1], axes=[0, 1], label="attrs"),
    case("Slice", floats(5, 6, 7), ints(-1, 1), ints(-2**63, 100), ints(2, 0), ints(-2, 3), opset=13, label="negative-step"),
    case("Slice", floats(5, 6), ints(1), ints(2**63 - 1), opset=13, label="no-axes"),
    case("Slice", floats(5, 6), ints(4), ints(-7), ints(-1), ints(-1), opset=13, label="reverse"),
    case("Split", floats(7, 4), opset=11, outputs=2, split=[3, 4], label="attr"),
    case("Split", floats(7, 4), ints(2, 5), opset=13, outputs=2, label="input"),
    case("Split", floats(7, 4), opset=18, outputs=3, num_outputs=3, label="num-outputs"),
    case("Split", floats(6, 4), opset=13, outputs=3, label="equal"),
    case("Squeeze", floats(3, 1, 4, 1), opset=11, axes=[1], label="attr"),
    case("Squeeze", floats(3, 1, 4, 1), ints(-1), opset=13, label="input"),
    case("Squeeze", floats(3, 1, 4, 1), opset=13, label="all"),
    case("Unsqueeze", floats(3, 4), opset=11, axes=[0, 3], label="attr"),
    case("Unsqueeze", floats(3, 4), ints(-1, 1), opset=13, label="input"),
    case("Gather", floats(5, 4), ints(-1, 0, 2, -5).reshape(2, 2), opset=13),
    case("Gather", floats(3, 5, 2), np.array(-2, np.int64), opset=13, axis=1, label="scalar"),
    case("GatherElements", floats(3, 4), np.array([[0, -1], [2, 1], [3, 0]], np.int64), opset=13, axis=1),
    case("Shape", floats(2, 3, 4, 5), opset=15, start=1, end=-1),
    case("Shape", floats(2, 3), opset=13, label="full"),
    case("Size", floats(2, 3, 4), opset=13),
    case("ConstantOfShape", Runtime(ints(2, 3)), opset=20, value=numpy_helper.from_array(np.array([7], np.int64))),
    case("ConstantOfShape", Runtime(ints(2, 3)), opset=9, label="default"),
    case("Range", Runtime(np.array(1, np.int64)), Runtime(np.array(10, np.int64)), Runtime(np.array(3, np.int64)), opset=11),
    case("Range", np.array(0.5, np.float32), np.array(-2.0, np.float32), np.array(-0.75, np.float32), opset=11, label="float"),
    case("Expand", floats(3, 1), ints(2, 1, 4), opset=13),
    case("Tile", floats(2, 3), ints(2, 2), opset=13),
    case("Cast", floats(2, 3, low=-5, high=5), opset=21, to=onnx.TensorProto.INT32, label="to-int"),
    case("Cast", np.array([0.0, 1.5, -2.0], np.float32), opset=21, to=onnx.TensorProto.BOOL, label="to-bool"),
    case("Cast", Runtime(ints(3, -4)), opset=13, to=onnx.TensorProto.FLOAT, label="to-float"),
    case("CastLike", Runtime(ints(3, -4)), floats(1), opset=15),
    case("Pad", floats(2, 3, 4), ints(0, 1, 2, 0, 0, 1), np.array(0.5, np.float32), opset=13, label="constant"),
    case("Pad", floats(2, 3, 4), ints(1, 2, 0, 1), None, ints(1, -1), opset=18, label="axes"),
    case("Pad", floats(2, 3, 4, 5), ints(0, 0, 1, 2, 0, 0, 2, 1), opset=13, mode="reflect", label="reflect"),
    case("Pad", floats(2, 3, 4, 5), ints(0, 0, 1, 2, 0, 0, 2, 1), opset=13, mode="edge", label="edge"),
    case("Pad", floats(2, 3, 4, 5), ints(0, 0, 1, 2, 0, 0, 2, 1), opset=19, mode="wrap", label="wrap"),
    case("Pad", floats(2, 3, 4), ints(0, -1, 1, 0, 1, -1), opset=13, label="negative"),
    case("Pad", floats(2, 3, 4), opset=2, pads=[0, 1, 0, 0, 1, 2], value=1.5, label="attrs"),
    case("Identity", floats(2, 3), opset=21),
    case("Trilu", floats(4, 5), ints(1), opset=14, label="upper"),
    case("Trilu", floats(4, 5), ints(-1), opset=14, upper=0, label="lower"),
    case("CumSum", floats(3, 4), np.array(1, np.int64), opset=14),
    case("CumSum", floats(3, 4), np.array(0, np.int64), opset=14, exclusive=1, reverse=1, label="exclusive-reverse"),
    # reductions
    case("ReduceMean", floats(2, 3, 4), opset=13, axes=[1, -1], label="attr"),
    case("ReduceMean", floats(2, 3, 4), ints(1), opset=18, keepdims=0, label="input"),
    case("ReduceMean", floats(2, 3, 4), opset=18, label="all"),
    case("ReduceMean", floats(2, 3, 4), opset=18, noop_with_empty_axes=1, label="noop"),
    case("ReduceSum", floats(2, 3, 4), opset=11, axes=[2], label="attr"),
    case("ReduceSum", floats(2, 3, 4), ints(0, 2), opset=13, label="input"),
    case("ReduceMax", floats(2, 3, 4), ints(1), opset=20),
    case("ReduceMin", floats(2, 3, 4), opset=13, axes=[0], keepdims=0),
    case("ReduceProd", floats(2, 3, 4), ints(0, 1), opset=18),
    case("ReduceL1", floats(2, 3, 4), ints(2), opset=18),
    case("ReduceL2", floats(2, 3, 4), ints(2), opset=18),
    case("ReduceSumSquare", floats(2, 3, 4), opset=13, axes=[1]),
    case("ReduceLogSumExp", floats(2, 3, 4), ints(-1), opset=18),
    case("ArgMax", floats(3, 5), opset=13, axis=1, keepdims=0),
    case("ArgMax", np.array([[1, 3, 3], [2, 2, 0]], np.float32), opset=13, axis=1, select_last_index=1, label="last"),
    case("ArgMin", floats(3, 5), opset=13, axis=0),
    # attention (opset 23)
    case("Attention", floats(2, 2, 5, 4), floats(2, 2, 6, 4), floats(2, 2, 6, 3), opset=23, label="4d"),
    case("Attention", floats(2, 5, 8), floats(2, 6, 4), floats(2, 6, 4), opset=23, q_num_heads=4, kv_num_heads=2, label="3d-gqa"),
    case("Attention", floats(2, 2, 5, 4), floats(2, 2, 5, 4), floats(2, 2, 5, 4), Runtime(RNG.random((5, 5)) > 0.3),
         opset=23, label="bool-mask"),
    case("Attention", floats(2, 2, 5, 4), floats(2, 2, 5, 4), floats(2, 2, 5, 4), floats(2, 1, 5, 5), opset=23, label="float-mask"),
    case("Attention", floats(2, 2, 5, 4), floats(2, 2, 5, 4), floats(2, 2, 5, 4), opset=23, is_causal=1, scale=0.3, label="causal"),
    case("Attention", floats(2, 2, 5, 4), floats(2, 2, 5, 4), floats(2, 2, 5, 4), opset=23, softcap=2.0, label="softcap"),
]


@pytest.mark.parametrize("spec", CASES)
def test_op_matches_onnxruntime(spec: Case) -> None:
    model, feeds = single_node_model(spec)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    twin = build_twin(model)
    with torch.no_grad():
        got, _ = twin.run({name: torch.from_numpy(value) for name, value in feeds.items()})
    assert len(got) == len(expected)
    for have, want in zip(got, expected):
        have = have.numpy()
        assert have.shape == want.shape
        if want.dtype.kind in "biu":
            assert have.dtype.kind == want.dtype.kind
            np.testing.assert_array_equal(have, want)
        else:
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_constant_node_values_are_folded_into_the_graph() -> None:
    model = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3] x) => (float[2, 3] y) {
            c = Constant <value_floats = [1.0, 2.0, 3.0]> ()
            y = Mul(x, c)
        }"""
    )
    twin = build_twin(model)
    x = floats(2, 3)
    np.testing.assert_allclose(twin(torch.from_numpy(x)).numpy(), x * np.array([1, 2, 3], np.float32))
    assert [step.op_type for step in twin.program.steps] == ["Mul"]


def test_float_bound_clip_passes_the_gradient_of_inputs_on_its_bounds() -> None:
    """A Clip at an input's calibrated range sees pixels exactly at its bounds (black ones at
    0): an attack must be able to move them, so their gradient is the identity's."""
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x", "low", "high"], ["y"])],
        "clip",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "low"), numpy_helper.from_array(np.array(1.0, np.float32), "high")],
    )
    twin = build_twin(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = torch.tensor([0.0, 0.5, 1.0, 1.5], requires_grad=True)
    outputs, _ = twin.run({"x": x})
    outputs[0].sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]
