"""The fake-quant training graph, and the float model inside a compiled QDQ model.

Fine-tuning trains the float weights of a plan's layers while the forward pass sees them
on their k-bit grids. The graph that does this is the compiled QDQ model with one change:
each quantized layer's integer weight initializer is replaced by its float initializer
(under the float model's name) behind QuantizeLinear -> DequantizeLinear whose per-channel
scale the graph computes from that weight, max|w| / (2^(k-1) - 1) as passes.qdq does, so
the grid follows the weights as they train. The layer's int32 bias goes back to the float
bias. Everything else (the activation Q/Clip/DQ chains with their calibrated grids) stays
as the compiler wrote it. The result is plain ONNX: onnxruntime runs it, and the torch twin
runs it as fake quantization with straight-through gradients (through the rounding, and
through the scale to each channel's largest weight, as in learned-step-size quantization).

The int32 bias becomes the float bias rounded in the graph to the grid of input scale x
(current) weight scale, as passes.qdq rounds it; since QuantizeLinear has no int32
container, the rounding is done as a coarse int16 step (2^16 grid steps) plus a fine one.
The rounded bias is added after the layer rather than inside it, so that the twin does
not try to emulate onnxruntime's own bias quantization on top of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ..errors import ModelError, PlanError
from ..inputs import parse_json
from ..layers import Layer
from ..passes.initializers import shared_initializer
from ..passes.qdq import PLAN_METADATA_KEY, WEIGHT_SOURCE_KEY
from ..plan import Plan, plan_from_json


class TrainableWeightsPass(ir.passes.InPlacePass):
    """Put each quantized layer's float weight, quantized in the graph, in place of its
    integer weight, and its float bias in place of the int32 one."""

    def __init__(self, layers: Sequence[Layer], plan: Plan, float_model: onnx.ModelProto) -> None:
        super().__init__()
        self.layers = layers
        self.plan = plan
        self.float_initializers = {t.name: t for t in float_model.graph.initializer}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        entries = self.plan.by_name()
        for layer in self.layers:
            entry = entries.get(layer.name)
            if entry is None or not entry.quantized:
                continue
            node = nodes.get(layer.name)
            if node is None:
                raise PlanError(f"layer '{layer.name}' is not in the compiled model")
            weight = self._float(graph, layer.weight)
            weight_on_grid, weight_scale = _weight_on_grid(graph, node, layer, weight, entry.weight_bits)
            node.replace_input_with(1, weight_on_grid)
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            input_scale = _activation_scale(node.inputs[0])
            if bias is None or not _is_dequantized_constant(bias) or layer.bias is None:
                continue
            if input_scale is None:
                raise ModelError(f"layer '{layer.name}': its bias is int32 but its input is not quantized")
            bias_on_grid = _bias_on_grid(graph, node, layer, self._float(graph, layer.bias), input_scale, weight_scale)
            node.resize_inputs(2)
            _add_after(graph, node, bias_on_grid)
        return ir.passes.PassResult(model, True)

    def _float(self, graph: ir.Graph, name: str) -> ir.Value:
        existing = graph.initializers.get(name)
        if existing is not None:
            return existing
        proto = self.float_initializers.get(name)
        if proto is None:
            raise ModelError(f"the float model has no initializer '{name}'")
        return shared_initializer(graph, name, onnx.numpy_helper.to_array(proto))


def _weight_on_grid(
    graph: ir.Graph, layer_node: ir.Node, layer: Layer, weight: ir.Value, bits: int
) -> tuple[ir.Value, ir.Value]:
    """Abs -> ReduceMax -> / limit -> (1 where 0) -> QuantizeLinear -> DequantizeLinear;
    returns the weight on its grid and the scale."""
    base = f"{layer.name}.weight_grid"
    rank = len(layer.weight_shape)
    axis = None if layer.weight_axis is None else layer.weight_axis % rank
    channels = () if axis is None else (layer.weight_shape[axis],)
    container = np.int8 if bits <= 8 else np.int16
    limit = shared_initializer(graph, f"{base}_limit", np.asarray(2 ** (bits - 1) - 1, dtype=np.float32))
    zero = shared_initializer(graph, f"{base}_zero", np.asarray(0.0, dtype=np.float32))
    one = shared_initializer(graph, f"{base}_one", np.asarray(1.0, dtype=np.float32))
    zero_point = shared_initializer(graph, f"{base}_zero_point", np.zeros(channels, dtype=container))
    magnitude = ir.node("Abs", [weight], name=f"{base}/Abs")
    reduce_inputs = [magnitude.outputs[0]]
    if axis is not None:
        others = [dim for dim in range(rank) if dim != axis]
        reduce_inputs.append(shared_initializer(graph, f"{base}_axes", np.asarray(others, dtype=np.int64)))
    absmax = ir.node("ReduceMax", reduce_inputs, {"keepdims": 0}, name=f"{base}/ReduceMax")
    step = ir.node("Div", [absmax.outputs[0], limit], name=f"{base}/Div")
    positive = ir.node("Greater", [step.outputs[0], zero], name=f"{base}/Greater")
    scale = ir.node("Where", [positive.outputs[0], step.outputs[0], one], name=f"{base}/Where")
    quantizer_attributes = {"axis": axis} if axis is not None else None
    quantize = ir.node(
        "QuantizeLinear", [weight, scale.outputs[0], zero_point], quantizer_attributes, name=f"{base}/QuantizeLinear"
    )
    dequantize = ir.node(
        "DequantizeLinear",
        [quantize.outputs[0], scale.outputs[0], zero_point],
        quantizer_attributes,
        name=f"{base}/DequantizeLinear",
    )
    created = [magnitude, absmax, step, positive, scale, quantize, dequantize]
    for node, suffix in zip(created, ("abs", "absmax", "step", "positive", "scale", "quantized", "dequantized")):
        node.outputs[0].name = f"{base}_{suffix}"
    graph.insert_before(layer_node, created)
    return dequantize.outputs[0], scale.outputs[0]


BIAS_COARSE_STEPS = 2**16
"""Grid steps per coarse int16 step: coarse + fine int16 reach the int32 range."""


def _bias_on_grid(
    graph: ir.Graph, layer_node: ir.Node, layer: Layer, bias: ir.Value, input_scale: ir.Value, weight_scale: ir.Value
) -> ir.Value:
    """round(bias / (input scale x weight scale)) on that grid, reshaped to add to the output."""
    base = f"{layer.name}.bias_grid"
    per_channel = layer.weight_axis is not None
    channels = (layer.out_features,) if per_channel else ()
    attributes = {"axis": 0} if per_channel else None
    zero_point = shared_initializer(graph, f"{base}_zero_point", np.zeros(channels, dtype=np.int16))
    zero = shared_initializer(graph, f"{base}_zero", np.asarray(0.0, dtype=np.float32))
    one = shared_initializer(graph, f"{base}_one", np.asarray(1.0, dtype=np.float32))
    coarse_steps = shared_initializer(graph, f"{base}_coarse_steps", np.asarray(BIAS_COARSE_STEPS, dtype=np.float32))
    created: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], suffix: str, node_attributes: dict[str, int] | None = None) -> ir.Value:
        created.append(ir.node(op, inputs, node_attributes, name=f"{base}/{suffix}"))
        created[-1].outputs[0].name = f"{base}_{suffix}"
        return created[-1].outputs[0]

    raw_step = add("Mul", [input_scale, weight_scale], "raw_step")
    step = add("Where", [add("Greater", [raw_step, zero], "positive"), raw_step, one], "step")
    coarse_step = add("Mul", [step, coarse_steps], "coarse_step")
    coarse_integers = add("QuantizeLinear", [bias, coarse_step, zero_point], "coarse_quantized", attributes)
    coarse = add("DequantizeLinear", [coarse_integers, coarse_step, zero_point], "coarse", attributes)
    rest = add("Sub", [bias, coarse], "rest")
    fine_integers = add("QuantizeLinear", [rest, step, zero_point], "fine_quantized", attributes)
    fine = add("DequantizeLinear", [fine_integers, step, zero_point], "fine", attributes)
    rounded = add("Add", [coarse, fine], "rounded")
    if layer.op in ("Conv", "ConvTranspose") and per_channel:
        shape = np.asarray([layer.out_features] + [1] * (len(layer.weight_shape) - 2), dtype=np.int64)
        rounded = add("Reshape", [rounded, shared_initializer(graph, f"{base}_shape", shape)], "shaped")
    graph.insert_before(layer_node, created)
    return rounded


def _add_after(graph: ir.Graph, node: ir.Node, addend: ir.Value) -> None:
    """node's output + addend in place of node's output (same tensor name downstream)."""
    output = node.outputs[0]
    name = output.name
    uses = list(output.uses())
    positions = [index for index, value in enumerate(graph.outputs) if value is output]
    added = ir.node("Add", [output, addend], name=f"{node.name}/AddBias")
    graph.insert_after(node, added)
    for use in uses:
        use.node.replace_input_with(use.idx, added.outputs[0])
    for index in positions:
        graph.outputs[index] = added.outputs[0]
    output.name = f"{name}_before_bias"
    added.outputs[0].name = name


def _activation_scale(value: ir.Value | None) -> ir.Value | None:
    """The scale initializer of the DequantizeLinear that produces `value`, if any."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = producer.inputs[1]
    return scale if scale is not None and scale.const_value is not None else None


def _is_dequantized_constant(value: ir.Value) -> bool:
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and producer.inputs[0] is not None
        and producer.inputs[0].const_value is not None
    )


def training_graph(compiled: onnx.ModelProto, float_model: onnx.ModelProto, layers: Sequence[Layer], plan: Plan) -> onnx.ModelProto:
    """The compiled model with its planned layers' weights trainable (see module docstring).

    `layers` and `plan` are the float model's layer table and the compiled (aligned) plan.
    """
    model = ir.serde.deserialize_model(compiled)
    ir.passes.Sequential(
        TrainableWeightsPass(layers, plan, float_model),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    )(model)
    proto = ir.serde.serialize_model(model)
    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto)


def compiled_plan(model: onnx.ModelProto) -> Plan | None:
    """The aligned plan that quanos-compile stored in a QDQ model, or None for other models."""
    for entry in model.metadata_props:
        if entry.key == PLAN_METADATA_KEY:
            where = f"metadata '{PLAN_METADATA_KEY}'"
            return plan_from_json(parse_json(entry.value, where, PlanError), where)
    return None


class StripQuantizersPass(ir.passes.InPlacePass):
    """Undo QDQ insertion: integer weights become their dequantized float values and every
    activation Q -> (Clip) -> DQ chain is bypassed, leaving the float graph it was built on."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            output = node.outputs[0]
            source = node.inputs[0]
            if source is not None and source.const_value is not None:
                replacement = shared_initializer(graph, _float_name(graph, node), _dequantized(node))
            else:
                replacement = _chain_input(node)
            output.replace_all_uses_with(replacement, replace_graph_outputs=True)
            modified = True
        return ir.passes.PassResult(model, modified)


def _float_name(graph: ir.Graph, dequantize: ir.Node) -> str:
    """The float model's name of a weight (recorded by passes.qdq), else the DQ output's."""
    recorded = dequantize.metadata_props.get(WEIGHT_SOURCE_KEY)
    taken = {value.name for node in graph for value in node.outputs} | set(graph.initializers)
    return recorded if recorded and recorded not in taken else dequantize.outputs[0].name


def _dequantized(node: ir.Node) -> np.ndarray:
    """(q - zero_point) * scale in float32, per axis when the scale is a vector."""
    integers = node.inputs[0].const_value.numpy().astype(np.float32)
    scale = node.inputs[1].const_value.numpy().astype(np.float32)
    zero_input = node.inputs[2] if len(node.inputs) > 2 else None
    zero = zero_input.const_value.numpy().astype(np.float32) if zero_input is not None else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:
        axis_attribute = node.attributes.get("axis")
        axis = (axis_attribute.as_int() if axis_attribute is not None else 1) % integers.ndim
        shape = [1] * integers.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((integers - zero) * scale).astype(np.float32)


def _chain_input(dequantize: ir.Node) -> ir.Value:
    """The float tensor an activation chain (Clip) -> QuantizeLinear -> (Clip) -> DQ reads."""
    value = dequantize.inputs[0]
    producer = value.producer() if value is not None else None
    while producer is not None and producer.op_type == "Clip":
        value = producer.inputs[0]
        producer = value.producer()
    if producer is None or producer.op_type != "QuantizeLinear":
        raise ModelError(f"DequantizeLinear '{dequantize.name}' reads neither a constant nor a QuantizeLinear")
    value = producer.inputs[0]
    float_clip = value.producer()
    if float_clip is not None and float_clip.op_type == "Clip" and _is_chain_clip(value, producer):
        value = float_clip.inputs[0]
    return value


def _is_chain_clip(clipped: ir.Value, quantize: ir.Node) -> bool:
    """True for the float Clip passes.qdq puts before a wide (int16) QuantizeLinear: its
    output is named '<base>_clipped' where the quantizer's scale is '<base>_scale'."""
    scale = quantize.inputs[1]
    if scale is None or not scale.name or not scale.name.endswith("_scale"):
        return False
    return clipped.name == scale.name[: -len("_scale")] + "_clipped"


def float_model_of(compiled: onnx.ModelProto) -> onnx.ModelProto:
    """The float model a quanos-compile output was built from, with its weights dequantized.

    The original float weights are not stored in a QDQ model; the dequantized ones are the
    values the deployed model computes with, so fine-tuning starts where the artifact is.
    Weights get back their float model's names where the compiler recorded them.
    """
    model = ir.serde.deserialize_model(compiled)
    ir.passes.Sequential(
        StripQuantizersPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    )(model)
    model.metadata_props.pop(PLAN_METADATA_KEY, None)
    proto = ir.serde.serialize_model(model)
    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto)
