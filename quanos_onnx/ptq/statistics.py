"""The float model's calibration statistics, measured once and shared by every plan.

A compile quantizes many plans of one float model on one calibration set: the milp search's
trial plans, the compiled plan, the uniform baselines of its verification, and the
sensitivity table's grids. The activation histograms (ranges.py), the weight-clipping
input moments and the clipped weight grids themselves (weights.py) are properties of the
float model's tensors on that data and of a layer's bits, not of the plan, so each tensor's
histogram, each layer's moments and each (layer, bits) grid are computed the first time a
plan needs them and reused after (per tensor and per layer, so the result is exactly what a
fresh pass would give: tested). Bias correction and learned rounding measure the quantized
model, and stay per plan.

The memo is the one mutable object of the PTQ stage: it fills as plans ask, and a caller
that shares it across processes (Ray jobs) sends it after a first plan filled it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import onnx

from ..layers import Layer
from ..passes.qdq import WeightGrid
from ..plan import Plan
from ..progress import ProgressFactory, no_progress
from .equalize import equalize
from .ranges import TensorHistogram, collect_histograms
from .weights import clipped_grid, input_moments_of, quantized_layers


class CalibrationStatistics:
    """Histograms and input moments of `source` (equalized first when `equalized`) on `batches`."""

    def __init__(self, source: onnx.ModelProto, batches: Sequence[np.ndarray], *, equalized: bool = False) -> None:
        self.source = source
        self.batches = tuple(batches)
        self.equalized = equalized
        self.model = equalize(source) if equalized else source
        self._histograms: dict[str, TensorHistogram] = {}
        self._moments: dict[str, np.ndarray | None] = {}
        self._grids: dict[tuple[str, int, bool], WeightGrid] = {}
        self._weights: dict[str, np.ndarray] | None = None
        self.choices: dict[tuple[str, ...], object] = {}
        """Settings chosen by measuring quantized models on these batches (ptq.resolved's
        low-bits range method), kept so that every plan of a compile gets the same one."""

    def serves(self, source: onnx.ModelProto, batches: Sequence[np.ndarray], equalized: bool) -> bool:
        """Whether these statistics are those of this model, these batches and this equalization."""
        return (
            source is self.source
            and equalized == self.equalized
            and len(batches) == len(self.batches)
            and all(mine is theirs for mine, theirs in zip(self.batches, batches))
        )

    def histograms(
        self,
        tensors: Collection[str],
        counted: Collection[str],
        *,
        progress: ProgressFactory = no_progress,
    ) -> dict[str, TensorHistogram]:
        """The histogram of each tensor (with bin counts for those in `counted`, extremes
        for the others), one onnxruntime pass over the batches for the ones not seen yet."""
        missing = [
            name for name in sorted(tensors)
            if name not in self._histograms or (name in counted and not self._histograms[name].counting)
        ]
        if missing:
            total = sum(len(batch) for batch in self.batches)
            self._histograms.update(collect_histograms(
                self.model, missing, self.batches, extremes_only=set(missing) - set(counted),
                progress=progress, total=total,
            ))
        return {name: self._histograms[name] for name in tensors}

    def moments(self, layers: Sequence[Layer]) -> dict[str, np.ndarray]:
        """E[x x^T] of each layer's input patches (weights.input_moments_of), for the layers
        whose patches weights.py forms."""
        missing = [layer for layer in layers if layer.name not in self._moments]
        if missing:
            found = input_moments_of(self.model, missing, self.batches)
            self._moments.update({layer.name: found.get(layer.name) for layer in missing})
        return {layer.name: moment for layer in layers if (moment := self._moments[layer.name]) is not None}

    def clipped_grids(self, layers: Sequence[Layer], plan: Plan, *, output_error: bool) -> dict[str, WeightGrid]:
        """The clipped grid (weights.clipped_grid) of each quantized layer of an aligned plan
        at its weight bits: on the layer's output error (`output_error`, with its input
        moments) or on the weights' own error."""
        if self._weights is None:
            self._weights = {t.name: onnx.numpy_helper.to_array(t).astype(np.float32) for t in self.model.graph.initializer}
        entries = plan.by_name()
        chosen = quantized_layers(layers, plan)
        moments = self.moments(chosen) if output_error else {}
        grids = {}
        for layer in chosen:
            bits = int(entries[layer.name].weight_bits)  # type: ignore[arg-type]
            key = (layer.name, bits, output_error)
            if key not in self._grids:
                self._grids[key] = clipped_grid(self._weights[layer.weight], bits, layer.weight_axis, moments.get(layer.name))
            grids[layer.name] = self._grids[key]
        return grids
