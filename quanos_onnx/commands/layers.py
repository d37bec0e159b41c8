"""`quanos layers`: the quantizable layers of a model and its residual joins.

Light on purpose: `quanos layers` runs without importing torch or onnxruntime; only
`lipschitz=True` (`--lipschitz`) imports torch, for the per-layer operator-norm bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..layers import Join, Layer, find_joins, list_layers
from .options import ModelSource, read_model

if TYPE_CHECKING:
    from ..harness.lipschitz import LipschitzEstimates


@dataclass(frozen=True)
class LayersResult:
    model: str
    """The model's path, or <onnx.ModelProto> for a model given in memory."""
    layers: tuple[Layer, ...]
    joins: tuple[Join, ...]
    lipschitz: LipschitzEstimates | None = None
    """Each layer block's Lipschitz upper bound, when asked for (harness/lipschitz.py)."""

    def document(self) -> dict[str, Any]:
        """The quanos-layers document (docs/json.md)."""
        document: dict[str, Any] = {
            "format": "quanos-layers",
            "version": 1,
            "model": self.model,
            "layers": [layer.to_json() for layer in self.layers],
            "joins": [join.to_json() for join in self.joins],
        }
        if self.lipschitz is not None:
            document["lipschitz"] = self.lipschitz.to_json()
        return document

    def summary_text(self) -> str:
        """The layer table, and the joins' table when there are any."""
        from ..layers import layer_table
        from ..report.text import format_table

        table = layer_table(self.layers)
        if self.lipschitz is not None:
            for row, bound in zip(table, self.lipschitz.bounds):
                row["lipschitz_bound"] = float(f"{bound.bound:.4g}")
        text = format_table(table)
        if not self.joins:
            return text
        rows = [
            {"join": j.name, "op": j.op, "feeds": j.downstream_layers[0] if j.downstream_layers else None}
            for j in self.joins
        ]
        return f"{text}\n\n{format_table(rows)}"


def run_layers(
    model: ModelSource, input_shape: tuple[int, ...] | None = None, *, lipschitz: bool = False
) -> LayersResult:
    """The layer table; `input_shape` fixes the model's dynamic input dims
    (model.fix_input_shape); `lipschitz` adds each block's operator-norm bound (imports torch)."""
    source = read_model(model, input_shape=input_shape)
    layers = list_layers(source.proto)
    bounds = None
    if lipschitz:
        from ..harness.lipschitz import estimate_lipschitz

        bounds = estimate_lipschitz(source.proto, layers)
    return LayersResult(source.name, tuple(layers), tuple(find_joins(source.proto, layers)), bounds)
