"""Activation ranges for the quantizers, measured in onnxruntime on the float model.

Streaming: one pass over the batches keeps only a running (min, max) per tensor, so memory
does not grow with the number of calibration samples. The percentile option clips rare
outliers per batch and averages the batch percentiles (a common, cheap estimator).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import DataError, UsageError, arg
from ..model import Runner

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile")


@dataclass(frozen=True)
class Range:
    low: float
    high: float


def collect_ranges(
    proto: onnx.ModelProto,
    tensors: Sequence[str],
    batches: Iterable[np.ndarray],
    *,
    method: str = "minmax",
    percentile: float = 99.99,
) -> dict[str, Range]:
    if method not in METHODS:
        raise UsageError(f"{arg('calibration')}: unknown method '{method}' (use {' or '.join(METHODS)})")
    if not 50.0 < percentile <= 100.0:
        raise UsageError(f"{arg('percentile')}: {percentile} is outside (50, 100]")
    names = list(tensors)
    if not names:
        return {}
    runner = Runner(proto, names)
    lows: dict[str, list[float]] = {n: [] for n in names}
    highs: dict[str, list[float]] = {n: [] for n in names}
    seen = 0
    for batch in batches:
        values = runner.run(batch, names)
        for name, value in zip(names, values):
            flat = value.reshape(-1)
            if method == "minmax":
                lows[name].append(float(flat.min()))
                highs[name].append(float(flat.max()))
            else:
                low, high = np.percentile(flat, [100.0 - percentile, percentile])
                lows[name].append(float(low))
                highs[name].append(float(high))
        seen += len(batch)
        if method == "minmax":
            for name in names:
                lows[name] = [min(lows[name])]
                highs[name] = [max(highs[name])]
    if seen == 0:
        raise DataError("calibration data is empty")
    log.info("calibrated %d tensors on %d samples (%s)", len(names), seen, method)
    reduce_low = min if method == "minmax" else np.mean
    reduce_high = max if method == "minmax" else np.mean
    return {
        name: Range(float(reduce_low(lows[name])), float(reduce_high(highs[name])))
        for name in names
    }
