"""ONNX element types and tensors as the twin holds them in torch.

Integer containers torch lacks or barely supports are widened to the next signed type that
holds every value (uint16 -> int32, uint32 -> int64, int4/int2 -> int8, uint4/uint2 ->
uint8); the ONNX type stays known to the graph compiler, which is what Q/DQ need.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.BOOL: torch.bool,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.UINT16: torch.int32,
    TensorProto.INT32: torch.int32,
    TensorProto.UINT32: torch.int64,
    TensorProto.INT64: torch.int64,
    TensorProto.INT4: torch.int8,
    TensorProto.UINT4: torch.uint8,
    TensorProto.INT2: torch.int8,
    TensorProto.UINT2: torch.uint8,
}

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})

_NUMPY_WIDENED: dict[int, np.dtype] = {
    TensorProto.UINT16: np.dtype(np.int32),
    TensorProto.UINT32: np.dtype(np.int64),
    TensorProto.INT4: np.dtype(np.int8),
    TensorProto.UINT4: np.dtype(np.uint8),
    TensorProto.INT2: np.dtype(np.int8),
    TensorProto.UINT2: np.dtype(np.uint8),
}


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype holding this ONNX type; KeyError for types the twin cannot hold."""
    return TORCH_DTYPES[elem_type]


def tensor_from_proto(proto: onnx.TensorProto) -> torch.Tensor:
    """A torch copy of an initializer or Constant value (raises KeyError for unsupported types)."""
    dtype = TORCH_DTYPES[proto.data_type]
    array = numpy_helper.to_array(proto)
    if proto.data_type == TensorProto.BFLOAT16:
        return torch.from_numpy(np.asarray(array, dtype=np.float32).copy()).to(dtype)
    widened = _NUMPY_WIDENED.get(proto.data_type)
    array = np.asarray(array, dtype=widened) if widened is not None else np.array(array)
    return torch.from_numpy(array.copy()).to(dtype)


def tensor_to_proto(tensor: torch.Tensor, name: str, elem_type: int) -> onnx.TensorProto:
    """An initializer of the given float ONNX type holding the tensor's values."""
    array = tensor.detach().to("cpu", torch.float32).numpy()
    if elem_type == TensorProto.BFLOAT16:
        return onnx.helper.make_tensor(name, elem_type, array.shape, array.flatten().tolist())
    numpy_type = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return numpy_helper.from_array(array.astype(numpy_type), name)


def scalar_value(tensor: torch.Tensor) -> Any:
    """The Python number in a one-element tensor (shape arithmetic reads its inputs this way)."""
    return tensor.reshape(-1)[0].item()


def int_list(tensor: torch.Tensor) -> list[int]:
    """The values of a 0-d or 1-d integer tensor as Python ints (shapes, axes, pads, starts)."""
    return [int(v) for v in tensor.reshape(-1).tolist()]


def channels_last(images: torch.Tensor) -> torch.Tensor:
    """Image batches in torch's channels-last memory format (values and shape unchanged):
    oneDNN's convolutions, depthwise ones most, run forward and backward about a third
    faster in it on CPU (EfficientNet-Lite0, docs/benchmarks.md#imagenet). A fake-quant
    twin's gradient differs in the last bit between the two formats, which can flip signs
    where a value sits on a rounding step, so every gradient of one attack uses this one."""
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images
