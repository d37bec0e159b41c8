"""Where the activation quantizers of a plan go, before any node is inserted.

Each quantizer is one (tensor, bits) point with a set of consumer edges that read its
quantized value; points that must share one scale (the operands of a join, and the two
ends of a quantization-transparent chain such as Relu -> MaxPool -> Conv) form a group.
Keeping this analysis apart from the insertion makes both small and lets calibration ask
for exactly the tensors it needs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..layers import Layer
from ..plan import Plan

TRANSPARENT_OPS = frozenset(
    {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Pad"}
)
"""Ops that map a quantization grid onto itself (max, data movement, zero padding): a
quantizer after them may also sit before them, with the same scale, without changing any
value. That gives onnxruntime the Q right after each Conv that QLinearConv fusion needs."""

Edge = tuple[str, int]
Key = tuple[str, int, str]
"""(tensor, bits, owner): owner is '' for layer quantizers and the join's name for the
quantizer its operands share, so a tensor that is both a layer's input and a join operand
(ResNet's post-Relu identity shortcut) keeps its own unsigned grid for the layer instead of
inheriting the join's signed one."""


@dataclass(frozen=True)
class QuantPoint:
    tensor: str
    bits: int
    owner: str
    group: str
    consumers: tuple[Edge, ...]

    @property
    def name(self) -> str:
        """Prefix for the names of the nodes and initializers this quantizer adds."""
        suffix = f"@{self.owner}" if self.owner else ""
        return f"{self.tensor}_q{self.bits}{suffix}"


@dataclass(frozen=True)
class QuantGroup:
    name: str
    bits: int
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class QuantPoints:
    points: tuple[QuantPoint, ...]
    groups: tuple[QuantGroup, ...]

    def tensors(self) -> list[str]:
        return sorted({p.tensor for p in self.points})


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Key, Key] = {}

    def find(self, key: Key) -> Key:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: Key, b: Key) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def plan_points(proto: onnx.ModelProto, layers: Sequence[Layer], plan: Plan) -> QuantPoints:
    """Assign every consumer edge that must read a quantized value to a quantizer point."""
    graph = _Edges(proto)
    entries = plan.by_name()
    assigned: dict[Edge, Key] = {}
    groups = _UnionFind()
    for layer in layers:
        entry = entries.get(layer.name)
        if entry is not None and entry.quantized:
            assigned[(layer.name, 0)] = (layer.input, entry.act_bits, "")
    for join in plan.joins:
        operand_bits = plan.operand_bits(join)
        if operand_bits is None:
            continue
        node = graph.node(join.name)
        keys = []
        for index, name in enumerate(node.input):
            if name in join.operands:
                key = (name, operand_bits, join.name)
                assigned[(node.name, index)] = key
                keys.append(key)
        for key in keys[1:]:
            groups.union(keys[0], key)
    _propagate(graph, assigned, groups)
    for layer in layers:
        entry = entries.get(layer.name)
        if entry is None or not entry.quantized or layer.block_output in graph.graph_outputs:
            continue
        for edge in graph.consumers[layer.block_output]:
            assigned.setdefault(edge, (layer.block_output, entry.act_bits, ""))
    _propagate(graph, assigned, groups)
    return _collect(assigned, groups)


def output_readers(proto: onnx.ModelProto, layers: Sequence[Layer], name: str) -> tuple[str, ...]:
    """The layers that read layer `name`'s output: its block output, or that tensor after
    transparent ops (ResNet's stem Relu -> MaxPool -> Conv), in graph order.

    Their input quantizers are where the output of `name` is quantized (a layer's output is
    quantized by its consumers), so pinning their input bits is how a plan puts that output
    on a grid of its own (plan.FirstOutputBits)."""
    graph = _Edges(proto)
    by_name = {layer.name: layer for layer in layers}
    reached, frontier = set(), [by_name[name].block_output]
    while frontier:
        tensor = frontier.pop()
        reached.add(tensor)
        for node_name, _ in graph.consumers[tensor]:
            node = graph.node(node_name)
            if graph.transparent(node) and node.input[0] == tensor and node.output[0] not in reached:
                frontier.append(node.output[0])
    return tuple(layer.name for layer in layers if layer.name != name and layer.input in reached)


class _Edges:
    def __init__(self, proto: onnx.ModelProto) -> None:
        self.nodes = {node.name: node for node in proto.graph.node}
        self.producer = {out: node for node in proto.graph.node for out in node.output}
        self.graph_outputs = {o.name for o in proto.graph.output}
        self.initializers = {t.name: t for t in proto.graph.initializer}
        self.consumers: dict[str, list[Edge]] = defaultdict(list)
        for node in proto.graph.node:
            for index, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node.name, index))

    def node(self, name: str) -> onnx.NodeProto:
        return self.nodes[name]

    def transparent(self, node: onnx.NodeProto) -> bool:
        if node.op_type not in TRANSPARENT_OPS or len(node.output) != 1:
            return False
        if node.op_type == "Pad":
            return self._zero_padding(node)
        return True

    def _zero_padding(self, node: onnx.NodeProto) -> bool:
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        if mode != b"constant":
            return False
        if len(node.input) < 3 or not node.input[2]:
            return True
        value = self.initializers.get(node.input[2])
        return value is not None and not np.any(onnx.numpy_helper.to_array(value))


def _propagate(graph: _Edges, assigned: dict[Edge, Key], groups: _UnionFind) -> None:
    """Move quantizers up through transparent ops whose output is only read quantized."""
    changed = True
    while changed:
        changed = False
        for tensor in {key[0] for key in assigned.values()}:
            producer = graph.producer.get(tensor)
            if producer is None or not graph.transparent(producer) or tensor in graph.graph_outputs:
                continue
            keys = {assigned.get(edge) for edge in graph.consumers[tensor]}
            if len(keys) != 1 or None in keys:
                continue
            key = keys.pop()
            upstream = (producer.input[0], key[1], key[2])
            edge = (producer.name, 0)
            if assigned.get(edge) == upstream:
                continue
            assigned[edge] = upstream
            groups.union(key, upstream)
            changed = True


def _collect(assigned: dict[Edge, Key], groups: _UnionFind) -> QuantPoints:
    by_key: dict[Key, list[Edge]] = defaultdict(list)
    for edge, key in sorted(assigned.items()):
        by_key[key].append(edge)
    members: dict[Key, list[str]] = defaultdict(list)
    points = []
    for key in sorted(by_key):
        root = groups.find(key)
        members[root].append(key[0])
        points.append(QuantPoint(key[0], key[1], key[2], _group_name(root), tuple(by_key[key])))
    quant_groups = tuple(
        QuantGroup(_group_name(root), root[1], tuple(sorted(set(names))))
        for root, names in sorted(members.items())
    )
    return QuantPoints(tuple(points), quant_groups)


def _group_name(key: Key) -> str:
    return f"{key[0]}@{key[1]}" + (f"@{key[2]}" if key[2] else "")
