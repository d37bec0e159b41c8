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
