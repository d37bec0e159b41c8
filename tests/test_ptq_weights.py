"""ptq/weights.py: per-channel k-bit clipping search on the weight or the output error."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.layers import list_layers
from quanos_onnx.model import normalize
from quanos_onnx.passes.qdq import quantize_weight
from quanos_onnx.plan import Plan
from quanos_onnx.ptq.weights import MOMENT_SAMPLES, clipped_grid, clipped_grids, input_moments

from tiny_models import GraphBuilder, random_inputs, vgg_chain


def conv_weight(seed: int = 0, shape=(8, 4, 3, 3)) -> np.ndarray:
    """Laplacian weights with a spread of channel scales, as trained convs have."""
    rng = np.random.default_rng(seed)
    return (rng.laplace(size=shape) * rng.uniform(0.1, 2.0, (shape[0], 1, 1, 1))).astype(np.float32)


def dequantized(integers: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return integers.astype(np.float64) * np.asarray(scale, np.float64).reshape(-1, *([1] * (integers.ndim - 1)))


def channel_errors(weight: np.ndarray, approximation: np.ndarray) -> np.ndarray:
    return ((approximation - weight) ** 2).reshape(len(weight), -1).sum(axis=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_clipping_has_no_more_weight_error_than_absmax_in_any_channel(bits):
    weight = conv_weight(bits)
    grid = clipped_grid(weight, bits, 0)
    limit = 2 ** (bits - 1) - 1
    assert grid.integers.dtype == np.int8 and grid.integers.shape == weight.shape
    assert np.abs(grid.integers).max() <= limit and grid.scale.shape == (8,) and grid.scale.dtype == np.float32
    absmax = channel_errors(weight, dequantized(*quantize_weight(weight, bits, 0)))
    clipped = channel_errors(weight, dequantized(grid.integers, grid.scale))
    assert np.all(clipped <= absmax * (1 + 1e-6))
    if bits <= 4:
        assert clipped.sum() < 0.9 * absmax.sum()


def test_wide_grids_use_int16_and_a_per_tensor_axis_gives_one_scale():
    weight = conv_weight(1)
    assert clipped_grid(weight, 12, 0).integers.dtype == np.int16
    grid = clipped_grid(weight.reshape(8, -1), 4, None)
    assert grid.scale.shape == ()


def test_the_output_criterion_minimizes_the_output_error():
    """With correlated inputs the output error differs from the weight error; each grid wins its own."""
    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(16, 16)) + 3.0 * np.eye(16)
    inputs = rng.normal(size=(4000, 16)) @ mixing
    moments = (inputs.T @ inputs / len(inputs))[None]
    weight = rng.laplace(size=(6, 16)).astype(np.float32)

    def output_error(grid):
        delta = dequantized(grid.integers, grid.scale) - weight
        return float(np.sum((inputs @ delta.T) ** 2) / len(inputs))

    def weight_error(grid):
        return float(channel_errors(weight, dequantized(grid.integers, grid.scale)).sum())

    by_output, by_weight = clipped_grid(weight, 3, 0, moments), clipped_grid(weight, 3, 0)
    assert output_error(by_output) < output_error(by_weight)
    assert weight_error(by_weight) < weight_error(by_output)


def gemm_model():
    builder = GraphBuilder(seed=4)
    x = builder.gemm("x", 6, 5, name="fc1")
    builder.nodes[-1].input[0] = "x"
    return normalize(builder.model(["N", 6], builder.gemm(builder.relu(x), 5, 3, name="fc2"), 3))


def test_moments_of_a_gemm_are_the_input_second_moments():
    model = gemm_model()
    layers = list_layers(model)
    x = np.random.default_rng(0).normal(size=(MOMENT_SAMPLES + 18, 6)).astype(np.float32)
    moments = input_moments(model, layers, Plan.uniform(layers, 4, keep_output_float=False), [x[:20], x[20:]])
    used = x[:MOMENT_SAMPLES].astype(np.float64)
    np.testing.assert_allclose(moments["fc1"][0], used.T @ used / len(used), rtol=1e-5)
    assert moments["fc2"].shape == (1, 5, 5)


def depthwise_model():
    builder = GraphBuilder(seed=5)
    x = builder.conv("x", 3, 4, kernel=1, name="pointwise")
    x = builder.conv(x, 4, 4, kernel=3, group=4, name="depthwise")
    return normalize(builder.model(["N", 3, 5, 5], x))


def test_moments_of_convs_are_per_group_patch_moments():
    model = depthwise_model()
    layers = list_layers(model)
    x = random_inputs(model, 6)
    moments = input_moments(model, layers, Plan.uniform(layers, 4, keep_output_float=False), [x])
    pixels = x.transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(moments["pointwise"][0], pixels.T @ pixels / len(pixels), rtol=1e-5)
    assert moments["depthwise"].shape == (4, 9, 9)
    # the centre tap of a padded 3x3 window sees every pixel once
    pointwise = np.einsum("oc,nchw->nohw", numpy_helper.to_array(model.graph.initializer[0]).reshape(4, 3), x)
    pointwise += numpy_helper.to_array(model.graph.initializer[1]).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(moments["depthwise"][:, 4, 4], (pointwise**2).mean(axis=(0, 2, 3)), rtol=1e-4)


def test_grids_cover_the_quantized_layers_at_their_bits():
    model = normalize(vgg_chain())
    layers = list_layers(model)
    plan = Plan.uniform(layers, 3)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    grids = clipped_grids(weights, layers, plan)
    assert set(grids) == {layer.name for layer in layers if not layer.is_output}
    assert all(np.abs(grid.integers).max() <= 3 for grid in grids.values())


def test_a_transposed_gemm_weight_is_clipped_per_output_column():
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(conv_weight(6, (4, 3, 1, 1)).reshape(4, 3), "w")],
    )
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    (layer,) = list_layers(model)
    grid = clipped_grid(numpy_helper.to_array(model.graph.initializer[0]), 4, layer.weight_axis)
    assert grid.scale.shape == (3,)
