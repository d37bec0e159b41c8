"""QuantizeLinear / DequantizeLinear as differentiable fake quantization.

Forward is onnxruntime's arithmetic exactly: q = saturate(round_half_even(x / scale) + zp)
and x' = (q - zp) * scale, evaluated in float32 like ORT's CPU kernels (x / scale is a true
division there too). The quantized value is kept as a float tensor holding integers so the
autograd graph stays connected; its ONNX container decides the saturation bounds.

Backward is the straight-through estimator: rounding passes the gradient unchanged, and
the saturation clamp (like a following Clip on the integer grid) passes it only inside
its range, so d x'/d x = 1 inside the representable range and 0 outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from onnx import TensorProto


@dataclass(frozen=True)
class IntegerContainer:
    """An ONNX integer type a quantized tensor is stored in, with its saturation bounds."""

    elem_type: int
    name: str
    minimum: int
    maximum: int


CONTAINERS: dict[int, IntegerContainer] = {
    c.elem_type: c
    for c in (
        IntegerContainer(TensorProto.UINT8, "uint8", 0, 255),
        IntegerContainer(TensorProto.INT8, "int8", -128, 127),
        IntegerContainer(TensorProto.UINT16, "uint16", 0, 65535),
        IntegerContainer(TensorProto.INT16, "int16", -32768, 32767),
        IntegerContainer(TensorProto.UINT4, "uint4", 0, 15),
        IntegerContainer(TensorProto.INT4, "int4", -8, 7),
        IntegerContainer(TensorProto.UINT2, "uint2", 0, 3),
        IntegerContainer(TensorProto.INT2, "int2", -2, 1),
    )
}


class _RoundStraightThrough(torch.autograd.Function):
    """torch.round (half to even, as ORT) forward; identity backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, values: torch.Tensor) -> torch.Tensor:
        return torch.round(values)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_straight_through(values: torch.Tensor) -> torch.Tensor:
    return _RoundStraightThrough.apply(values)


def broadcast_parameter(parameter: torch.Tensor, rank: int, axis: int, block_size: int, length: int) -> torch.Tensor:
    """Shape a scale or zero point so it broadcasts against a tensor of the given rank.

    Per-tensor parameters (0-d or one element) stay scalars; per-axis ones (1-d, one value
    per slice along `axis`) get singleton dims around the axis; blocked ones (same rank,
    one value per `block_size` slices along `axis`) are repeated to full length.
    """
    if parameter.dim() == 0 or (parameter.dim() == 1 and parameter.numel() == 1 and block_size == 0):
        return parameter.reshape(())
    axis = axis % rank
    if block_size > 0:
        return parameter.repeat_interleave(block_size, dim=axis).narrow(axis, 0, length)
    shape = [1] * rank
    shape[axis] = parameter.numel()
    return parameter.reshape(shape)


def quantize(
    values: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    container: IntegerContainer,
    *,
    axis: int = 1,
    block_size: int = 0,
) -> torch.Tensor:
    """QuantizeLinear: integers (in a float tensor) saturated to the container's range."""
    rank, length = values.dim(), values.shape[axis % values.dim()] if values.dim() else 1
    scale = broadcast_parameter(scale, rank, axis, block_size, length).to(values.dtype)
    quantized = round_straight_through(values / scale)
    if zero_point is not None:
        quantized = quantized + broadcast_parameter(zero_point, rank, axis, block_size, length).to(values.dtype)
    return torch.clamp(quantized, container.minimum, container.maximum)


def dequantize(
    quantized: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    axis: int = 1,
    block_size: int = 0,
) -> torch.Tensor:
    """DequantizeLinear: (q - zero_point) * scale, for integer tensors or float-held integers."""
    rank, length = quantized.dim(), quantized.shape[axis % quantized.dim()] if quantized.dim() else 1
    scale = broadcast_parameter(scale, rank, axis, block_size, length)
    values = quantized.to(scale.dtype)
    if zero_point is not None:
        values = values - broadcast_parameter(zero_point, rank, axis, block_size, length).to(scale.dtype)
    return values * scale
