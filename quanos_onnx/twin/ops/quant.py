"""QuantizeLinear and DequantizeLinear as fake quantization (see twin.fakequant).

The integer container of QuantizeLinear is fixed by the graph, not by tensor values: the
output_dtype attribute (opset 21) or else the zero point's element type, or uint8 when
there is no zero point. It is resolved once at build time because the twin holds the
quantized values in float tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import torch
from onnx import TensorProto

from ..fakequant import CONTAINERS, dequantize, quantize
from ..registry import NotSupported, register
from ..tensors import FLOAT_TYPES, type_name

Inputs = Sequence[torch.Tensor | None]
Attributes = Mapping[str, Any]


def _optional(inputs: Inputs, index: int) -> torch.Tensor | None:
    return inputs[index] if len(inputs) > index else None


def _prepare_quantize(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    has_zero_point = len(node.input) > 2 and bool(node.input[2])
    elem_type = attrs.get("output_dtype", 0)
    if not elem_type:
        elem_type = types[2] if has_zero_point else TensorProto.UINT8
    if elem_type is None:
        raise NotSupported("the zero point's element type is unknown, so its container is too")
    if elem_type not in CONTAINERS:
        raise NotSupported(f"quantizing to {type_name(elem_type)} is not implemented")
    if attrs.get("precision", 0) not in (0, TensorProto.FLOAT):
        raise NotSupported(f"precision {type_name(attrs['precision'])} is not implemented")
    return {"container": CONTAINERS[elem_type], "axis": attrs.get("axis", 1), "block_size": attrs.get("block_size", 0)}


@register("QuantizeLinear", since=10, prepare=_prepare_quantize)
def quantize_linear(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [
        quantize(
            inputs[0],
            inputs[1],
            _optional(inputs, 2),
            attrs["container"],
            axis=attrs["axis"],
            block_size=attrs["block_size"],
        )
    ]


def _prepare_dequantize(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    if types[0] is not None and types[0] not in CONTAINERS and types[0] != TensorProto.INT32:
        raise NotSupported(f"dequantizing {type_name(types[0])} is not implemented")
    output_type = attrs.get("output_dtype", 0)
    if output_type and output_type not in FLOAT_TYPES:
        raise NotSupported(f"output_dtype {type_name(output_type)} is not implemented")
    return {"axis": attrs.get("axis", 1), "block_size": attrs.get("block_size", 0)}


@register("DequantizeLinear", since=10, prepare=_prepare_dequantize)
def dequantize_linear(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    return [
        dequantize(inputs[0], inputs[1], _optional(inputs, 2), axis=attrs["axis"], block_size=attrs["block_size"])
    ]
