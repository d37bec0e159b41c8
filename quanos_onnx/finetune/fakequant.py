"""Fake quantization of weights, biases and activations in torch, on the compiler's grids.

These reproduce passes.qdq bit for bit, so a fine-tuned model and the QDQ model the compile
passes write from its weights compute the same thing: weights are symmetric narrow-range
integers per output channel with scale = max|w| / (2^(k-1) - 1), re-derived from the
current weights at every call, so the grid follows the weights as they train; biases are
int32 at input scale x weight scale; activations use the calibrated grid of
passes.qdq.activation_quantizer.

Gradients are straight-through, as in the twin's Q/DQ nodes and the fine-tuning graph:
rounding passes them unchanged (also through the scale, to each channel's largest weight),
saturation passes them only inside the representable range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..passes.calibrate import Range
from ..passes.qdq import ActivationQuantizer, activation_quantizer
from ..twin.fakequant import round_straight_through

INT32_RANGE = (-(2**31), 2**31 - 1)


def weight_limit(bits: int) -> int:
    """The largest integer magnitude of a k-bit symmetric narrow-range weight."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """max|w| / limit per slice along `axis` (per tensor when None), shaped to broadcast;
    float32 as passes.qdq.quantize_weight computes it, and 1.0 where a channel is all zero."""
    magnitude = weight.abs().to(torch.float32)
    if axis is None:
        absmax = magnitude.amax()
    else:
        axis = axis % weight.dim()
        others = [dim for dim in range(weight.dim()) if dim != axis]
        absmax = magnitude.amax(dim=others, keepdim=True) if others else magnitude
    scale = absmax / weight_limit(bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fake_quant_weight(weight: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """The weight on its k-bit grid: clamp(round(w / s), -limit, limit) * s."""
    scale = weight_scale(weight, bits, axis)
    limit = weight_limit(bits)
    integers = torch.clamp(round_straight_through(weight / scale), -limit, limit)
    return integers * scale


def fake_quant_bias(
    bias: torch.Tensor, weight: torch.Tensor, weight_bits: int, axis: int | None, input_scale: float
) -> torch.Tensor:
    """The bias as int32 at scale = input scale x weight scale (what onnxruntime adds in
    QLinearConv), computed in float64 like passes.qdq so the grid is the same."""
    scale = weight_scale(weight, weight_bits, axis).reshape(-1).to(torch.float64)
    bias_scale = (input_scale * scale).to(torch.float32)
    bias_scale = torch.where(bias_scale > 0, bias_scale, torch.ones_like(bias_scale))
    integers = round_straight_through(bias.to(torch.float64) / bias_scale.to(torch.float64))
    integers = torch.clamp(integers, *INT32_RANGE)
    return integers.to(torch.float32) * bias_scale


@dataclass(frozen=True)
class ActivationGrid:
    """One activation quantizer as onnxruntime runs it: an optional float Clip (wide
    containers), then q = clamp(round(x / scale) + zero_point, low, high), then
    (q - zero_point) * scale."""

    scale: float
    zero_point: int
    low: int
    high: int
    float_clip: tuple[float, float] | None = None

    @classmethod
    def from_quantizer(cls, quantizer: ActivationQuantizer) -> ActivationGrid:
        low, high = quantizer.levels
        float_clip = None
        if quantizer.wide and quantizer.needs_clip:
            float_clip = tuple(
                float(np.float32((level - quantizer.zero_point) * quantizer.scale)) for level in quantizer.levels
            )
        return cls(quantizer.scale, quantizer.zero_point, low, high, float_clip)

    @classmethod
    def calibrated(cls, bits: int, low: float, high: float) -> ActivationGrid:
        """The grid passes.qdq gives a tensor whose calibrated range is [low, high]."""
        return cls.from_quantizer(activation_quantizer(bits, Range(low, high)))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if self.float_clip is not None:
            values = torch.clamp(values, *self.float_clip)
        scale = torch.tensor(self.scale, dtype=torch.float32)
        integers = round_straight_through(values / scale) + self.zero_point
        integers = torch.clamp(integers, self.low, self.high)
        return (integers - self.zero_point) * scale
