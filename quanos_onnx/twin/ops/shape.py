"""Shape arithmetic and data movement: Shape, Gather, Concat, Reshape, Slice, Pad and friends.

Shape values are int64 tensors on the data's device, read into Python lists where torch
wants sizes. Ops whose parameters moved from attributes to inputs (Slice at 10, Pad at 11,
Split at 13, Squeeze/Unsqueeze at 13) are registered once per form and share one kernel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import torch
from torch.nn import functional as F

from ..registry import NotSupported, register
from ..tensors import int_list, scalar_value, torch_dtype, type_name

Inputs = Sequence[torch.Tensor | None]
Attributes = Mapping[str, Any]


def _optional(inputs: Inputs, index: int) -> torch.Tensor | None:
    return inputs[index] if len(inputs) > index else None


def _prepare_constant(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    if "value" in attrs:
        return {"value": attrs["value"]}
    if "value_float" in attrs:
        return {"value": torch.tensor(attrs["value_float"], dtype=torch.float32)}
    if "value_floats" in attrs:
        return {"value": torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)}
    if "value_int" in attrs:
        return {"value": torch.tensor(attrs["value_int"], dtype=torch.int64)}
    if "value_ints" in attrs:
        return {"value": torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)}
    raise NotSupported(f"only numeric values are implemented, not {sorted(attrs)}")


@register("Constant", since=1, prepare=_prepare_constant)
def constant(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [attrs["value"]]


@register("Identity", since=1)
def identity(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0]]


def _prepare_cast(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    try:
        return {**attrs, "dtype": torch_dtype(attrs["to"])}
    except KeyError:
        raise NotSupported(f"casting to {type_name(attrs['to'])} is not implemented") from None


@register("Cast", since=6, prepare=_prepare_cast)
def cast(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0].to(attrs["dtype"])]


@register("CastLike", since=15)
def cast_like(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0].to(inputs[1].dtype)]


@register("Shape", since=1)
def shape(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values = inputs[0]
    dims = list(values.shape)[attrs.get("start", 0) : attrs.get("end", values.dim())]
    return [torch.tensor(dims, dtype=torch.int64, device=values.device)]


@register("Size", since=1)
def size(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device)]


def _prepare_constant_of_shape(
    node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]
) -> dict[str, Any]:
    value = attrs.get("value", torch.zeros(1, dtype=torch.float32))
    return {"fill": scalar_value(value), "dtype": value.dtype}


@register("ConstantOfShape", since=9, prepare=_prepare_constant_of_shape)
def constant_of_shape(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    dims = inputs[0]
    return [torch.full(int_list(dims), attrs["fill"], dtype=attrs["dtype"], device=dims.device)]


@register("Range", since=11)
def arange(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    values = torch.arange(scalar_value(start), scalar_value(limit), scalar_value(delta), device=start.device)
    return [values.to(start.dtype)]


@register("Reshape", since=5)
def reshape(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    """0 copies the input's dim at that position (unless allowzero), -1 is inferred."""
    values, target = inputs[0], int_list(inputs[1])
    if not attrs.get("allowzero", 0):
        target = [values.shape[i] if dim == 0 else dim for i, dim in enumerate(target)]
    return [values.reshape(target)]


@register("Flatten", since=1)
def flatten(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + values.dim() if axis < 0 else axis
    return [values.reshape(math.prod(values.shape[:axis]), math.prod(values.shape[axis:]))]


@register("Transpose", since=1)
def transpose(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values = inputs[0]
    return [values.permute(attrs.get("perm", list(reversed(range(values.dim())))))]


@register("Concat", since=4)
def concat(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.cat(list(inputs), attrs["axis"])]


@register("Expand", since=8)
def expand(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    """Bidirectional broadcast: a target dim of 1 keeps the input's dim."""
    values = inputs[0]
    return [values.expand(torch.broadcast_shapes(values.shape, tuple(int_list(inputs[1]))))]


@register("Tile", since=6)
def tile(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0].repeat(int_list(inputs[1]))]


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _slice(
    values: torch.Tensor, starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None
) -> torch.Tensor:
    """ONNX Slice: per-axis clamping of starts/ends, negative steps walk backwards."""
    rank = values.dim()
    axes = list(range(len(starts))) if axes is None else [axis % rank for axis in axes]
    steps = [1] * len(starts) if steps is None else steps
    index: list[slice] = [slice(None)] * rank
    backwards: list[tuple[int, int, int, int]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = values.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            index[axis] = slice(_clamp(start, 0, size), _clamp(end, 0, size), step)
        else:
            backwards.append((axis, _clamp(start, 0, size - 1), _clamp(end, -1, size - 1), step))
    result = values[tuple(index)]
    for axis, start, end, step in backwards:
        result = result.index_select(axis, torch.arange(start, end, step, device=values.device))
    return result


@register("Slice", since=1)
def slice_attributes(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [_slice(inputs[0], list(attrs["starts"]), list(attrs["ends"]), attrs.get("axes"), None)]


@register("Slice", since=10)
def slice_inputs(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    axes, steps = _optional(inputs, 3), _optional(inputs, 4)
    return [
        _slice(
            inputs[0],
            int_list(inputs[1]),
            int_list(inputs[2]),
            None if axes is None else int_list(axes),
            None if steps is None else int_list(steps),
        )
    ]


def _prepare_split(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    return {**attrs, "outputs": len(node.output)}


def _split(values: torch.Tensor, axis: int, sizes: list[int] | None, attrs: Attributes) -> list[torch.Tensor]:
    length = values.shape[axis]
    if sizes is None:
        count = attrs.get("num_outputs", attrs["outputs"])
        chunk = math.ceil(length / count)
        sizes = [chunk] * (count - 1) + [length - chunk * (count - 1)]
    return list(torch.split(values, sizes, axis))


@register("Split", since=2, prepare=_prepare_split)
def split_attributes(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    split = attrs.get("split")
    return _split(inputs[0], attrs.get("axis", 0), None if split is None else list(split), attrs)


@register("Split", since=13, prepare=_prepare_split)
def split_inputs(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    split = _optional(inputs, 1)
    return _split(inputs[0], attrs.get("axis", 0), None if split is None else int_list(split), attrs)


def _squeeze(values: torch.Tensor, axes: list[int] | None) -> torch.Tensor:
    if axes is None:
        return values.squeeze()
    return values.squeeze(tuple(axis % values.dim() for axis in axes))


def _unsqueeze(values: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = values.dim() + len(axes)
    for axis in sorted(axis % rank for axis in axes):
        values = values.unsqueeze(axis)
    return values


@register("Squeeze", since=1)
def squeeze_attributes(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    axes = attrs.get("axes")
    return [_squeeze(inputs[0], None if axes is None else list(axes))]


@register("Squeeze", since=13)
def squeeze_inputs(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    axes = _optional(inputs, 1)
    return [_squeeze(inputs[0], None if axes is None else int_list(axes))]


@register("Unsqueeze", since=1)
def unsqueeze_attributes(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [_unsqueeze(inputs[0], list(attrs["axes"]))]


@register("Unsqueeze", since=13)
def unsqueeze_inputs(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [_unsqueeze(inputs[0], int_list(inputs[1]))]


def _non_negative(indices: torch.Tensor, length: int) -> torch.Tensor:
    return torch.where(indices < 0, indices + length, indices)


@register("Gather", since=1)
def gather(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    data, indices = inputs[0], inputs[1]
    axis = attrs.get("axis", 0) % data.dim()
    length = data.shape[axis]
    if indices.dim() == 0:
        index = int(indices)
        return [data.select(axis, index + length if index < 0 else index)]
    flat = _non_negative(indices.reshape(-1).to(device=data.device), length)
    shape = (*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])
    return [data.index_select(axis, flat).reshape(shape)]


@register("GatherElements", since=11)
def gather_elements(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    data, indices = inputs[0], inputs[1]
    axis = attrs.get("axis", 0) % data.dim()
    return [torch.gather(data, axis, _non_negative(indices, data.shape[axis]))]


_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _prepare_pad(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    mode = attrs.get("mode", "constant")
    if mode != "constant" and mode not in _PAD_MODES:
        raise NotSupported(f"pad mode {mode!r} is not implemented")
    return {**attrs, "mode": mode}


def _pad(values: torch.Tensor, pads: list[int], mode: str, fill: float, axes: list[int] | None) -> torch.Tensor:
    """ONNX pads are (begin per axis..., end per axis...); negative values crop."""
    rank = values.dim()
    axes = list(range(rank)) if axes is None else [axis % rank for axis in axes]
    count = len(axes)
    per_axis = {axis: (pads[i], pads[i + count]) for i, axis in enumerate(axes)}
    padded = [axis for axis, (begin, end) in per_axis.items() if begin or end]
    if not padded:
        return values
    torch_pads: list[int] = []
    for axis in range(rank - 1, min(padded) - 1, -1):
        torch_pads += per_axis.get(axis, (0, 0))
    if mode == "constant":
        return F.pad(values, torch_pads, value=fill)
    return F.pad(values, torch_pads, mode=_PAD_MODES[mode])


@register("Pad", since=2, prepare=_prepare_pad)
def pad_attributes(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [_pad(inputs[0], list(attrs["pads"]), attrs["mode"], attrs.get("value", 0.0), None)]


@register("Pad", since=11, prepare=_prepare_pad)
def pad_inputs(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    fill, axes = _optional(inputs, 2), _optional(inputs, 3)
    return [
        _pad(
            inputs[0],
            int_list(inputs[1]),
            attrs["mode"],
            0.0 if fill is None else scalar_value(fill),
            None if axes is None else int_list(axes),
        )
    ]


@register("Trilu", since=14)
def trilu(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    offset = _optional(inputs, 1)
    diagonal = 0 if offset is None else int(scalar_value(offset))
    if attrs.get("upper", 1):
        return [torch.triu(inputs[0], diagonal)]
    return [torch.tril(inputs[0], diagonal)]


@register("CumSum", since=11)
def cumsum(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    values = inputs[0]
    axis = int(scalar_value(inputs[1])) % values.dim()
    if attrs.get("reverse", 0):
        values = values.flip(axis)
    result = torch.cumsum(values, axis)
    if attrs.get("exclusive", 0):
        shifted = result.narrow(axis, 0, result.shape[axis] - 1)
        result = torch.cat([torch.zeros_like(result.narrow(axis, 0, 1)), shifted], axis)
    return [result.flip(axis) if attrs.get("reverse", 0) else result]

