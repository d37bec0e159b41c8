"""The calibrated range of an activation tensor, as the QDQ pass takes it.

How ranges are measured and chosen (min/max, percentile, entropy, MSE on histograms of the
whole calibration set) is ptq/ranges.py; this module only holds the value both share.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    low: float
    high: float
