"""Where a divergence table's time goes when its images are few: the parts that do not scale with them.

Builds the default compile's sensitivity table for ResNet-20 step by step, one part at a time
(no overlap), on the compile's PTQ grids (7-bit background, candidates 2..8) with its first
`--samples` calibration images, and prints each part's CPU seconds: the histogram pass, the
ranges (entropy/mse searches per group and bits), the clipped weight grids, writing the 114
QDQ models (onnx_ir), opening them in onnxruntime, and running them.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/table_parts.py --samples 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_data import load_setup  # noqa: E402


def main() -> None:
    from quanos_onnx.allocate import sensitivity
    from quanos_onnx.layers import find_joins, list_layers
    from quanos_onnx.model import Runner, load_model, normalize, output_names
    from quanos_onnx.passes.align import align_plan
    from quanos_onnx.ptq import PtqSettings
    from quanos_onnx.ptq.statistics import CalibrationStatistics
    from quanos_onnx.threads import using_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    options = parser.parse_args()
    setup = load_setup("resnet20")
    model = normalize(load_model(setup.model_path))
    layers = list_layers(model)
    joins = find_joins(model, layers)
    calibration = [np.asarray(setup.tune_x[s : s + 64], np.float32) for s in range(0, 512, 64)]
    images = np.concatenate(calibration)[: options.samples]
    parts: dict[str, float] = {}

    def timed(label: str, work):  # noqa: ANN001, ANN202 - a thunk and its value
        started = time.process_time()
        value = work()
        parts[label] = time.process_time() - started
        return value

    with using_threads(1):
        statistics = CalibrationStatistics(model, calibration)
        reference = sensitivity.reference_plan(layers, sensitivity.BACKGROUND_BITS)
        bits = [b for b in sensitivity.DEFAULT_BITS if b != sensitivity.BACKGROUND_BITS]
        variants = [sensitivity.with_bits(reference, layer.name, b) for layer in sensitivity.allocatable(layers) for b in bits]
        settings = PtqSettings(rounding="nearest")
        builder = timed(
            "histogram pass", lambda: sensitivity.QdqBuilder(model, layers, joins, [reference, *variants], [images], settings, statistics)
        )
        timed("ranges", lambda: [builder._quantizers(builder._points(v)) for v in variants])
        timed("clipped weight grids", lambda: [builder._grids(align_plan(v, layers, joins)) for v in variants])
        protos = timed("writing the QDQ models", lambda: [builder.build(v) for v in variants])
        output = output_names(model)[0]
        runners = timed("opening them in onnxruntime", lambda: [Runner(p, [output]) for p in protos])
        timed(f"running them on {len(images)} images", lambda: [r.run(images, [output]) for r in runners])
    print(f"ResNet-20, {len(variants)} table models, {len(images)} images, one thread (CPU s):")
    for label, seconds in parts.items():
        print(f"  {label}: {seconds:.2f} ({1000 * seconds / len(variants):.0f} ms per model)" if "models" in label or "onnxruntime" in label else f"  {label}: {seconds:.2f}")


if __name__ == "__main__":
    main()
