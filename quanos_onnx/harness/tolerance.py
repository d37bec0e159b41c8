"""Each layer's quantization tolerance: how few bits it takes alone before the predictions move.

The allocation's divergence table (allocate.sensitivity, `measure_divergence` with
`background=None`) quantizes one layer at a time, every other layer float, over one min/max
calibration, and measures the logit KL from the float model. The audit runs the same
single-layer QDQ models on its own samples and keeps, besides the KL, the share of samples
whose top-1 class stays the float model's (agreement). A layer's tolerance is the fewest
candidate bits from which on its agreement stays at least MIN_AGREEMENT at every wider
candidate too (so one lucky narrow grid does not count); None when even the widest misses.

Why agreement, and why 99%: compile's default accuracy guard is 1 point of clean accuracy,
and a model whose predictions agree with float on a share a of the samples is at most 1 - a
below float's accuracy on them. A layer that alone moves more than 1% of the predictions at
b bits cannot sit at b bits in a plan that keeps the default guard (other layers' errors
rarely cancel it). KL is reported beside it because it is what the allocator minimizes.

Two whole plans are measured the same way: every layer at its own tolerance at once (errors
add up, so this keeps fewer predictions than any layer alone), and the plan the default
allocator's integer program (allocate.solve: this KL table, the ANS term at its default
weight) gives at the same average bits.

Cost: one onnxruntime run per layer and candidate. Only the part of the graph that a
layer's quantizers change is run: the float activations at the cut are computed once per
layer and fed to the rest (`_Suffix`), which halves the work on a chain like ResNet-20.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from ..allocate.sensitivity import (
    DEFAULT_BITS,
    QdqBuilder,
    Sensitivity,
    allocatable,
    check_candidate_bits,
    reference_plan,
)
from ..errors import DataError
from ..layers import Layer, find_joins
from ..logits import kl_divergence, model_logits
from ..plan import Plan
from .ans import Progress

MIN_AGREEMENT = 0.99
"""A layer tolerates b bits when, quantized alone at b (and every wider candidate), at least
this share of the samples keep the float model's top-1 class (1 - compile's default
--max-accuracy-drop of 1 point)."""


@dataclass(frozen=True)
class LayerTolerance:
    """One layer alone at each candidate: logit KL from float and top-1 agreement with float."""

    layer: str
    kl: tuple[float, ...]
    agreement: tuple[float, ...]
    tolerance: int | None
    allocator_bits: int

    def to_json(self, bits: Sequence[int]) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kl": dict(zip(map(str, bits), self.kl)),
            "agreement": dict(zip(map(str, bits), self.agreement)),
            "tolerance_bits": self.tolerance,
            "allocator_bits": self.allocator_bits,
        }


@dataclass(frozen=True)
class PlanCheck:
    """A whole plan measured like the single layers: its average bits, agreement and KL."""

    average_bits: float
    agreement: float
    kl: float

    def to_json(self) -> dict[str, Any]:
        return {"average_bits": self.average_bits, "agreement": self.agreement, "kl": self.kl}


@dataclass(frozen=True)
class ToleranceTable:
    """Every quantized layer's tolerance, and the two whole plans (module docstring)."""

    bits: tuple[int, ...]
    samples: int
    min_agreement: float
    layers: tuple[LayerTolerance, ...]
    tolerance_plan: PlanCheck
    allocator_plan: PlanCheck
    seconds: float

    def sensitivity(self) -> Sensitivity:
        """The KL table as the allocator's Sensitivity (measure_divergence's, background None)."""
        return Sensitivity(
            tuple(row.layer for row in self.layers), self.bits, tuple(row.kl for row in self.layers),
            "kl", self.samples, self.seconds,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "criterion": "top-1 agreement with float",
            "min_agreement": self.min_agreement,
            "samples": self.samples,
            "bits": list(self.bits),
            "layers": [row.to_json(self.bits) for row in self.layers],
            "tolerance_plan": self.tolerance_plan.to_json(),
            "allocator_plan": self.allocator_plan.to_json(),
        }


def tolerance_bits(bits: Sequence[int], agreement: Sequence[float], min_agreement: float = MIN_AGREEMENT) -> int | None:
    """The fewest bits from which on every candidate keeps at least `min_agreement`."""
    tolerated = None
    for b, share in sorted(zip(bits, agreement), reverse=True):
        if share < min_agreement:
            break
        tolerated = b
    return tolerated


def measure_tolerance(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    batches: Sequence[np.ndarray],
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    ans: Mapping[str, float] | None = None,
    min_agreement: float = MIN_AGREEMENT,
    progress: Progress | None = None,
) -> ToleranceTable:
    """The tolerance table of `model`'s quantized layers (output layers stay float) on `batches`,
    which also calibrate the activation ranges (one min/max pass, as the allocator's table).

    `ans` (layer -> ANS mean) gives the allocator its robustness term, as compile does.
    """
    from ..allocate.solve import DEFAULT_ANS_WEIGHT, Budget, solve
    from ..model import output_names

    started = time.perf_counter()
    if not batches or sum(len(b) for b in batches) == 0:
        raise DataError("no samples to measure quantization tolerance on")
    candidates = check_candidate_bits(bits)
    joins = find_joins(model, layers)
    targets = allocatable(layers)
    reference = reference_plan(layers, candidates[-1])
    builder = QdqBuilder(model, layers, joins, [reference], list(batches))
    output = output_names(model)[0]
    float_logits = model_logits(model, output, batches)
    float_top = float_logits.argmax(axis=1)

    def judge(logits: np.ndarray) -> tuple[float, float]:
        return kl_divergence(float_logits, logits), float(np.mean(logits.argmax(axis=1) == float_top))

    original = {_signature(node) for node in model.graph.node} if _splittable(model) else None
    measured: list[tuple[Layer, list[float], list[float]]] = []
    for layer in targets:
        kls, agreements = [], []
        cut: tuple[str, ...] | None = None
        feeds: list[dict[str, np.ndarray]] = []
        for b in candidates:
            variant = builder.single_layer(reference, layer, b)
            if original is None:
                logits = model_logits(variant, output, batches)
            else:
                suffix = _Suffix(original, variant, output)
                if suffix.cut != cut:  # the same for every candidate of a layer: computed once
                    cut, feeds = suffix.cut, suffix.float_feeds(model, batches)
                logits = suffix.logits(feeds)
            kl, agreement = judge(logits)
            kls.append(kl)
            agreements.append(agreement)
            if progress is not None:
                progress(1)
        measured.append((layer, kls, agreements))
    tolerances = {layer.name: tolerance_bits(candidates, agreement, min_agreement) for layer, _, agreement in measured}
    table = Sensitivity(
        tuple(layer.name for layer, _, _ in measured), candidates, tuple(tuple(kls) for _, kls, _ in measured),
        "kl", len(float_logits), 0.0,
    )
    at_tolerance = reference.with_layers(
        _at(entry, tolerances[entry.name] or candidates[-1]) if entry.name in tolerances else entry
        for entry in reference.layers
    )
    average = _average_bits(targets, at_tolerance)
    allocated = solve(layers, joins, table, Budget("avg-bits", average), ans=ans, ans_weight=DEFAULT_ANS_WEIGHT)
    allocator_bits = {entry.name: entry.weight_bits for entry in allocated.layers if entry.quantized}
    rows = tuple(
        LayerTolerance(layer.name, tuple(kls), tuple(agreement), tolerances[layer.name], int(allocator_bits[layer.name]))
        for layer, kls, agreement in measured
    )

    def check(plan: Plan) -> PlanCheck:
        kl, agreement = judge(model_logits(builder.build(plan), output, batches))
        return PlanCheck(_average_bits(targets, plan), agreement, kl)

    return ToleranceTable(
        candidates, len(float_logits), min_agreement, rows, check(at_tolerance), check(allocated),
        time.perf_counter() - started,
    )


def _at(entry: Any, bits: int) -> Any:
    return replace(entry, weight_bits=bits, act_bits=bits)


def _average_bits(layers: Sequence[Layer], plan: Plan) -> float:
    """Parameter-weighted average weight bits over `layers` (the allocator's avg-bits)."""
    entries = plan.by_name()
    params = sum(layer.params for layer in layers)
    return sum(layer.params * (entries[layer.name].weight_bits or 32) for layer in layers) / max(params, 1)


class _Suffix:
    """The part of a single-layer QDQ model that differs from the float model, run on its own.

    Nodes of `variant` that are not in `model` (the inserted Q/DQ nodes), and every node
    downstream of them, make the suffix; every other node computes exactly what it computes
    in the float model. The suffix's inputs (the cut) are float tensors, computed once per
    layer by the float model and fed to each candidate's suffix.
    """

    def __init__(self, original: set[bytes], variant: onnx.ModelProto, output: str) -> None:
        """`original`: the float model's node signatures (_signature)."""
        changed: set[str] = set()
        suffix: list[onnx.NodeProto] = []
        for node in variant.graph.node:  # topologically sorted, as every ONNX graph
            if _signature(node) not in original or any(name in changed for name in node.input):
                suffix.append(node)
                changed.update(node.output)
        produced = {name for node in suffix for name in node.output}
        constants = {init.name for init in variant.graph.initializer}
        self.cut = tuple(sorted(
            {name for node in suffix for name in node.input if name and name not in produced and name not in constants}
        ))
        self.variant, self.suffix, self.output = variant, suffix, output

    def float_feeds(self, model: onnx.ModelProto, batches: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The cut's float values per batch (the graph input passes through as it is)."""
        from ..model import Runner

        graph_input = model.graph.input[0].name
        inner = [name for name in self.cut if name != graph_input]
        runner = Runner(model, inner) if inner else None
        feeds = []
        for batch in batches:
            values = dict(zip(inner, runner.run(batch, inner))) if runner is not None else {}
            if graph_input in self.cut:
                values[graph_input] = np.asarray(batch, dtype=np.float32)
            feeds.append(values)
        return feeds

    def logits(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        from ..model import make_session

        used = {name for node in self.suffix for name in node.input}
        graph = onnx.helper.make_graph(
            self.suffix,
            "suffix",
            [onnx.helper.make_tensor_value_info(name, _dtype(feeds[0][name]), None) for name in self.cut],
            [value for value in self.variant.graph.output if value.name == self.output],
            [init for init in self.variant.graph.initializer if init.name in used],
        )
        proto = onnx.helper.make_model(graph, opset_imports=self.variant.opset_import)
        proto.ir_version = self.variant.ir_version
        session = make_session(proto)
        return np.concatenate(
            [session.run([self.output], dict(feed))[0].reshape(len(next(iter(feed.values()))), -1) for feed in feeds]
        )


def _splittable(model: onnx.ModelProto) -> bool:
    """Whether _Suffix can run this model's tail: a free batch dim (a fixed one is run in
    chunks by model.Runner) and no subgraphs (their outer-scope inputs escape the cut)."""
    from ..model import input_shape

    nested = any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                 for node in model.graph.node for attribute in node.attribute)
    return not nested and input_shape(model)[0] is None


def _signature(node: onnx.NodeProto) -> bytes:
    """A node as bytes: the same op on the same tensors with the same attributes."""
    return node.SerializeToString(deterministic=True)


def _dtype(value: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
