"""Per-output-channel k-bit weight scales by clipping search instead of absmax.

Absmax spends the grid on each channel's largest weight; at 2-4 bits most weights then
round to zero. The search tries a grid of clipping ratios per channel and keeps the one
with the least error: `mse`, the squared weight error (Quark's MinMSE), or `output`, the
expected squared error of the layer's output on the calibration inputs,
E||(Wq - W) x||^2 = dW H dW^T with H = E[x x^T] over the input patches (the criterion of
AIMET's SeqMSE, here on the float model's inputs). H is accumulated batch by batch (its size
is fixed by the layer, not the data). Layers whose patches this module does not form
(ConvTranspose, 1-D/3-D convs, auto_pad) fall back to `mse`. Ties keep the widest range, so a
channel absmax already serves best is left alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..layers import Layer
from ..model import Runner
from ..passes.qdq import WeightGrid
from ..plan import Plan

WEIGHT_CLIPPINGS = ("absmax", "mse", "output")
CLIP_RATIOS = np.linspace(1.0, 0.1, 46)
"""Candidate ratios of each channel's absmax, widest first (steps of 0.02)."""
MOMENT_SAMPLES = 32
"""Calibration samples H is estimated on: a layer's patches outnumber its D^2 entries by far
already, and the D x D products are the expensive part of the stage."""


def clipped_grid(
    weight: np.ndarray, bits: int, axis: int | None, moments: np.ndarray | None = None
) -> WeightGrid:
    """Symmetric narrow-range k-bit integers and per-channel scales of least error.

    `moments` (groups x D x D, E[x x^T] of each group's input patches) switches the error
    from the weights' to the layer output's.
    """
    limit = 2 ** (bits - 1) - 1
    rows = channel_rows(np.asarray(weight, dtype=np.float32), axis)
    absmax = np.abs(rows).max(axis=1)
    absmax = np.where(absmax > 0, absmax, np.float32(1.0))
    scales = (absmax[None, :] * CLIP_RATIOS[:, None].astype(np.float32) / np.float32(limit)).astype(np.float32)
    deltas = np.clip(np.round(rows[None] / scales[:, :, None]), -limit, limit) * scales[:, :, None] - rows[None]
    errors = _errors(deltas, moments)
    best_scale = scales[np.argmin(errors, axis=0), np.arange(rows.shape[0])]
    scale = best_scale
    if axis is None:
        scale = scale.reshape(())
        broadcast = scale
    else:
        shape = [1] * weight.ndim
        shape[axis] = -1
        broadcast = scale.reshape(shape)
    integers = np.clip(np.round(weight / broadcast), -limit, limit).astype(np.int8 if bits <= 8 else np.int16)
    return WeightGrid(integers, scale)


def clipped_grids(
    weights: Mapping[str, np.ndarray],
    layers: Sequence[Layer],
    plan: Plan,
    moments: Mapping[str, np.ndarray] | None = None,
) -> dict[str, WeightGrid]:
    """The clipped grid of every quantized layer of an aligned plan, at its weight bits."""
    entries = plan.by_name()
    moments = moments or {}
    return {
        layer.name: clipped_grid(
            weights[layer.weight], entries[layer.name].weight_bits, layer.weight_axis, moments.get(layer.name)
        )
        for layer in quantized_layers(layers, plan)
    }


def quantized_layers(layers: Sequence[Layer], plan: Plan) -> list[Layer]:
    entries = plan.by_name()
    return [
        layer
        for layer in layers
        if layer.name in entries and entries[layer.name].quantized and entries[layer.name].weight_bits is not None
    ]


def input_moments(
    proto: onnx.ModelProto, layers: Sequence[Layer], plan: Plan, batches: Iterable[np.ndarray]
) -> dict[str, np.ndarray]:
    """E[x x^T] of each quantized layer's input patches (per group) on the float model,
    from the first MOMENT_SAMPLES calibration samples."""
    return input_moments_of(proto, quantized_layers(layers, plan), batches)


def input_moments_of(
    proto: onnx.ModelProto, layers: Sequence[Layer], batches: Iterable[np.ndarray]
) -> dict[str, np.ndarray]:
    """input_moments for the given layers (those whose patches this module forms)."""
    import torch

    nodes = {node.name: node for node in proto.graph.node}
    patches = {
        layer.name: shaper
        for layer in layers
        if (shaper := patch_shaper(layer, nodes[layer.name])) is not None
    }
    if not patches:
        return {}
    inputs = sorted({layer.input for layer in layers if layer.name in patches})
    runner = Runner(proto, inputs, fuse=False)  # the same moments whichever layers are asked for
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(patches, 0)
    by_name = {layer.name: layer for layer in layers}
    seen = 0
    with torch.no_grad():
        for batch in batches:
            if seen >= MOMENT_SAMPLES:
                break
            batch = batch[: MOMENT_SAMPLES - seen]
            seen += len(batch)
            values = dict(zip(inputs, runner.run(batch, inputs)))
            for name, shaper in patches.items():
                columns = shaper(torch.from_numpy(np.ascontiguousarray(values[by_name[name].input], dtype=np.float32)))
                product = _second_moments(columns)
                sums[name] = sums[name] + product if name in sums else product
                counts[name] += columns.shape[0] * columns.shape[-1]
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def patch_shaper(layer: Layer, node: onnx.NodeProto):
    """A function from the layer's input batch to its patches, samples x groups x D x
    positions, or None when this module does not form them."""
    import torch.nn.functional as functional

    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if layer.op == "Gemm":
        if attributes.get("transA", 0):
            return None
        return lambda x: x.reshape(1, 1, x.shape[0], -1).transpose(2, 3)
    if layer.op == "MatMul":
        return lambda x: x.reshape(1, 1, -1, x.shape[-1]).transpose(2, 3)
    if layer.op != "Conv" or len(layer.kernel) != 2 or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    groups = int(attributes.get("group", 1))
    top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
    dilations = tuple(attributes.get("dilations", [1, 1]))

    def shaper(x):
        padded = functional.pad(x, (left, right, top, bottom))
        columns = functional.unfold(padded, tuple(layer.kernel), dilation=dilations, stride=tuple(layer.strides))
        return columns.reshape(x.shape[0], groups, -1, columns.shape[-1])

    return shaper


def _second_moments(columns) -> np.ndarray:  # noqa: ANN001 - torch.Tensor, imported lazily
    """Sum over samples and positions of p p^T per group, from samples x groups x D x positions."""
    samples, groups, size, positions = columns.shape
    flat = columns.reshape(samples * groups, size, positions)
    products = (flat @ flat.transpose(1, 2)).reshape(samples, groups, size, size).sum(dim=0)
    return products.double().numpy()


def _errors(deltas: np.ndarray, moments: np.ndarray | None) -> np.ndarray:
    """Error per (ratio, channel) of the weight deltas (ratios x channels x D)."""
    if moments is None:
        return (deltas.astype(np.float64) ** 2).sum(axis=2)
    import torch

    groups = moments.shape[0]
    grouped = torch.from_numpy(np.ascontiguousarray(deltas)).reshape(deltas.shape[0], groups, -1, deltas.shape[2])
    hessian = torch.from_numpy(moments.astype(np.float32))
    errors = (torch.matmul(grouped, hessian) * grouped).sum(dim=3)
    return errors.reshape(deltas.shape[0], -1).double().numpy()


def channel_rows(weight: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return weight.reshape(1, -1)
    return np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
