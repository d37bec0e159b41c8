"""GPTQ's choices, each against the shipped form on the same plan and data (docs/benchmarks.md, "GPTQ").

Variants (comma-separated `--variants`):
  shipped        --rounding gptq as written: sequential, asymmetric target, 256 samples,
                 bias correction left off the layers GPTQ rounded
  symmetric      the same sequential inputs, the target W x_q instead of W x_f (no shift)
  bias-corrected the shipped integers, then bias correction on every layer as well
  samples=N      GPTQ's H and shift on the first N calibration samples
  damping=D      D x the mean diagonal added to H instead of gptq.DAMPING

Data and plans are bench/ptq.py's (uniform plans, classifier float; ImageNet models scored
with onnxruntime's exact kernels). One line per cell, printed as it is measured:

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/gptq_variants.py --model resnet20 --configs W4A4,W3A3,W2A4
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from quanos_onnx.layers import list_layers
from quanos_onnx.ptq import PtqSettings, gptq
from quanos_onnx.ptq.gptq import gptq_weights
from quanos_onnx.quantize import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ptq as bench  # noqa: E402


@contextmanager
def variant(name: str) -> Iterator[None]:
    """The module changes a variant needs, undone after it."""
    saved_products, saved_samples, saved_damping = gptq._input_products, gptq.GPTQ_SAMPLES, gptq.DAMPING
    if name == "symmetric":

        def without_shift(*args):  # noqa: ANN002, ANN202
            hessian, shift = saved_products(*args)
            return hessian, torch.zeros_like(shift)

        gptq._input_products = without_shift
    elif name.startswith("samples="):
        gptq.GPTQ_SAMPLES = int(name.split("=", 1)[1])
    elif name.startswith("damping="):
        gptq.DAMPING = float(name.split("=", 1)[1])
    try:
        yield
    finally:
        gptq._input_products, gptq.GPTQ_SAMPLES, gptq.DAMPING = saved_products, saved_samples, saved_damping


def written(setup: bench.Setup, config: str, name: str):  # noqa: ANN201 - onnx.ModelProto
    plan = bench.uniform_plan(setup.model, *bench.CONFIGS[config], None)
    if name != "bias-corrected":
        with variant(name):
            return quantize(setup.model, plan, setup.calibration, ptq=PtqSettings(rounding="gptq")).model
    nearest = quantize(setup.model, plan, setup.calibration, ptq=PtqSettings(bias_correction=False))
    grids = gptq_weights(setup.model, nearest.model, list_layers(setup.model), nearest.plan, setup.calibration)
    return quantize(setup.model, plan, setup.calibration, weight_grids=grids, ptq=PtqSettings()).model


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "efficientnet", "mobilenetv2"), default="resnet20")
    parser.add_argument("--shared", type=Path, default=bench.SHARED)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/quanos_ptq_bench"))
    parser.add_argument("--configs", default="W4A4,W3A3,W2A4")
    parser.add_argument("--variants", default="shipped,symmetric,bias-corrected,samples=128")
    args = parser.parse_args()
    if args.model == "resnet20":
        setup = bench.cifar(args.shared, 512)
        config = ()
    else:
        setup = bench.imagenet(args.shared, args.model, 256, args.cache)
        config = bench.EXACT_KERNELS
    print(f"{args.model} float {bench.top1(setup, setup.model, config):.1%}", flush=True)
    for config_name in args.configs.split(","):
        for name in args.variants.split(","):
            start = time.perf_counter()
            model = written(setup, config_name, name)
            seconds = time.perf_counter() - start
            print(f"{args.model} {config_name} {name}: {bench.top1(setup, model, config):.1%} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
