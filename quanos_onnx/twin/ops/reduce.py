"""Reductions and ArgMax/ArgMin.

The axes of Reduce* ops are an attribute up to opset 17 (ReduceSum: 12) and an optional
input afterwards; with no axes every axis is reduced, unless noop_with_empty_axes says
the op is then an identity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..registry import register
from ..tensors import int_list

Inputs = Sequence[torch.Tensor | None]
Attributes = Mapping[str, Any]
Reduction = Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]


def _product(values: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):
        values = torch.prod(values, dim, keepdim=keepdim)
    return values


_REDUCTIONS: dict[str, Reduction] = {
    "ReduceMean": lambda values, dims, keep: torch.mean(values, dims, keepdim=keep),
    "ReduceSum": lambda values, dims, keep: torch.sum(values, dims, keepdim=keep),
    "ReduceMax": lambda values, dims, keep: torch.amax(values, dims, keepdim=keep),
    "ReduceMin": lambda values, dims, keep: torch.amin(values, dims, keepdim=keep),
    "ReduceProd": _product,
    "ReduceL1": lambda values, dims, keep: torch.sum(values.abs(), dims, keepdim=keep),
    "ReduceL2": lambda values, dims, keep: torch.linalg.vector_norm(values, 2, dims, keepdim=keep),
    "ReduceSumSquare": lambda values, dims, keep: torch.sum(values * values, dims, keepdim=keep),
    "ReduceLogSumExp": lambda values, dims, keep: torch.logsumexp(values, dims, keepdim=keep),
}

_AXES_BECAME_INPUT = {"ReduceSum": 13}
"""Opset at which each op's axes moved from attribute to input (18 for those not listed)."""


def _reduce(reduction: Reduction, values: torch.Tensor, axes: list[int] | None, attrs: Attributes) -> torch.Tensor:
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return values
        axes = list(range(values.dim()))
    dims = tuple(sorted(axis % values.dim() for axis in axes))
    return reduction(values, dims, bool(attrs.get("keepdims", 1)))


def _register_reduction(op_type: str, reduction: Reduction) -> None:
    def with_attribute(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
        axes = attrs.get("axes")
        return [_reduce(reduction, inputs[0], None if axes is None else list(axes), attrs)]

    def with_input(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
        axes = inputs[1] if len(inputs) > 1 else None
        return [_reduce(reduction, inputs[0], None if axes is None else int_list(axes), attrs)]

    register(op_type, since=1)(with_attribute)
    register(op_type, since=_AXES_BECAME_INPUT.get(op_type, 18))(with_input)


for _op_type, _reduction in _REDUCTIONS.items():
    _register_reduction(_op_type, _reduction)


def _arg_extreme(find: Callable[..., torch.Tensor]) -> Callable[[Attributes, Inputs], list[torch.Tensor]]:
    def run(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
        values = inputs[0]
        axis = attrs.get("axis", 0) % values.dim()
        keepdim = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            flipped = find(values.flip(axis), axis, keepdim=keepdim)
            return [values.shape[axis] - 1 - flipped]
        return [find(values, axis, keepdim=keepdim)]

    return run


register("ArgMax", since=1)(_arg_extreme(torch.argmax))
register("ArgMin", since=1)(_arg_extreme(torch.argmin))
