"""`quanos layers`: the quantizable layers of a model and its residual joins.

Light on purpose: `quanos layers` runs without importing torch or onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..layers import Join, Layer, find_joins, list_layers
from .options import ModelSource, read_model


@dataclass(frozen=True)
class LayersResult:
    model: str
    """The model's path, or <onnx.ModelProto> for a model given in memory."""
    layers: tuple[Layer, ...]
    joins: tuple[Join, ...]

    def document(self) -> dict[str, Any]:
        """The quanos-layers document (docs/json.md)."""
        return {
            "format": "quanos-layers",
            "version": 1,
            "model": self.model,
            "layers": [layer.to_json() for layer in self.layers],
            "joins": [join.to_json() for join in self.joins],
        }

    def summary_text(self) -> str:
        """The layer table, and the joins' table when there are any."""
        from ..layers import layer_table
        from ..report.text import format_table

        text = format_table(layer_table(self.layers))
        if not self.joins:
            return text
        rows = [
            {"join": j.name, "op": j.op, "feeds": j.downstream_layers[0] if j.downstream_layers else None}
            for j in self.joins
        ]
        return f"{text}\n\n{format_table(rows)}"


def run_layers(model: ModelSource, input_shape: tuple[int, ...] | None = None) -> LayersResult:
    """`input_shape` fixes the model's dynamic input dims (model.fix_input_shape)."""
    source = read_model(model, input_shape=input_shape)
    layers = list_layers(source.proto)
    return LayersResult(source.name, tuple(layers), tuple(find_joins(source.proto, layers)))
