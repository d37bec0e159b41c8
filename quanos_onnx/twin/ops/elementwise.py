"""Elementwise arithmetic, comparisons, logic and activations.

Binary ops broadcast like numpy from opset 7 on, which is torch's rule too; the older
versions with a `broadcast` attribute are not registered. Integer division truncates
toward zero as in ONNX (torch's `/` would return floats).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from ..registry import register
from ..tensors import scalar_value

Inputs = Sequence[torch.Tensor | None]
Attributes = Mapping[str, Any]


@register("Add", since=7)
def add(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0] + inputs[1]]


@register("Sub", since=7)
def sub(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0] - inputs[1]]


@register("Mul", since=7)
def mul(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0] * inputs[1]]


@register("Div", since=7)
def div(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    numerator, denominator = inputs[0], inputs[1]
    if numerator.is_floating_point():
        return [numerator / denominator]
    return [torch.div(numerator, denominator, rounding_mode="trunc")]


@register("Mod", since=10)
def mod(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    if attrs.get("fmod", 0):
        return [torch.fmod(inputs[0], inputs[1])]
    return [torch.remainder(inputs[0], inputs[1])]


@register("Pow", since=7)
def power(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    base, exponent = inputs[0], inputs[1]
    if exponent.dim() == 0 and not exponent.requires_grad:
        return [torch.pow(base, scalar_value(exponent)).to(base.dtype)]
    return [torch.pow(base, exponent).to(base.dtype)]


def _unary(op_type: str, function: Any, since: int = 6) -> None:
    register(op_type, since=since)(lambda attrs, inputs: [function(inputs[0])])


_unary("Neg", torch.neg)
_unary("Abs", torch.abs)
_unary("Reciprocal", torch.reciprocal)
_unary("Sqrt", torch.sqrt)
_unary("Exp", torch.exp)
_unary("Log", torch.log)
_unary("Floor", torch.floor)
_unary("Ceil", torch.ceil)
_unary("Tanh", torch.tanh)
_unary("Sigmoid", torch.sigmoid)
_unary("Relu", torch.relu)
_unary("Erf", torch.erf, since=9)
_unary("Sign", torch.sign, since=9)
_unary("Round", torch.round, since=11)
_unary("Sin", torch.sin, since=7)
_unary("Cos", torch.cos, since=7)
_unary("Softsign", F.softsign, since=1)
_unary("Softplus", F.softplus, since=1)
_unary("Mish", F.mish, since=18)
_unary("HardSwish", F.hardswish, since=14)
_unary("Not", torch.logical_not, since=1)


@register("LeakyRelu", since=6)
def leaky_relu(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))]


@register("PRelu", since=7)
def prelu(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values, slope = inputs[0], inputs[1]
    return [torch.where(values < 0, values * slope, values)]


@register("Elu", since=6)
def elu(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [F.elu(inputs[0], attrs.get("alpha", 1.0))]


@register("Celu", since=12)
def celu(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [F.celu(inputs[0], attrs.get("alpha", 1.0))]


@register("Selu", since=6)
def selu(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    values = inputs[0]
    return [gamma * torch.where(values > 0, values, alpha * torch.expm1(values))]


@register("HardSigmoid", since=6)
def hard_sigmoid(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.clamp(attrs.get("alpha", 0.2) * inputs[0] + attrs.get("beta", 0.5), 0.0, 1.0)]


@register("Gelu", since=20)
def gelu(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))]


@register("Clip", since=6)
def clip_attributes(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.clamp(inputs[0], attrs.get("min", -math.inf), attrs.get("max", math.inf))]


@register("Clip", since=11)
def clip(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    """Bounds may be integer tensors (the integer-grid Clip between Q and DQ, whose input the
    twin holds as float), so they are cast to the input's dtype."""
    values = inputs[0]
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    if _float_scalar(low) and _float_scalar(high):
        # ReLU6 and friends: a clamp with Python-number bounds takes fewer backward kernels
        # than one with tensor bounds (a large share of MobileNet and EfficientNet attack
        # time). Not hardtanh, although it is cheaper still: its gradient is zero for inputs
        # exactly on a bound, and inputs do sit there (black pixels on a Clip at the input's
        # calibrated minimum 0), so white-box attacks could never move them: gradient masking.
        return [torch.clamp(values, float(low), float(high))]
    low = None if low is None else low.to(values.dtype)
    high = None if high is None else high.to(values.dtype)
    if low is None and high is None:
        return [values]
    return [torch.clamp(values, low, high)]


def _float_scalar(bound: torch.Tensor | None) -> bool:
    return bound is not None and bound.dim() == 0 and bound.is_floating_point()


def _variadic(op_type: str, combine: Any) -> None:
    register(op_type, since=8)(lambda attrs, inputs: [functools.reduce(combine, inputs)])


_variadic("Max", torch.maximum)
_variadic("Min", torch.minimum)
_variadic("Sum", torch.add)


@register("Mean", since=8)
def mean(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [functools.reduce(torch.add, inputs) / len(inputs)]


def _binary(op_type: str, function: Any, since: int) -> None:
    register(op_type, since=since)(lambda attrs, inputs: [function(inputs[0], inputs[1])])


_binary("Equal", torch.eq, 7)
_binary("Less", torch.lt, 7)
_binary("Greater", torch.gt, 7)
_binary("LessOrEqual", torch.le, 12)
_binary("GreaterOrEqual", torch.ge, 12)
_binary("And", torch.logical_and, 7)
_binary("Or", torch.logical_or, 7)
_binary("Xor", torch.logical_xor, 7)


@register("Where", since=9)
def where(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]
