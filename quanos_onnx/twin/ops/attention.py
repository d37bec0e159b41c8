"""Attention (opset 23): what the dynamo exporter emits for scaled_dot_product_attention.

Self and cross attention, multi-head, grouped-query and multi-query, 3-D or 4-D inputs,
boolean or additive masks, causal masking and softcap. The KV-cache inputs and outputs
(past_key/past_value, present_*) and the qk_matmul_output debug output are generative
decoding features an image classifier does not have; nodes using them are rejected at
build time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import torch
from onnx import TensorProto
from torch.nn import functional as F

from ..registry import NotSupported, register

Inputs = Sequence[torch.Tensor | None]
Attributes = Mapping[str, Any]


def _prepare_attention(node: onnx.NodeProto, attrs: dict[str, Any], types: Sequence[int | None]) -> dict[str, Any]:
    if any(node.input[4:]) or any(node.output[1:]):
        raise NotSupported("past/present key-value caches and qk_matmul_output are not implemented")
    if attrs.get("softmax_precision", 0) not in (0, TensorProto.FLOAT):
        raise NotSupported("softmax_precision other than float is not implemented")
    return attrs


def _heads_first(values: torch.Tensor, heads: int | None) -> torch.Tensor:
    """(B, S, heads * size) -> (B, heads, S, size); 4-D inputs are already in that layout."""
    if values.dim() == 4:
        return values
    if not heads:
        raise ValueError("3-D Attention inputs need q_num_heads and kv_num_heads")
    batch, length, hidden = values.shape
    return values.reshape(batch, length, heads, hidden // heads).transpose(1, 2)


def _bias(mask: torch.Tensor | None, causal: bool, rows: int, columns: int, like: torch.Tensor) -> torch.Tensor | None:
    bias = None
    if causal:
        allowed = torch.ones(rows, columns, dtype=torch.bool, device=like.device).tril()
        bias = torch.zeros(rows, columns, dtype=like.dtype, device=like.device).masked_fill(~allowed, -math.inf)
    if mask is not None:
        if mask.shape[-1] < columns:
            missing = columns - mask.shape[-1]
            mask = F.pad(mask, (0, missing), value=False if mask.dtype == torch.bool else -math.inf)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, -math.inf)
        bias = mask if bias is None else bias + mask
    return bias


@register("Attention", since=23, prepare=_prepare_attention)
def attention(attrs: Attributes, inputs: Inputs) -> list[torch.Tensor]:
    query_in = inputs[0]
    query = _heads_first(query_in, attrs.get("q_num_heads"))
    key = _heads_first(inputs[1], attrs.get("kv_num_heads"))
    value = _heads_first(inputs[2], attrs.get("kv_num_heads"))
    mask = inputs[3] if len(inputs) > 3 else None
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = attrs.get("scale", 1.0 / math.sqrt(query.shape[-1]))
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    softcap = attrs.get("softcap", 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    bias = _bias(mask, bool(attrs.get("is_causal", 0)), scores.shape[-2], scores.shape[-1], scores)
    weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
    if bias is not None:
        weights = torch.nan_to_num(weights, nan=0.0)
    result = torch.matmul(weights, value)
    if query_in.dim() == 3:
        batch, heads, length, size = result.shape
        result = result.transpose(1, 2).reshape(batch, length, heads * size)
    return [result]
