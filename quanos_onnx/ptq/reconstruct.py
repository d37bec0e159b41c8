"""Rounding optimization through the twin: AdaRound layer by layer, BRECQ/QDrop by block.

Round-to-nearest puts each weight on the nearest point of its k-bit grid, which is the
best choice per weight but not per layer: at 2-4 bits the rounding errors of one output
channel add up. AdaRound (Nagel et al., ICML 2020) keeps the grid (the quantized model's
weight scales) and learns, per weight, whether to round down or up so that the layer's
output matches the float model's. BRECQ (Li et al., ICLR 2021) reconstructs residual
blocks as a whole, so errors that cancel across a block's layers are allowed to, and
QDrop (Wei et al., ICLR 2022) feeds each block a random elementwise mix of the float and
the quantized activation during that reconstruction, which makes the rounding robust to
the activation noise it will meet.

The quantized model runs in the torch twin: each reconstructed layer's weight
DequantizeLinear is replaced by a graph input fed with the soft-rounded weight
`scale * clip(floor(W / scale) + h(V))`, h the rectified sigmoid, so activation Q/DQ
nodes inside a block stay exactly the deployed quantizers (straight-through gradients).
Units are reconstructed in graph order against the float model's output for the float
input (asymmetric reconstruction, as all three papers do); each unit's quantized input
comes from the quantized model with the units before it already rounded. The choices
and their measurements are in docs/quantization.md, "Rounding optimization".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError, UsageError
from ..layers import ACTIVATION_OPS, Join, Layer, find_joins
from ..model import data_dependent_tensors
from ..passes.qdq import WeightGrid
from ..plan import Plan
from ..progress import ProgressFactory, no_progress

if TYPE_CHECKING:
    import torch

    from ..twin import OnnxTwin

log = logging.getLogger(__name__)

METHODS = ("adaround", "brecq")
DEFAULT_ITERATIONS = 500
"""Adam steps per layer (adaround) or block (brecq) for callers to default to; chosen on
ResNet-20 by measurement (docs/benchmarks.md)."""
BATCH_SIZE = 32
MAX_SAMPLES = 1024
"""The first calibration samples are used, at most this many: each unit keeps its inputs
and target for all of them in memory."""
ROUNDING_TRAVEL = 5.0
"""How far (in logits) Adam can move each rounding variable over a unit's run: a weight
whose fractional part is 0.1 starts at logit -2.2 and must cross 0 to round up. The papers'
1e-3 over 10-20k steps gives 10-20; at this tool's 500 steps it gave 0.5, so only weights
within a few hundredths of a half could flip (ResNet-20 W4A4 BRECQ: 86.6% at 1e-3, 88.2%
at 1e-2; docs/benchmarks.md)."""
MIN_LEARNING_RATE, MAX_LEARNING_RATE = 1e-3, 1e-2
REGULARIZER_WEIGHT = 0.01
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2
"""Fraction of the iterations before the rounding regularizer starts (AdaRound, BRECQ)."""
DROP_PROBABILITY = 0.5
"""QDrop: chance that an element of a block's input is the float activation."""
ZETA, GAMMA = 1.1, -0.1
"""The rectified sigmoid's stretch: h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)."""
COLLECT_BATCH = 32
"""Samples per onnxruntime run when gathering unit data: the session returns every
activation of the units for the chunk at once and its arena keeps the peak, so memory grows
with the chunk (EfficientNet-Lite0, 128 samples in one chunk of 128: 12.7 GB resident,
killed for memory on the 23 GB VM, docs/benchmarks.md)."""
ERROR_SAMPLES = 256
"""Samples on which the log reports each unit's output error before and after."""

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Clip"})


@dataclass(frozen=True)
class Unit:
    """One reconstruction step: the quantized `layers` between the float tensors `input`
    and `output`, whose rounding is optimized together."""

    label: str
    input: str
    output: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class RoundedWeight:
    """A layer's float weight and the k-bit grid the quantized model put it on."""

    layer: str
    feed: str
    """The twin input that replaces the weight's DequantizeLinear."""
    weight: np.ndarray
    integers: np.ndarray
    """Round-to-nearest integers, as the quantized model holds them."""
    scale: np.ndarray
    axis: int | None
    bits: int

    @property
    def broadcast_scale(self) -> np.ndarray:
        if self.scale.ndim == 0 or self.axis is None:
            return self.scale.reshape(())
        shape = [1] * self.weight.ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape)

    def dequantized(self, integers: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy((integers * self.broadcast_scale).astype(np.float32))


def reconstruct_weights(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    layers: Sequence[Layer],
    plan: Plan,
    calibration: Sequence[np.ndarray],
    *,
    method: str,
    iterations: int,
    seed: int,
    progress: ProgressFactory = no_progress,
) -> dict[str, WeightGrid]:
    """Learned up/down rounding for every quantized layer, on the quantized model's grid.

    `quantized` is the round-to-nearest QDQ model of `model` for the aligned `plan`; its
    weight scales and activation quantizers are kept. Returns layer name -> WeightGrid for
    quantize(..., weight_grids=...). `method` "adaround" reconstructs each layer's output
    (after its activation), "brecq" each block's with QDrop. Deterministic per seed.
    Each layer of a unit then keeps its learned or its nearest rounding, whichever mix
    gives the unit the lowest output error (`_best_choice`): a learned rounding can end worse
    than nearest (EfficientNet-Lite0's first depthwise conv at 100 steps on 64 samples:
    13.0 -> 16.9, docs/benchmarks.md).
    """
    import torch

    if method not in METHODS:
        raise UsageError(f"rounding method '{method}' is unknown (use {', '.join(METHODS)})")
    if iterations < 1:
        raise UsageError(f"rounding iterations must be at least 1, got {iterations}")
    units = reconstruction_units(model, layers, plan, method=method)
    if not units:
        return {}
    weights = rounded_weights(model, quantized, layers, plan)
    samples = _samples(calibration)
    rounding_model = with_weight_feeds(quantized, weights.values())
    float_names = _tensor_names(model)
    graphs = [unit_subgraph(rounding_model, float_names, unit, [weights[n] for n in unit.layers]) for unit in units]
    quantized_runs = Collector(rounding_model, sorted({name for graph in graphs for name in graph.activations}))
    float_runs = Collector(model, sorted({name for unit in units for name in (unit.input, unit.output)}))
    current = {w.feed: w.dequantized(w.integers) for w in weights.values()}
    grids: dict[str, WeightGrid] = {}
    for index, (unit, graph) in enumerate(zip(units, graphs)):
        unit_weights = [weights[name] for name in unit.layers]
        quantized_inputs = quantized_runs.run(samples, graph.activations, current)
        floats = float_runs.run(samples, [unit.output, unit.input] if method == "brecq" else [unit.output], {})
        data = UnitData(quantized_inputs, floats.get(unit.input) if method == "brecq" else None, floats[unit.output])
        twin = _twin(graph.model)
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        roundings = [SoftRounding(weight) for weight in unit_weights]
        nearest = {w.feed: current[w.feed] for w in unit_weights}
        with progress(unit.label, iterations) as advance:
            _optimize(twin, roundings, unit_weights, data, iterations, generator, advance)
        learned = {weight.feed: weight.dequantized(rounding.integers()) for weight, rounding in zip(unit_weights, roundings)}
        choice = _best_choice(twin, data, nearest, learned)
        for weight, rounding in zip(unit_weights, roundings):
            integers = rounding.integers() if weight.feed in choice.learned else weight.integers
            current[weight.feed] = weight.dequantized(integers)
            grids[weight.layer] = WeightGrid(integers.astype(np.int8 if weight.bits <= 8 else np.int16), weight.scale)
        log.info(
            "%s: output error %.4g with nearest rounding, %.4g learned, %.4g kept (%s)",
            unit.label, choice.nearest_error, choice.learned_error, choice.error,
            _described(choice, [(w.feed, w.layer) for w in unit_weights]),
        )
    return grids


@dataclass(frozen=True)
class Choice:
    """What a unit keeps: the weight feeds whose learned rounding it takes (the others keep
    round-to-nearest), and the unit's output error then, with all nearest, and with all
    learned."""

    learned: frozenset[str]
    error: float
    nearest_error: float
    learned_error: float


MAX_COMBINED_LAYERS = 4
"""Units with up to this many layers try every mix of learned and nearest rounding per layer
(2^4 = 16 error evaluations, each a forward pass over at most ERROR_SAMPLES: about a tenth
of 100 training steps); larger units try all learned or all nearest."""


def _best_choice(
    twin: OnnxTwin, data: UnitData, nearest: Mapping[str, torch.Tensor], learned: Mapping[str, torch.Tensor]
) -> Choice:
    """The mix of learned and nearest rounding per layer with the lowest unit output error,
    all nearest first so that ties keep it. At 100 steps a depthwise conv's rounding
    variables are often still undecided when rounded and its learned rounding ends worse
    than nearest, while the projection after it ends better (docs/benchmarks.md): a block
    reconstructed together should still keep each layer's better rounding."""
    feeds = list(learned)
    if len(feeds) <= MAX_COMBINED_LAYERS:
        subsets = [frozenset(f for bit, f in enumerate(feeds) if mask >> bit & 1) for mask in range(2 ** len(feeds))]
    else:
        subsets = [frozenset(), frozenset(feeds)]
    errors = {
        subset: _unit_error(twin, data, {feed: learned[feed] if feed in subset else nearest[feed] for feed in feeds})
        for subset in subsets
    }
    best = min(subsets, key=lambda subset: errors[subset])
    return Choice(best, errors[best], errors[frozenset()], errors[frozenset(feeds)])


def _described(choice: Choice, layers: Sequence[tuple[str, str]]) -> str:
    """The log's account of a unit's choice; `layers`: (weight feed, layer name)."""
    taken = [layer for feed, layer in layers if feed in choice.learned]
    if len(taken) == len(layers):
        return "learned rounding"
    if taken:
        return "learned rounding on " + ", ".join(taken)
    return "nearest rounding"


def reconstruction_units(
    model: onnx.ModelProto, layers: Sequence[Layer], plan: Plan, *, method: str
) -> tuple[Unit, ...]:
    """The steps in graph order: one per quantized layer (adaround), or for brecq one per
    residual block, one per chain of layers ending in a linear bottleneck (a MobileNet block
    without its shortcut), and one per other layer (the first and last layers among them,
    as in BRECQ and QDrop)."""
    quantized = {entry.name for entry in plan.layers if entry.quantized and entry.weight_bits is not None}
    chosen = [layer for layer in layers if layer.name in quantized]
    singles = [Unit(f"layer {layer.name}", layer.input, layer.block_output, (layer.name,)) for layer in chosen]
    if method == "adaround":
        return tuple(singles)
    graph = _Graph(model)
    blocks: list[Unit] = []
    taken: set[str] = set()
    for join in find_joins(model, layers):
        block = _residual_block(graph, join, chosen)
        if block is None or taken & set(block.layers):
            continue
        blocks.append(block)
        taken.update(block.layers)
    alone = sorted((unit for unit in singles if unit.layers[0] not in taken), key=lambda unit: graph.position(unit.output))
    ends = {chosen[0].name, chosen[-1].name} if chosen else set()
    units = blocks + _bottleneck_chains(graph, alone, {layer.name: layer for layer in chosen}, ends)
    return tuple(sorted(units, key=lambda unit: graph.position(unit.output)))


def _bottleneck_chains(graph: _Graph, singles: Sequence[Unit], layers: Mapping[str, Layer], ends: set[str]) -> list[Unit]:
    """`singles` (in graph order) with each run of consecutive layers that read only the
    previous one's output and end at a layer with no activation merged into one unit: the
    inverted residual blocks without a shortcut that BRECQ reconstructs as blocks too. Runs
    that do not end linearly (a VGG chain) and the first and last layers (`ends`) stay alone."""
    merged: list[Unit] = []
    run: list[Unit] = []
    for unit in singles:
        name = unit.layers[0]
        if name in ends or (run and unit.input != run[-1].output) or not _reads_only(graph, layers[name]):
            merged.extend(run)
            run = []
            if name in ends:
                merged.append(unit)
                continue
        run.append(unit)
        if not _has_activation(graph, layers[name]):
            merged.append(_chain(run) if len(run) > 1 else run[0])
            run = []
    return merged + run


def _reads_only(graph: _Graph, layer: Layer) -> bool:
    """The layer's input has no other reader, so a chain through it is closed."""
    return len(graph.consumers.get(layer.input, [])) == 1


def _has_activation(graph: _Graph, layer: Layer) -> bool:
    return any(graph.op_types.get(name) in ACTIVATION_OPS for name in layer.block_nodes)


def _chain(run: Sequence[Unit]) -> Unit:
    layers = tuple(name for unit in run for name in unit.layers)
    return Unit(f"chain {layers[0]}..{layers[-1]}", run[0].input, run[-1].output, layers)


class _Graph:
    """Producers and topological positions of a model's tensors."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.op_types = {node.name: node.op_type for node in self.nodes}
        self.producer = {name: node for node in self.nodes for name in node.output}
        self.node_index = {id(node): i for i, node in enumerate(self.nodes)}
        self.index = {name: i for i, node in enumerate(self.nodes) for name in node.output}
        self.initializers = {t.name for t in model.graph.initializer}
        self.live = data_dependent_tensors(model)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def position(self, tensor: str) -> int:
        return self.index.get(tensor, -1)

    def ancestors(self, tensor: str) -> set[str]:
        """Input-dependent tensors `tensor` is computed from, itself included."""
        found: set[str] = set()
        pending = [tensor]
        while pending:
            name = pending.pop()
            if name in found or name not in self.live:
                continue
            found.add(name)
            node = self.producer.get(name)
            if node is not None:
                pending.extend(n for n in node.input if n)
        return found

    def between(self, start: str, end: str) -> set[str] | None:
        """Names of the nodes computing `end` from `start` alone, or None when `end` also
        depends on another input-dependent tensor."""
        nodes: set[str] = set()
        pending, seen = [end], set()
        while pending:
            name = pending.pop()
            if name in seen or name == start or name in self.initializers:
                continue
            seen.add(name)
            node = self.producer.get(name)
            if node is None:
                return None
            nodes.add(node.name)
            pending.extend(n for n in node.input if n)
        return nodes

    def activation_after(self, tensor: str) -> str:
        """The output of an elementwise activation that is `tensor`'s only user, else `tensor`."""
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type in ACTIVATION_OPS and users[0].input[0] == tensor:
            return users[0].output[0]
        return tensor


def _residual_block(graph: _Graph, join: Join, layers: Sequence[Layer]) -> Unit | None:
    """The block ending at a join (and its activation), starting at the latest tensor every
    operand is computed from; None when no quantized layer lies between or the block
    reads another tensor from outside."""
    common = set.intersection(*(graph.ancestors(operand) for operand in join.inputs))
    if not common:
        return None
    start = max(common, key=graph.position)
    end = graph.activation_after(join.output)
    nodes = graph.between(start, end)
    if nodes is None:
        return None
    inside = tuple(layer.name for layer in layers if layer.name in nodes)
    if not inside:
        return None
    return Unit(f"block {join.name}", start, end, inside)


def rounded_weights(
    model: onnx.ModelProto, quantized: onnx.ModelProto, layers: Sequence[Layer], plan: Plan
) -> dict[str, RoundedWeight]:
    """Each quantized layer's float weight (from `model`) with the grid the QDQ model gave
    it (its weight DequantizeLinear's integers and scale)."""
    graph = _Graph(quantized)
    nodes = {node.name: node for node in graph.nodes}
    initializers = {t.name: t for t in quantized.graph.initializer}
    float_initializers = {t.name: t for t in model.graph.initializer}
    entries = plan.by_name()
    found: dict[str, RoundedWeight] = {}
    for layer in layers:
        entry = entries.get(layer.name)
        if entry is None or not entry.quantized or entry.weight_bits is None:
            continue
        node = nodes.get(layer.name)
        dequantize = graph.producer.get(node.input[1]) if node is not None and len(node.input) > 1 else None
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.input[0] not in initializers:
            raise ModelError(
                f"layer '{layer.name}': the quantized model has no weight DequantizeLinear for it",
                hint="pass the QDQ model quantize() wrote for this plan",
            )
        if layer.weight not in float_initializers:
            raise ModelError(f"layer '{layer.name}': the float model has no weight '{layer.weight}'")
        integers = numpy_helper.to_array(initializers[dequantize.input[0]]).astype(np.int32)
        scale = numpy_helper.to_array(initializers[dequantize.input[1]]).astype(np.float32)
        axis = next((a.i for a in dequantize.attribute if a.name == "axis"), 1) if scale.ndim else None
        if axis is not None and axis < 0:
            axis += integers.ndim
        found[layer.name] = RoundedWeight(
            layer=layer.name,
            feed=f"{layer.name}::rounded_weight",
            weight=numpy_helper.to_array(float_initializers[layer.weight]).astype(np.float32),
            integers=integers,
            scale=scale,
            axis=axis,
            bits=entry.weight_bits,
        )
    return found


def with_weight_feeds(quantized: onnx.ModelProto, weights: Iterable[RoundedWeight]) -> onnx.ModelProto:
    """A copy of the QDQ model whose reconstructed layers read their weight from a graph
    input (RoundedWeight.feed) instead of their DequantizeLinear, so the twin can be given
    soft-rounded weights; everything else (activation quantizers, int32 biases) is kept."""
    copy = onnx.ModelProto()
    copy.CopyFrom(quantized)
    nodes = {node.name: node for node in copy.graph.node}
    replaced: set[str] = set()
    for weight in weights:
        node = nodes[weight.layer]
        replaced.add(node.input[1])
        node.input[1] = weight.feed
        copy.graph.input.append(helper.make_tensor_value_info(weight.feed, onnx.TensorProto.FLOAT, None))
    still_read = {name for node in copy.graph.node for name in node.input}
    kept = [node for node in copy.graph.node if not (set(node.output) & replaced and not set(node.output) & still_read)]
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    return copy


@dataclass(frozen=True)
class UnitGraph:
    """A unit cut out of the weight-feed QDQ model: it reads `activations` (values of the
    quantized model derived from the unit's input tensor) and the weight feeds, and outputs
    the unit's output tensor before any quantizer."""

    model: onnx.ModelProto
    activations: tuple[str, ...]


def unit_subgraph(rounding_model: onnx.ModelProto, float_names: set[str], unit: Unit, weights: Sequence[RoundedWeight]) -> UnitGraph:
    """The nodes between the unit's input (its quantized copies, or the float tensor itself
    where a node reads it unquantized) and its output, as a model of their own."""
    graph = _Graph(rounding_model)
    feeds = {weight.feed for weight in weights}
    kept: set[int] = set()
    activations: list[str] = []
    pending, seen = [unit.output], set()
    while pending:
        name = pending.pop()
        if not name or name in seen or name in graph.initializers or name in feeds:
            continue
        seen.add(name)
        node = graph.producer.get(name)
        is_copy = node is not None and node.op_type == "DequantizeLinear" and _float_source(graph, name, float_names) == unit.input
        if name == unit.input or is_copy:
            activations.append(name)
            continue
        if node is None:
            raise ModelError(f"{unit.label}: tensor '{name}' comes from outside the unit")
        kept.add(graph.node_index[id(node)])
        pending.extend(node.input)
    values = {v.name: v for v in [*rounding_model.graph.input, *rounding_model.graph.value_info, *rounding_model.graph.output]}
    nodes = [node for index, node in enumerate(graph.nodes) if index in kept]
    used = {name for node in nodes for name in node.input}
    activations.sort()
    sub = helper.make_graph(
        nodes,
        "unit",
        [_batched(values, name) for name in activations]
        + [helper.make_tensor_value_info(weight.feed, onnx.TensorProto.FLOAT, None) for weight in weights],
        [_batched(values, unit.output)],
        [t for t in rounding_model.graph.initializer if t.name in used],
    )
    model = helper.make_model(sub, opset_imports=list(rounding_model.opset_import))
    model.ir_version = rounding_model.ir_version
    return UnitGraph(model, tuple(activations))


def _float_source(graph: _Graph, name: str, float_names: set[str]) -> str | None:
    """The float model's tensor a quantizer chain (Q, Clip, DQ, requantizing DQ -> Q) starts
    from; a residual join recomputed for a second grid counts as the join's own output."""
    while name not in float_names:
        node = graph.producer.get(name)
        if node is None or node.op_type not in _QDQ_OPS:
            return _recomputed_join(name, float_names)
        name = node.input[0]
    return name


def _recomputed_join(name: str, float_names: set[str]) -> str | None:
    """The join output a per-grid recomputation (passes.qdq.RecomputeJoinPerGridPass) named
    `<join output>/<grid>` stands for; grid names contain '/' too, so the longest prefix."""
    cuts = [i for i, char in enumerate(name) if char == "/"]
    return next((name[:i] for i in reversed(cuts) if name[:i] in float_names), None)


def _batched(values: Mapping[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    """The value's type with a symbolic batch, or an unshaped float when it was not inferred."""
    known = values.get(name)
    if known is None or not known.type.tensor_type.HasField("shape"):
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(known)
    dims = copy.type.tensor_type.shape.dim
    if dims:
        dims[0].Clear()
        dims[0].dim_param = "batch"
    return copy


class SoftRounding:
    """AdaRound's relaxation of one weight: scale * clip(floor(W / scale) + h(V), grid).

    V starts where h(V) equals the fractional part, so the soft weight starts at the float
    weight; the regularizer pushes h(V) to 0 or 1, and the final rounding is up where
    h(V) >= 0.5 (V >= 0).
    """

    def __init__(self, weight: RoundedWeight) -> None:
        import torch

        scaled = weight.weight.astype(np.float64) / weight.broadcast_scale.astype(np.float64)
        floor = np.floor(scaled)
        rest = np.clip(scaled - floor, 0.0, 1.0)
        self.limit = 2 ** (weight.bits - 1) - 1
        self.floor = torch.from_numpy(floor).float()
        self.scale = torch.from_numpy(np.asarray(weight.broadcast_scale)).float()
        logits = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
        self.logits = torch.from_numpy(logits).float().requires_grad_()

    def rectified(self) -> torch.Tensor:
        import torch

        return torch.clamp(torch.sigmoid(self.logits) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def soft_weight(self) -> torch.Tensor:
        import torch

        return self.scale * torch.clamp(self.floor + self.rectified(), -self.limit, self.limit)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.rectified() - 1.0).abs().pow(beta)).sum()

    def integers(self) -> np.ndarray:
        rounded = self.floor + (self.logits.detach() >= 0).float()
        return rounded.clamp(-self.limit, self.limit).numpy().astype(np.int32)


@dataclass(frozen=True)
class UnitData:
    """A unit's training data over the calibration samples (torch tensors): the quantized
    model's values for each activation feed, the float input (for QDrop) and the target."""

    quantized: Mapping[str, torch.Tensor]
    float_input: torch.Tensor | None
    target: torch.Tensor


def _samples(calibration: Sequence[np.ndarray]) -> np.ndarray:
    batches = [np.asarray(batch, dtype=np.float32) for batch in calibration]
    if not batches or sum(len(b) for b in batches) == 0:
        raise UsageError("rounding optimization needs calibration samples")
    return np.concatenate(batches)[:MAX_SAMPLES]


def _twin(model: onnx.ModelProto) -> OnnxTwin:
    from ..twin import build_twin

    return build_twin(model, trainable=False)


class Collector:
    """Runs a model in onnxruntime with extra feeds (those it does not read are left out)
    and returns named tensors over all samples (the quantized model with the current
    weights, or the float model). Faster than the twin for the forward-only passes that
    gather each unit's data."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str]) -> None:
        from ..model import input_shape, make_session, with_outputs

        self.input_name = model.graph.input[0].name
        self.session = make_session(with_outputs(model, [name for name in names if name != self.input_name]))
        self.feeds = {value.name for value in self.session.get_inputs()}
        self.fixed_batch = input_shape(model)[0]

    def run(self, samples: np.ndarray, names: Sequence[str], feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        computed = [name for name in names if name != self.input_name]
        chunk = self.fixed_batch or COLLECT_BATCH
        extra = {name: np.asarray(value) for name, value in feeds.items() if name in self.feeds}
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(samples), chunk):
            batch = samples[start : start + chunk]
            padded = np.concatenate([batch, np.repeat(batch[-1:], chunk - len(batch), axis=0)]) if self.fixed_batch else batch
            outputs = self.session.run(computed, {self.input_name: padded, **extra}) if computed else []
            parts.append([output[: len(batch)] for output in outputs])
        found = {name: torch.from_numpy(np.concatenate([p[i] for p in parts])) for i, name in enumerate(computed)}
        if self.input_name in names:
            found[self.input_name] = torch.from_numpy(samples)
        return found


def reconstruction_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over samples and positions (BRECQ's)."""
    squared = (output - target) ** 2
    return squared.sum(1).mean() if squared.ndim > 1 else squared.mean()


def learning_rate(iterations: int) -> float:
    """Adam's step for the rounding variables: ROUNDING_TRAVEL spread over the run, kept
    between the papers' 1e-3 and 1e-2 (larger steps overshoot the regularizer's anneal)."""
    return min(MAX_LEARNING_RATE, max(MIN_LEARNING_RATE, ROUNDING_TRAVEL / iterations))


def _beta(step: int, warmup: int, iterations: int) -> float:
    """The regularizer's exponent, annealed linearly from BETA_START to BETA_END after warm-up."""
    progress = (step - warmup) / max(iterations - warmup, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)


def _feeds(data: UnitData, index: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch of the unit's activation inputs; with QDrop, each element is the float
    activation with probability DROP_PROBABILITY (one mask for all copies of the input)."""
    import torch

    if data.float_input is None:
        return {name: values[index] for name, values in data.quantized.items()}
    float_input = data.float_input[index]
    mask = torch.rand(float_input.shape, generator=generator) < DROP_PROBABILITY
    return {name: torch.where(mask, float_input, values[index]) for name, values in data.quantized.items()}


def _optimize(
    twin: OnnxTwin,
    roundings: Sequence[SoftRounding],
    weights: Sequence[RoundedWeight],
    data: UnitData,
    iterations: int,
    generator: torch.Generator,
    advance: Callable[[int], None],
) -> None:
    """Adam on the rounding variables: reconstruction error, plus the annealed regularizer
    after the warm-up."""
    import torch

    optimizer = torch.optim.Adam([rounding.logits for rounding in roundings], lr=learning_rate(iterations))
    count = int(data.target.shape[0])
    batch = min(BATCH_SIZE, count)
    warmup = int(WARMUP * iterations)
    for step in range(iterations):
        index = torch.randperm(count, generator=generator)[:batch]
        feeds = _feeds(data, index, generator)
        feeds.update({weight.feed: rounding.soft_weight() for weight, rounding in zip(weights, roundings)})
        outputs, _ = twin.run(feeds)
        loss = reconstruction_error(outputs[0], data.target[index])
        if step >= warmup:
            beta = _beta(step, warmup, iterations)
            loss = loss + REGULARIZER_WEIGHT * sum(rounding.regularizer(beta) for rounding in roundings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        advance(1)


def _unit_error(twin: OnnxTwin, data: UnitData, weights: Mapping[str, torch.Tensor]) -> float:
    """The unit's output error over the first calibration samples for fixed (hard) weights, with
    the quantized inputs (no drop): what the deployed model sees."""
    import torch

    total, count = 0.0, min(int(data.target.shape[0]), ERROR_SAMPLES)
    with torch.no_grad():
        for start in range(0, count, COLLECT_BATCH):
            index = torch.arange(start, min(start + COLLECT_BATCH, count))
            feeds = {name: values[index] for name, values in data.quantized.items()}
            outputs, _ = twin.run({**feeds, **weights})
            total += float(reconstruction_error(outputs[0], data.target[index])) * len(index)
    return total / count


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {value.name for value in model.graph.input} | {t.name for t in model.graph.initializer}
    return names | {name for node in model.graph.node for name in node.output}
