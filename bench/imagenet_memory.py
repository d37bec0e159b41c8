"""Peak memory of an ImageNet compile, stage by stage: the process's VmRSS and VmHWM (peak
RSS) printed at the start and end of every progress stage, so the stage that raises the
peak shows. Two runs, each in one process with 1 thread, on the first images of
../shared/data/imagenet/val1300 (labels.csv, shorter side resized to 224):

- compile: `quanos_onnx.compile` with N calibration and N attacked images out of the first
  --images (the default milp compile; ANS is its first stage);
- quantize: the PTQ stack alone (`quantize`, every layer at 4 bits, N calibration images):
  weight clipping, calibration histograms, bias correction.

    PYTHONPATH=. python bench/imagenet_memory.py compile|quantize [--model M] [--samples 64] [--images 400] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = next(path for path in (REPO.parent / "shared", REPO.parents[1] / "shared", REPO / "shared") if path.is_dir())
IMAGES = SHARED / "data/imagenet/val1300/images"
LABELS = SHARED / "data/imagenet/val1300/labels.csv"
START = time.time()


def memory_mib() -> tuple[float, float]:
    """(RSS, peak RSS) of this process, MiB."""
    text = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024 for key in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def line(what: str) -> None:
    rss, peak = memory_mib()
    print(f"{time.time() - START:7.1f}s {what}: rss {rss:.0f} MiB, peak {peak:.0f} MiB", flush=True)


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    line(f"start {label!r}")
    yield lambda done: None
    line(f"end   {label!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", choices=("compile", "quantize"))
    parser.add_argument("--model", default=str(SHARED / "models/imagenet/efficientnet_lite0.onnx"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    options = parser.parse_args()
    import quanos_onnx as qn

    if options.run == "compile":
        qn.compile(
            options.model, str(IMAGES), labels=str(LABELS), resize=224, calibration_samples=options.samples,
            samples=options.samples, data_range=(0, options.images), batch_size=options.batch_size, progress=progress,
        )
    else:
        from quanos_onnx.commands.compile import CompileOptions
        from quanos_onnx.commands.options import first_samples, load_data, read_model
        from quanos_onnx.layers import list_layers
        from quanos_onnx.plan import Plan
        from quanos_onnx.quantize import quantize
        from quanos_onnx.threads import using_threads

        settings = CompileOptions(labels=str(LABELS), resize=224, data_range=(0, options.samples))
        source = read_model(options.model)
        with using_threads(1):
            data = load_data(str(IMAGES), settings, source.proto)
            calibration = [x for x, _ in first_samples(data, options.samples, options.batch_size)]
            layers = list_layers(source.proto)
            line("data read")
            quantize(source.proto, Plan.uniform(layers, 4), calibration, layers=layers, ptq=settings.ptq_settings(), progress=progress)
    line("done")


if __name__ == "__main__":
    main()
