"""The quantizable layers of a normalized model, their blocks and the residual joins.

A read-only view: every later stage (ANS capture, bit allocation, QDQ insertion, the
hardware model) asks this module what a layer is, so they all agree on names, shapes and
which tensor is "the layer's activation" in the paper's sense.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import onnx

from .errors import ModelError
from .model import data_dependent_tensors, infer_shapes

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

ACTIVATION_OPS = frozenset(
    {
        "Relu",
        "Clip",
        "LeakyRelu",
        "HardSigmoid",
        "HardSwish",
        "Sigmoid",
        "Tanh",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "PRelu",
        "Gelu",
        "Mish",
    }
)
"""Elementwise activations that belong to the block of the layer they follow."""

NON_NEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softplus"})
"""Ops whose output is never negative (unsigned activation quantizers fit them)."""


@dataclass(frozen=True)
class Layer:
    """One quantizable layer: a Conv/ConvTranspose/Gemm/MatMul with a constant weight.

    Shapes are per sample with the batch dim set to 1. `block_output` is the tensor the
    paper calls the layer's activation a^l: the node's output after a following bias Add,
    BatchNormalization and elementwise activation, when each follows directly and alone.
    """

    name: str
    op: str
    weight: str
    bias: str | None
    input: str
    output: str
    block_output: str
    block_nodes: tuple[str, ...]
    weight_shape: tuple[int, ...]
    weight_axis: int | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    groups: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    in_features: int
    out_features: int
    params: int
    macs: int
    is_output: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Join:
    """An Add or Concat of two or more computed tensors (a residual or branch merge)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    downstream_layers: tuple[str, ...]
    shortcut_layers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class _Graph:
    """Producer/consumer indexes over a GraphProto."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.shapes = _shapes(proto)
        self.order = {node.name: index for index, node in enumerate(self.nodes)}

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.graph_outputs:
            return None
        return users[0]

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.initializers

    def shape(self, tensor: str, context: str) -> tuple[int, ...]:
        shape = self.shapes.get(tensor)
        if shape is None or any(d is None for d in shape[1:]):
            raise ModelError(
                f"layer '{context}': the shape of tensor '{tensor}' cannot be inferred",
                hint="fix its dynamic input dims with --input-shape (API: input_shape), e.g. 3x224x224",
            )
        return (1, *shape[1:]) if shape else ()


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Inferred shapes at batch 1, so flattening Reshapes resolve their -1."""
    proto = batch_one(proto)
    shapes: dict[str, tuple[int | None, ...]] = {}
    infos = [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]
    for info in infos:
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[info.name] = tuple(
            d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
        )
    for tensor in proto.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def batch_one(proto: onnx.ModelProto) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    if not dims or dims[0].HasField("dim_value"):
        return proto
    dims[0].dim_value = 1
    del fixed.graph.value_info[:]
    for output in fixed.graph.output:
        output.type.tensor_type.ClearField("shape")
    return infer_shapes(fixed)


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def list_layers(proto: onnx.ModelProto) -> tuple[Layer, ...]:
    """Every quantizable layer in graph order; the model must be normalized (model.py)."""
    graph = _Graph(proto)
    layers = [
        layer
        for node in graph.nodes
        if node.op_type in LAYER_OPS and node.domain in ("", "ai.onnx")
        for layer in [_make_layer(node, graph)]
        if layer is not None
    ]
    return tuple(_mark_output_layer(layers, graph))


def _weight_input(node: onnx.NodeProto, graph: _Graph) -> tuple[str, str] | None:
    """(activation, weight) names, or None when the node has no constant weight."""
    if len(node.input) < 2:
        return None
    activation, weight = node.input[0], node.input[1]
    if not graph.is_constant(weight) or graph.is_constant(activation):
        return None
    if node.op_type in ("Gemm", "MatMul") and len(graph.initializers[weight].dims) != 2:
        return None
    return activation, weight


def _make_layer(node: onnx.NodeProto, graph: _Graph) -> Layer | None:
    names = _weight_input(node, graph)
    if names is None:
        return None
    activation, weight = names
    weight_shape = tuple(int(d) for d in graph.initializers[weight].dims)
    input_shape = graph.shape(activation, node.name)
    output_shape = graph.shape(node.output[0], node.name)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    block_nodes, block_output, block_bias = _block(node, graph)
    bias = bias or block_bias
    bias_size = math.prod(graph.initializers[bias].dims) if bias else 0
    geometry = _geometry(node, weight_shape, input_shape, output_shape)
    return Layer(
        name=node.name,
        op=node.op_type,
        weight=weight,
        bias=bias,
        input=activation,
        output=node.output[0],
        block_output=block_output,
        block_nodes=block_nodes,
        weight_shape=weight_shape,
        input_shape=input_shape,
        output_shape=output_shape,
        params=math.prod(weight_shape) + int(bias_size),
        is_output=False,
        **geometry,
    )


def _geometry(
    node: onnx.NodeProto,
    weight_shape: tuple[int, ...],
    input_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
) -> dict[str, object]:
    """Channels, kernel, strides, the per-channel weight axis and MACs per sample."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        groups = int(_attribute(node, "group", 1))
        kernel = tuple(int(k) for k in weight_shape[2:])
        strides = tuple(int(s) for s in _attribute(node, "strides", [1] * len(kernel)))
        if op == "Conv":
            in_features, out_features = weight_shape[1] * groups, weight_shape[0]
            macs = math.prod(output_shape[1:]) * weight_shape[1] * math.prod(kernel)
            axis: int | None = 0
        else:
            in_features, out_features = weight_shape[0], weight_shape[1] * groups
            macs = math.prod(input_shape[1:]) * weight_shape[1] * math.prod(kernel)
            axis = 1 if groups == 1 else None
        return dict(
            groups=groups, kernel=kernel, strides=strides, weight_axis=axis,
            in_features=in_features, out_features=out_features, macs=macs,
        )
    if op == "Gemm":
        transposed = bool(_attribute(node, "transB", 0))
        out_features, in_features = weight_shape if transposed else weight_shape[::-1]
        return dict(
            groups=1, kernel=(), strides=(), weight_axis=0 if transposed else 1,
            in_features=in_features, out_features=out_features,
            macs=in_features * out_features,
        )
    in_features, out_features = weight_shape
    rows = math.prod(input_shape[1:-1]) if len(input_shape) > 2 else 1
    return dict(
        groups=1, kernel=(), strides=(), weight_axis=1,
        in_features=in_features, out_features=out_features,
        macs=rows * in_features * out_features,
    )


def _block(node: onnx.NodeProto, graph: _Graph) -> tuple[tuple[str, ...], str, str | None]:
    """Follow bias Add -> BatchNormalization -> activation, each only if it is the sole user."""
    tensor = node.output[0]
    members: list[str] = []
    bias: str | None = None
    stages = ("bias", "norm", "activation")
    stage = 0
    while stage < len(stages):
        user = graph.sole_consumer(tensor)
        if user is None:
            break
        kind = _block_stage(user, tensor, graph)
        if kind is None or stages.index(kind) < stage:
            break
        if kind == "bias":
            bias = next(name for name in user.input if name != tensor)
        members.append(user.name)
        tensor = user.output[0]
        stage = stages.index(kind) + 1
    return tuple(members), tensor, bias


def _block_stage(user: onnx.NodeProto, tensor: str, graph: _Graph) -> str | None:
    if user.op_type == "Add" and len(user.input) == 2:
        other = user.input[1] if user.input[0] == tensor else user.input[0]
        return "bias" if graph.is_constant(other) else None
    if user.op_type == "BatchNormalization" and user.input[0] == tensor:
        return "norm"
    if user.op_type in ACTIVATION_OPS and user.input[0] == tensor:
        return "activation"
    return None


def _mark_output_layer(layers: list[Layer], graph: _Graph) -> list[Layer]:
    """The layers whose block reaches a graph output without passing through another layer."""
    reaching = _tensors_reaching_output(graph, {layer.name for layer in layers})
    return [replace(layer, is_output=layer.block_output in reaching) for layer in layers]


def _tensors_reaching_output(graph: _Graph, stop_nodes: set[str]) -> set[str]:
    """Tensors from which a graph output is reached through non-layer nodes only.

    One pass over the nodes in reverse graph order (linear; a search per layer was
    quadratic on deep residual graphs, docs/benchmarks.md).
    """
    reaching = set(graph.graph_outputs)
    for node in reversed(graph.nodes):
        if node.name in stop_nodes or not any(out in reaching for out in node.output):
            continue
        reaching.update(name for name in node.input if name)
    return reaching


def find_joins(proto: onnx.ModelProto, layers: Sequence[Layer]) -> tuple[Join, ...]:
    """Add/Concat nodes merging two or more computed tensors, with the layers they feed.

    The downstream layers are the layers reached from the join's output through nodes
    that are neither layers nor joins, in graph order; the first quantized one sets the
    join's bits.
    """
    graph = _Graph(proto)
    live = data_dependent_tensors(proto)
    by_input: dict[str, list[Layer]] = defaultdict(list)
    for layer in layers:
        by_input[layer.input].append(layer)
    layer_nodes = {layer.name for layer in layers}
    depth = _layer_depths(graph, layer_nodes)
    by_block_output = {layer.block_output: layer.name for layer in layers}
    join_nodes = [
        node
        for node in graph.nodes
        if node.op_type in ("Add", "Concat") and sum(name in live for name in node.input) >= 2
    ]
    stop_nodes = layer_nodes | {node.name for node in join_nodes}
    joins = []
    for node in join_nodes:
        computed = [name for name in node.input if name in live]
        downstream = _downstream_layers(node.output[0], graph, by_input, stop_nodes)
        feeding = [by_block_output[t] for t in computed if t in by_block_output]
        deepest = max((depth[name] for name in feeding), default=0)
        only_for_join = {
            by_block_output[t] for t in computed if t in by_block_output and graph.sole_consumer(t) is node
        }
        joins.append(
            Join(
                name=node.name,
                op=node.op_type,
                inputs=tuple(computed),
                output=node.output[0],
                downstream_layers=tuple(downstream),
                shortcut_layers=tuple(
                    n for n in feeding if depth[n] < deepest and n in only_for_join
                ),
            )
        )
    return tuple(joins)


def _layer_depths(graph: _Graph, layer_nodes: set[str]) -> dict[str, int]:
    """The number of layers on the longest path from the input to each layer (inclusive).

    Of the layers feeding a join only, the shallower ones are its projection shortcuts.
    """
    tensor_depth: dict[str, int] = {}
    depths: dict[str, int] = {}
    for node in graph.nodes:
        upstream = max((tensor_depth.get(name, 0) for name in node.input if name), default=0)
        here = upstream + 1 if node.name in layer_nodes else upstream
        if node.name in layer_nodes:
            depths[node.name] = here
        for name in node.output:
            tensor_depth[name] = here
    return depths


def _downstream_layers(
    tensor: str,
    graph: _Graph,
    by_input: Mapping[str, list[Layer]],
    stop_nodes: set[str],
) -> list[str]:
    """Layers reached from `tensor` through nodes that are neither layers nor joins.

    The search stops at the next join as well: what lies beyond it is that join's own
    downstream, and stopping keeps the total work linear in the graph's size.
    """
    found: set[str] = set()
    pending, seen = [tensor], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        found.update(layer.name for layer in by_input.get(current, []))
        for user in graph.consumers.get(current, []):
            if user.name not in stop_nodes:
                pending.extend(user.output)
    return sorted(found, key=lambda name: graph.order[name])


def layer_table(layers: Sequence[Layer]) -> list[dict[str, object]]:
    """Rows for `quanos layers`: what a user needs to pick bits by hand."""
    return [
        {
            "layer": layer.name,
            "op": layer.op,
            "weight": "x".join(str(d) for d in layer.weight_shape),
            "input": "x".join(str(d) for d in layer.input_shape[1:]),
            "output": "x".join(str(d) for d in layer.output_shape[1:]),
            "groups": layer.groups,
            "params": layer.params,
            "macs": layer.macs,
            "block": "+".join(layer.block_nodes) or "-",
            "output_layer": layer.is_output,
        }
        for layer in layers
    ]


def spatial_pads(
    attrs: Mapping[str, Any], sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis of a Conv-like node, resolving auto_pad against the
    input sizes as onnxruntime does (`attrs`: the decoded attributes: the twin's ops and bias
    correction share it)."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, extent, stride, dilation in zip(sizes, kernel, strides, dilations):
            total = max((math.ceil(size / stride) - 1) * stride + (extent - 1) * dilation + 1 - size, 0)
            small = total // 2
            pads.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return pads
    if auto_pad == "VALID":
        return [(0, 0)] * len(kernel)
    flat = attrs.get("pads", [0] * (2 * len(kernel)))
    return list(zip(flat[: len(kernel)], flat[len(kernel) :]))
