"""What each candidate bit-width of each layer costs, measured on calibration data.

Two estimators, both from ONE calibration of activation ranges (the ranges of every
quantizer any measured plan needs are collected in a single onnxruntime pass, then reused):

- `measure_divergence` ("kl" or "mse"): the deployed numerics. For every layer l and
  candidate b, the model with l at b bits (its weights, its input activation and the
  residual-join quantizers alignment ties to it) and every other layer at background bits
  (default 7) runs in onnxruntime; the cost is how much further its logits are from the
  float model's than the background plan's. L x |B| small onnxruntime runs.
- `measure_gradient` ("fisher"): ModelOpt AutoQuantize's score through the torch twin:
  sum over samples of (dL/dY_l)^2 (Q_b(Y_l) - Y_l)^2, where Y_l is the layer's output and
  Q_b(Y_l) the same layer run on b-bit weights and a b-bit input. One forward/backward of
  the float twin per batch, then one layer op per (l, b).

Both return a `Sensitivity`: a table cost[l][b] whose sum over a plan predicts that plan's
damage (docs/method.md says which predicts measured accuracy better, and why).
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import onnx

from ..errors import PlanError, UsageError
from ..model import ACTIVATION_CHUNK
from ..layers import Join, Layer
from ..logits import kl_divergence, mean_squared_error, model_logits
from ..passes.align import align_plan
from ..passes.calibrate import Range
from ..ptq.ranges import choose_range
from ..ptq.statistics import CalibrationStatistics
from ..passes.points import QuantPoints, plan_points
from ..passes.qdq import ActivationQuantizer, WeightGrid, activation_quantizer, insert_qdq, quantize_weight
from ..plan import MAX_BITS, MIN_BITS, FirstOutputBits, Plan, with_act_bits
from ..ptq import PtqSettings, resolved

DEFAULT_BITS = tuple(range(2, 9))
"""2..8: every layer stays in onnxruntime's integer (uint8/int8) kernels."""

DIVERGENCES = ("kl", "mse")
METHODS = (*DIVERGENCES, "fisher", "auto")

KL_TABLE_MAC_BUDGET = 5e12
"""`auto` measures the divergence table when it costs at most this many multiply-accumulates
(variants x samples x the model's MACs per sample), the gradient score otherwise. The
divergence table runs L x (|B| - 1) whole models on the samples: on ResNet-20 (41M MACs, 114
variants, 256 samples: 1.2e12) it is most of a compile's allocation time; on
EfficientNet-Lite0 (about 400M MACs, 300 variants: 3e13) it alone would take about half an
hour on one core, where the gradient score, one forward/backward per batch, takes about a
minute (docs/method.md)."""


@dataclass(frozen=True)
class Sensitivity:
    """cost[i][j]: predicted damage of layer `layers[i]` at `bits[j]` bits (see the measure_* functions)."""

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    cost: tuple[tuple[float, ...], ...]
    method: str
    samples: int
    seconds: float

    def of(self, layer: str, bits: int) -> float:
        if layer not in self.layers or bits not in self.bits:
            raise PlanError(
                f"layer '{layer}' at {bits} bits: the sensitivity table covers {len(self.layers)} layers "
                f"at {self.bits[0]}..{self.bits[-1]} bits"
            )
        return self.cost[self.layers.index(layer)][self.bits.index(bits)]

    def predict(self, plan: Plan) -> float:
        """Sum of the costs of the plan's bits (layers the table lacks or keeps float cost 0)."""
        return math.fsum(
            self.of(entry.name, entry.weight_bits)
            for entry in plan.layers
            if entry.quantized and entry.weight_bits is not None and entry.name in self.layers
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": list(self.bits),
            "samples": self.samples,
            "cost": {name: dict(zip(map(str, self.bits), row)) for name, row in zip(self.layers, self.cost)},
        }


def check_candidate_bits(bits: Sequence[int]) -> tuple[int, ...]:
    candidates = tuple(sorted(set(bits)))
    if not candidates or any(isinstance(b, bool) or not isinstance(b, int) for b in candidates):
        raise UsageError(f"--bits-candidates {list(bits)!r}: give whole numbers")
    if candidates[0] < MIN_BITS or candidates[-1] > MAX_BITS:
        raise UsageError(f"--bits-candidates {list(candidates)}: bits must lie in {MIN_BITS}..{MAX_BITS}")
    return candidates


def allocatable(layers: Sequence[Layer], quantize_output: bool = False) -> list[Layer]:
    """The layers the allocator gives bits to (output layers stay float unless asked)."""
    return [layer for layer in layers if quantize_output or not layer.is_output]


def reference_plan(layers: Sequence[Layer], bits: int, quantize_output: bool = False) -> Plan:
    return Plan.uniform(layers, bits, keep_output_float=not quantize_output)


BACKGROUND_BITS = 7
"""Default bits of the other layers while one layer's candidates are measured: the widest
grid whose uint8 x int8 products cannot saturate onnxruntime's AVX2 integer convolution
(it adds pairs of u8*s8 products in int16: 2 * 127 * 127 fits, 2 * 255 * 127 does not), so
the background runs the same fused integer kernels as the deployed plan and stays near
float on every x86 CPU. On this project's 2-core VM (AVX2, no VNNI) uniform 8-bit ResNet-20
is further from float (logit KL 0.157) than uniform 7-bit (0.019)."""


class QdqBuilder:
    """Writes QDQ models of plans over one fixed set of calibrated ranges.

    `quantize.quantize` calibrates every call; measuring L x |B| plans that way would run the
    calibration data through onnxruntime L x |B| times for the same ranges. Here the ranges of
    every tensor any of the given plans quantizes are collected once.

    Without `ptq`, every grid is min/max round-to-nearest (absmax weights). With `ptq` (the
    compile's PtqSettings), the grids are the ones the written model gets: each quantizer's
    range by the settings' method for its bits (one histogram pass, the range chosen per
    bit-width), and the weights clipped as the settings say (output-error clipping on the
    float model's input moments, computed once). Bias correction and learned rounding are
    left out: they are measured through each whole plan's QDQ model, L x |B| more passes.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: Sequence[Layer],
        joins: Sequence[Join],
        plans: Sequence[Plan],
        calibration: Sequence[np.ndarray],
        ptq: PtqSettings | None = None,
        statistics: CalibrationStatistics | None = None,
    ) -> None:
        """`statistics`: the compile's own calibration statistics (then `calibration` is
        unused), so that the table's grids are those of the written models."""
        statistics = statistics or CalibrationStatistics(model, calibration, equalized=bool(ptq and ptq.equalize))
        self.model, self.layers, self.joins = statistics.model, list(layers), list(joins)
        self.ptq = ptq  # places the joins' operands (_aligned) before resolved() settles the ranges
        all_points = [self._points(plan) for plan in plans]
        groups = [group for points in all_points for group in points.groups]
        self.ptq = resolved(ptq, self.layers, statistics, groups) if ptq is not None else ptq
        ptq = self.ptq
        tensors = sorted({t for points in all_points for group in points.groups for t in group.tensors})
        counted = set() if ptq is None else {
            t for points in all_points for g in points.groups if ptq.range_method(g.bits) != "minmax" for t in g.tensors
        }
        # One calibration pass for every candidate plan; histograms only where a range search needs them.
        self.histograms = statistics.histograms(tensors, counted)
        self.ranges: dict[str, Range] = {name: choose_range(h, 8, "minmax") for name, h in self.histograms.items()}
        self._group_ranges: dict[tuple[tuple[str, ...], int], Range] = {}
        self.statistics = statistics

    def _points(self, plan: Plan) -> QuantPoints:
        return plan_points(self.model, self.layers, self._aligned(plan))

    def _aligned(self, plan: Plan) -> Plan:
        """The plan aligned as quantize.quantize aligns it, join operands included."""
        placed = self.ptq.with_join_operands(plan) if self.ptq is not None else plan
        return align_plan(placed, self.layers, self.joins)

    def _group_range(self, tensors: tuple[str, ...], bits: int) -> Range:
        if self.ptq is None:
            return Range(min(self.ranges[t].low for t in tensors), max(self.ranges[t].high for t in tensors))
        key = (tensors, bits)
        if key not in self._group_ranges:
            first, *rest = (self.histograms[t] for t in tensors)
            merged = first.merged(rest) if rest else first
            self._group_ranges[key] = choose_range(merged, bits, self.ptq.range_method(bits), self.ptq.percentile)
        return self._group_ranges[key]

    def _quantizers(self, points: QuantPoints) -> dict[str, Any]:
        return {
            group.name: activation_quantizer(group.bits, self._group_range(tuple(group.tensors), group.bits))
            for group in points.groups
        }

    def _grids(self, plan: Plan) -> dict[str, WeightGrid] | None:
        """The clipped weight grids of the plan's quantized layers (None: absmax, insert_qdq's own)."""
        if self.ptq is None or self.ptq.weight_clipping == "absmax":
            return None
        return self.statistics.clipped_grids(self.layers, plan, output_error=self.ptq.weight_clipping == "output")

    def build(self, plan: Plan) -> onnx.ModelProto:
        """The QDQ model of the whole plan (aligned), as quantize.quantize writes it."""
        aligned = self._aligned(plan)
        points = plan_points(self.model, self.layers, aligned)
        return insert_qdq(self.model, self.layers, aligned, points, self._quantizers(points), weight_grids=self._grids(aligned))

    def single_layer(self, reference: Plan, layer: Layer, bits: int, act_bits: int | None = None) -> onnx.ModelProto:
        """The float model with only `layer` at `bits`: its weights, its input quantizer, the
        residual-join quantizers alignment ties to it and the shortcut convs those joins fix.

        The quantizers are exactly those the full `reference` plan with this layer changed
        would give it, so a plan's predicted cost counts each quantizer once (a layer's output
        is quantized by its consumer, not here).
        """
        aligned = self._aligned(with_bits(reference, layer.name, bits, act_bits))
        owned = {
            join.name
            for join in aligned.joins
            if join.downstream == layer.name or (join.downstream is None and layer.block_output in join.operands)
        }
        tied = {layer.name, *(s for join in self.joins if join.name in owned for s in join.shortcut_layers)}
        points = plan_points(self.model, self.layers, aligned)
        groups = {p.group for p in points.points if p.owner in owned or any((t, 0) in p.consumers for t in tied)}
        kept = QuantPoints(
            tuple(p for p in points.points if p.group in groups),
            tuple(g for g in points.groups if g.name in groups),
        )
        weights = aligned.with_layers(
            e if e.name in tied else replace(e, weight_bits=None, act_bits=None, keep_float=True)
            for e in aligned.layers
        )
        return insert_qdq(self.model, self.layers, weights, kept, self._quantizers(kept), weight_grids=self._grids(weights))


def pinned_input_bits(
    layers: Sequence[Layer], act_bits: int | None, first_output: FirstOutputBits | None
) -> dict[str, int | None]:
    """Each layer's input bits whatever its candidate (None: the candidate's): `act_bits` for
    every layer, else the first layer's output bits for its readers (--first-last-bits), so
    the table prices what the compile writes."""
    readers = set(() if first_output is None else first_output.readers)
    return {
        layer.name: act_bits if act_bits is not None else (first_output.bits if first_output and layer.name in readers else None)
        for layer in layers
    }


def with_bits(plan: Plan, name: str, bits: int, act_bits: int | None = None) -> Plan:
    """Layer `name` at `bits` weights and `act_bits` activations (None: `bits` too)."""
    return plan.with_layers(
        replace(e, weight_bits=bits, act_bits=act_bits or bits) if e.name == name else e for e in plan.layers
    )


def measure_divergence(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    joins: Sequence[Join],
    calibration: Sequence[np.ndarray],
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    metric: str = "kl",
    background: int | None = BACKGROUND_BITS,
    quantize_output: bool = False,
    ptq: PtqSettings | None = None,
    statistics: CalibrationStatistics | None = None,
    act_bits: int | None = None,
    first_output: FirstOutputBits | None = None,
) -> Sensitivity:
    """Logit divergence (KL or MSE) from the float model when one layer changes, per candidate.

    `ptq`: the grids of every measured model as the compile writes them (QdqBuilder), else
    min/max round-to-nearest; `statistics`: calibrate those grids on the compile's
    calibration statistics instead of on `calibration` (which the divergence is still
    measured on).

    With `background` bits, every other layer is quantized at those bits (the deployed fused
    integer kernels) and the cost is D(background plan with l at b) - D(background plan).
    With `background=None`, every other layer stays float and the cost is D(l alone at b):
    onnxruntime then runs l's Conv in float on dequantized values (no fused kernel).
    """
    from ..model import output_names

    if metric not in DIVERGENCES:
        raise UsageError(f"--sensitivity {metric!r}: use one of {', '.join(METHODS)}")
    started = time.perf_counter()
    candidates = check_candidate_bits(bits)
    targets = allocatable(layers, quantize_output)
    reference = reference_plan(layers, background or candidates[-1], quantize_output)
    if first_output is not None:
        reference = first_output.apply(reference)
    if act_bits is not None:
        reference = with_act_bits(reference, act_bits)
    input_bits = pinned_input_bits(targets, act_bits, first_output)
    variants = {
        (layer.name, b): with_bits(reference, layer.name, b, input_bits[layer.name]) for layer in targets for b in candidates
    }
    builder = QdqBuilder(model, layers, joins, [reference, *variants.values()], calibration, ptq, statistics)
    output = output_names(model)[0]

    def logits(proto: onnx.ModelProto) -> np.ndarray:
        return model_logits(proto, output, calibration)

    float_logits = logits(model)
    divergence = kl_divergence if metric == "kl" else mean_squared_error
    base = 0.0 if background is None else divergence(float_logits, logits(builder.build(reference)))

    def variant(layer: Layer, b: int) -> onnx.ModelProto:
        if background is None:
            return builder.single_layer(reference, layer, b, input_bits[layer.name])
        return builder.build(variants[(layer.name, b)])

    measured = [(layer, b) for layer in targets for b in candidates if b != background]
    costs = dict(zip(
        [(layer.name, b) for layer, b in measured],
        overlapped(lambda key: variant(*key), lambda proto: divergence(float_logits, logits(proto)) - base, measured),
    ))
    table = tuple(tuple(costs.get((layer.name, b), 0.0) for b in candidates) for layer in targets)
    return Sensitivity(
        tuple(layer.name for layer in targets),
        candidates,
        table,
        (metric if background is None else f"{metric}@{background}") + ("" if ptq is None else "+ptq"),
        len(float_logits),
        time.perf_counter() - started,
    )


Key = TypeVar("Key")


def overlapped(
    build: Callable[[Key], onnx.ModelProto], measure: Callable[[onnx.ModelProto], float], keys: Sequence[Key]
) -> list[float]:
    """`measure(build(key))` for every key, in order, writing the next model in this thread
    while a second thread measures the one before.

    Writing a QDQ model is Python (onnx_ir) and holds the GIL; onnxruntime releases it while
    it runs, so the two overlap in part: on ResNet-20 the divergence table spent 19 of its 45
    CPU seconds writing models and 26 opening and running them, and overlapped it takes
    1.16x less wall time at one thread, 1.21x at two (docs/benchmarks.md). The measuring
    thread runs in a copy of this thread's context, so the command's threads and device
    (context variables) hold there too; the results are those of doing one after the other."""
    results: list[float] = []
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending: Future[float] | None = None
        for key in keys:
            model = build(key)
            if pending is not None:
                results.append(pending.result())
            pending = worker.submit(contextvars.copy_context().run, measure, model)
        if pending is not None:
            results.append(pending.result())
    return results


def measure_gradient(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    joins: Sequence[Join],
    calibration: Sequence[np.ndarray],
    *,
    labels: Sequence[np.ndarray] | None = None,
    bits: Sequence[int] = DEFAULT_BITS,
    quantize_output: bool = False,
    ptq: PtqSettings | None = None,
    statistics: CalibrationStatistics | None = None,
    act_bits: int | None = None,
    first_output: FirstOutputBits | None = None,
) -> Sensitivity:
    """ModelOpt's score sum (dL/dY)^2 (Q(Y) - Y)^2 per layer and candidate, through the twin.

    L is the cross-entropy against `labels` (the float model's own predictions when None),
    summed over the batch, so each sample's dL/dY is its own. Q(Y) runs the layer's op on
    its b-bit weights (absmax per channel, as the QDQ writer does) and its input on the
    b-bit grid (the `act_bits` grid when given) of the calibrated min/max range.

    `statistics` (the compile's) supplies those ranges; with `ptq`, the same pass also
    gathers the histograms the settings' range method needs for every candidate's uniform
    plan, so that the compile's plans after the table find them collected (one pass over
    the calibration data instead of two; the score itself is the same either way).
    """
    import torch

    from ..twin import build_twin

    started = time.perf_counter()
    candidates = check_candidate_bits(bits)
    targets = allocatable(layers, quantize_output)
    plans = [reference_plan(layers, b, quantize_output) for b in (candidates if ptq is not None else candidates[-1:])]
    if first_output is not None:
        plans = [first_output.apply(plan) for plan in plans]
    input_bits = pinned_input_bits(targets, act_bits, first_output)
    builder = QdqBuilder(model, layers, joins, plans, calibration, ptq, statistics)
    twin = build_twin(model)
    twin.eval()
    steps = {step.node_name: step for step in twin.program.steps}
    weights = {**twin.constants_by_name(), **twin.parameters_by_name()}
    quantized_weights = {
        (layer.name, b): _QuantizedWeight.of(weights[layer.weight].detach(), b, layer.weight_axis)
        for layer in targets
        for b in candidates
    }
    scores = np.zeros((len(targets), len(candidates)))
    samples = 0
    captured_names = sorted({name for layer in targets for name in (layer.input, layer.output)})
    # ACTIVATION_CHUNK samples at a time: every layer's input, output and output gradient of
    # the chunk are held at once (EfficientNet-Lite0 at batch 64: about 10 GB); the score is a
    # sum over samples, so the chunking does not change it.
    chunks = [
        (batch[start : start + ACTIVATION_CHUNK], None if labels is None else labels[index][start : start + ACTIVATION_CHUNK])
        for index, batch in enumerate(calibration)
        for start in range(0, len(batch), ACTIVATION_CHUNK)
    ]
    for batch, batch_labels in chunks:
        # A copy: data read from .npy files is often read-only, which torch.from_numpy warns about.
        image = torch.tensor(np.asarray(batch), dtype=torch.float32).requires_grad_(True)
        inputs = {twin.input_names[0]: image}
        outputs, captured = twin.run(inputs, captured_names)
        logits = outputs[0].reshape(len(batch), -1)
        target = (
            torch.tensor(np.asarray(batch_labels), dtype=torch.int64)
            if batch_labels is not None
            else logits.argmax(dim=1)
        )
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        grads = torch.autograd.grad(loss, [captured[layer.output] for layer in targets])
        samples += len(batch)
        with torch.no_grad():
            for row, (layer, grad) in enumerate(zip(targets, grads)):
                step = steps[layer.name]
                x = captured[layer.input].detach()
                y = captured[layer.output].detach()
                squared_gradient = grad.detach().square()
                extra = [weights[name].detach() if name in weights else None for name in step.inputs[2:]]
                value_range = builder.ranges.get(layer.input) or Range(float(x.min()), float(x.max()))
                for column, b in enumerate(candidates):
                    grid = activation_quantizer(input_bits[layer.name] or b, value_range)
                    centered = _centered_activation(x, grid)
                    q_x = centered * grid.scale
                    weight = quantized_weights[(layer.name, b)]
                    q_y = step.function(step.attributes, [q_x, weight.values, *extra])[0]
                    saturation = _saturation_error(step, centered, grid, weight, q_y)
                    error = q_y.sub_(y).add_(saturation)
                    scores[row, column] += float(error.square_().mul_(squared_gradient).sum())
    scores /= max(samples, 1)
    return Sensitivity(
        tuple(layer.name for layer in targets),
        candidates,
        tuple(tuple(float(v) for v in row) for row in scores),
        "fisher",
        samples,
        time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _QuantizedWeight:
    """A layer's b-bit weight (absmax per channel, as the QDQ writer's default): its
    integers, the per-channel scale shaped to the weight, and the dequantized values."""

    integers: Any
    scale: Any
    values: Any

    @classmethod
    def of(cls, weight: Any, bits: int, axis: int | None) -> _QuantizedWeight:
        import torch

        integers, scale = quantize_weight(weight.numpy(), bits, axis)
        shape = [1] * weight.ndim
        if axis is not None:
            shape[axis] = -1
        as_float = torch.from_numpy(integers.astype(np.float32))
        per_channel = torch.from_numpy(np.asarray(scale, dtype=np.float32).reshape(shape))
        return cls(as_float, per_channel, as_float * per_channel)


def _centered_activation(x: Any, grid: ActivationQuantizer) -> Any:
    """x on the activation grid the QDQ writer gives its range (round half to even), as
    integers minus the zero point: `clip(round(x / scale) + zp) - zp` clipped on the centered
    levels, in place on one new tensor (this runs for every layer, candidate and sample)."""
    low, high = grid.levels
    centered = x / grid.scale
    return centered.round_().clamp_(low - grid.zero_point, high - grid.zero_point)


def _saturation_error(step: Any, centered: Any, grid: ActivationQuantizer, weight: _QuantizedWeight, q_y: Any) -> Any:
    """What the deployed kernel adds to the layer's output on this CPU: onnxruntime's u8 x s8
    kernels without VNNI clamp sums of product pairs to int16 (twin/fusion.py), which 8-bit
    weights can overflow and 7-bit ones cannot. Without it the score ranks 8 bits above 7
    on layers where 8 bits saturate too, and the plans it solves put them at 8 bits that
    then lose points on the data (docs/method.md). 0 where nothing saturates."""
    import torch

    from ..twin.fusion import saturation_change

    if grid.wide:  # int16 activations: onnxruntime leaves the layer in float
        return 0.0
    change = saturation_change(step, centered, grid.zero_point, weight.integers, q_y)
    if change is None:
        return 0.0
    output_scale = weight.scale.reshape(-1) * grid.scale
    axis = 1 if step.op_type == "Conv" else q_y.dim() - 1
    shape = [1] * q_y.dim()
    shape[axis] = -1
    return (change * output_scale.double().reshape(shape)).to(q_y.dtype)


def auto_method(layers: Sequence[Layer], bits: Sequence[int], samples: int, quantize_output: bool = False) -> str:
    """"kl" when the divergence table costs at most KL_TABLE_MAC_BUDGET multiply-accumulates, else "fisher"."""
    variants = len(allocatable(layers, quantize_output)) * max(len(set(bits)) - 1, 1)
    work = variants * samples * sum(layer.macs for layer in layers)
    return "kl" if work <= KL_TABLE_MAC_BUDGET else "fisher"


def measure(
    method: str,
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    joins: Sequence[Join],
    calibration: Sequence[np.ndarray],
    *,
    labels: Sequence[np.ndarray] | None = None,
    bits: Sequence[int] = DEFAULT_BITS,
    background: int | None = BACKGROUND_BITS,
    quantize_output: bool = False,
    ptq: PtqSettings | None = None,
    statistics: CalibrationStatistics | None = None,
    act_bits: int | None = None,
    first_output: FirstOutputBits | None = None,
) -> Sensitivity:
    """Dispatch on the method name ("kl", "mse", "fisher" or "auto", see auto_method;
    `background` is for kl and mse). With `act_bits`, every candidate is b-bit weights with
    activations at `act_bits` (plan.with_act_bits), else b bits for both; with
    `first_output`, its readers' inputs stay at its bits in every candidate."""
    method = auto_method(layers, bits, sum(len(batch) for batch in calibration), quantize_output) if method == "auto" else method
    if method == "fisher":
        return measure_gradient(
            model, layers, joins, calibration, labels=labels, bits=bits, quantize_output=quantize_output,
            ptq=ptq, statistics=statistics, act_bits=act_bits, first_output=first_output,
        )
    return measure_divergence(
        model, layers, joins, calibration, bits=bits, metric=method, background=background,
        quantize_output=quantize_output, ptq=ptq, statistics=statistics, act_bits=act_bits,
        first_output=first_output,
    )
