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
from .passes.points import plan_points
from .passes.qdq import WeightGrid, check_storage
from .plan import MAX_BITS, Plan
from .progress import ProgressFactory, no_progress
from .ptq import PtqSettings, apply_ptq
from .ptq.statistics import CalibrationStatistics

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
    method: str | None = None,
    percentile: float | None = None,
    storage: str = "int8",
    weight_grids: Mapping[str, WeightGrid] | None = None,
    ptq: PtqSettings = PtqSettings(),
    statistics: CalibrationStatistics | None = None,
    progress: ProgressFactory = no_progress,
) -> Quantized:
    """Align the plan, choose its grids on the calibration data (ptq/), write the QDQ model.

    `ptq` says how ranges, weight scales and biases are chosen (the default is the measured
    best, docs/quantization.md); `method` and `percentile`, when given, override its
    activation range method (the commands' --calibration / --percentile).
    `storage` picks the weight containers (passes.qdq.STORAGES); values are the same in all.
    `weight_grids` (layer name -> passes.qdq.WeightGrid) are weights a caller already put
    on the plan's grid; the PTQ stage chooses the others. `statistics`
    (ptq.statistics.CalibrationStatistics of this model and these calibration batches) lets
    many plans share one calibration pass.
    """
    check_storage(storage)
    if method is not None or percentile is not None:
        ptq = replace(ptq, act_range=method or ptq.act_range, percentile=percentile or ptq.percentile)
    layers = list_layers(model) if layers is None else layers
    joins = find_joins(model, layers) if joins is None else joins
    aligned = align_plan(float_above_containers(ptq.with_join_operands(plan)), layers, joins)
    points = plan_points(model, layers, aligned)
    quantized = apply_ptq(
        model, layers, aligned, points, calibration, ptq, storage=storage, weight_grids=weight_grids,
        statistics=statistics, progress=progress,
    )
    return Quantized(quantized, aligned)


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

