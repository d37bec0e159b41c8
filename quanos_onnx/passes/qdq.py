"""Materialize an aligned plan as a QDQ model on the exact k-bit grid (DESIGN section 3).

Weights: symmetric per-output-channel integers in an int8 (k <= 8) or int16 container,
values in [-(2^(k-1)-1), 2^(k-1)-1], read through DequantizeLinear; biases of Conv/Gemm as
int32 at scale = input scale x weight scale, as onnxruntime's own quantizer writes them.
Activations: QuantizeLinear -> Clip(integer bounds) -> DequantizeLinear in a uint8
container (zero-point 0 for non-negative tensors, 128 for signed ones), because
onnxruntime fuses DQ -> Conv -> Q into QLinearConv only when that Clip is on uint8; for
k = 9..16 an int16 container behind a float Clip (onnxruntime has no int16 Clip).
Each float tensor gets one QuantizeLinear (its finest grid; other grids requantize from
it, except a residual join's output, which is added again per grid), and a non-negative
tensor in a signed group is stored as the grid's non-negative part from zero-point 0, so
that onnxruntime also fuses residual joins into QLinearAdd.

Storage modes trade speed for file size: `int4` keeps weights of k <= 4 in int4
initializers (opset 21), `int2` also keeps k <= 2 in int2 (opset 25, so the model's opset
is raised only when one is written); onnxruntime's limits with them are in docs/interop.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from ..errors import PlanError, QuanosError, UsageError, arg
from ..layers import NON_NEGATIVE_OPS, Layer
from ..plan import Plan
from .calibrate import Range
from .initializers import shared_initializer
from .points import TRANSPARENT_OPS, QuantPoint, QuantPoints

PLAN_METADATA_KEY = "quanos.plan"
WEIGHT_SOURCE_KEY = "quanos.weight"
"""Node metadata on each weight DequantizeLinear: the float initializer it replaced, so
exports can name the weight as the float model does (onnxruntime.quantization overrides)."""

STORAGES = ("int8", "int4", "int2")
INT2_OPSET = 25
INT2_IR_VERSION = 13
"""int2 tensors exist from opset 25 / IR version 13 on (onnx 1.20)."""


@dataclass(frozen=True)
class ActivationQuantizer:
    """One activation grid: q = clip(round(x / scale) + zero_point) within `levels`."""

    bits: int
    scale: float
    zero_point: int
    signed: bool
    levels: tuple[int, int]

    @property
    def wide(self) -> bool:
        return self.bits > 8

    @property
    def container_range(self) -> tuple[int, int]:
        return (-32768, 32767) if self.wide else (0, 255)

    @property
    def needs_clip(self) -> bool:
        return self.levels != self.container_range

    def for_non_negative(self) -> ActivationQuantizer:
        """The same grid for a tensor that cannot be negative (a Relu output in a signed group).

        Only the signed grid's upper half can occur; stored from zero-point 0 it dequantizes
        to identical values, and onnxruntime drops a Relu in front of a zero-point-0
        quantizer, which is what lets it fuse DQ -> Add -> Relu -> Q into QLinearAdd and a
        Conv -> Relu feeding a residual join into QLinearConv.
        """
        if not self.signed or self.wide:
            return self
        return replace(self, zero_point=0, levels=(0, self.levels[1] - self.zero_point))


def activation_quantizer(bits: int, value_range: Range) -> ActivationQuantizer:
    """Grid for a tensor with the calibrated range; unsigned when the range is >= 0.

    Signed tensors up to 8 bits get an asymmetric grid: 2^k levels spread over exactly
    [low, high], placed in the middle of the uint8 container with the zero point where
    0.0 falls, so no level is wasted on a side the tensor never reaches.
    """
    low, high = min(value_range.low, 0.0), max(value_range.high, 0.0)
    signed = low < 0.0
    levels_count = 2**bits
    if signed and bits <= 8:
        scale = _positive_scale((high - low) / (levels_count - 1))
        first = 128 - levels_count // 2
        zero_point = first + int(round(-low / scale))
        return ActivationQuantizer(bits, scale, zero_point, True, (first, first + levels_count - 1))
    if signed:
        half = levels_count // 2
        scale = _positive_scale(max(-low / half, high / (half - 1)))
        return ActivationQuantizer(bits, scale, 0, True, (-half, half - 1))
    scale = _positive_scale(high / (levels_count - 1))
    zero_point = -32768 if bits > 8 else 0
    return ActivationQuantizer(bits, scale, zero_point, False, (zero_point, zero_point + levels_count - 1))


@dataclass(frozen=True)
class WeightGrid:
    """A layer's weights already on its k-bit grid, chosen by a PTQ stage (clipping search,
    rounding optimization) instead of absmax round-to-nearest; `bias`, when given, replaces
    the float bias (bias correction) before it is quantized to int32."""

    integers: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None


def _positive_scale(scale: float) -> float:
    return float(np.float32(scale)) if scale > 0 else 1.0


def quantize_weight(weight: np.ndarray, bits: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric narrow-range integers and their float32 scale (per channel on `axis`)."""
    limit = 2 ** (bits - 1) - 1
    if axis is None:
        absmax = np.abs(weight).max(keepdims=False)
        scale = np.asarray(absmax / limit, dtype=np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        broadcast = scale
    else:
        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
        absmax = np.abs(weight).max(axis=reduce_axes)
        scale = (absmax / limit).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        broadcast = scale.reshape(shape)
    dtype = np.int8 if bits <= 8 else np.int16
    integers = np.clip(np.round(weight / broadcast), -limit, limit).astype(dtype)
    return integers, scale


def weight_container(bits: int, storage: str) -> np.dtype:
    """The narrowest integer type the storage mode allows for k-bit weights."""
    if storage == "int2" and bits <= 2:
        return ir.DataType.INT2.numpy()
    if storage in ("int4", "int2") and bits <= 4:
        return ir.DataType.INT4.numpy()
    return np.dtype(np.int8 if bits <= 8 else np.int16)


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise UsageError(f"{arg('storage')}: unknown container '{storage}' (use {', '.join(STORAGES)})")
    return storage


class QDQInsertionPass(ir.passes.InPlacePass):
    """Insert weight DQs, int32 biases and activation Q/Clip/DQ chains for one plan.

    A float tensor with several grids (a block input read by its first conv at that conv's
    bits and by the residual join at the join's) is quantized once, on its finest grid; the
    other grids requantize that one (DQ -> Q -> Clip -> DQ). Every consumer still reads its
    own exact grid, and the float tensor has a single QuantizeLinear: the shape onnxruntime
    needs to fuse its producer into QLinearConv / QLinearAdd.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        plan: Plan,
        points: QuantPoints,
        quantizers: Mapping[str, ActivationQuantizer],
        storage: str = "int8",
        weight_grids: Mapping[str, WeightGrid] | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.plan = plan
        self.points = points
        self.quantizers = quantizers
        self.storage = check_storage(storage)
        self.weight_grids = dict(weight_grids or {})

    def requires(self, model: ir.Model) -> None:
        missing = {p.group for p in self.points.points} - set(self.quantizers)
        if missing:
            raise ir.passes.PreconditionError(f"no calibrated range for {sorted(missing)[0]}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        values = _values(graph)
        input_scale: dict[str, float] = {}
        group_of_edge = {edge: p.group for p in self.points.points for edge in p.consumers}
        non_negative = non_negative_tensors(graph)
        for tensor, points in _points_by_tensor(self.points.points).items():
            finest: ir.Value | None = None
            for point in sorted(points, key=lambda p: (self.quantizers[p.group].scale, -p.bits, p.group)):
                quantizer = self.quantizers[point.group]
                source = values[tensor] if finest is None else finest
                if tensor in non_negative:
                    quantizer = quantizer.for_non_negative()
                clip = not _already_on_grid(source, point.group, group_of_edge)
                dequantized = self._insert_activation(graph, source, point, quantizer, clip=clip)
                finest = finest or dequantized
                for node_name, index in point.consumers:
                    nodes[node_name].replace_input_with(index, dequantized)
                    if index == 0:
                        input_scale[node_name] = quantizer.scale
        entries = self.plan.by_name()
        for layer in self.layers:
            entry = entries.get(layer.name)
            if entry is None or not entry.quantized:
                continue
            node = nodes[layer.name]
            self._quantize_weight(graph, node, layer, entry.weight_bits, input_scale.get(layer.name))
        return ir.passes.PassResult(model, True)

    def _insert_activation(
        self,
        graph: ir.Graph,
        value: ir.Value,
        point: QuantPoint,
        quantizer: ActivationQuantizer,
        *,
        clip: bool = True,
    ) -> ir.Value:
        base = point.name
        container = np.int16 if quantizer.wide else np.uint8
        scale = shared_initializer(graph, f"{base}_scale", np.asarray(quantizer.scale, dtype=np.float32))
        zero_point = shared_initializer(graph, f"{base}_zero_point", np.asarray(quantizer.zero_point, dtype=container))
        created: list[ir.Node] = []
        source = value
        if clip and quantizer.wide and quantizer.needs_clip:
            low, high = (
                np.asarray((level - quantizer.zero_point) * quantizer.scale, dtype=np.float32)
                for level in quantizer.levels
            )
            created.append(
                ir.node(
                    "Clip",
                    [source, shared_initializer(graph, f"{base}_min", low), shared_initializer(graph, f"{base}_max", high)],
                    name=f"{base}/Clip",
                )
            )
            source = created[-1].outputs[0]
            source.name = f"{base}_clipped"
        created.append(ir.node("QuantizeLinear", [source, scale, zero_point], name=f"{base}/QuantizeLinear"))
        quantized = created[-1].outputs[0]
        quantized.name = f"{base}_quantized"
        if clip and not quantizer.wide and quantizer.needs_clip:
            low, high = (np.asarray(level, dtype=container) for level in quantizer.levels)
            created.append(
                ir.node(
                    "Clip",
                    [quantized, shared_initializer(graph, f"{base}_qmin", low), shared_initializer(graph, f"{base}_qmax", high)],
                    name=f"{base}/Clip",
                )
            )
            quantized = created[-1].outputs[0]
            quantized.name = f"{base}_clipped"
        created.append(ir.node("DequantizeLinear", [quantized, scale, zero_point], name=f"{base}/DequantizeLinear"))
        dequantized = created[-1].outputs[0]
        dequantized.name = f"{base}_dequantized"
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, created)
        else:
            graph.insert_before(graph.node(0), created)
        return dequantized

    def _quantize_weight(
        self, graph: ir.Graph, node: ir.Node, layer: Layer, bits: int, input_scale: float | None
    ) -> None:
        weight_value = node.inputs[1]
        if weight_value is None or weight_value.const_value is None:
            raise PlanError(f"layer '{layer.name}': weight '{layer.weight}' is not a constant")
        weight = weight_value.const_value.numpy().astype(np.float32)
        grid = self.weight_grids.get(layer.name)
        if grid is None:
            integers, scale = quantize_weight(weight, bits, layer.weight_axis)
        else:
            integers, scale = _checked_grid(layer, grid, weight.shape, bits)
        integers = integers.astype(weight_container(bits, self.storage))
        base = f"{layer.name}.weight_w{bits}"
        dequantized = _dequantize(graph, base, integers, scale, layer.weight_axis)
        dequantized.producer().metadata_props[WEIGHT_SOURCE_KEY] = weight_value.name
        node.replace_input_with(1, dequantized)
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_value is None or bias_value.const_value is None or input_scale is None:
            return
        bias = bias_value.const_value.numpy().astype(np.float64)
        if grid is not None and grid.bias is not None:
            bias = np.asarray(grid.bias, dtype=np.float64).reshape(bias.shape)
        bias_scale = (input_scale * scale.astype(np.float64)).astype(np.float32)
        bias_scale = np.where(bias_scale > 0, bias_scale, np.float32(1.0)).astype(np.float32)
        # Wide layers (int16 weights and activations) have scales so fine that the bias
        # can overflow int32 at input scale x weight scale; those channels get a coarser
        # bias scale (still far below one activation step). A float bias is no option:
        # onnxruntime's optimizer then changes the results of int16 models.
        limit = float(2**30)
        bias_scale = np.maximum(bias_scale, (np.abs(bias) / limit).astype(np.float32)).astype(np.float32)
        bias_integers = np.round(bias / bias_scale).astype(np.int32)
        bias_axis = 0 if bias_scale.ndim else None
        node.replace_input_with(2, _dequantize(graph, f"{layer.name}.bias_i32", bias_integers, bias_scale, bias_axis))


def _checked_grid(layer: Layer, grid: WeightGrid, shape: tuple[int, ...], bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A PTQ stage's grid, refused unless it is the exact k-bit grid of this weight."""
    limit = 2 ** (bits - 1) - 1
    integers = np.asarray(grid.integers)
    if integers.shape != shape:
        raise PlanError(f"layer '{layer.name}': weight grid of shape {list(integers.shape)}, weight is {list(shape)}")
    if not np.array_equal(integers, np.round(integers)) or np.abs(integers).max(initial=0) > limit:
        raise PlanError(f"layer '{layer.name}': weight grid is not on the {bits}-bit integers -{limit}..{limit}")
    scale = np.asarray(grid.scale, dtype=np.float32)
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise PlanError(f"layer '{layer.name}': weight grid scale must be finite and positive")
    return integers.astype(np.int8 if bits <= 8 else np.int16), scale


class RecomputeJoinPerGridPass(ir.passes.InPlacePass):
    """A residual join's output needed on a second grid is computed again for that grid.

    The second grid of a tensor is normally requantized from the first (DQ -> Q -> Clip ->
    DQ), which onnxruntime runs in float. When the tensor is a join, Add(DQ a, DQ b) with an
    optional Relu after it, adding again for the second grid lets onnxruntime run both sums
    as QLinearAdd, and quantizes each grid from the exact sum instead of from the other grid.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for quantize in [node for node in graph if node.op_type == "QuantizeLinear"]:
            chain = _requantized_join(quantize)
            if chain is None:
                continue
            source = chain[0].inputs
            grid = quantize.name.rsplit("/", 1)[0]
            clones = []
            for node in chain:
                clone = ir.node(node.op_type, list(source), dict(node.attributes), name=f"{node.name}/{grid}")
                clone.outputs[0].name = f"{node.outputs[0].name}/{grid}"
                clones.append(clone)
                source = clone.outputs
            graph.insert_after(chain[-1], clones)
            quantize.replace_input_with(0, clones[-1].outputs[0])
            modified = True
        return ir.passes.PassResult(model, modified)


def _requantized_join(quantize: ir.Node) -> list[ir.Node] | None:
    """[Add] or [Add, Relu] when `quantize` requantizes a DQ'd join output, else None."""
    dequantize = quantize.inputs[0].producer() if quantize.inputs[0] is not None else None
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    node = dequantize.inputs[0].producer()
    while node is not None and node.op_type == "Clip":
        node = node.inputs[0].producer()
    if node is None or node.op_type != "QuantizeLinear":
        return None
    chain: list[ir.Node] = []
    node = node.inputs[0].producer()
    if node is not None and node.op_type == "Relu":
        chain.append(node)
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Add" or node.domain not in ("", "ai.onnx"):
        return None
    operands = [value.producer() if value is not None else None for value in node.inputs]
    if any(producer is None or producer.op_type != "DequantizeLinear" for producer in operands):
        return None
    return [node, *chain]


def _dequantize(
    graph: ir.Graph, base: str, integers: np.ndarray, scale: np.ndarray, axis: int | None
) -> ir.Value:
    zero = np.zeros(scale.shape, dtype=integers.dtype)
    inputs = [
        shared_initializer(graph, f"{base}_quantized", integers),
        shared_initializer(graph, f"{base}_scale", scale),
        shared_initializer(graph, f"{base}_zero_point", zero),
    ]
    attributes = {"axis": axis} if axis is not None and scale.ndim == 1 else None
    node = ir.node("DequantizeLinear", inputs, attributes, name=f"{base}/DequantizeLinear")
    graph.insert_before(graph.node(0), node)
    node.outputs[0].name = f"{base}_dequantized"
    return node.outputs[0]


def _already_on_grid(value: ir.Value, group: str, group_of_edge: Mapping[tuple[str, int], str]) -> bool:
    """True for the output of a transparent op (MaxPool, Slice, zero Pad, ...) whose input is
    read through the same quantizer: its values are on the grid and within its levels
    already, so its own Q -> DQ needs no Clip (and onnxruntime runs the op on uint8)."""
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type in TRANSPARENT_OPS
        and group_of_edge.get((producer.name, 0)) == group
    )


def non_negative_tensors(graph: ir.Graph) -> set[str]:
    """Tensors that cannot be negative: outputs of Relu-like ops, and of data movement
    (Slice, MaxPool, non-negative Pad, ...) applied to such a tensor. Found before any
    insertion, so the answer does not depend on the order the quantizers go in."""
    found: set[str] = set()
    for node in graph:
        if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            continue
        if node.op_type in NON_NEGATIVE_OPS or (
            node.op_type in TRANSPARENT_OPS and node.inputs[0].name in found and _pads_non_negative(node)
        ):
            found.update(output.name for output in node.outputs)
    return found


def _pads_non_negative(node: ir.Node) -> bool:
    if node.op_type != "Pad" or len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    value = node.inputs[2].const_value
    return value is not None and bool(np.all(value.numpy() >= 0))


def _points_by_tensor(points: Sequence[QuantPoint]) -> dict[str, list[QuantPoint]]:
    grouped: dict[str, list[QuantPoint]] = {}
    for point in points:
        grouped.setdefault(point.tensor, []).append(point)
    return grouped


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    found.update(graph.initializers)
    for node in graph:
        for output in node.outputs:
            found[output.name] = output
    return found


def insert_qdq(
    proto: onnx.ModelProto,
    layers: Sequence[Layer],
    plan: Plan,
    points: QuantPoints,
    quantizers: Mapping[str, ActivationQuantizer],
    *,
    storage: str = "int8",
    weight_grids: Mapping[str, WeightGrid] | None = None,
) -> onnx.ModelProto:
    """The QDQ model for an aligned, calibrated plan, cleaned up and with the plan attached.

    `weight_grids` (layer name -> grid) overrides absmax round-to-nearest for those layers.
    """
    model = ir.serde.deserialize_model(proto)
    passes = ir.passes.Sequential(
        QDQInsertionPass(layers, plan, points, quantizers, storage, weight_grids),
        RecomputeJoinPerGridPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    )
    try:
        passes(model)
    except ir.passes.PassError as error:
        # onnx_ir wraps what a pass raised in a message naming pass objects; the user's
        # error is the one the pass raised.
        if isinstance(error.__cause__, QuanosError):
            raise error.__cause__ from None
        raise
    if any(v.dtype == ir.DataType.INT2 for v in model.graph.initializers.values()):
        model.opset_imports[""] = INT2_OPSET
        model.ir_version = max(model.ir_version, INT2_IR_VERSION)
    model.metadata_props[PLAN_METADATA_KEY] = plan.dumps()
    result = ir.serde.serialize_model(model)
    del result.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(result)
