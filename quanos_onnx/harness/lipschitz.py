"""Per-layer Lipschitz constants: an operator-norm upper bound and a local estimate on data.

A second robustness signal beside ANS (after Song, Ranjan and Li, arXiv 2110.12308): a
layer block that stretches small input changes a lot passes more of an adversarial (or a
quantization) perturbation on.

The block is the one layers.py defines: the Conv/ConvTranspose/Gemm/MatMul node, then a
bias Add, a BatchNormalization and an elementwise activation when they follow directly.
Every node runs through the twin's op registry, so the operator is the one onnxruntime
applies (strides, pads and auto_pad, dilations, groups, transB).

- The bound: L_l <= c_act * ||diag(s) W||_2, with W the layer's linear operator at its input
  shape, s the per-channel scale gamma / sqrt(var + eps) of a BatchNormalization still in
  the block (normalize() folds most of them into the weights already) and c_act the
  activation's Lipschitz constant. ||.||_2 comes from block power iteration on W^T W (see
  spectral_norm), the adjoint being autograd's backward of the same op (conv_transpose for
  a Conv), run in float64 until the estimate changes by less than `tolerance` (relative).
- The local estimate: at each sample's layer input a, power iteration on the block's
  Jacobian J(a)^T J(a) finds the direction v that the block stretches most there; the
  reported ratio is the measured ||f(a + d) - f(a)|| / ||d|| for d = h v, h = `step`*||a||,
  and the same ratio for a random direction d. Both are at most the bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import ModelError
from ..layers import Layer
from ..model import Runner

Batches = Iterable[tuple[np.ndarray, "np.ndarray | None"]]
"""(inputs in the model's layout, labels or None) per batch, as data.Dataset.batches gives."""

Progress = Callable[[int], None]

TensorFunction = Callable[[torch.Tensor], torch.Tensor]

_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875

ACTIVATION_LIPSCHITZ: Mapping[str, Callable[[Mapping[str, Any], Sequence[np.ndarray | None]], float]] = {
    "Relu": lambda a, c: 1.0,
    "Clip": lambda a, c: 1.0,
    "Tanh": lambda a, c: 1.0,
    "Softplus": lambda a, c: 1.0,
    "Softsign": lambda a, c: 1.0,
    "Celu": lambda a, c: 1.0,
    "Sigmoid": lambda a, c: 0.25,
    "LeakyRelu": lambda a, c: max(1.0, abs(float(a.get("alpha", 0.01)))),
    "PRelu": lambda a, c: max(1.0, float(np.abs(c[1]).max())) if c[1] is not None else math.inf,
    "Elu": lambda a, c: max(1.0, abs(float(a.get("alpha", 1.0)))),
    "Selu": lambda a, c: abs(float(a.get("gamma", _SELU_GAMMA))) * max(1.0, abs(float(a.get("alpha", _SELU_ALPHA)))),
    "HardSigmoid": lambda a, c: abs(float(a.get("alpha", 0.2))),
    "HardSwish": lambda a, c: 1.5,
    "Gelu": lambda a, c: 1.13,
    "Mish": lambda a, c: 1.09,
}
"""Each activation's Lipschitz constant (the supremum of |f'|) from its attributes and
constant inputs. Gelu (1.1289 exact, 1.1295 tanh form) and Mish (1.0886) are rounded up;
tests/test_lipschitz.py checks every entry against a dense grid of derivatives."""


@dataclass(frozen=True)
class LipschitzBound:
    """A layer block's global Lipschitz upper bound (l2 to l2, per sample)."""

    layer: str
    operator_norm: float
    """||diag(s) W||_2 of the layer's linear operator as applied, BatchNorm scale folded."""
    activation: float
    """The block activation's Lipschitz constant (1 when the block has none)."""
    bound: float
    iterations: int

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "operator_norm": self.operator_norm,
            "activation": self.activation,
            "bound": self.bound,
            "iterations": self.iterations,
        }


@dataclass(frozen=True)
class LocalLipschitz:
    """Measured ||f(a + d) - f(a)|| / ||d|| at the data's layer inputs a (`count` samples)."""

    layer: str
    local_mean: float
    """Mean over samples of the ratio along the locally most stretched direction."""
    local_max: float
    random_mean: float
    """Mean over samples of the ratio along a random direction."""
    count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "local_mean": self.local_mean,
            "local_max": self.local_max,
            "random_mean": self.random_mean,
            "count": self.count,
        }


@dataclass(frozen=True)
class LipschitzEstimates:
    """The bounds of every layer block, and the local ratios when data was given."""

    bounds: tuple[LipschitzBound, ...]
    local: tuple[LocalLipschitz, ...] | None = None
    iterations: int = 20
    """Power iterations on each sample's Jacobian (the local estimate)."""
    step: float = 1e-3
    """||d|| / ||a|| of the measured perturbation (the local estimate)."""

    def by_layer(self) -> dict[str, tuple[LipschitzBound, LocalLipschitz | None]]:
        local = {row.layer: row for row in self.local or ()}
        return {bound.layer: (bound, local.get(bound.layer)) for bound in self.bounds}

    def to_json(self) -> dict[str, Any]:
        """The shared `lipschitz` part of docs/json.md."""
        local = None
        if self.local is not None:
            local = {
                "samples": max((row.count for row in self.local), default=0),
                "iterations": self.iterations,
                "step": self.step,
                "layers": [row.to_json() for row in self.local],
            }
        return {"bounds": [bound.to_json() for bound in self.bounds], "local": local}


def estimate_lipschitz(
    proto: onnx.ModelProto,
    layers: Sequence[Layer],
    batches: Batches | None = None,
    *,
    iterations: int = 20,
    step: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> LipschitzEstimates:
    """The bounds, and with `batches` the local ratios measured on them."""
    bounds = operator_bounds(proto, layers, seed=seed)
    if batches is None:
        return LipschitzEstimates(bounds, None, iterations, step)
    local = local_estimates(proto, layers, batches, iterations=iterations, step=step, seed=seed, progress=progress)
    return LipschitzEstimates(bounds, local, iterations, step)


@dataclass(frozen=True)
class _Block:
    """The block's nodes with their registry functions, and its constants as float64 tensors."""

    layer: Layer
    nodes: tuple[tuple[onnx.NodeProto, Callable[..., list[torch.Tensor]], dict[str, Any]], ...]
    constants: Mapping[str, torch.Tensor]

    def run(self, x: torch.Tensor, *, linear_only: bool = False) -> torch.Tensor:
        """The block on x; `linear_only`: the layer without bias, then BatchNorm's scale only."""
        values: dict[str, torch.Tensor] = {self.layer.input: x}
        tensor = x
        for node, function, attrs in self.nodes:
            if linear_only:
                step = self._linear_step(node, function, attrs, tensor)
                if step is None:
                    break
                tensor = step
            else:
                inputs = [self._value(name, values) if name else None for name in node.input]
                tensor = function(attrs, inputs)[0]
            values[node.output[0]] = tensor
        return tensor

    def _linear_step(
        self, node: onnx.NodeProto, function: Callable[..., list[torch.Tensor]], attrs: dict[str, Any], x: torch.Tensor
    ) -> torch.Tensor | None:
        if node.name == self.layer.name:
            return function(attrs, [x, self.constants[node.input[1]]])[0]
        if node.op_type == "BatchNormalization":
            return x * _channel_view(_batch_norm_scale(node, attrs, self.constants), x.dim())
        if node.op_type == "Add":
            return x
        return None

    def _value(self, name: str, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if name in values:
            return values[name]
        if name in self.constants:
            return self.constants[name]
        raise ModelError(f"layer '{self.layer.name}': block input '{name}' is neither computed nor a constant")

    def activation_constant(self) -> float:
        for node, _, attrs in self.nodes:
            if node.op_type in ACTIVATION_LIPSCHITZ:
                constants = [self.constants[n].numpy() if n in self.constants else None for n in node.input]
                return ACTIVATION_LIPSCHITZ[node.op_type](attrs, constants)
        return 1.0


def _channel_view(scale: torch.Tensor, dims: int) -> torch.Tensor:
    return scale.reshape(1, -1, *([1] * (dims - 2)))


def _batch_norm_scale(node: onnx.NodeProto, attrs: Mapping[str, Any], constants: Mapping[str, torch.Tensor]) -> torch.Tensor:
    scale, variance = constants[node.input[1]], constants[node.input[4]]
    return scale / torch.sqrt(variance + float(attrs.get("epsilon", 1e-5)))


def _blocks(proto: onnx.ModelProto, layers: Sequence[Layer]) -> list[_Block]:
    from ..twin.graph import _decode_attributes, opsets
    from ..twin.registry import NotSupported, canonical_domain, lookup

    by_name = {node.name: node for node in proto.graph.node}
    initializers = {t.name: t for t in proto.graph.initializer}
    versions = opsets(proto)
    blocks = []
    for layer in layers:
        nodes = []
        constants: dict[str, torch.Tensor] = {}
        for name in (layer.name, *layer.block_nodes):
            node = by_name[name]
            impl = lookup(node.domain, node.op_type, versions.get(canonical_domain(node.domain), 0))
            if impl is None:
                raise ModelError(f"layer '{layer.name}': node '{name}' ({node.op_type}) has no twin implementation")
            try:
                attrs = _decode_attributes(node)
                if impl.prepare is not None:
                    attrs = impl.prepare(node, attrs, [None] * len(node.input))
            except NotSupported as exc:
                raise ModelError(f"layer '{layer.name}': node '{name}' ({node.op_type}): {exc}") from None
            nodes.append((node, impl.function, attrs))
            for input_name in node.input:
                if input_name in initializers:
                    array = onnx.numpy_helper.to_array(initializers[input_name])
                    constants[input_name] = torch.from_numpy(np.asarray(array, dtype=np.float64))
        blocks.append(_Block(layer, tuple(nodes), constants))
    return blocks


def operator_bounds(
    proto: onnx.ModelProto,
    layers: Sequence[Layer],
    *,
    tolerance: float = 1e-6,
    max_iterations: int = 500,
    seed: int = 0,
) -> tuple[LipschitzBound, ...]:
    """Each block's Lipschitz upper bound c_act * ||diag(s) W||_2, in layer order."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    with torch.no_grad():
        for block in _blocks(proto, layers):
            operator = lambda x, block=block: block.run(x, linear_only=True)  # noqa: E731
            norm, iterations = spectral_norm(operator, block.layer.input_shape, tolerance, max_iterations, generator)
            activation = block.activation_constant()
            results.append(LipschitzBound(block.layer.name, norm, activation, norm * activation, iterations))
    return tuple(results)


def spectral_norm(
    operator: TensorFunction,
    shape: Sequence[int],
    tolerance: float,
    max_iterations: int,
    generator: torch.Generator,
    block: int = 8,
) -> tuple[float, int]:
    """||A||_2 of a linear `operator` on tensors of `shape` (batch 1) by block power iteration.

    Power iteration on A^T A with `block` vectors at once (run as one batch through the op),
    orthonormalized each step, and the Rayleigh-Ritz value of the block as the estimate: it
    converges at the rate (sigma_{block+1} / sigma_1)^2 rather than (sigma_2 / sigma_1)^2,
    which matters for convolutions, whose top singular values lie close together. The
    adjoint is autograd's backward of the operator (conv_transpose for a Conv; exact for a
    linear map, whatever the point it is taken at). Returns the norm and the iterations used.
    """
    batch_shape = (block, *tuple(shape)[1:])
    zero = torch.zeros(batch_shape, dtype=torch.float64)
    with torch.enable_grad():
        _, adjoint = torch.func.vjp(operator, zero)
    basis = _orthonormal(torch.randn(batch_shape, dtype=torch.float64, generator=generator))
    norm = 0.0
    for iteration in range(1, max_iterations + 1):
        image = operator(basis)
        flat = image.reshape(block, -1)
        gram = flat @ flat.T
        estimate = math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))
        if estimate == 0.0:
            return 0.0, iteration
        if abs(estimate - norm) <= tolerance * estimate:
            return estimate, iteration
        norm = estimate
        basis = _orthonormal(adjoint(image)[0])
    return norm, max_iterations


def _orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """The batch's vectors (one per leading index) orthonormalized by a reduced QR."""
    q, _ = torch.linalg.qr(vectors.reshape(len(vectors), -1).T)
    return q.T.reshape(vectors.shape)


def local_estimates(
    proto: onnx.ModelProto,
    layers: Sequence[Layer],
    batches: Batches,
    *,
    iterations: int = 20,
    step: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[LocalLipschitz, ...]:
    """Measured local ratios at each sample's layer inputs (from onnxruntime), in layer order."""
    blocks = _blocks(proto, layers)
    inputs = list(dict.fromkeys(layer.input for layer in layers))
    runner = Runner(proto, inputs)
    generator = torch.Generator().manual_seed(seed)
    local: list[list[np.ndarray]] = [[] for _ in blocks]
    random: list[list[np.ndarray]] = [[] for _ in blocks]
    for x, _ in batches:
        values = dict(zip(inputs, runner.run(x, inputs)))
        for position, block in enumerate(blocks):
            a = torch.from_numpy(np.asarray(values[block.layer.input], dtype=np.float64))
            ratios, random_ratios = _local_ratios(block, a, iterations, step, generator)
            local[position].append(ratios)
            random[position].append(random_ratios)
        if progress is not None:
            progress(len(x))
    results = []
    for block, parts, random_parts in zip(blocks, local, random):
        ratios = np.concatenate(parts) if parts else np.zeros(0)
        random_ratios = np.concatenate(random_parts) if random_parts else np.zeros(0)
        results.append(
            LocalLipschitz(
                block.layer.name,
                float(ratios.mean()) if len(ratios) else math.nan,
                float(ratios.max()) if len(ratios) else math.nan,
                float(random_ratios.mean()) if len(random_ratios) else math.nan,
                len(ratios),
            )
        )
    return tuple(results)


def _local_ratios(
    block: _Block, a: torch.Tensor, iterations: int, step: float, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the ratio along the power-iterated direction, and along a random one."""
    function = block.run
    _, backward = torch.func.vjp(function, a)
    v = _unit(torch.randn(a.shape, dtype=torch.float64, generator=generator))
    for _ in range(iterations):
        _, forward = torch.func.jvp(function, (a,), (v,))
        grown = backward(forward)[0]
        if not torch.isfinite(grown).all():
            break
        v = _unit(grown, fallback=v)
    random_direction = _unit(torch.randn(a.shape, dtype=torch.float64, generator=generator))
    with torch.no_grad():
        clean = function(a)
        return _ratio(function, a, clean, v, step), _ratio(function, a, clean, random_direction, step)


def _unit(v: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's slice scaled to norm 1 (`fallback`'s slice where the norm is 0)."""
    norms = v.reshape(len(v), -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
    unit = v / torch.where(norms > 0, norms, torch.ones_like(norms))
    if fallback is not None:
        unit = torch.where(norms > 0, unit, fallback)
    return unit


def _ratio(function: TensorFunction, a: torch.Tensor, clean: torch.Tensor, direction: torch.Tensor, step: float) -> np.ndarray:
    scale = a.reshape(len(a), -1).norm(dim=1)
    h = step * torch.where(scale > 0, scale, torch.ones_like(scale))
    shaped = h.reshape(-1, *([1] * (a.dim() - 1)))
    change = (function(a + shaped * direction) - clean).reshape(len(a), -1).norm(dim=1)
    size = (shaped * direction).reshape(len(a), -1).norm(dim=1)
    return (change / size).numpy()
