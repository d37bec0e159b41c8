"""Where a compiled ImageNet model wins and loses against float, per part of the compile's own split.

The ImageNet default compile (docs/benchmarks.md, "ImageNet") splits val1300 images 0..1279
into a seeded held-out 20% (verification) and the rest, whose first 256 calibrate and whose
next 768 are the search split. This script reproduces that split (`data.split_held_out`,
seed 0) and runs the float model and a written model on every image, then prints per part
the accuracy of each and the images only one of them gets right. It shows whether a guard
that broke on the held-out images broke on the search split too.

    PYTHONPATH=. python bench/split_outcomes.py ../shared/models/imagenet/tf2_mobilenet_v2_1.0_224_ptq_deq.onnx \
        out/mobilenet/model.quanos.onnx --label-offset 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sys

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_data import SHARED  # noqa: E402

IMAGES = SHARED / "data/imagenet/val1300"
CALIBRATION, SEARCH = 256, 768


def outcomes(model_path: str, dataset) -> np.ndarray:  # noqa: ANN001 - data.Dataset
    """Whether the model classifies each image correctly, one onnxruntime pass in batches of 32."""
    from quanos_onnx.model import Runner, load_model

    runner = Runner(load_model(model_path))
    predictions = [runner.run(np.asarray(dataset.x[i : i + 32], np.float32))[0].argmax(1) for i in range(0, dataset.count, 32)]
    return np.concatenate(predictions) == dataset.y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("float_model")
    parser.add_argument("written_model")
    parser.add_argument("--label-offset", type=int, default=0)
    options = parser.parse_args()

    from quanos_onnx.data import IndexRange, dataset_from, split_held_out
    from quanos_onnx.model import input_spec, load_model, num_classes

    proto = load_model(options.float_model)
    dataset = dataset_from(
        str(IMAGES / "images"), input_spec(proto), num_classes=num_classes(proto, options.float_model),
        labels=str(IMAGES / "labels.csv"), resize=224, data_range=IndexRange(0, 1280), label_offset=options.label_offset,
    )
    split = split_held_out(dataset, 0.2, seed=0)
    parts = {"calibration part": split.calibration, "held out": split.evaluation}
    measured = {name: (outcomes(options.float_model, part), outcomes(options.written_model, part)) for name, part in parts.items()}
    rows = {
        "calibration images": tuple(o[:CALIBRATION] for o in measured["calibration part"]),
        "search split": tuple(o[CALIBRATION : CALIBRATION + SEARCH] for o in measured["calibration part"]),
        "held out": measured["held out"],
    }
    print("| part | images | float | written | only float right | only written right |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (reference, written) in rows.items():
        print(
            f"| {name} | {len(reference)} | {100 * reference.mean():.2f}% | {100 * written.mean():.2f}% "
            f"| {int(np.count_nonzero(reference & ~written))} | {int(np.count_nonzero(written & ~reference))} |"
        )


if __name__ == "__main__":
    main()
