"""onnxruntime.quantization driven by an exported plan, against the quanos QDQ model.

ResNet-20 (CIFAR-10) at uniform 8 and 4 bits: quanos compiles it, `to_ort_overrides`
exports the plan, onnxruntime.quantization.quantize_static quantizes the float model with
it (calibrated on the same 200 images), and both are scored on the exact first 932 test
images. Prints the Markdown table docs/interop.md quotes:

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/ort_overrides.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from storage_sizes import CALIBRATION, MODEL, TEST, images

from quanos_onnx import quantize as quantize_stage
from quanos_onnx.export import ort_quantize_options, to_ort_overrides
from quanos_onnx.layers import list_layers
from quanos_onnx.model import load_model, make_session, save_model
from quanos_onnx.plan import Plan


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = make_session(model)
    logits = np.concatenate([session.run(None, {"input": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
    return float(np.mean(logits.argmax(1) == y))


def main() -> None:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    shared = parser.parse_args().shared
    model = load_model(shared / MODEL)
    calibration, _ = images(shared / CALIBRATION, 932, 1132)
    test_x, test_y = images(shared / TEST, 0, 932)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({"input": calibration[i : i + 50]} for i in range(0, len(calibration), 50))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    print("| plan | quanos QDQ top-1 | quantize_static + overrides top-1 | warnings |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        float_path = save_model(model, Path(directory) / "float.onnx")
        for bits in (8, 4):
            quantized = quantize_stage.quantize(model, Plan.uniform(list_layers(model), bits), [calibration])
            document, warnings = to_ort_overrides(quantized.model)
            target = Path(directory) / f"ort{bits}.onnx"
            quantize_static(str(float_path), str(target), Reader(), **ort_quantize_options(document))
            ours = accuracy(quantized.model, test_x, test_y)
            theirs = accuracy(onnx.load(str(target)), test_x, test_y)
            print(f"| uniform {bits}-bit | {ours:.1%} | {theirs:.1%} | {len(warnings)} |")


if __name__ == "__main__":
    main()
