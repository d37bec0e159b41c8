"""Initializers that graph passes add: one way to make them, three naming policies."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Registers `array` under `name`; onnx_ir refuses a name that is already taken.

    `ir.Tensor` directly, not `ir.tensor`: the convenience constructor's protocol checks cost
    8x the tensor itself, and a QDQ model of ResNet-20 makes ~270 of these (a sensitivity
    table builds 100+ such models)."""
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.Tensor(np.asarray(array), name=name),
    )
    graph.register_initializer(value)
    return value


def shared_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer already called `name`, else a new one: constants whose name encodes
    their value (a layer's scale, a shared zero) are made once and reused."""
    existing = graph.initializers.get(name)
    return existing if existing is not None else new_initializer(graph, name, array)


def unique_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer; the name gets a counter when the model already uses it."""
    base, counter = name, 1
    while name in graph.initializers:
        name = f"{base}_{counter}"
        counter += 1
    return new_initializer(graph, name, array)
