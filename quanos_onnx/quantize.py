"""The plan-to-QDQ stage: align the plan, calibrate its quantizers, write the QDQ model.

It sits below every command and below finetune/, which both materialize plans.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from .layers import Join, Layer, find_joins, list_layers
from .passes.align import align_plan
from .passes.calibrate import Range, collect_ranges
from .passes.points import plan_points
from .passes.qdq import WeightGrid, activation_quantizer, check_storage, insert_qdq
from .plan import MAX_BITS, Plan

log = logging.getLogger(__name__)


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
    storage: str = "int8",
    weight_grids: Mapping[str, WeightGrid] | None = None,
) -> Quantized:
    """Align the plan, calibrate its quantizers in onnxruntime, and write the QDQ model.

    `storage` picks the weight containers (passes.qdq.STORAGES); values are the same in all.
    `weight_grids` (layer name -> passes.qdq.WeightGrid) are weights a PTQ stage put on the
    plan's grid; the other layers get absmax round-to-nearest.
    """
    check_storage(storage)
    layers = list_layers(model) if layers is None else layers
    joins = find_joins(model, layers) if joins is None else joins
    aligned = align_plan(float_above_containers(plan), layers, joins)
    points = plan_points(model, layers, aligned)
    tensors = sorted({t for group in points.groups for t in group.tensors})
    ranges = collect_ranges(model, tensors, calibration, method=method, percentile=percentile)
    quantizers = {
        group.name: activation_quantizer(group.bits, _union(ranges[t] for t in group.tensors))
        for group in points.groups
    }
    return Quantized(
        insert_qdq(model, layers, aligned, points, quantizers, storage=storage, weight_grids=weight_grids), aligned
    )


def float_above_containers(plan: Plan) -> Plan:
    """Layers given more than 16 bits (Eqn 3 from --k-init 32) stay float.

    The widest QDQ container is int16; a 32-bit start in the paper is the float model, and
    the hardware model counts float layers at 32 bits, so this is the same layer either way.
    """
    wide = [e.name for e in plan.layers if e.quantized and max(e.weight_bits, e.act_bits) > MAX_BITS]
    if not wide:
        return plan
    log.info("%d layer(s) above %d bits stay float: %s", len(wide), MAX_BITS, ", ".join(wide))
    return plan.with_layers(
        replace(e, weight_bits=None, act_bits=None, keep_float=True) if e.name in wide else e
        for e in plan.layers
    )


def _union(ranges: Iterable[Range]) -> Range:
    collected = list(ranges)
    return Range(min(r.low for r in collected), max(r.high for r in collected))
