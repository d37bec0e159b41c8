"""Compile an ONNX graph into the twin's execution plan, once, at build time.

Everything that does not depend on the input is settled here so a forward pass is a flat
loop over precomputed steps: each node's implementation is resolved for its opset, its
attributes are decoded, constant subgraphs (shape constants, Constant nodes, integer
weights through DequantizeLinear, Shape of an initializer) are evaluated, and the point
after which each intermediate tensor is dead is known.

Initializers split three ways:
- float initializers become parameters (trainable on request), except
- quantizer parameters (scales and zero points of Q/DQ), which are fixed by the bit plan
  and so are constants like
- integer and bool initializers (integer weights, shape constants, Clip bounds).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx
import torch

from ..errors import ModelError, UnsupportedOpError
from .registry import MAX_OPSET, NotSupported, OpFunction, OpImpl, canonical_domain, lookup
from .tensors import FLOAT_TYPES, tensor_from_proto, type_name

log = logging.getLogger(__name__)

QUANTIZER_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

_FIXED_SLOTS = frozenset(
    {
        ("BatchNormalization", 3),
        ("BatchNormalization", 4),
        ("Clip", 1),
        ("Clip", 2),
        ("Pad", 2),
        ("QuantizeLinear", 1),
        ("QuantizeLinear", 2),
        ("DequantizeLinear", 1),
        ("DequantizeLinear", 2),
    }
)
"""(op type, input index) slots whose float initializers are never trained: running
statistics, clipping bounds, pad values and quantizer parameters."""

_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Step:
    """One node, ready to run: its resolved function, decoded attributes and tensor names."""

    node_name: str
    op_type: str
    domain: str
    opset: int
    function: OpFunction
    attributes: Mapping[str, Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...] = ()
    emulated: bool = False
    """Computes what onnxruntime's fused integer kernel computes instead of the node's
    plain semantics (see twin.fusion)."""

    def run(self, inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        return self.function(self.attributes, inputs)


@dataclass(frozen=True)
class GraphProgram:
    """The plan a twin executes: runtime inputs and outputs, steps run at every forward pass,
    and steps that were evaluated once at build time (kept for parity diagnosis)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    steps: tuple[Step, ...]
    folded: tuple[Step, ...]
    tensor_names: frozenset[str]


@dataclass(frozen=True)
class CompiledGraph:
    program: GraphProgram
    parameters: dict[str, torch.Tensor]
    trainable: frozenset[str]
    parameter_types: dict[str, int]
    constants: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _ResolvedNode:
    node: onnx.NodeProto
    name: str
    impl: OpImpl
    opset: int
    attributes: Mapping[str, Any]


_FIRST_IR_WITHOUT_INITIALIZER_INPUTS = 4


def prepare_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with model-local functions inlined and initializers dropped from the graph inputs
    (IR 3 exporters list every initializer as an input; they are still initializers, and the
    copy says IR 4 so onnxruntime accepts them without)."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializer_names = {t.name for t in copy.graph.initializer}
    kept = [value for value in copy.graph.input if value.name not in initializer_names]
    del copy.graph.input[:]
    copy.graph.input.extend(kept)
    copy.ir_version = max(copy.ir_version, _FIRST_IR_WITHOUT_INITIALIZER_INPUTS)
    return copy


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {canonical_domain(entry.domain): entry.version for entry in model.opset_import}


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable stand-in for nameless nodes."""
    return node.name or f"{node.op_type}#{index}"


def check_supported(model: onnx.ModelProto) -> list[_ResolvedNode]:
    """Resolve every node or raise one UnsupportedOpError listing all that cannot run."""
    versions = opsets(model)
    elem_types = _known_elem_types(model)
    resolved: list[_ResolvedNode] = []
    problems: list[str] = []
    for index, node in enumerate(model.graph.node):
        label = node_label(node, index)
        domain = canonical_domain(node.domain)
        opset = versions.get(domain, 1)
        where = f"{node.op_type} node '{label}' ({'ai.onnx' if not domain else domain} opset {opset})"
        impl = lookup(domain, node.op_type, opset)
        if impl is None:
            reason = f"opset above {MAX_OPSET}" if domain == "" and opset > MAX_OPSET else "no implementation"
            problems.append(f"{where}: {reason}")
            continue
        try:
            attributes = _decode_attributes(node)
            if impl.prepare is not None:
                attributes = impl.prepare(node, attributes, [elem_types.get(name) for name in node.input])
        except NotSupported as reason:
            problems.append(f"{where}: {reason}")
            continue
        resolved.append(_ResolvedNode(node, label, impl, opset, types.MappingProxyType(attributes)))
    if problems:
        raise UnsupportedOpError(
            f"the torch twin cannot run {len(problems)} node(s): " + "; ".join(problems),
            hint="re-export the model with standard ONNX ops, or add the op to quanos_onnx/twin/ops",
        )
    return resolved


def compile_graph(model: onnx.ModelProto, *, trainable: bool) -> CompiledGraph:
    """The execution plan, parameters and constants of a prepared, supported model."""
    resolved = _topological(check_supported(model), model)
    initializers = {t.name: t for t in model.graph.initializer}
    if model.graph.sparse_initializer:
        raise ModelError(f"sparse initializer '{model.graph.sparse_initializer[0].values.name}' is not supported")
    parameters, parameter_types, constants, trainable_names = _split_initializers(
        initializers, resolved, trainable=trainable
    )
    inputs = tuple(value.name for value in model.graph.input)
    outputs = tuple(value.name for value in model.graph.output)
    runtime, folded = _fold(resolved, parameters, constants)
    steps = with_releases(runtime, set(outputs))
    names = set(inputs) | set(initializers) | {name for r in resolved for name in r.node.output if name}
    program = GraphProgram(inputs, outputs, tuple(steps), tuple(folded), frozenset(names))
    log.debug("twin plan: %d runtime steps, %d folded, %d parameters", len(steps), len(folded), len(parameters))
    return CompiledGraph(program, parameters, frozenset(trainable_names), parameter_types, constants)


def _decode_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for attribute in node.attribute:
        if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise NotSupported(f"subgraph attribute '{attribute.name}' (control flow) is not implemented")
        if attribute.type == onnx.AttributeProto.SPARSE_TENSOR:
            raise NotSupported(f"sparse tensor attribute '{attribute.name}' is not implemented")
        value = onnx.helper.get_attribute_value(attribute)
        if attribute.type == onnx.AttributeProto.TENSOR:
            try:
                value = tensor_from_proto(value)
            except KeyError:
                raise NotSupported(f"tensor attribute of type {type_name(value.data_type)}") from None
        elif attribute.type == onnx.AttributeProto.STRING:
            value = value.decode("utf-8")
        elif attribute.type == onnx.AttributeProto.STRINGS:
            value = tuple(v.decode("utf-8") for v in value)
        elif isinstance(value, list):
            value = tuple(value)
        decoded[attribute.name] = value
    return decoded


def _known_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every tensor whose type the graph states or Constant nodes fix."""
    graph = model.graph
    known: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            known[value.name] = value.type.tensor_type.elem_type
    for tensor in graph.initializer:
        known[tensor.name] = tensor.data_type
    for node in graph.node:
        if node.op_type == "Constant" and canonical_domain(node.domain) == "":
            for attribute in node.attribute:
                if attribute.name == "value":
                    known[node.output[0]] = attribute.t.data_type
                elif attribute.name in ("value_float", "value_floats"):
                    known[node.output[0]] = onnx.TensorProto.FLOAT
                elif attribute.name in ("value_int", "value_ints"):
                    known[node.output[0]] = onnx.TensorProto.INT64
    return known


def _topological(resolved: list[_ResolvedNode], model: onnx.ModelProto) -> list[_ResolvedNode]:
    """Nodes in an order where every input exists before use (most exports already are)."""
    available = {value.name for value in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered: list[_ResolvedNode] = []
    pending = list(resolved)
    while pending:
        waiting: list[_ResolvedNode] = []
        for item in pending:
            if all(name in available for name in item.node.input):
                ordered.append(item)
                available.update(item.node.output)
            else:
                waiting.append(item)
        if len(waiting) == len(pending):
            item = waiting[0]
            missing = next(name for name in item.node.input if name not in available)
            raise ModelError(f"{item.node.op_type} node '{item.name}' reads '{missing}', which nothing produces")
        pending = waiting
    return ordered


def _split_initializers(
    initializers: Mapping[str, onnx.TensorProto], resolved: Sequence[_ResolvedNode], *, trainable: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, torch.Tensor], set[str]]:
    slots = _consumer_slots(initializers, resolved)
    parameters: dict[str, torch.Tensor] = {}
    parameter_types: dict[str, int] = {}
    constants: dict[str, torch.Tensor] = {}
    trainable_names: set[str] = set()
    for name, proto in initializers.items():
        try:
            tensor = tensor_from_proto(proto)
        except KeyError:
            raise ModelError(
                f"initializer '{name}' has type {type_name(proto.data_type)}, which the twin cannot hold"
            ) from None
        used_in = slots[name]
        quantizer_only = bool(used_in) and all(op in QUANTIZER_OPS and index > 0 for op, index in used_in)
        if proto.data_type not in FLOAT_TYPES or quantizer_only:
            constants[name] = tensor
            continue
        parameters[name] = tensor
        parameter_types[name] = proto.data_type
        if trainable and tensor.numel() > 1 and not used_in & _FIXED_SLOTS:
            trainable_names.add(name)
    return parameters, parameter_types, constants, trainable_names


def _consumer_slots(
    initializers: Mapping[str, onnx.TensorProto], resolved: Sequence[_ResolvedNode]
) -> dict[str, set[tuple[str, int]]]:
    """(op type, input index) of every reader of each initializer, looking through Identity
    nodes (the legacy exporter shares equal initializers between layers through them)."""
    aliases = {name: name for name in initializers}
    for item in resolved:
        if item.node.op_type == "Identity" and item.node.input[0] in aliases:
            aliases[item.node.output[0]] = aliases[item.node.input[0]]
    slots: dict[str, set[tuple[str, int]]] = {name: set() for name in initializers}
    for item in resolved:
        for index, name in enumerate(item.node.input):
            if name in aliases and item.node.op_type != "Identity":
                slots[aliases[name]].add((item.node.op_type, index))
    return slots


def _step(item: _ResolvedNode) -> Step:
    node = item.node
    return Step(
        item.name,
        node.op_type,
        canonical_domain(node.domain),
        item.opset,
        item.impl.function,
        item.attributes,
        tuple(node.input),
        tuple(node.output),
    )


def _fold(
    resolved: Sequence[_ResolvedNode], parameters: Mapping[str, torch.Tensor], constants: dict[str, torch.Tensor]
) -> tuple[list[Step], list[Step]]:
    """Evaluate nodes that depend only on constants (or only on an initializer's shape).

    Results are added to `constants`; parameters are never folded, so their current values
    (after training or load_state_dict) are what every forward pass uses.
    """
    runtime: list[Step] = []
    folded: list[Step] = []
    for item in resolved:
        step = _step(item)
        names = [name for name in step.inputs if name]
        shape_of_initializer = step.op_type in _SHAPE_ONLY_OPS and names[0] in parameters
        if not (all(name in constants for name in names) or shape_of_initializer):
            runtime.append(step)
            continue
        values = [parameters.get(name, constants.get(name)) if name else None for name in step.inputs]
        try:
            with torch.no_grad():
                results = step.run(values)
        except (RuntimeError, ValueError, IndexError, TypeError) as error:
            raise ModelError(f"{step.op_type} node '{step.node_name}' fails on its constant inputs: {error}") from error
        for name, value in zip(step.outputs, results):
            if name:
                constants[name] = value
        folded.append(step)
    return runtime, folded


def with_releases(steps: Sequence[Step], keep: set[str]) -> list[Step]:
    """Attach to each step the intermediates whose last use it is (its own unread outputs
    included), so a forward pass holds only live tensors."""
    last_use: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.outputs:
            if name:
                last_use[name] = index
    for index, step in enumerate(steps):
        for name in step.inputs:
            if name in last_use:
                last_use[name] = index
    releases: dict[int, list[str]] = {}
    for name, index in last_use.items():
        if name not in keep:
            releases.setdefault(index, []).append(name)
    return [replace(step, release=tuple(releases.get(index, ()))) for index, step in enumerate(steps)]
