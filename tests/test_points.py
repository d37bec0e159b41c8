"""passes/points.py: where each activation quantizer goes and which ones share a scale."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quanos_onnx.layers import find_joins, list_layers
from quanos_onnx.model import normalize
from quanos_onnx.passes.align import align_plan
from quanos_onnx.passes.points import output_readers, plan_points
from quanos_onnx.quantize import quantize
from quanos_onnx.plan import LayerPlan, Plan

from tiny_models import GraphBuilder, resnet_style, vgg_chain


def _points(model, bits: dict[str, int]):
    layers = list_layers(model)
    plan = Plan(tuple(LayerPlan(name, b, b) for name, b in bits.items()))
    return plan_points(model, layers, align_plan(plan, layers, find_joins(model, layers)))


def _by_edge(points) -> dict[tuple[str, int], tuple[str, int, str]]:
    return {edge: (p.tensor, p.bits, p.group) for p in points.points for edge in p.consumers}


def test_every_quantized_layer_reads_a_quantizer_at_its_bits():
    model = normalize(vgg_chain())
    edges = _by_edge(_points(model, {"conv0": 2, "conv1": 3, "conv2": 4, "conv3": 5}))
    assert edges[("conv0", 0)][:2] == ("x", 2)
    assert edges[("conv1", 0)][:2] == ("relu1_out", 3)
    assert edges[("conv3", 0)][:2] == ("relu4_out", 5)


def test_quantizer_moves_above_maxpool_with_the_same_scale():
    model = normalize(vgg_chain())
    points = _points(model, {"conv0": 2, "conv1": 3, "conv2": 4, "conv3": 5})
    edges = _by_edge(points)
    assert edges[("maxpool3", 0)][:2] == ("relu2_out", 4)
    assert edges[("maxpool3", 0)][2] == edges[("conv2", 0)][2]
    group = next(g for g in points.groups if g.name == edges[("conv2", 0)][2])
    assert set(group.tensors) == {"relu2_out", "maxpool3_out"}


def test_last_quantized_block_output_is_quantized_for_its_float_consumer():
    model = normalize(vgg_chain())
    edges = _by_edge(_points(model, {"conv0": 8, "conv1": 8, "conv2": 8, "conv3": 6}))
    assert edges[("globalaveragepool6", 0)][:2] == ("relu5_out", 6)
    assert ("classifier", 0) not in edges


def test_join_operands_form_one_group():
    model = normalize(resnet_style())
    bits = {"stem": 3, "block1.conv1": 5, "block1.conv2": 4, "block2.conv1": 7,
            "block2.conv2": 2, "block2.shortcut": 8, "classifier": 6}
    points = _points(model, bits)
    edges = _by_edge(points)
    assert edges[("block1.add", 0)][1:] == edges[("block1.add", 1)][1:] == (7, edges[("block1.add", 0)][2])
    assert edges[("block2.add", 0)][2] == edges[("block2.add", 1)][2]
    assert edges[("block2.add", 1)][1] == 6
    # The stem's output feeds a conv at 5 bits and the join at 7: two quantizers.
    assert {(p.tensor, p.bits) for p in points.points if p.tensor == "relu1_out"} == {("relu1_out", 5), ("relu1_out", 7)}


def _padded_model(mode: str, value: float) -> onnx.ModelProto:
    builder = GraphBuilder()
    x = builder.relu(builder.conv("x", 3, 4, name="first"))
    pads = builder.constant("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    inputs = [x, pads]
    if mode == "constant":
        inputs.append(builder.constant("pad_value", np.array(value, np.float32)))
    padded = builder.node("Pad", inputs, "pad", mode=mode)
    return normalize(builder.model(["N", 3, 4, 4], builder.conv(padded, 4, 2, name="second")))


@pytest.mark.parametrize(("value", "shared"), [(0.0, True), (1.0, False)])
def test_quantizer_moves_above_zero_padding_only(value: float, shared: bool):
    """Padding with zeros keeps the grid; padding with 1.0 adds a value the grid may lack."""
    edges = _by_edge(_points(_padded_model("constant", value), {"first": 4, "second": 4}))
    assert edges[("second", 0)][1] == 4
    assert (edges[("pad", 0)][2] == edges[("second", 0)][2]) == shared


def test_a_layer_input_that_is_also_a_graph_output_stays_float_there():
    builder = GraphBuilder()
    hidden = builder.relu(builder.conv("x", 3, 4, name="first"))
    out = builder.conv(hidden, 4, 2, name="second")
    model = builder.model(["N", 3, 4, 4], out)
    model.graph.output.append(onnx.ValueInfoProto(name=hidden))
    model = normalize(model)
    points = _points(model, {"first": 4, "second": 4})
    assert _by_edge(points)[("second", 0)][:2] == (hidden, 4)
    layers = list_layers(model)
    calibration = np.random.default_rng(0).random((4, 3, 4, 4), dtype=np.float32)
    quantized = quantize(model, Plan.uniform(layers, 4, keep_output_float=False), [calibration]).model
    producers = {out: node.op_type for node in quantized.graph.node for out in node.output}
    assert [producers[o.name] for o in quantized.graph.output] == ["Conv", "Relu"]


def test_join_operand_bits_widen_the_operands_grid_and_not_the_layer_the_join_feeds():
    """BRECQ/QDrop's placement: the sum is rounded once, onto the grid of the layer it feeds."""
    model = normalize(resnet_style())
    layers = list_layers(model)
    plan = Plan(tuple(LayerPlan(layer.name, 4, 4) for layer in layers), join_operand_bits=8)
    edges = _by_edge(plan_points(model, layers, align_plan(plan, layers, find_joins(model, layers))))
    assert edges[("block1.add", 0)][1:] == edges[("block1.add", 1)][1:]
    assert edges[("block1.add", 0)][1] == edges[("block2.add", 0)][1] == 8
    assert edges[("block2.conv1", 0)][1] == edges[("block2.shortcut", 0)][1] == 4
    assert edges[("block1.conv1", 0)][:2] == ("relu1_out", 4)  # the stem's output keeps its own grid for the conv


def test_output_readers_are_the_layers_reading_a_layers_output_through_transparent_ops():
    model = normalize(vgg_chain())  # conv1 -> Relu -> MaxPool -> conv2
    layers = list_layers(model)
    assert output_readers(model, layers, "conv0") == ("conv1",)
    assert output_readers(model, layers, "conv1") == ("conv2",)
    assert output_readers(model, layers, "conv3") == ()  # read by the pooling head, no layer
    residual = normalize(resnet_style())  # the stem's output feeds block1.conv1 and the join
    assert output_readers(residual, list_layers(residual), "stem") == ("block1.conv1",)
