"""The Lipschitz bound against the explicit operator matrix, and the measured ratios under it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.harness.lipschitz import ACTIVATION_LIPSCHITZ, local_estimates, operator_bounds
from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner, normalize


def _model(nodes, initializers, input_shape, output, output_shape=None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _conv_matrix(weight, input_hw, stride, pads, dilation, groups) -> np.ndarray:
    """The explicit matrix of a zero-padded 2-D convolution, written out with loops."""
    out_c, in_per_group, kh, kw = weight.shape
    in_c = in_per_group * groups
    h, w = input_hw
    oh = (h + pads[0] + pads[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + pads[1] + pads[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    matrix = np.zeros((out_c * oh * ow, in_c * h * w))
    per_group = out_c // groups
    for o in range(out_c):
        g = o // per_group
        for y in range(oh):
            for x in range(ow):
                row = (o * oh + y) * ow + x
                for c in range(in_per_group):
                    channel = g * in_per_group + c
                    for i in range(kh):
                        for j in range(kw):
                            iy = y * stride[0] - pads[0] + i * dilation[0]
                            ix = x * stride[1] - pads[1] + j * dilation[1]
                            if 0 <= iy < h and 0 <= ix < w:
                                matrix[row, (channel * h + iy) * w + ix] += weight[o, c, i, j]
    return matrix


CONV_CASES = [
    dict(stride=(1, 1), pads=(1, 1, 1, 1), dilation=(1, 1), groups=1),
    dict(stride=(2, 2), pads=(1, 0, 0, 1), dilation=(1, 1), groups=1),
    dict(stride=(1, 2), pads=(2, 2, 2, 2), dilation=(2, 2), groups=2),
    dict(stride=(2, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=4),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_bound_is_the_largest_singular_value_of_the_explicit_matrix(case) -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(4, 4 // case["groups"], 3, 3)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], name="conv", strides=list(case["stride"]),
        pads=list(case["pads"]), dilations=list(case["dilation"]), group=case["groups"],
    )
    model = _model([node], {"w": weight, "b": rng.normal(size=4)}, (4, 7, 6), "y")
    [bound] = operator_bounds(model, list_layers(model))
    expected = np.linalg.svd(
        _conv_matrix(weight.astype(np.float64), (7, 6), case["stride"], case["pads"], case["dilation"], case["groups"]),
        compute_uv=False,
    )[0]
    assert bound.activation == 1.0
    assert bound.bound == pytest.approx(expected, rel=1e-5)


def _conv_bn_relu() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    scale = rng.uniform(0.2, 3.0, size=3).astype(np.float32)
    variance = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["n"], name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    initializers = {"w": weight, "g": scale, "beta": rng.normal(size=3), "m": rng.normal(size=3), "v": variance}
    model = _model(nodes, initializers, (2, 6, 6), "y")
    folded = (scale / np.sqrt(variance.astype(np.float64) + 1e-3))[:, None, None, None] * weight
    return model, folded, rng.normal(size=(16, 2, 6, 6)).astype(np.float32)


def test_batch_norm_in_the_block_is_folded_into_the_bound() -> None:
    model, folded, _ = _conv_bn_relu()
    layers = list_layers(model)
    assert layers[0].block_nodes == ("bn", "relu")
    [bound] = operator_bounds(model, layers)
    expected = np.linalg.svd(_conv_matrix(folded, (6, 6), (2, 2), (1, 1, 1, 1), (1, 1), 1), compute_uv=False)[0]
    assert bound.bound == pytest.approx(expected, rel=1e-5)
    normalized = normalize(model)
    [after_folding] = operator_bounds(normalized, list_layers(normalized))
    assert after_folding.bound == pytest.approx(expected, rel=1e-5)


def test_measured_ratios_stay_under_the_bound_and_the_block_matches_onnxruntime() -> None:
    model, _, x = _conv_bn_relu()
    layers = list_layers(model)
    [bound] = operator_bounds(model, layers)
    [local] = local_estimates(model, layers, [(x[:10], None), (x[10:], None)])
    assert local.count == 16
    assert 0 < local.random_mean < local.local_mean <= local.local_max <= bound.bound * (1 + 1e-6)
    from quanos_onnx.harness.lipschitz import _blocks

    [block] = _blocks(model, layers)
    ours = block.run(torch.from_numpy(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(ours, Runner(model).run(x)[0], rtol=1e-4, atol=1e-5)


def test_a_linear_layer_s_local_estimate_reaches_its_bound() -> None:
    """Without an activation the Jacobian is W everywhere: the measured maximum is ||W||."""
    rng = np.random.default_rng(7)
    weight = rng.normal(size=(5, 8)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha=0.5)
    model = _model([node], {"w": weight, "b": rng.normal(size=5)}, (8,), "y")
    layers = list_layers(model)
    [bound] = operator_bounds(model, layers)
    assert bound.bound == pytest.approx(0.5 * np.linalg.svd(weight.astype(np.float64), compute_uv=False)[0], rel=1e-6)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    [local] = local_estimates(model, layers, [(x, None)], iterations=200)
    assert local.local_max == pytest.approx(bound.bound, rel=1e-5)
    assert local.local_max <= bound.bound * (1 + 1e-6)


@pytest.mark.parametrize("op", sorted(ACTIVATION_LIPSCHITZ))
def test_activation_constants_bound_the_derivative(op: str) -> None:
    from quanos_onnx.twin.registry import lookup

    attrs = {"Clip": {}, "HardSigmoid": {"alpha": 0.2, "beta": 0.5}}.get(op, {})
    slope = torch.tensor([0.3, -1.7], dtype=torch.float64)
    x = torch.linspace(-8, 8, 100001, dtype=torch.float64).repeat(1, 2, 1).requires_grad_(True)
    inputs = [x, slope.reshape(1, 2, 1)] if op == "PRelu" else [x]
    y = lookup("", op, 20).function(attrs, inputs)[0]
    (grad,) = torch.autograd.grad(y.sum(), x)
    constant = ACTIVATION_LIPSCHITZ[op](attrs, [None, slope.numpy()])
    assert float(grad.abs().max()) <= constant + 1e-9
    assert float(grad.abs().max()) >= constant - 0.01
