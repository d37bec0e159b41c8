"""Activation ranges for k-bit grids, chosen on a histogram of the whole calibration set.

One streaming pass over the batches (onnxruntime on the float model) keeps, per tensor, the
exact min and max and a histogram of |x| for each sign over [0, R], R a power of two whose
bins are merged pairwise whenever a batch exceeds it (R doubles, so histograms of different
tensors merge exactly): memory is fixed by the bin count, never by
the number of samples, and the percentiles are those of the whole set, independent of the
batch size (passes/calibrate.py's percentile averages per-batch values).

The range of a quantizer group is chosen on the merged histogram of its tensors, for the
group's bits:

- minmax: the exact extremes.
- percentile: the p-th percentile (and the (100-p)-th for signed tensors) of the whole set.
- entropy: the clipping that minimizes KL(P || Q) between the clipped distribution and its
  2^k-level quantization (TensorRT's calibrator, as onnxruntime implements it).
- mse: the clipping that minimizes the expected squared error of the k-bit grid itself
  (rounding inside the range plus clipping outside it), evaluated on the bin centres.

entropy and mse shrink [low, high] by one common ratio, so the asymmetric signed grid of
passes/qdq.activation_quantizer keeps its shape. Above 8 bits they return min/max: a grid of
at least 512 levels is finer than the histogram, and clipping gains nothing there.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import DataError, UsageError, arg
from ..model import ACTIVATION_CHUNK, Runner
from ..passes.calibrate import Range
from ..progress import ProgressFactory, no_progress

log = logging.getLogger(__name__)

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")
HISTOGRAM_BINS = 4096
"""Bins per sign. 4096 bins over [0, R] keep at least 8 bins per level of an 8-bit grid."""
CLIP_RATIOS = np.linspace(1.0, 0.02, 99)
"""Candidate clipping ratios for entropy and mse, widest first (ties keep the wider range)."""
SEARCH_MAX_BITS = 8


@dataclass
class TensorHistogram:
    """Streaming statistics of one tensor: exact extremes and |x| histograms per sign."""

    bins: int = HISTOGRAM_BINS
    counting: bool = True
    """False keeps only the extremes (a tensor only min/max ranges are asked of)."""
    low: float = np.inf
    high: float = -np.inf
    limit: float = 0.0
    zeros: float = 0.0
    """Exact zeros (a Relu's spike): on every grid exactly, so entropy leaves them out."""
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0))
    negative: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if not self.positive.size:
            self.positive = np.zeros(self.bins)
            self.negative = np.zeros(self.bins)

    @property
    def count(self) -> float:
        return float(self.positive.sum() + self.negative.sum())

    def add(self, values: np.ndarray) -> None:
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        if not flat.size:
            return
        low, high = float(flat.min()), float(flat.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise DataError("calibration: a tensor of the float model is not finite on the calibration data")
        self.low, self.high = min(self.low, low), max(self.high, high)
        if not self.counting:
            return
        self.zeros += float(np.count_nonzero(flat == 0))
        self.grow(max(-self.low, self.high))
        if self.limit == 0.0:
            self.positive[0] += flat.size
            return
        index = np.minimum((np.abs(flat) * np.float32(self.bins / self.limit)).astype(np.int32), self.bins - 1)
        index += (flat < 0).astype(np.int32) * self.bins
        counts = np.bincount(index, minlength=2 * self.bins)
        self.positive += counts[: self.bins]
        self.negative += counts[self.bins :]

    def grow(self, magnitude: float) -> None:
        """Double R (merging bin pairs) until it covers `magnitude`; exact, no re-binning error."""
        if magnitude <= 0:
            return
        if self.limit == 0.0:
            self.limit = float(2.0 ** np.ceil(np.log2(magnitude)))
        while self.limit < magnitude:
            self.positive = _merge_pairs(self.positive)
            self.negative = _merge_pairs(self.negative)
            self.limit *= 2.0

    def merged(self, others: Sequence[TensorHistogram]) -> TensorHistogram:
        """One histogram of this tensor and `others` together (a quantizer group)."""
        total = TensorHistogram(self.bins, self.counting and all(part.counting for part in others))
        for part in (self, *others):
            if part.limit == 0.0 and part.low > part.high:
                continue
            total.low = min(total.low, part.low)
            total.high = max(total.high, part.high)
            total.grow(max(part.limit, -total.low, total.high))
        for part in (self, *others):
            positive, negative = part.positive, part.negative
            limit = part.limit
            while limit and limit < total.limit:
                positive, negative = _merge_pairs(positive), _merge_pairs(negative)
                limit *= 2.0
            total.positive = total.positive + positive
            total.negative = total.negative + negative
            total.zeros += part.zeros
        return total

def _merge_pairs(counts: np.ndarray) -> np.ndarray:
    merged = counts.reshape(-1, 2).sum(axis=1)
    return np.concatenate([merged, np.zeros(counts.size - merged.size)])


def collect_histograms(
    proto: onnx.ModelProto,
    tensors: Sequence[str],
    batches: Iterable[np.ndarray],
    *,
    extremes_only: Collection[str] = (),
    progress: ProgressFactory = no_progress,
    total: int = 0,
) -> dict[str, TensorHistogram]:
    """Histograms of the named tensors of the float model over every calibration batch
    (only the extremes for the tensors in `extremes_only`). Unfused, so that a tensor's
    histogram does not depend on which others are collected with it (make_session)."""
    names = list(tensors)
    if not names:
        return {}
    runner = Runner(proto, names, fuse=False)
    histograms = {name: TensorHistogram(counting=name not in extremes_only) for name in names}
    seen = 0
    with progress("calibrate", total) as advance:
        for batch in batches:
            for start in range(0, len(batch), ACTIVATION_CHUNK):  # the histograms are the same in any grouping
                for name, value in zip(names, runner.run(batch[start : start + ACTIVATION_CHUNK], names)):
                    histograms[name].add(value)
            seen += len(batch)
            advance(len(batch))
    if seen == 0:
        raise DataError("calibration data is empty")
    log.info("histograms of %d tensors on %d samples", len(names), seen)
    return histograms


def choose_range(histogram: TensorHistogram, bits: int, method: str, percentile: float = 99.99) -> Range:
    """The clipping range of a k-bit quantizer for this histogram, by `method`."""
    check_range_method(method, percentile)
    low, high = min(histogram.low, 0.0), max(histogram.high, 0.0)
    if method == "minmax" or histogram.limit == 0.0:
        return Range(low, high)
    if not histogram.counting:
        raise ValueError(f"a {method} range needs a histogram; this tensor kept only its extremes")
    if method == "percentile":
        return _percentile_range(histogram, percentile)
    if bits > SEARCH_MAX_BITS:
        return Range(low, high)
    centres, counts = _signed_bins(histogram)
    if method == "mse":
        ratio = _mse_ratio(centres, counts, low, high, bits)
    else:
        ratio = _entropy_ratio(histogram, low, high, bits)
    return Range(low * ratio, high * ratio)


def check_range_method(method: str, percentile: float) -> None:
    if method not in RANGE_METHODS:
        raise UsageError(f"{arg('calibration')}: unknown method '{method}' (use {', '.join(RANGE_METHODS)})")
    if not 50.0 < percentile <= 100.0:
        raise UsageError(f"{arg('percentile')}: {percentile} is outside (50, 100]")


def _signed_bins(histogram: TensorHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and counts of both signs on one axis, most negative first."""
    width = histogram.limit / histogram.bins
    magnitudes = (np.arange(histogram.bins) + 0.5) * width
    centres = np.concatenate([-magnitudes[::-1], magnitudes])
    counts = np.concatenate([histogram.negative[::-1], histogram.positive])
    keep = counts > 0
    return centres[keep], counts[keep]


def _percentile_range(histogram: TensorHistogram, percentile: float) -> Range:
    edges = np.linspace(0.0, histogram.limit, histogram.bins + 1)
    axis = np.concatenate([-edges[::-1], edges[1:]])
    counts = np.concatenate([histogram.negative[::-1], histogram.positive])
    cumulative = np.concatenate([[0.0], np.cumsum(counts)]) / counts.sum()
    tail = 1.0 - percentile / 100.0
    high = float(np.interp(1.0 - tail, cumulative, axis)) if percentile < 100 else histogram.high
    low = float(np.interp(tail, cumulative, axis)) if percentile < 100 else histogram.low
    return Range(min(max(low, histogram.low), 0.0), max(min(high, histogram.high), 0.0))


def _grid_values(values: np.ndarray, low: float, high: float, bits: int) -> np.ndarray:
    """`values` through the k-bit grid passes/qdq.activation_quantizer builds for [low, high]."""
    scale = (high - low) / (2**bits - 1)
    if scale <= 0:
        return np.zeros_like(values)
    zero = np.round(-low / scale)
    levels = np.clip(np.round(values / scale) + zero, 0, 2**bits - 1)
    return (levels - zero) * scale


def _mse_ratio(centres: np.ndarray, counts: np.ndarray, low: float, high: float, bits: int) -> float:
    errors = [
        float(np.dot(counts, (centres - _grid_values(centres, low * r, high * r, bits)) ** 2)) for r in CLIP_RATIOS
    ]
    return float(CLIP_RATIOS[int(np.argmin(errors))])


def _entropy_ratio(histogram: TensorHistogram, low: float, high: float, bits: int) -> float:
    """TensorRT's KL calibration with the window [low, high] x ratio and 2^k levels.

    Exact zeros are left out: spread over the first level's bins by Q they would make every
    wide window look bad and pull ReLU outputs to ranges a few bins wide."""
    levels = 2**bits
    negative, positive = histogram.negative, histogram.positive.copy()
    positive[0] -= histogram.zeros
    width = histogram.limit / histogram.bins
    best, best_ratio = np.inf, 1.0
    for ratio in CLIP_RATIOS:
        below = int(np.ceil(-low * ratio / width))
        above = int(np.ceil(high * ratio / width))
        if below + above < levels:
            break
        sliced = np.concatenate([negative[:below][::-1], positive[:above]])
        reference = sliced.copy()
        if below:
            reference[0] += negative[below:].sum()
        if above:
            reference[-1] += positive[above:].sum()
        divergence = _kl_divergence(reference, sliced, levels)
        if divergence < best:
            best, best_ratio = divergence, float(ratio)
    return best_ratio


def _kl_divergence(reference: np.ndarray, sliced: np.ndarray, levels: int) -> float:
    """KL(P || Q): P the window with the outliers added to its edge bins, Q the window
    without them quantized to `levels` chunks, each chunk's mass spread evenly over its
    non-empty bins (so clipping costs the outliers' mass, as in TensorRT)."""
    size, extra = divmod(reference.size, levels)
    sizes = np.full(levels, size) + (np.arange(levels) < extra)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    used = reference > 0
    mass = np.add.reduceat(sliced, starts)
    filled = np.add.reduceat(used.astype(np.float64), starts)
    per_bin = np.repeat(mass / np.maximum(filled, 1.0), sizes)
    expanded = np.where(used, per_bin, 0.0)
    p = reference / reference.sum()
    q = expanded / expanded.sum()
    used = p > 0
    return float(np.sum(p[used] * np.log(p[used] / np.maximum(q[used], 1e-12))))
