"""Post-training quantization: how an aligned plan's grids are chosen (docs/quantization.md, PTQ).

The stages, in order, each optional and each on any plan (any bits 2..16 per layer):
cross-layer equalization of the float weights (equalize.py), activation ranges for each
quantizer group's bits from histograms of the calibration set (ranges.py), per-channel
weight clipping (weights.py), rounding on those grids chosen in closed form (gptq.py) or
learned through the twin (reconstruct.py: AdaRound, BRECQ/QDrop), and bias correction
measured through the QDQ model (bias.py). All of them only choose scales, integers and
biases: the output is always passes/qdq's exact k-bit QDQ form, so onnxruntime's integer
fusions are unchanged. Only the learned rounding draws random numbers (batches, QDrop
masks), from `seed`; the result depends only on the model, the plan, the data and the
settings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import onnx

from ..errors import UsageError, arg
from ..layers import Layer, find_joins
from ..logits import kl_divergence, model_logits
from ..passes.align import align_plan
from ..passes.points import QuantGroup, QuantPoints, plan_points
from ..passes.qdq import WeightGrid, activation_quantizer, insert_qdq, quantize_weight
from ..plan import MAX_BITS, MIN_BITS, Plan
from ..progress import ProgressFactory, no_progress
from .bias import bias_shifts, corrected_grids
from .gptq import gptq_weights
from .reconstruct import DEFAULT_ITERATIONS
from .reconstruct import METHODS as ROUNDING_METHODS
from .ranges import RANGE_METHODS, check_range_method, choose_range
from .statistics import CalibrationStatistics
from .weights import WEIGHT_CLIPPINGS

log = logging.getLogger(__name__)

AUTO = "auto"
PROBE = "probe"


@dataclass(frozen=True)
class PtqSettings:
    """How the grids of a plan are chosen; the defaults are the measured best (docs/quantization.md).

    act_range: minmax | percentile | entropy | mse | auto (entropy up to 6 bits, minmax
      above: see the measurements) | probe (min/max above 6 bits; at 6 bits and fewer
      entropy or mse, whichever a probe on the calibration data finds closer to float:
      `resolved`). percentile: for act_range percentile.
    probed_range: probe's method at 6 bits and fewer once `resolved` measured it (None
      before; a caller may also set it to skip the measurement).
    weight_clipping: absmax | mse | output (per-channel clipping search on the weight error
      or on the layer's output error).
    bias_correction: add each layer's measured mean output shift to its bias (after rounding;
      layers whose input has fewer than BIAS_CORRECTION_MIN_ACT_BITS bits and layers GPTQ
      rounded, whose target already is the float output, are left alone).
    equalize: cross-layer equalization of the float model first (data-free, same function).
    rounding: nearest | gptq (ptq/gptq.py, closed form, layer by layer) | adaround |
      brecq (ptq/reconstruct.py, through the torch twin), with rounding_iterations per layer
      or block and `seed` for their batches and QDrop masks.
    join_operand_bits: the operands of every quantized residual join share a quantizer of no
      fewer than these bits, and the join's sum meets the k-bit grid of the layer it feeds
      (Plan.join_operand_bits; None: the paper's rule, operands at the join's bits).
    """

    act_range: Literal["auto", "probe", "minmax", "percentile", "entropy", "mse"] = AUTO
    percentile: float = 99.99
    weight_clipping: Literal["absmax", "mse", "output"] = "output"
    bias_correction: bool = True
    equalize: bool = False
    rounding: Literal["nearest", "gptq", "adaround", "brecq"] = "nearest"
    rounding_iterations: int = DEFAULT_ITERATIONS
    seed: int = 0
    probed_range: Literal["entropy", "mse"] | None = None
    join_operand_bits: int | None = None

    def __post_init__(self) -> None:
        if self.join_operand_bits is not None and not (
            isinstance(self.join_operand_bits, int) and MIN_BITS <= self.join_operand_bits <= MAX_BITS
        ):
            raise UsageError(f"{arg('join_operand_bits')}: {self.join_operand_bits!r} is outside {MIN_BITS}..{MAX_BITS}")
        if self.act_range not in (AUTO, PROBE):
            check_range_method(self.act_range, self.percentile)
        elif not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"{arg('percentile')}: {self.percentile} is outside (50, 100]")
        if self.probed_range is not None and self.probed_range not in PROBE_CANDIDATES:
            raise UsageError(f"probed_range: use one of {', '.join(PROBE_CANDIDATES)}, not {self.probed_range!r}")
        if self.rounding not in ROUNDINGS:
            raise UsageError(f"{arg('rounding')}: unknown method '{self.rounding}' (use {', '.join(ROUNDINGS)})")
        if self.rounding_iterations < 1:
            raise UsageError(f"{arg('rounding_iterations')}: must be at least 1, got {self.rounding_iterations}")
        if self.weight_clipping not in WEIGHT_CLIPPINGS:
            raise UsageError(
                f"{arg('weight_clipping')}: unknown method '{self.weight_clipping}' (use {', '.join(WEIGHT_CLIPPINGS)})"
            )

    def with_join_operands(self, plan: Plan) -> Plan:
        """The plan with these settings' join operand bits; a plan's own stay when these set none."""
        if self.join_operand_bits is None or plan.join_operand_bits == self.join_operand_bits:
            return plan
        return replace(plan, join_operand_bits=self.join_operand_bits)

    def range_method(self, bits: int) -> str:
        """The activation range method used for a quantizer of `bits` bits."""
        if self.act_range not in (AUTO, PROBE):
            return self.act_range
        if bits > AUTO_SEARCH_MAX_BITS:
            return "minmax"
        if self.act_range == AUTO:
            return "entropy"
        if self.probed_range is None:
            raise ValueError("probe ranges at 6 bits and fewer are chosen on the calibration data first (ptq.resolved)")
        return self.probed_range


BIAS_CORRECTION_MIN_ACT_BITS = 4
"""Layers whose input has fewer bits keep their bias: on ResNet-20, bias correction gained
0.5-1 point at W2A4, W4A4 and W6A6 but lost 5-6 points at W3A3 (two range methods)."""
AUTO_SEARCH_MAX_BITS = 6
"""auto and probe: a searched range up to here (auto: entropy, ResNet-20: +2 to +6 points
over mse at 2-4 and 6 bits), min/max above (at 8 bits every method is within 0.2 points, and
min/max needs no histogram)."""
PROBE_CANDIDATES = ("entropy", "mse")
"""probe's methods at 6 bits and fewer. Neither wins everywhere, and the calibration images
decide as much as the model: W4A4 scored 84.9% with entropy against 82.0% with mse on
ResNet-20; on MobileNetV2 (first conv and classifier W8A8) 18.7% against 32.2% calibrated on
the first 256 val1300 images and 26.5% against 26.3% on another 256 (docs/quantization.md)."""
PROBE_BITS = 4
"""The plan probe judges the candidates on: uniform at these bits (weights and activations),
written with the settings' bias correction: without it EfficientNet-Lite0's probe preferred
entropy, with it mse, the method its W4A4 models score higher with (docs/quantization.md)."""
PROBE_SAMPLES = 256
"""Calibration samples the candidates' logits are compared with float's on (at most)."""
PROBE_TIE_KL = 0.01
"""mse replaces entropy (the first candidate, ResNet-20's measured best) only when its probe
is closer to float by more than this (mean KL, nats). Where both models are near float the
difference is noise that still moves the search's discrete outcome: on the bundled MNIST
example the probes were 0.00077 and 0.00059, and mse's ranges took its compile from 3.94 to
5.00 bits. Every model where the methods' W4A4 accuracies differed measured a KL
difference of 0.03 nats or more (docs/quantization.md)."""
ACT_RANGES = (AUTO, PROBE, *RANGE_METHODS)
ROUNDINGS = ("nearest", "gptq", *ROUNDING_METHODS)


@dataclass(frozen=True)
class LowBitsRange:
    """probe's method at 6 bits and fewer, and the measurement that chose it."""

    method: str
    divergence: tuple[tuple[str, float], ...]
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "probe": f"uniform {PROBE_BITS}-bit plan, round-to-nearest",
            "kl_from_float": dict(self.divergence),
            "samples": self.samples,
        }


def resolved(
    settings: PtqSettings, layers: Sequence[Layer], statistics: CalibrationStatistics, groups: Iterable[QuantGroup]
) -> PtqSettings:
    """`settings` with probe's method at 6 bits and fewer chosen, when it is probe, not chosen
    yet, and some of the quantizer `groups` the settings are for has 6 bits or fewer (else
    nothing is measured).

    The uniform PROBE_BITS plan is written with each candidate's ranges (the settings'
    weight clipping and bias correction, round-to-nearest) and the candidate whose logits
    are closer to float's (mean KL on the first PROBE_SAMPLES calibration samples) is
    kept; within PROBE_TIE_KL of the first candidate (entropy), the first. Measured once per
    calibration (statistics.choices), so every plan of a compile, the sensitivity table's
    included, gets the same method.
    """
    if settings.act_range != PROBE or settings.probed_range is not None:
        return settings
    if all(group.bits > AUTO_SEARCH_MAX_BITS for group in groups):
        return settings
    return replace(settings, probed_range=low_bits_range(layers, statistics, settings).method)


def chosen_low_bits_range(statistics: CalibrationStatistics, settings: PtqSettings) -> LowBitsRange | None:
    """What `resolved` measured on these statistics for these settings (None: nothing yet)."""
    known = statistics.choices.get(_choice_key(settings))
    return known if isinstance(known, LowBitsRange) else None


def _choice_key(settings: PtqSettings) -> tuple[str, ...]:
    """What the probe's models depend on besides the calibration: their weights and biases."""
    return ("low_bits_range", settings.weight_clipping, str(settings.bias_correction))


def low_bits_range(layers: Sequence[Layer], statistics: CalibrationStatistics, settings: PtqSettings) -> LowBitsRange:
    """The measurement behind `resolved` (memoized on `statistics` per weight clipping and
    bias correction, the settings the probe's models depend on)."""
    from ..model import output_names

    known = chosen_low_bits_range(statistics, settings)
    if known is not None:
        return known
    model = statistics.source
    probe_batches = _first_samples(statistics.batches, PROBE_SAMPLES)
    output = output_names(model)[0]

    def logits(proto: onnx.ModelProto) -> np.ndarray:
        return model_logits(proto, output, probe_batches)

    aligned = align_plan(settings.with_join_operands(Plan.uniform(layers, PROBE_BITS)), layers, find_joins(model, layers))
    points = plan_points(model, layers, aligned)
    reference = logits(model)
    divergence = []
    for method in PROBE_CANDIDATES:
        candidate = replace(settings, act_range=method, rounding="nearest")
        written = apply_ptq(model, layers, aligned, points, statistics.batches, candidate, statistics=statistics)
        divergence.append((method, kl_divergence(reference, logits(written))))
    best = _preferred(divergence)
    choice = LowBitsRange(best, tuple(divergence), sum(len(batch) for batch in probe_batches))
    log.info(
        "probe activation ranges at 6 bits and fewer: %s (logit KL from float of the uniform %d-bit plan: %s)",
        best, PROBE_BITS, ", ".join(f"{m} {d:.4f}" for m, d in divergence),
    )
    statistics.choices[_choice_key(settings)] = choice
    return choice


def _preferred(divergence: Sequence[tuple[str, float]]) -> str:
    """The first candidate unless a later one is closer to float by more than PROBE_TIE_KL."""
    best, best_kl = divergence[0]
    for method, kl in divergence[1:]:
        if kl < best_kl - PROBE_TIE_KL:
            best, best_kl = method, kl
    return best


def _first_samples(batches: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    taken, left = [], count
    for batch in batches:
        if left <= 0:
            break
        taken.append(batch[:left])
        left -= len(taken[-1])
    return taken


def apply_ptq(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    plan: Plan,
    points: QuantPoints,
    calibration: Iterable[np.ndarray],
    settings: PtqSettings,
    *,
    storage: str = "int8",
    weight_grids: Mapping[str, WeightGrid] | None = None,
    statistics: CalibrationStatistics | None = None,
    progress: ProgressFactory = no_progress,
) -> onnx.ModelProto:
    """The QDQ model of an aligned plan with PTQ-chosen activation ranges, weights and biases.

    `weight_grids` given by the caller are kept as they are (not clipped again); bias
    correction adjusts the bias of those that bring none. `statistics` (statistics.py): the
    float model's histograms and moments on these batches, shared with other plans; they
    must be those of this model, these batches and this equalization.
    """
    batches = calibration if isinstance(calibration, Sequence) else list(calibration)
    if statistics is None:
        statistics = CalibrationStatistics(model, batches, equalized=settings.equalize)
    elif not statistics.serves(model, batches, settings.equalize):
        raise ValueError("the calibration statistics given were measured on another model, data or equalization")
    model = statistics.model
    settings = resolved(settings, layers, statistics, points.groups)
    total = sum(len(batch) for batch in batches)
    tensors = sorted({t for group in points.groups for t in group.tensors})
    counted = {t for g in points.groups if settings.range_method(g.bits) != "minmax" for t in g.tensors}
    histograms = statistics.histograms(tensors, counted, progress=progress)
    quantizers = {}
    for group in points.groups:
        first, *rest = (histograms[t] for t in group.tensors)
        merged = first.merged(rest) if rest else first
        method = settings.range_method(group.bits)
        quantizers[group.name] = activation_quantizer(group.bits, choose_range(merged, group.bits, method, settings.percentile))
    weights = {t.name: onnx.numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    grids = _weight_grids(weights, layers, plan, settings, statistics) | dict(weight_grids or {})
    quantized = insert_qdq(model, layers, plan, points, quantizers, storage=storage, weight_grids=grids)
    rounded: dict[str, WeightGrid] = {}
    if settings.rounding != "nearest":
        rounded = _rounded(model, quantized, layers, plan, batches, settings, progress)
        rounded = {name: grid for name, grid in rounded.items() if name not in (weight_grids or {})}
        grids = {**grids, **rounded}
        quantized = insert_qdq(model, layers, plan, points, quantizers, storage=storage, weight_grids=grids)
    if not settings.bias_correction:
        return quantized
    given = {name for name, grid in (weight_grids or {}).items() if grid.bias is not None}
    if settings.rounding == "gptq":
        given |= set(rounded)
    input_bits = {entry.name: entry.act_bits or MAX_BITS for entry in plan.layers}
    corrected_layers = [
        layer
        for layer in layers
        if layer.name not in given and input_bits.get(layer.name, MAX_BITS) >= BIAS_CORRECTION_MIN_ACT_BITS
    ]
    shifts = bias_shifts(quantized, weights, corrected_layers, plan, batches, progress=progress, total=total)
    if not shifts:
        return quantized
    nodes = {node.name: node for node in model.graph.node}
    biases = {name: weights[nodes[name].input[2]] for name in shifts}
    log.info("bias correction on %d layers", len(shifts))
    corrected = corrected_grids(grids, shifts, biases)
    return insert_qdq(model, layers, plan, points, quantizers, storage=storage, weight_grids=corrected)


def _rounded(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    layers: Sequence[Layer],
    plan: Plan,
    batches: Sequence[np.ndarray],
    settings: PtqSettings,
    progress: ProgressFactory,
) -> dict[str, WeightGrid]:
    """GPTQ's or the learned rounding's grids, on the grids of the round-to-nearest `quantized`."""
    from .reconstruct import reconstruct_weights

    if settings.rounding == "gptq":
        return gptq_weights(model, quantized, layers, plan, batches, progress=progress)
    return reconstruct_weights(
        model,
        quantized,
        layers,
        plan,
        batches,
        method=settings.rounding,
        iterations=settings.rounding_iterations,
        seed=settings.seed,
        progress=progress,
    )


def _weight_grids(
    weights: Mapping[str, np.ndarray],
    layers: Sequence[Layer],
    plan: Plan,
    settings: PtqSettings,
    statistics: CalibrationStatistics,
) -> dict[str, WeightGrid]:
    if settings.weight_clipping != "absmax":
        return statistics.clipped_grids(layers, plan, output_error=settings.weight_clipping == "output")
    entries = plan.by_name()
    return {
        layer.name: WeightGrid(*quantize_weight(weights[layer.weight], entries[layer.name].weight_bits, layer.weight_axis))
        for layer in layers
        if layer.name in entries and entries[layer.name].quantized and entries[layer.name].weight_bits is not None
    }

