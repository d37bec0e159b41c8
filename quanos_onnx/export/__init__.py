"""Export a compiled QDQ model to the forms other toolchains read (DESIGN section 3).

QONNX (FINN, Brevitas) reads `Quant` nodes whose bit-width is an input, so a k-bit layer
is written as k bits whatever container its QDQ form stores it in. qonnx's own
QCDQToQuant cannot recover k from an integer-initializer weight, so the bit-widths come
from the plan stored in the model, and every grid in the graph is checked against it
(reading.py). onnxruntime.quantization expresses only 4, 8 and 16 bits per tensor
(TensorQuantOverrides), so a plan is exported there rounded up, with a warning naming
each layer so changed (ort.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError, arg
from ..model import read_model
from ..outputs import check_output_file, write_file
from .ort import ORT_BITS, ort_quantize_options, read_ort_overrides, to_ort_overrides
from .qonnx import QONNX_DOMAIN, QONNX_DOMAIN_VERSION, to_qonnx
from .reading import ActivationGrid, ConstantDequant, activation_bits, read_quantizers, stored_plan

TARGETS = ("qonnx", "ort-overrides")

__all__ = [
    "ORT_BITS",
    "QONNX_DOMAIN",
    "QONNX_DOMAIN_VERSION",
    "TARGETS",
    "ActivationGrid",
    "ConstantDequant",
    "Exported",
    "activation_bits",
    "default_output",
    "export_file",
    "ort_quantize_options",
    "read_ort_overrides",
    "read_quantizers",
    "stored_plan",
    "to_ort_overrides",
    "to_qonnx",
]


@dataclass(frozen=True)
class Exported:
    path: Path
    warnings: tuple[str, ...]


def default_output(model_path: str | os.PathLike[str], target: str) -> Path:
    """OUT next to the model: model.quanos.qonnx.onnx or model.quanos.ort_overrides.json."""
    source = Path(model_path)
    suffix = ".qonnx.onnx" if target == "qonnx" else ".ort_overrides.json"
    return source.with_name(source.name.removesuffix(".onnx") + suffix)


def export_file(
    model_path: str | os.PathLike[str], target: str, output: str | os.PathLike[str] | None = None
) -> Exported:
    """Read a quanos-compile model, export it to `target`, write it atomically next to it."""
    if target not in TARGETS:
        raise UsageError(f"{arg('to')}: unknown target '{target}' (use {' or '.join(TARGETS)})")
    source = Path(model_path)
    destination = Path(output) if output is not None else default_output(source, target)
    check_output_file(destination, [source])
    proto = read_model(source)
    if target == "qonnx":
        write_file(destination, to_qonnx(proto, str(source)).SerializeToString(), [source])
        return Exported(destination, ())
    document, warnings = to_ort_overrides(proto, str(source))
    write_file(destination, (json.dumps(document, indent=2) + "\n").encode(), [source])
    return Exported(destination, tuple(warnings))

