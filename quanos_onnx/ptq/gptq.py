"""GPTQ: each layer's rounding chosen column by column, with second-order error feedback.

AdaRound and BRECQ (reconstruct.py) learn the rounding by gradient descent through the twin,
and the papers need 10,000-20,000 steps per unit for it; at the hundred steps a 2-core
machine affords on an ImageNet model, most rounding variables are still undecided when they
are rounded (docs/benchmarks.md, "Why units end worse"). GPTQ (Frantar et al., ICLR 2023,
after OBQ, NeurIPS 2022) solves the layer-wise problem in closed form and greedily: it
rounds one input column of W at a time and moves the columns not yet rounded so that they
cancel that column's error, through the Cholesky factor of the inverse of H = E[x x^T] over
the layer's input patches x. One D x D factorization per group and D rank-one updates; the
cost is the two onnxruntime passes per layer that measure its inputs, each on the models
cut to that layer (model.computing_only).

Choices (docs/quantization.md, "GPTQ"):
- Sequential and asymmetric, as the twin's reconstruction is: layers are rounded in graph
  order, each on the inputs x_q of the quantized model with every earlier layer already
  rounded, against the float model's output W x_f for the float input. The objective
  E||W x_f - Q x_q||^2 equals (Q - W*) H_q (Q - W*)^T plus a constant, with
  W* = W + W E[(x_f - x_q) x_q^T] H_q^-1 (GPTAQ, Li et al. 2025), so GPTQ rounds W* under H_q.
- The grid is the one the clipping search chose (per output channel, symmetric, narrow
  range); GPTQ only picks the integers, so quantize() writes the same exact k-bit QDQ form.
- Columns go in order of decreasing H diagonal (GPTQ's act-order); H gets DAMPING times its
  mean diagonal added, and an input that never fires (zero diagonal) a unit one, so its
  weight keeps its nearest integer and its error is not spread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..layers import Layer
from ..model import computing_only
from ..passes.qdq import WeightGrid
from ..plan import Plan
from ..progress import ProgressFactory, no_progress
from .reconstruct import COLLECT_BATCH, Collector, RoundedWeight, rounded_weights, with_weight_feeds
from .weights import channel_rows, patch_shaper

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DAMPING = 0.01
"""Added to H's diagonal, relative to its mean (GPTQ's default): keeps the factorization
stable where the samples do not span every input direction. 0.001 lost 4 points on
MobileNetV2 W4A4 and 1.0 lost 6; 0.1 was within 1.3 points of 0.01 either way on ResNet-20
and MobileNetV2 (docs/benchmarks.md, "GPTQ's damping")."""
GPTQ_SAMPLES = 256
"""Calibration samples H is estimated on: MobileNetV2 W4A8 gained 1.8 points from 128 to
256 (docs/benchmarks.md, "GPTQ"); the time grows with them."""


def gptq_weights(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    layers: Sequence[Layer],
    plan: Plan,
    calibration: Sequence[np.ndarray],
    *,
    progress: ProgressFactory = no_progress,
) -> dict[str, WeightGrid]:
    """GPTQ's integers for every quantized layer whose patches weights.py forms, on the grids
    of `quantized` (the round-to-nearest QDQ model of `model` for the aligned `plan`);
    layer name -> WeightGrid for quantize(..., weight_grids=...). Deterministic."""
    weights = rounded_weights(model, quantized, layers, plan)
    rounding_model = with_weight_feeds(quantized, weights.values())
    float_nodes = {node.name: node for node in model.graph.node}
    quantized_inputs = {node.name: node.input[0] for node in rounding_model.graph.node}
    chosen = [
        (layer, weights[layer.name], shaper)
        for layer in layers
        if layer.name in weights
        and weights[layer.name].axis is not None
        and (shaper := patch_shaper(layer, float_nodes[layer.name])) is not None
    ]
    if not chosen:
        return {}
    samples = np.concatenate([np.asarray(batch, dtype=np.float32) for batch in calibration])[:GPTQ_SAMPLES]
    current = {weight.feed: weight.dequantized(weight.integers) for weight in weights.values()}
    grids: dict[str, WeightGrid] = {}
    with progress("gptq", len(chosen)) as advance:
        for layer, weight, shaper in chosen:
            quantized_name = quantized_inputs[layer.name]
            float_runs = Collector(computing_only(model, [layer.input]), [layer.input])
            quantized_runs = Collector(computing_only(rounding_model, [quantized_name]), [quantized_name])
            hessian, shift = _input_products(samples, shaper, float_runs, layer.input, quantized_runs, quantized_name, current)
            integers = gptq_integers(weight, hessian, shift)
            current[weight.feed] = weight.dequantized(integers)
            grids[layer.name] = WeightGrid(integers.astype(np.int8 if weight.bits <= 8 else np.int16), weight.scale)
            advance(1)
    log.info("gptq rounding on %d layers, %d samples", len(grids), len(samples))
    return grids


def _input_products(samples, shaper, float_runs, float_name, quantized_runs, quantized_name, current):  # noqa: ANN001, ANN202
    """Sums over the samples and positions of x_q x_q^T and (x_f - x_q) x_q^T per group, for
    the layer's input patches in the quantized model (x_q) and in the float model (x_f)."""
    import torch

    hessian = shift = None
    with torch.no_grad():
        for start in range(0, len(samples), COLLECT_BATCH):
            chunk = samples[start : start + COLLECT_BATCH]
            rounded = shaper(quantized_runs.run(chunk, [quantized_name], current)[quantized_name])
            exact = shaper(float_runs.run(chunk, [float_name], {})[float_name])
            products = _grouped_products(rounded, rounded), _grouped_products(exact - rounded, rounded)
            hessian = products[0] if hessian is None else hessian + products[0]
            shift = products[1] if shift is None else shift + products[1]
    return hessian, shift


def _grouped_products(left, right):  # noqa: ANN001, ANN202 - torch tensors, imported lazily
    """Sum over samples and positions of l r^T per group, from samples x groups x D x positions."""
    samples, groups, size, positions = left.shape
    flat_left = left.reshape(samples * groups, size, positions)
    flat_right = right.reshape(samples * groups, size, positions)
    return (flat_left @ flat_right.transpose(1, 2)).reshape(samples, groups, size, size).sum(dim=0).double()


def gptq_integers(weight: RoundedWeight, hessian: torch.Tensor, shift: torch.Tensor) -> np.ndarray:
    """The integers of least E||W x_f - Q x_q||^2 GPTQ finds on the weight's grid, from
    H_q = sum x_q x_q^T and sum (x_f - x_q) x_q^T per group (groups x D x D)."""
    import torch

    rows = channel_rows(weight.weight.astype(np.float64), weight.axis)
    scale = np.broadcast_to(np.asarray(weight.scale, dtype=np.float64).reshape(-1), (rows.shape[0],))
    groups, size = hessian.shape[0], hessian.shape[1]
    if rows.shape[0] % groups or rows.shape[1] != size:
        raise ValueError(f"layer '{weight.layer}': weight rows {rows.shape} do not match {groups} groups of {size} inputs")
    damped = _damped(hessian)
    grouped = torch.from_numpy(rows).reshape(groups, -1, size)
    target = grouped + grouped @ shift @ torch.cholesky_inverse(torch.linalg.cholesky(damped))
    scaled = target / torch.from_numpy(scale.copy()).reshape(groups, -1, 1)
    integers = _rounded_columns(scaled, damped, 2 ** (weight.bits - 1) - 1)
    return _weight_from_rows(integers.reshape(rows.shape).numpy(), weight.weight.shape, weight.axis).astype(np.int32)


def _damped(hessian):  # noqa: ANN001, ANN202 - torch tensors, imported lazily
    """H with a unit diagonal where an input never fired and DAMPING x its mean diagonal added."""
    import torch

    damped = hessian.clone()
    diagonal = torch.diagonal(damped, dim1=1, dim2=2)
    diagonal[diagonal <= 0] = 1.0
    diagonal += DAMPING * diagonal.mean(dim=1, keepdim=True)
    return damped


def _rounded_columns(scaled, hessian, limit: int):  # noqa: ANN001, ANN202 - torch tensors, imported lazily
    """GPTQ's integers for targets in grid units (groups x rows x D) under a damped H
    (groups x D x D), columns in act-order."""
    import torch

    order = torch.argsort(torch.diagonal(hessian, dim1=1, dim2=2), dim=1, descending=True)
    hessian = torch.gather(torch.gather(hessian, 1, order[:, :, None].expand_as(hessian)), 2, order[:, None, :].expand_as(hessian))
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    remaining = torch.gather(scaled, 2, order[:, None, :].expand_as(scaled)).clone()
    rounded = torch.empty_like(remaining)
    for column in range(remaining.shape[2]):
        values = remaining[:, :, column]
        chosen = torch.clamp(torch.round(values), -limit, limit)
        rounded[:, :, column] = chosen
        error = (values - chosen) / factor[:, column, column][:, None]
        remaining[:, :, column:] -= error[:, :, None] * factor[:, None, column, column:]
    restored = torch.empty_like(rounded)
    restored.scatter_(2, order[:, None, :].expand_as(rounded), rounded)
    return restored


def _weight_from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """The inverse of weights.channel_rows."""
    moved = (shape[axis], *(size for i, size in enumerate(shape) if i != axis))
    return np.moveaxis(rows.reshape(moved), 0, axis)
