"""QONNX: every quantizer as one `Quant` node at the plan's bit-width (docs/interop.md)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ..passes.initializers import new_initializer
from ..passes.qdq import WEIGHT_SOURCE_KEY
from .reading import (
    ConstantDequant,
    activation_bits,
    read_model,
    read_quantizers,
    replace_with_initializer,
    set_standard_opset,
    stored_plan,
)

log = logging.getLogger(__name__)

QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_DOMAIN_VERSION = 1


def to_qonnx(qdq_model: onnx.ModelProto, source: str = "<model>") -> onnx.ModelProto:
    """The model with every quantizer as a QONNX Quant node at the plan's bit-width.

    Weights become float initializers holding exactly what the DequantizeLinear computed
    (integers x scale) behind a signed narrow-range Quant; activation chains become one
    Quant each (signed or not, full range, zero point 0, rounding half to even, which is
    what onnxruntime's QuantizeLinear does); int32 biases become their float values, as
    Brevitas exports an unquantized bias.
    """
    plan = stored_plan(qdq_model, source)
    bits_by_grid = activation_bits(qdq_model, plan)
    model = read_model(qdq_model)
    graph = model.graph
    contents = read_quantizers(graph)
    weights = contents.weights(graph, plan)
    current: dict[str, ir.Value] = {}
    for grid in contents.activations:
        planned = grid.planned(bits_by_grid[grid.name])
        current[grid.output.name] = _replace_with_quant(
            graph,
            grid.output,
            current.get(grid.source.name, grid.source),
            grid.scale,
            bits_by_grid[grid.name],
            signed=planned.signed,
            narrow=False,
            zero_point=planned.zero_offset,
        )
        graph.remove(grid.nodes, safe=True)
    for constant in contents.constants:
        output = constant.node.outputs[0]
        if constant.node.name not in weights:
            replace_with_initializer(graph, constant, output.name)
            continue
        _, entry = weights[constant.node.name]
        float_weight = new_initializer(graph, _weight_name(graph, constant), constant.values)
        _replace_with_quant(
            graph, output, float_weight, constant.broadcast_scale(), entry.weight_bits, signed=True, narrow=True
        )
        graph.remove(constant.node, safe=True)
    set_standard_opset(model)
    model.opset_imports[QONNX_DOMAIN] = QONNX_DOMAIN_VERSION
    ir.passes.Sequential(common_passes.RemoveUnusedNodesPass(), common_passes.TopologicalSortPass())(model)
    log.info("QONNX export: %d activation and %d weight Quant nodes", len(contents.activations), len(weights))
    return ir.serde.serialize_model(model)


def _replace_with_quant(
    graph: ir.Graph,
    replaced: ir.Value,
    source: ir.Value,
    scale: np.ndarray | np.float32,
    bits: int,
    *,
    signed: bool,
    narrow: bool,
    zero_point: int = 0,
) -> ir.Value:
    name = replaced.name
    scale_array = np.asarray(scale, dtype=np.float32)
    inputs = [
        source,
        new_initializer(graph, f"{name}_scale", scale_array),
        new_initializer(graph, f"{name}_zero_point", np.asarray(zero_point, dtype=np.float32)),
        new_initializer(graph, f"{name}_bitwidth", np.asarray(bits, dtype=np.float32)),
    ]
    attributes = {"signed": int(signed), "narrow": int(narrow), "rounding_mode": "ROUND"}
    quant = ir.node("Quant", inputs, attributes, domain=QONNX_DOMAIN, name=f"{name}/Quant")
    replaced.name = f"{name}.replaced"
    output = quant.outputs[0]
    output.name = name
    output.shape = replaced.shape
    output.type = replaced.type
    replaced.replace_all_uses_with(output, replace_graph_outputs=True)
    producer = source.producer()
    if producer is not None:
        graph.insert_after(producer, quant)
    else:
        graph.insert_before(graph.node(0), quant)
    return output


def _weight_name(graph: ir.Graph, constant: ConstantDequant) -> str:
    """The float model's name for the weight when it is recorded and still free."""
    recorded = constant.node.metadata_props.get(WEIGHT_SOURCE_KEY)
    taken = set(graph.initializers) | {v.name for node in graph for v in node.outputs}
    if recorded and recorded not in taken:
        return recorded
    return f"{constant.node.outputs[0].name}.float"
