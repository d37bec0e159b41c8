"""`quanos export`: a compiled model for another toolchain, at its plan's bits (see export/)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from .options import ExportTarget, ModelSource, Options, input_paths


@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    """`to`: QONNX Quant nodes ("qonnx") or onnxruntime.quantization TensorQuantOverrides
    ("ort-overrides", bits rounded up to 4, 8 or 16 with a warning per layer so changed)."""

    to: ExportTarget


@dataclass(frozen=True)
class ExportResult:
    """`model` is the QONNX model (to="qonnx"), `overrides` the quanos-ort-overrides document
    (to="ort-overrides"); the other is None."""

    target: ExportTarget
    model: onnx.ModelProto | None
    overrides: dict[str, Any] | None
    warnings: tuple[str, ...]
    source: str
    inputs: tuple[Path, ...] = ()
    written: tuple[Path, ...] = ()

    def content(self) -> bytes:
        """The exported file's bytes."""
        if self.model is not None:
            return self.model.SerializeToString()
        return (json.dumps(self.overrides, indent=2) + "\n").encode()

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write the export to the file `path` atomically, never over an input file."""
        from ..outputs import write_file

        return (write_file(path, self.content(), self.inputs),)

    def summary_json(self) -> dict[str, Any]:
        """The quanos-export document (docs/json.md)."""
        return {
            "format": "quanos-export",
            "version": 1,
            "model": self.source,
            "target": self.target,
            "output": str(self.written[0]) if self.written else None,
            "warnings": list(self.warnings),
        }


def run_export(
    model: ModelSource, options: ExportOptions, *, save_to: str | os.PathLike[str] | None = None
) -> ExportResult:
    """Export a quanos-compile model; with `save_to` (the CLI's -o, or next to the model
    when that is a file and -o is left out: export.default_output) write it there."""
    from ..errors import UsageError, arg
    from ..export import to_ort_overrides, to_qonnx
    from ..model import read_model
    from ..outputs import check_output_file

    inputs = input_paths(model)
    if save_to is not None:
        check_output_file(save_to, inputs)
    if isinstance(model, onnx.ModelProto):
        proto, source = model, "<onnx.ModelProto>"
    elif isinstance(model, (str, os.PathLike)):
        proto, source = read_model(Path(model)), str(model)
    else:
        raise UsageError(f"{arg('model')} {type(model).__name__} is not a path or an onnx.ModelProto")
    if options.to == "qonnx":
        result = ExportResult(options.to, to_qonnx(proto, source), None, (), source, tuple(inputs))
    else:
        document, warnings = to_ort_overrides(proto, source)
        result = ExportResult(options.to, None, document, tuple(warnings), source, tuple(inputs))
    return result if save_to is None else replace(result, written=result.save(save_to))
