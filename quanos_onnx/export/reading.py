"""What a compiled QDQ model holds: its stored plan and its quantizers, checked.

Both exports start here. The QDQ forms are the ones passes/qdq.py writes; the activation
points are recomputed from the stored plan (on the graph with its quantizers taken out,
exactly as compilation placed them) so that every bit-width comes from the plan, and every
grid in the graph is checked against it: a hand-edited model or plan is refused with the
node named rather than exported with wrong bits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ..errors import ModelError
from ..inputs import parse_json
from ..layers import list_layers
from ..model import TARGET_IR_VERSION, TARGET_OPSET
from ..passes.initializers import new_initializer
from ..passes.points import QuantPoint, plan_points
from ..passes.qdq import PLAN_METADATA_KEY, non_negative_tensors
from ..plan import LayerPlan, Plan, plan_from_json

_CONTAINER_RANGES = {
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT16: (-32768, 32767),
}
_WIDE_CONTAINERS = frozenset({ir.DataType.UINT16, ir.DataType.INT16})


@dataclass(frozen=True)
class ActivationGrid:
    """One activation quantizer of the QDQ model: Q -> (integer Clip) -> DQ, or for a
    16-bit container (float Clip) -> Q -> DQ. `levels` are relative to the zero point, so
    a signed grid is (-2^(k-1), 2^(k-1) - 1) and an unsigned one (0, 2^k - 1)."""

    source: ir.Value
    output: ir.Value
    nodes: tuple[ir.Node, ...]
    scale: np.float32
    levels: tuple[int, int]

    @property
    def name(self) -> str:
        return self.nodes[-1].name

    @property
    def signed(self) -> bool:
        """A symmetric signed grid (QONNX signed Quant); asymmetric ones are unsigned with an offset."""
        count = self.levels[1] - self.levels[0] + 1
        return self.levels[0] < 0 and self.levels[0] == -(count // 2)

    @property
    def zero_offset(self) -> int:
        """QONNX zero point: 0 for symmetric and zero-based grids, else where 0.0 sits."""
        return 0 if self.signed else -self.levels[0]

    @property
    def bits(self) -> int | None:
        """k for a full k-bit grid; None for any other level set."""
        count = self.levels[1] - self.levels[0] + 1
        bits = count.bit_length() - 1
        holds_zero = self.levels[0] <= 0 <= self.levels[1]
        return bits if count == 2**bits and holds_zero else None

    def edges(self) -> frozenset[tuple[str, int]]:
        return frozenset((use.node.name, use.idx) for use in self.output.uses())

    def planned(self, bits: int) -> ActivationGrid | None:
        """This quantizer as the full k-bit grid, or None when it is not part of one.

        A non-negative tensor in a signed group is written from zero-point 0 with only the
        group's levels from zero up (ActivationQuantizer.for_non_negative): its k-bit grid
        is the 2^k levels that end at its top level. Only valid for a tensor that cannot be
        negative and whose group holds that grid whole, which activation_bits checks.
        """
        if self.bits == bits:
            return self
        low, high = self.levels
        if low == 0 and high < 2**bits - 1:
            return replace(self, levels=(high - 2**bits + 1, high))
        return None


@dataclass(frozen=True)
class ConstantDequant:
    """A DequantizeLinear of an integer initializer: a weight or an int32 bias."""

    node: ir.Node
    integers: np.ndarray
    scale: np.ndarray
    axis: int | None

    @property
    def values(self) -> np.ndarray:
        """The float tensor onnxruntime computes: float32(q) * scale along the axis."""
        return (self.integers.astype(np.float32) * self.broadcast_scale()).astype(np.float32)

    def broadcast_scale(self) -> np.ndarray:
        if self.axis is None:
            return self.scale
        shape = [1] * self.integers.ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape)


@dataclass(frozen=True)
class QDQContents:
    activations: tuple[ActivationGrid, ...]
    constants: tuple[ConstantDequant, ...]

    def weights(self, graph: ir.Graph, plan: Plan) -> dict[str, tuple[ConstantDequant, LayerPlan]]:
        """The weight dequantizer of every quantized layer, keyed by the DQ node name."""
        nodes = {node.name: node for node in graph}
        by_node = {c.node.name: c for c in self.constants}
        found: dict[str, tuple[ConstantDequant, LayerPlan]] = {}
        for entry in plan.layers:
            if not entry.quantized:
                continue
            layer = nodes.get(entry.name)
            weight = layer.inputs[1] if layer is not None and len(layer.inputs) > 1 else None
            producer = weight.producer() if weight is not None else None
            if producer is None or producer.name not in by_node:
                raise ModelError(
                    f"layer '{entry.name}': the plan quantizes it but its weight is not a "
                    "DequantizeLinear of an integer initializer"
                )
            found[producer.name] = (_checked_weight(by_node[producer.name], entry), entry)
        return found


def stored_plan(proto: onnx.ModelProto, source: str = "<model>") -> Plan:
    """The aligned plan that QDQ insertion attached to the model."""
    for entry in proto.metadata_props:
        if entry.key == PLAN_METADATA_KEY:
            data = parse_json(entry.value, f"{source}: metadata '{PLAN_METADATA_KEY}'", ModelError)
            return plan_from_json(data, f"{source}: metadata '{PLAN_METADATA_KEY}'")
    raise ModelError(
        f"{source}: no '{PLAN_METADATA_KEY}' metadata, so not a model written by quanos-compile",
        hint="export the model.quanos.onnx that quanos-compile wrote",
    )


def read_quantizers(graph: ir.Graph) -> QDQContents:
    """Every quantizer of a QDQ model as QDQ insertion writes them; anything else is refused."""
    activations: list[ActivationGrid] = []
    constants: list[ConstantDequant] = []
    for node in graph:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        if node.inputs[0] is not None and node.inputs[0].const_value is not None:
            constants.append(_constant_dequant(node))
        else:
            activations.append(_activation_grid(node))
    activations = _inherit_transparent_levels(activations)
    claimed = {id(node) for grid in activations for node in grid.nodes}
    for node in graph:
        if node.op_type == "QuantizeLinear" and id(node) not in claimed:
            raise ModelError(f"node '{node.name}': QuantizeLinear that no DequantizeLinear reads back")
    return QDQContents(tuple(activations), tuple(constants))


def _inherit_transparent_levels(grids: list[ActivationGrid]) -> list[ActivationGrid]:
    """A quantizer right after a transparent op (MaxPool, Slice, ...) that reads the same
    grid is written without a Clip, its values being on that grid already; it has the
    levels of the grid in front of the op."""
    from ..passes.points import TRANSPARENT_OPS

    by_output: dict[str, ActivationGrid] = {}
    result = []
    for grid in grids:
        producer = grid.source.producer()
        upstream_value = producer.inputs[0] if producer is not None and producer.inputs else None
        upstream = by_output.get(upstream_value.name) if upstream_value is not None else None
        if (
            producer is not None
            and producer.op_type in TRANSPARENT_OPS
            and upstream is not None
            and upstream.scale == grid.scale
            and grid.levels[0] <= upstream.levels[0] <= upstream.levels[1] <= grid.levels[1]
        ):
            grid = replace(grid, levels=upstream.levels)
        by_output[grid.output.name] = grid
        result.append(grid)
    return result


def _constant_dequant(node: ir.Node) -> ConstantDequant:
    integers = node.inputs[0].const_value.numpy().astype(np.int64)
    scale = _constant(node, 1).astype(np.float32)
    zero_point = _constant(node, 2) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if zero_point is not None and np.any(zero_point.astype(np.int64) != 0):
        raise ModelError(f"node '{node.name}': weight zero point is not 0 (quanos writes symmetric weights)")
    axis = None
    if scale.ndim == 1 and scale.size > 1:
        axis_attr = node.attributes.get("axis")
        axis = (axis_attr.as_int() if axis_attr is not None else 1) % integers.ndim
    return ConstantDequant(node, integers, scale.reshape(-1) if axis is not None else scale.reshape(()), axis)


def _activation_grid(dequantize: ir.Node) -> ActivationGrid:
    quantize = dequantize.inputs[0].producer() if dequantize.inputs[0] is not None else None
    integer_clip = None
    if quantize is not None and quantize.op_type == "Clip":
        integer_clip = quantize
        quantize = integer_clip.inputs[0].producer()
    if quantize is None or quantize.op_type != "QuantizeLinear":
        raise ModelError(
            f"node '{dequantize.name}': DequantizeLinear of a computed tensor that is not "
            "QuantizeLinear -> (Clip) -> DequantizeLinear"
        )
    scale = np.float32(_constant(quantize, 1).reshape(()))
    zero_value = quantize.inputs[2]
    zero_point = int(_constant(quantize, 2).reshape(()))
    if not np.array_equal(_constant(dequantize, 1), scale) or int(_constant(dequantize, 2).reshape(())) != zero_point:
        raise ModelError(f"node '{dequantize.name}': scale or zero point differs from its QuantizeLinear '{quantize.name}'")
    container = _CONTAINER_RANGES.get(zero_value.dtype)
    if container is None:
        raise ModelError(f"node '{quantize.name}': activation container {zero_value.dtype} is not supported")
    low, high = container
    if integer_clip is not None:
        low = max(low, int(_constant(integer_clip, 1)))
        high = min(high, int(_constant(integer_clip, 2)))
    levels = (low - zero_point, high - zero_point)
    nodes: tuple[ir.Node, ...] = (quantize, *([integer_clip] if integer_clip else []), dequantize)
    source = quantize.inputs[0]
    float_clip = _grid_clip(source, scale, levels) if zero_value.dtype in _WIDE_CONTAINERS else None
    if float_clip is not None:
        clip_node, levels = float_clip
        nodes = (clip_node, *nodes)
        source = clip_node.inputs[0]
    return ActivationGrid(source, dequantize.outputs[0], nodes, scale, levels)


def _grid_clip(
    value: ir.Value, scale: np.float32, levels: tuple[int, int]
) -> tuple[ir.Node, tuple[int, int]] | None:
    """The float Clip that narrows a 16-bit container to k bits, when `value` comes from one.

    It belongs to the quantizer only if it feeds nothing else and both bounds sit exactly
    on grid points strictly inside the container, as QDQ insertion writes it; a model's
    own Clip (a Relu6, say) never does.
    """
    clip = value.producer()
    if clip is None or clip.op_type != "Clip" or len(value.uses()) != 1 or len(clip.inputs) < 3:
        return None
    if any(v is None or v.const_value is None for v in clip.inputs[1:3]):
        return None
    bounds = [float(_constant(clip, i).reshape(())) for i in (1, 2)]
    relative = [round(bound / float(scale)) for bound in bounds]
    on_grid = all(np.float32(level * float(scale)) == np.float32(bound) for level, bound in zip(relative, bounds))
    inside = levels[0] <= relative[0] <= relative[1] <= levels[1] and (relative[0], relative[1]) != levels
    return (clip, (relative[0], relative[1])) if on_grid and inside else None


def _constant(node: ir.Node, index: int) -> np.ndarray:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value.const_value is None:
        raise ModelError(f"node '{node.name}': input {index} is not a constant")
    return value.const_value.numpy()


def _checked_weight(weight: ConstantDequant, entry: LayerPlan) -> ConstantDequant:
    limit = 2 ** (entry.weight_bits - 1) - 1
    largest = int(np.abs(weight.integers).max()) if weight.integers.size else 0
    if largest > limit:
        raise ModelError(
            f"node '{weight.node.name}': weight integers reach {largest}, outside the "
            f"{entry.weight_bits}-bit grid of layer '{entry.name}' in the stored plan"
        )
    return weight


def activation_bits(proto: onnx.ModelProto, plan: Plan) -> dict[str, int]:
    """The plan's bits for each activation quantizer (keyed by its DequantizeLinear name).

    The quantization points are recomputed from the plan on the model with its quantizers
    taken out, exactly as compilation placed them, and each grid in the graph must be the
    full k-bit grid the plan gives it, or for a non-negative tensor in a signed group the
    part of its group's grid from zero up.
    """
    model = read_model(proto)
    contents = read_quantizers(model.graph)
    float_proto = _without_quantizers(proto)
    points = plan_points(float_proto, list_layers(float_proto), plan)
    planned = {(p.tensor, frozenset(p.consumers)): p for p in points.points}
    non_negative = non_negative_tensors(ir.serde.deserialize_model(float_proto).graph)
    found: dict[str, int] = {}
    whole_grids: dict[str, set[tuple[np.float32, tuple[int, int]]]] = defaultdict(set)
    parts: list[tuple[ActivationGrid, QuantPoint, str]] = []
    quantizer_nodes = {node.name for grid in contents.activations for node in grid.nodes}
    for grid in contents.activations:
        readers = frozenset(edge for edge in grid.edges() if edge[0] not in quantizer_nodes)
        tensor = float_source(grid, contents.activations)
        point = planned.get((tensor, readers))
        if point is None:
            raise ModelError(f"node '{grid.name}': activation quantizer of '{grid.source.name}' is not in the stored plan")
        if grid.bits == point.bits:
            whole_grids[point.group].add((grid.scale, grid.levels))
        else:
            parts.append((grid, point, tensor))
        found[grid.name] = point.bits
    for grid, point, tensor in parts:
        # Only the non-negative part of a grid that another member of its group holds whole.
        whole = grid.planned(point.bits)
        if whole is None or tensor not in non_negative or (grid.scale, whole.levels) not in whole_grids[point.group]:
            raise ModelError(
                f"node '{grid.name}': levels {grid.levels} are not the {point.bits}-bit grid the stored plan gives "
                f"'{grid.source.name}'"
            )
    return found


def float_source(grid: ActivationGrid, grids: Sequence[ActivationGrid]) -> str:
    """The float tensor a grid quantizes, also when it requantizes another grid's output."""
    by_output = {other.output.name: other for other in grids}
    name = grid.source.name
    while name in by_output:
        name = by_output[name].source.name
    return name


def read_model(proto: onnx.ModelProto) -> ir.Model:
    """The QDQ model with each residual join that QDQ insertion added once per grid
    (RecomputeJoinPerGridPass) merged back into one node, so every grid quantizes the
    float tensor the plan names."""
    model = ir.serde.deserialize_model(proto)
    common_passes.CommonSubexpressionEliminationPass()(model)
    return model


def _without_quantizers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The float graph the quantizers were inserted into (weights as their dequantized values)."""
    model = read_model(proto)
    contents = read_quantizers(model.graph)
    # Last first: a grid requantized from another grid's output hands its readers to that
    # output before the other grid hands all of them to the float tensor.
    for grid in reversed(contents.activations):
        grid.output.replace_all_uses_with(grid.source, replace_graph_outputs=True)
        model.graph.remove(grid.nodes, safe=True)
    for constant in contents.constants:
        replace_with_initializer(model.graph, constant, constant.node.outputs[0].name)
    set_standard_opset(model)
    return ir.serde.serialize_model(model)


def replace_with_initializer(graph: ir.Graph, constant: ConstantDequant, name: str) -> ir.Value:
    """Swap a constant DequantizeLinear for an initializer holding its float result."""
    output = constant.node.outputs[0]
    output.name = f"{output.name}.replaced"
    value = new_initializer(graph, name, constant.values)
    output.replace_all_uses_with(value, replace_graph_outputs=True)
    graph.remove(constant.node, safe=True)
    return value


def set_standard_opset(model: ir.Model) -> None:
    """No sub-byte tensor is left, so the opset-25 bump of int2 storage is undone."""
    model.opset_imports[""] = TARGET_OPSET
    model.ir_version = TARGET_IR_VERSION
