"""onnxruntime.quantization: the plan as TensorQuantOverrides, rounded up to 4/8/16 bits."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import DataError, ModelError
from ..inputs import read_document
from ..passes.qdq import WEIGHT_SOURCE_KEY
from ..plan import LayerPlan
from .reading import ActivationGrid, activation_bits, float_source, read_model, read_quantizers, stored_plan

ORT_BITS = (4, 8, 16)
_FLOAT_KEYS = ("rmin", "rmax", "scale")


def to_ort_overrides(qdq_model: onnx.ModelProto, source: str = "<model>") -> tuple[dict[str, Any], list[str]]:
    """The plan as onnxruntime.quantization options, and a warning per layer rounded up.

    Returns {"TensorQuantOverrides": {tensor: [override]}, "nodes_to_exclude": [...]},
    named as in the float model quanos compiled (quanos_onnx.model.load_model of the
    original). Weights are per-channel symmetric QInt4/8/16, activations QUInt4/8/16,
    and layers the plan keeps float are excluded. Pass it on with ort_quantize_options.
    """
    plan = stored_plan(qdq_model, source)
    bits_by_grid = activation_bits(qdq_model, plan)
    graph = read_model(qdq_model).graph
    contents = read_quantizers(graph)
    overrides = _activation_overrides(contents.activations, bits_by_grid)
    for constant, entry in contents.weights(graph, plan).values():
        name = constant.node.metadata_props.get(WEIGHT_SOURCE_KEY)
        if not name:
            raise ModelError(
                f"node '{constant.node.name}': the float weight's name is not recorded "
                f"(metadata '{WEIGHT_SOURCE_KEY}')",
                hint="recompile the model with this version of quanos",
            )
        override: dict[str, Any] = {"quant_type": f"QInt{_ort_bits(entry.weight_bits)}", "symmetric": True}
        if constant.axis is not None:
            override["axis"] = constant.axis
        overrides[name] = [override]
    document = {
        "TensorQuantOverrides": dict(sorted(overrides.items())),
        "nodes_to_exclude": [entry.name for entry in plan.layers if not entry.quantized],
    }
    return document, _rounding_warnings(plan.layers)


def _ort_bits(bits: int) -> int:
    return next(width for width in ORT_BITS if bits <= width)


def _activation_overrides(
    grids: Iterable[ActivationGrid], bits_by_grid: Mapping[str, int]
) -> dict[str, list[dict[str, Any]]]:
    """One override per tensor, at the widest type any of its quantizers needs.

    Only the type: onnxruntime calibrates the range itself. Pinning the plan's ranges
    (rmin/rmax) is wrong by default, because onnxruntime then drops a Relu whose output
    range it assumes starts at 0, and a residual group's shared grid is signed (measured:
    ResNet-20 at 8 bits falls to 11% accuracy).
    """
    widest: dict[str, int] = {}
    grids = list(grids)
    for grid in grids:
        bits = _ort_bits(bits_by_grid[grid.name])
        tensor = float_source(grid, grids)
        widest[tensor] = max(bits, widest.get(tensor, 0))
    return {tensor: [{"quant_type": f"QUInt{bits}"}] for tensor, bits in widest.items()}


def _rounding_warnings(entries: Iterable[LayerPlan]) -> list[str]:
    warnings = []
    for entry in entries:
        if not entry.quantized:
            continue
        changed = [
            f"{what} {bits} -> {_ort_bits(bits)} bits"
            for what, bits in (("weights", entry.weight_bits), ("activations", entry.act_bits))
            if bits not in ORT_BITS
        ]
        if changed:
            warnings.append(f"layer '{entry.name}': {', '.join(changed)} (onnxruntime.quantization has 4, 8 and 16)")
    return warnings


def ort_quantize_options(document: Mapping[str, Any], source: str = "<overrides>") -> dict[str, Any]:
    """Keyword arguments for onnxruntime.quantization.quantize_static from an exported document.

    JSON holds quant types as names and ranges as numbers; onnxruntime wants QuantType
    members and numpy floats, and the QDQ format (QOperator has no 4- or 16-bit kernels).
    """
    from onnxruntime.quantization import QuantFormat, QuantType

    raw = document.get("TensorQuantOverrides")
    if not isinstance(raw, dict):
        raise DataError(f"{source}: no \"TensorQuantOverrides\" object")
    overrides: dict[str, list[dict[str, Any]]] = {}
    for tensor, entries in raw.items():
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise DataError(f"{source}: tensor '{tensor}': overrides must be a list of objects")
        converted = []
        for entry in entries:
            name = entry.get("quant_type")
            if name is not None and name not in QuantType.__members__:
                raise DataError(f"{source}: tensor '{tensor}': unknown quant_type '{name}'")
            converted.append(
                {
                    **entry,
                    **({"quant_type": QuantType[name]} if name else {}),
                    **{key: np.float32(entry[key]) for key in _FLOAT_KEYS if key in entry},
                }
            )
        overrides[tensor] = converted
    return {
        "quant_format": QuantFormat.QDQ,
        "nodes_to_exclude": list(document.get("nodes_to_exclude", [])),
        "extra_options": {"TensorQuantOverrides": overrides},
    }


def read_ort_overrides(path: str | os.PathLike[str]) -> dict[str, Any]:
    """quantize_static keyword arguments from a file `quanos export --to ort-overrides` wrote."""
    source = Path(path)
    document = read_document(source, DataError, "overrides file")
    if not isinstance(document, dict):
        raise DataError(f"{source}: not a JSON object")
    return ort_quantize_options(document, str(source))
