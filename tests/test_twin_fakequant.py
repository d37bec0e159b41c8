"""QuantizeLinear/DequantizeLinear as fake quantization: onnxruntime's numbers, STE gradients."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.twin import build_twin
from quanos_onnx.twin.fakequant import CONTAINERS, dequantize, quantize

RNG = np.random.default_rng(3)


def qdq_model(zero_point_type: int, zero_point: int, *, per_axis: bool, channels: int = 4, block_size: int = 0):
    """x -> QuantizeLinear -> DequantizeLinear with per-tensor, per-axis or blocked parameters.

    Blocked parameters have x's rank, so x then has a fixed batch of 48."""
    batch: int | str = "n"
    if block_size:
        batch, shape = 48, [48, channels, 6 // block_size]
    else:
        shape = [channels] if per_axis else []
    count = int(np.prod(shape)) if shape else 1
    scale = (RNG.random(count) * 0.1 + 0.01).astype(np.float32).reshape(shape)
    attrs = {"axis": 1} if not block_size else {"axis": 2, "block_size": block_size}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(scale, "scale"),
            helper.make_tensor("zero_point", zero_point_type, shape, [zero_point] * count),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), scale


def inputs_with_ties(scale: np.ndarray, channels: int = 4, spread: float = 300) -> np.ndarray:
    """Random values, a third of them exactly halfway between two quantization levels."""
    x = (RNG.standard_normal((48, channels, 6)) * spread * float(np.mean(scale)) / 3).astype(np.float32)
    if scale.ndim == 1:
        levels = scale.reshape(1, -1, 1)
    elif scale.ndim == 3:
        levels = np.repeat(scale, 6 // scale.shape[2], axis=2)[:16]
    else:
        levels = scale
    halves = (RNG.integers(-int(spread), int(spread), (16, channels, 6)) + 0.5) * levels
    x[:16] = halves.astype(np.float32)
    return x


@pytest.mark.parametrize(
    "zero_point_type, zero_point, per_axis, spread",
    [
        (TensorProto.UINT8, 128, False, 300),
        (TensorProto.UINT8, 0, True, 300),
        (TensorProto.INT8, 0, True, 300),
        (TensorProto.INT8, -3, False, 300),
        (TensorProto.UINT16, 300, True, 40000),
        (TensorProto.INT16, 0, False, 40000),
        (TensorProto.INT4, 0, False, 12),
        (TensorProto.UINT4, 3, True, 12),
    ],
)
def test_qdq_equals_onnxruntime_exactly(zero_point_type: int, zero_point: int, per_axis: bool, spread: float) -> None:
    model, scale = qdq_model(zero_point_type, zero_point, per_axis=per_axis)
    x = inputs_with_ties(scale, spread=spread)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = build_twin(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_blocked_qdq_equals_onnxruntime_exactly() -> None:
    model, scale = qdq_model(TensorProto.INT8, 0, per_axis=True, block_size=2)
    x = inputs_with_ties(scale)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(build_twin(model)(torch.from_numpy(x)).numpy(), expected)


def test_rounding_is_half_to_even() -> None:
    values = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999])
    quantized = quantize(values, torch.tensor(1.0), torch.tensor(0, dtype=torch.int8), CONTAINERS[TensorProto.INT8])
    assert quantized.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 2.0]


def test_straight_through_gradient_is_one_inside_and_zero_outside_the_range() -> None:
    """uint8, zero point 128, scale 0.1: representable range [-12.8, 12.7]."""
    values = torch.tensor([-20.0, -12.9, -5.04, 0.0, 3.33, 12.6, 12.8, 30.0], requires_grad=True)
    scale, zero_point = torch.tensor(0.1), torch.tensor(128, dtype=torch.uint8)
    dequantize(quantize(values, scale, zero_point, CONTAINERS[TensorProto.UINT8]), scale, zero_point).sum().backward()
    assert values.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_integer_grid_clip_blocks_the_gradient_outside_its_bounds() -> None:
    """Q(uint8, zp 0) -> Clip[0, 15] (4 bits) -> DQ: the gradient stops above 15 * scale."""
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
            helper.make_node("Clip", ["q", "low", "high"], ["clipped"]),
            helper.make_node("DequantizeLinear", ["clipped", "scale", "zp"], ["y"]),
        ],
        "qcdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
        [
            numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
            numpy_helper.from_array(np.array(0, np.uint8), "zp"),
            numpy_helper.from_array(np.array(0, np.uint8), "low"),
            numpy_helper.from_array(np.array(15, np.uint8), "high"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.array([-1.0, 0.3, 2.2, 7.4, 7.9, 20.0], np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    values = torch.from_numpy(x).requires_grad_()
    output = build_twin(model)(values)
    np.testing.assert_array_equal(output.detach().numpy(), expected)
    output.sum().backward()
    assert values.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
