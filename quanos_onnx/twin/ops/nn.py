"""Convolution, pooling, normalization, Gemm/MatMul, Softmax and Dropout.

ONNX pads are (begin..., end...) per spatial axis and may be asymmetric (SAME_UPPER,
SAME_LOWER, or explicit); torch convolutions and pools only pad symmetrically, so
asymmetric padding is applied with F.pad first. Average pooling without counting the
padding divides by the number of real elements in each window, which the ratio of two
zero-padded poolings reproduces for any padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import torch
from torch.nn import functional as F

from ...layers import spatial_pads
from ..registry import NotSupported, register

Inputs = Sequence[torch.Tensor | None]
Attributes = Mapping[str, Any]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _optional(inputs: Inputs, index: int) -> torch.Tensor | None:
    return inputs[index] if len(inputs) > index else None


def torch_pads(pads: Sequence[tuple[int, int]]) -> list[int]:
    """F.pad order: last axis first, (begin, end) each."""
    return [value for begin_end in reversed(pads) for value in begin_end]


def _pad_for_torch(
    values: torch.Tensor, pads: Sequence[tuple[int, int]], kernel: Sequence[int], fill: float
) -> tuple[torch.Tensor, list[int]]:
    """Symmetric padding torch can do itself is returned as `padding`; the rest is applied here."""
    if all(begin == end and begin <= extent // 2 for (begin, end), extent in zip(pads, kernel)):
        return values, [begin for begin, _ in pads]
    return F.pad(values, torch_pads(pads), value=fill), [0] * len(pads)


def strides_and_dilations(attrs: Attributes, spatial: int) -> tuple[list[int], list[int]]:
    return list(attrs.get("strides", [1] * spatial)), list(attrs.get("dilations", [1] * spatial))


@register("Conv", since=1)
def conv(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values, weight, bias = inputs[0], inputs[1], _optional(inputs, 2)
    spatial = values.dim() - 2
    kernel = list(weight.shape[2:])
    strides, dilations = strides_and_dilations(attrs, spatial)
    pads = spatial_pads(attrs, values.shape[2:], kernel, strides, dilations)
    if all(begin == end for begin, end in pads):
        padding = [begin for begin, _ in pads]
    else:
        values, padding = F.pad(values, torch_pads(pads)), [0] * spatial
    return [_CONV[spatial](values, weight, bias, strides, padding, dilations, attrs.get("group", 1))]


def _prepare_conv_transpose(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotSupported("output_shape and SAME auto_pad are not implemented; give explicit pads")
    return attrs


@register("ConvTranspose", since=1, prepare=_prepare_conv_transpose)
def conv_transpose(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values, weight, bias = inputs[0], inputs[1], _optional(inputs, 2)
    spatial = values.dim() - 2
    strides, dilations = strides_and_dilations(attrs, spatial)
    flat = [0] * (2 * spatial) if attrs.get("auto_pad") == "VALID" else attrs.get("pads", [0] * (2 * spatial))
    output_padding = list(attrs.get("output_padding", [0] * spatial))
    result = _CONV_TRANSPOSE[spatial](
        values, weight, bias, strides, 0, output_padding, attrs.get("group", 1), dilations
    )
    for axis, (begin, end) in enumerate(zip(flat[:spatial], flat[spatial:]), start=2):
        result = result.narrow(axis, begin, result.shape[axis] - begin - end)
    return [result]


def _prepare_max_pool(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    if len(node.output) > 1 and node.output[1]:
        raise NotSupported("the Indices output is not implemented")
    return attrs


@register("MaxPool", since=1, prepare=_prepare_max_pool)
def max_pool(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values = inputs[0]
    kernel = list(attrs["kernel_shape"])
    strides, dilations = strides_and_dilations(attrs, len(kernel))
    pads = spatial_pads(attrs, values.shape[2:], kernel, strides, dilations)
    values, padding = _pad_for_torch(values, pads, kernel, -math.inf)
    pool = _MAX_POOL[len(kernel)]
    return [pool(values, kernel, strides, padding, dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))]


def _prepare_average_pool(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    if any(d != 1 for d in attrs.get("dilations", [])):
        raise NotSupported("dilated average pooling is not implemented")
    return attrs


@register("AveragePool", since=1, prepare=_prepare_average_pool)
def average_pool(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values = inputs[0]
    kernel = list(attrs["kernel_shape"])
    spatial = len(kernel)
    strides = list(attrs.get("strides", [1] * spatial))
    pads = spatial_pads(attrs, values.shape[2:], kernel, strides, [1] * spatial)
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0))
    pool = _AVG_POOL[spatial]
    if all(begin == end and begin <= extent // 2 for (begin, end), extent in zip(pads, kernel)):
        padding = [begin for begin, _ in pads]
        return [pool(values, kernel, strides, padding, ceil_mode, include_pad)]
    padded = F.pad(values, torch_pads(pads))
    window_mean = pool(padded, kernel, strides, 0, ceil_mode, True)
    if include_pad:
        return [window_mean]
    real = F.pad(torch.ones((1, 1, *values.shape[2:]), dtype=values.dtype, device=values.device), torch_pads(pads))
    return [window_mean / pool(real, kernel, strides, 0, ceil_mode, True)]


@register("GlobalAveragePool", since=1)
def global_average_pool(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values = inputs[0]
    return [values.mean(dim=tuple(range(2, values.dim())), keepdim=True)]


@register("GlobalMaxPool", since=1)
def global_max_pool(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values = inputs[0]
    return [values.amax(dim=tuple(range(2, values.dim())), keepdim=True)]


def _single_output(what: str) -> Any:
    def prepare(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
        if any(node.output[1:]):
            raise NotSupported(f"only the first output is implemented ({what})")
        return attrs

    return prepare


def _prepare_batch_norm(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    if attrs.get("training_mode", 0) or attrs.get("spatial", 1) != 1:
        raise NotSupported("only inference mode with spatial=1 is implemented")
    return _single_output("running statistics are inference-only")(node, attrs, types)


@register("BatchNormalization", since=7, prepare=_prepare_batch_norm)
def batch_norm(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    """Inference mode: the running statistics are constants (detached, as torch has no gradient for them)."""
    values, scale, bias, mean, variance = inputs[:5]
    epsilon = attrs.get("epsilon", 1e-5)
    return [F.batch_norm(values, mean.detach(), variance.detach(), scale, bias, False, 0.0, epsilon)]


@register("LayerNormalization", since=17, prepare=_single_output("Mean and InvStdDev are not produced"))
def layer_norm(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values, scale, bias = inputs[0], inputs[1], _optional(inputs, 2)
    axis = attrs.get("axis", -1) % values.dim()
    epsilon = attrs.get("epsilon", 1e-5)
    shape = tuple(values.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return [F.layer_norm(values, shape, scale, bias, epsilon)]
    dims = tuple(range(axis, values.dim()))
    centered = values - values.mean(dim=dims, keepdim=True)
    normalized = centered * torch.rsqrt(centered.square().mean(dim=dims, keepdim=True) + epsilon) * scale
    return [normalized if bias is None else normalized + bias]


@register("InstanceNormalization", since=6)
def instance_norm(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values, scale, bias = inputs[:3]
    return [F.instance_norm(values, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))]


@register("Gemm", since=7)
def gemm(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    a, b, c = inputs[0], inputs[1], _optional(inputs, 2)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        if alpha == 1.0 and (c is None or (beta == 1.0 and c.dim() == 1 and c.numel() == b.shape[0])):
            return [F.linear(a, b, c)]
        b = b.t()
    product = a @ b
    if alpha != 1.0:
        product = product * alpha
    if c is not None:
        product = product + (c if beta == 1.0 else beta * c)
    return [product]


@register("MatMul", since=1)
def matmul(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.matmul(inputs[0], inputs[1])]


@register("Einsum", since=12)
def einsum(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.einsum(attrs["equation"], *inputs)]


def _coerced_2d(function: Any) -> Any:
    """Softmax before opset 13: flatten to [prod(shape[:axis]), -1], normalize rows, restore."""

    def run(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
        values = inputs[0]
        axis = attrs.get("axis", 1) % max(values.dim(), 1)
        rows = math.prod(values.shape[:axis])
        return [function(values.reshape(rows, -1), 1).reshape(values.shape)]

    return run


register("Softmax", since=1)(_coerced_2d(torch.softmax))
register("LogSoftmax", since=1)(_coerced_2d(torch.log_softmax))


@register("Softmax", since=13)
def softmax(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.softmax(inputs[0], attrs.get("axis", -1))]


@register("LogSoftmax", since=13)
def log_softmax(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.log_softmax(inputs[0], attrs.get("axis", -1))]


def _prepare_dropout(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    return {**attrs, "mask_output": len(node.output) > 1 and bool(node.output[1])}


@register("Dropout", since=7, prepare=_prepare_dropout)
def dropout(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    """Inference semantics (identity, all-true mask), as onnxruntime runs exported models."""
    values = inputs[0]
    if attrs["mask_output"]:
        return [values, torch.ones_like(values, dtype=torch.bool)]
    return [values]
