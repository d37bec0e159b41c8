"""compile(): the stages in plain order. Each stage is a module; this file only wires them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .layers import Join, Layer, find_joins, list_layers
from .passes.align import align_plan
from .passes.calibrate import Range, collect_ranges
from .passes.points import plan_points
from .passes.qdq import activation_quantizer, insert_qdq
from .plan import Plan


@dataclass(frozen=True)
class Quantized:
    model: onnx.ModelProto
    plan: Plan


def quantize(
    model: onnx.ModelProto,
    plan: Plan,
    calibration: Iterable[np.ndarray],
    *,
    layers: Sequence[Layer] | None = None,
    joins: Sequence[Join] | None = None,
    method: str = "minmax",
    percentile: float = 99.99,
) -> Quantized:
    """Align the plan, calibrate its quantizers in onnxruntime, and write the QDQ model."""
    layers = list_layers(model) if layers is None else layers
    joins = find_joins(model, layers) if joins is None else joins
    aligned = align_plan(plan, layers, joins)
    points = plan_points(model, layers, aligned)
    tensors = sorted({t for group in points.groups for t in group.tensors})
    ranges = collect_ranges(model, tensors, calibration, method=method, percentile=percentile)
    quantizers = {
        group.name: activation_quantizer(group.bits, _union(ranges[t] for t in group.tensors))
        for group in points.groups
    }
    return Quantized(insert_qdq(model, layers, aligned, points, quantizers), aligned)


def _union(ranges: Iterable[Range]) -> Range:
    collected = list(ranges)
    return Range(min(r.low for r in collected), max(r.high for r in collected))
