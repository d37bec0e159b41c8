"""What `--calibration probe` chooses at 6 bits and fewer, and whether the choice is right.

For each model and calibration set: the probe's logit KL from float with entropy and with mse
ranges (`ptq.low_bits_range`: the uniform 4-bit plan, the default weight clipping and bias
correction, round-to-nearest, on the first 256 calibration samples), the method it picks,
and the top-1 of a W4A4 model written with each method (`quantize()`, the default settings
otherwise) on images that did not calibrate it:

- resnet20: calibration = 512 JPEG q75 CIFAR-10 test images from index 932, test = the exact
  first 932; uniform W4A4 (classifier float).
- fashion: the CNN of bench/study_data.py; calibration = its first 512 tune (training)
  images, test = t10k; uniform W4A4.
- efficientnet / mobilenetv2, calibration set `first`: the first 256 val1300 images (as
  bench/ptq.py), test = the other 1044; `compile`: the 256 the ImageNet default compile
  calibrates on (images 0..1279 less the seeded held-out 20%), test = the other 1024. W4A4
  with the first conv and the classifier W8A8 (the papers' setting, bench/ptq.py's
  `uniform_plan(model, 4, 4, 8, 8)`).

Every cell is cached as JSON under bench/cache/range-choice/.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/range_choice.py --row resnet20 --row fashion \\
        --row efficientnet:first --row mobilenetv2:first --row mobilenetv2:compile [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study_data import SHARED, cached, load_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench/cache/range-choice"
IMAGENET = {"efficientnet": ("efficientnet_lite0.onnx", 0), "mobilenetv2": ("tf2_mobilenet_v2_1.0_224_ptq_deq.onnx", 1)}


def _imagenet(name: str, calibration_set: str) -> tuple[Any, list[np.ndarray], np.ndarray, np.ndarray, Any]:
    from quanos_onnx.data import IndexRange, dataset_from, split_held_out
    from quanos_onnx.model import input_spec, load_model, num_classes

    file, offset = IMAGENET[name]
    proto = load_model(SHARED / "models/imagenet" / file)
    folder = SHARED / "data/imagenet/val1300"
    count = 1280 if calibration_set == "compile" else 1300
    dataset = dataset_from(
        str(folder / "images"), input_spec(proto), num_classes=num_classes(proto, file), labels=str(folder / "labels.csv"),
        resize=224, data_range=IndexRange(0, count), label_offset=offset,
    )
    if calibration_set == "compile":
        split = split_held_out(dataset, 0.2, seed=0)
        x, y = np.asarray(split.calibration.x, np.float32), np.asarray(split.calibration.y)
        test_x = np.concatenate([x[256:], np.asarray(split.evaluation.x, np.float32)])
        test_y = np.concatenate([y[256:], np.asarray(split.evaluation.y)])
    else:
        x, y = np.asarray(dataset.x, np.float32), np.asarray(dataset.y)
        test_x, test_y = x[256:], y[256:]
    calibration = [x[i : i + 32] for i in range(0, 256, 32)]
    return proto, calibration, test_x, test_y, "papers"


def _small(name: str) -> tuple[Any, list[np.ndarray], np.ndarray, np.ndarray, Any]:
    from quanos_onnx.model import load_model

    setup = load_setup(name)
    calibration = [np.asarray(setup.tune_x[i : i + 128], np.float32) for i in range(0, 512, 128)]
    return load_model(setup.model_path), calibration, setup.test_x, setup.test_y, "uniform"


def measure(row: str) -> dict[str, Any]:
    import ptq as ptq_bench
    from quanos_onnx.layers import list_layers
    from quanos_onnx.model import Runner, normalize
    from quanos_onnx.plan import Plan
    from quanos_onnx.ptq import PROBE_CANDIDATES, PtqSettings, low_bits_range
    from quanos_onnx.ptq.statistics import CalibrationStatistics
    from quanos_onnx.quantize import quantize

    name, _, calibration_set = row.partition(":")
    proto, calibration, test_x, test_y, setting = _imagenet(name, calibration_set) if name in IMAGENET else _small(name)
    model = normalize(proto)
    layers = list_layers(model)
    statistics = CalibrationStatistics(model, calibration)
    started = time.process_time()
    choice = low_bits_range(layers, statistics, PtqSettings())
    probe_seconds = time.process_time() - started
    plan = ptq_bench.uniform_plan(model, 4, 4, 8, 8) if setting == "papers" else Plan.uniform(layers, 4)

    def top1(written: Any) -> float:
        runner = Runner(written)
        predictions = [runner.run(test_x[i : i + 64])[0].argmax(1) for i in range(0, len(test_x), 64)]
        return float(np.mean(np.concatenate(predictions) == test_y))

    accuracy = {
        method: top1(quantize(model, plan, calibration, ptq=PtqSettings(act_range=method), statistics=statistics).model)
        for method in PROBE_CANDIDATES
    }
    return {
        "kl": dict(choice.divergence), "picks": choice.method, "accuracy": accuracy, "float": top1(model),
        "test_images": int(len(test_y)), "setting": setting, "probe_cpu_s": probe_seconds, "machine": machine(),
    }


def render(rows: list[str]) -> str:
    flags = " ".join(f"--row {row}" for row in rows)
    lines = [
        "## The probe's range method at 6 bits and fewer (bench/range_choice.py)",
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=. python bench/range_choice.py {flags} --write`: the probe of `--calibration probe` "
        "(`ptq.low_bits_range`: the uniform 4-bit plan written with entropy and with mse ranges, default weight clipping and "
        "bias correction, round-to-nearest; logit KL from float on the first 256 calibration samples) and the top-1 of W4A4 "
        "models written with each method on images that did not calibrate them (uniform W4A4 for ResNet-20 and the Fashion "
        "CNN; first conv and classifier W8A8 for the ImageNet models). Calibration sets: see the script's docstring.",
        "",
        "| model | calibration set | KL entropy | KL mse | probe picks | W4A4 entropy | W4A4 mse | float | test images | right? | probe CPU s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    machines = set()
    for row in rows:
        cell = cached(CACHE / f"{row.replace(':', '-')}.json", lambda: measure(row))
        name, _, calibration_set = row.partition(":")
        accuracy = cell["accuracy"]
        best = max(accuracy, key=accuracy.get)
        gap = abs(accuracy["entropy"] - accuracy["mse"])
        verdict = "tie (within 1 point)" if gap < 0.01 else ("yes" if cell["picks"] == best else f"no ({best} is {100 * gap:.1f} points ahead)")
        lines.append(
            f"| {name} | {calibration_set or 'bench'} | {cell['kl']['entropy']:.3f} | {cell['kl']['mse']:.3f} | {cell['picks']} | "
            f"{100 * accuracy['entropy']:.1f}% | {100 * accuracy['mse']:.1f}% | {100 * cell['float']:.1f}% | {cell['test_images']} | "
            f"{verdict} | {cell['probe_cpu_s']:.0f} |"
        )
        machines.add(cell["machine"])
    return "\n".join([*lines, "", f"Machine: {'; '.join(sorted(machines))}.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", required=True, help="resnet20, fashion, efficientnet:first|compile, mobilenetv2:first|compile")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    options = parser.parse_args()
    section = render(options.row)
    print(section)
    if options.write:
        write_section(
            REPO / "docs/benchmarks.md", section.splitlines()[0], section,
            after="## Post-training quantization: methods x bits (bench/ptq.py)",
        )


if __name__ == "__main__":
    main()
