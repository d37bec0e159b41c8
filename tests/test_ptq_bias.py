"""ptq/bias.py: each layer's mean output shift, measured through the QDQ model, into its bias."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner, normalize
from quanos_onnx.plan import LayerPlan, Plan
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.ptq.bias import _before_quantizer, bias_shifts
from quanos_onnx.quantize import quantize

from tiny_models import GraphBuilder, random_inputs, vgg_chain

PLAIN = PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=False)
CORRECTED = PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=True)


def single_conv(bias_mean: float = 0.0):
    builder = GraphBuilder(seed=2)
    y = builder.conv("x", 3, 6, name="conv")
    builder.initializers[-1] = numpy_helper.from_array(
        numpy_helper.to_array(builder.initializers[-1]) + np.float32(bias_mean), builder.initializers[-1].name
    )
    return normalize(builder.model(["N", 3, 8, 8], y))


def channel_means(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return Runner(model).run(x)[0].mean(axis=(0, 2, 3))


def test_a_corrected_layer_has_the_float_layers_mean_output():
    model = single_conv()
    x = random_inputs(model, 32, seed=1)
    plan = Plan.uniform(list_layers(model), 4, keep_output_float=False)
    plain = quantize(model, plan, [x[:16], x[16:]], ptq=PLAIN).model
    corrected = quantize(model, plan, [x[:16], x[16:]], ptq=CORRECTED).model
    reference = channel_means(model, x)
    # what is left is the rounding of the corrected bias to its int32 grid (input x weight scale)
    bias_step = numpy_helper.to_array(next(t for t in corrected.graph.initializer if t.name == "conv.bias_i32_scale"))
    left = np.abs(channel_means(corrected, x) - reference)
    assert np.all(left <= bias_step / 2 + 1e-4)
    assert left.sum() < 0.5 * np.abs(channel_means(plain, x) - reference).sum()


def test_shifts_are_measured_per_output_channel_of_every_biased_layer():
    model = normalize(vgg_chain())
    layers = list_layers(model)
    x = random_inputs(model, 16)
    plan = Plan.uniform(layers, 3, keep_output_float=False)
    quantized = quantize(model, plan, [x], ptq=PLAIN).model
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shifts = bias_shifts(quantized, weights, layers, quantize(model, plan, [x], ptq=PLAIN).plan, [x])
    assert set(shifts) == {layer.name for layer in layers}
    assert all(shifts[layer.name].shape == (layer.out_features,) for layer in layers)


def test_float_layers_and_layers_without_bias_are_not_probed():
    model = normalize(vgg_chain())
    layers = list_layers(model)
    x = random_inputs(model, 8)
    plan = Plan(tuple(LayerPlan(l.name, None, None, keep_float=True) if l.is_output else LayerPlan(l.name, 4, 4) for l in layers))
    result = quantize(model, plan, [x], ptq=PLAIN)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shifts = bias_shifts(result.model, weights, layers, result.plan, [x])
    assert "classifier" not in shifts and len(shifts) == len(layers) - 1


def test_a_requantized_grid_leads_back_to_the_float_tensor():
    nodes = [
        helper.make_node("QuantizeLinear", ["t", "s", "z"], ["q1"], name="a/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"], name="a/DequantizeLinear"),
        helper.make_node("QuantizeLinear", ["d1", "s", "z"], ["q2"], name="b/QuantizeLinear"),
        helper.make_node("Clip", ["q2", "lo", "hi"], ["c2"], name="b/Clip"),
        helper.make_node("DequantizeLinear", ["c2", "s", "z"], ["d2"], name="b/DequantizeLinear"),
        helper.make_node("Clip", ["u", "lo", "hi"], ["relu6"], name="model/Clip"),
        helper.make_node("QuantizeLinear", ["relu6", "s", "z"], ["q3"], name="c/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["q3", "s", "z"], ["d3"], name="c/DequantizeLinear"),
    ]
    producers = {out: node for node in nodes for out in node.output}
    assert _before_quantizer("d2", producers) == "t"
    assert _before_quantizer("d3", producers) == "relu6"
    assert _before_quantizer("t", producers) == "t"


def test_bias_correction_improves_a_low_bit_network():
    model = normalize(vgg_chain(seed=3))
    layers = list_layers(model)
    x = random_inputs(model, 64, seed=4)
    plan = Plan.uniform(layers, 4)
    reference = Runner(model).run(x)[0]

    def error(settings: PtqSettings) -> float:
        return float(np.mean((Runner(quantize(model, plan, [x[:32], x[32:]], ptq=settings).model).run(x)[0] - reference) ** 2))

    assert error(CORRECTED) < error(PLAIN)


@pytest.mark.parametrize("op", ["Gemm"])
def test_gemm_shifts_are_per_output_feature(op):
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w", "b"], ["y"], name="fc", transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        ],
    )
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    x = np.random.default_rng(1).uniform(0, 1, (64, 5)).astype(np.float32)
    plan = Plan((LayerPlan("fc", 2, 4),))
    corrected = quantize(model, plan, [x], ptq=CORRECTED).model
    bias_step = numpy_helper.to_array(next(t for t in corrected.graph.initializer if t.name == "fc.bias_i32_scale"))
    left = np.abs(Runner(corrected).run(x)[0].mean(axis=0) - Runner(model).run(x)[0].mean(axis=0))
    assert np.all(left <= bias_step / 2 + 1e-4)


def test_layers_with_inputs_below_four_bits_keep_their_bias():
    """Measured on ResNet-20: correcting 3-bit-input layers lost 5-6 points (docs)."""
    model = single_conv()
    x = random_inputs(model, 32, seed=1)
    plan = Plan((LayerPlan("conv", 4, 3),))
    plain = quantize(model, plan, [x], ptq=PLAIN).model
    corrected = quantize(model, plan, [x], ptq=CORRECTED).model
    assert plain.SerializeToString() == corrected.SerializeToString()


def _one_layer(op: str, x_shape: list[int], weight_shape: list[int], **attributes: object) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    if op == "ConvTranspose":
        outputs = weight_shape[1] * attributes.get("group", 1)
    else:
        outputs = weight_shape[1] if op == "Gemm" and not attributes.get("transB") else weight_shape[0]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w", "b"], ["y"], name="layer", **attributes)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.normal(size=weight_shape).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(size=outputs).astype(np.float32), "b"),
        ],
    )
    return normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def _probed_means(op: str, attributes: dict, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The layer's mean output per channel without bias, computed by onnxruntime itself."""
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"], **attributes)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    output = Runner(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)).run(x)[0]
    axis = output.ndim - 1 if op == "Gemm" else 1
    return np.moveaxis(output, axis, 0).reshape(output.shape[axis], -1).astype(np.float64).mean(axis=1)


@pytest.mark.parametrize(
    ("op", "x_shape", "weight_shape", "attributes"),
    [
        ("Conv", [8, 4, 9, 9], [6, 4, 3, 3], {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
        ("Conv", [8, 4, 9, 9], [6, 2, 3, 3], {"group": 2, "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        ("Conv", [8, 4, 9, 9], [4, 1, 5, 5], {"group": 4, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("Conv", [8, 4, 10, 7], [6, 4, 1, 1], {}),
        ("Conv", [8, 4, 11], [6, 4, 3], {"strides": [2], "pads": [0, 1]}),
        ("Gemm", [8, 5], [4, 5], {"transB": 1, "alpha": 0.5}),
        ("ConvTranspose", [8, 4, 5, 5], [4, 3, 3, 3], {"strides": [2, 2], "pads": [1, 1, 0, 0]}),
    ],
)
def test_shifts_are_the_mean_output_difference_onnxruntime_computes(op, x_shape, weight_shape, attributes):
    """Conv and Gemm shifts come from patch sums of the inputs (linearity); they must equal the
    mean of the layer's own outputs, W * x minus Wq * xq, as onnxruntime computes them."""
    model = _one_layer(op, x_shape, weight_shape, **attributes)
    layers = list_layers(model)
    x = np.random.default_rng(6).uniform(0, 1, x_shape).astype(np.float32)
    plan = Plan((LayerPlan("layer", 3, 4),))
    result = quantize(model, plan, [x], ptq=PLAIN)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shifts = bias_shifts(result.model, weights, layers, result.plan, [x])
    node = next(n for n in result.model.graph.node if n.name == "layer")
    assert _before_quantizer(node.input[0], {out: n for n in result.model.graph.node for out in n.output}) == "x"
    x_quantized, w_quantized = Runner(result.model, [node.input[0], node.input[1]]).run(x, [node.input[0], node.input[1]])
    expected = _probed_means(op, attributes, x, weights["w"]) - _probed_means(op, attributes, x_quantized, w_quantized)
    np.testing.assert_allclose(shifts["layer"], expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 1e-3  # the quantization moved the mean: the check has something to see


def test_a_gemm_with_transposed_input_is_corrected_per_output_feature():
    """transA: the samples are the input's second axis (here after a Transpose)."""
    rng = np.random.default_rng(7)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
            helper.make_node("Gemm", ["xt", "w", "b"], ["y"], name="layer", transA=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        ],
    )
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    x = rng.uniform(0, 1, (32, 5)).astype(np.float32)
    result = quantize(model, Plan((LayerPlan("layer", 3, 4),)), [x], ptq=PLAIN)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shifts = bias_shifts(result.model, weights, list_layers(model), result.plan, [x])
    node = next(n for n in result.model.graph.node if n.name == "layer")
    producers = {out: n for n in result.model.graph.node for out in n.output}
    names = [_before_quantizer(node.input[0], producers), node.input[0], node.input[1]]
    x_float, x_quantized, w_quantized = Runner(result.model, names).run(x, names)
    expected = (x_float.T.astype(np.float64) @ weights["w"]).mean(axis=0) - (x_quantized.T.astype(np.float64) @ w_quantized).mean(axis=0)
    np.testing.assert_allclose(shifts["layer"], expected, rtol=1e-4, atol=1e-5)
