"""ResNet-20 (CIFAR-10) top-1 after rounding optimization: nearest vs AdaRound vs BRECQ/QDrop.

Quantizes at W4A4, W3A3, W2A4 and W4A8 (every layer at those bits but the output layer,
which stays float as in Plan.uniform; `--paper` also puts the first layer and the output
layer at W8A8, as the BRECQ and QDrop papers do), calibrates on 1024 images of cifar10_test_jpeg_q75.npz from index 932, and
tests the written QDQ model in onnxruntime on the exact first 932 test images. Prints a
Markdown table with the wall and CPU time of each rounding optimization. Needs ../shared.

    python bench/reconstruct.py [--iterations N] [--threads T] [--configs 4/4,3/3]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quanos_onnx import model as onnx_model  # noqa: E402
from quanos_onnx.layers import Layer, list_layers  # noqa: E402
from quanos_onnx.passes.points import output_readers  # noqa: E402
from quanos_onnx.plan import FirstOutputBits, LayerPlan, Plan  # noqa: E402
from quanos_onnx.ptq import PtqSettings  # noqa: E402
from quanos_onnx.ptq.reconstruct import DEFAULT_ITERATIONS, reconstruct_weights  # noqa: E402
from quanos_onnx.quantize import quantize  # noqa: E402

SHARED = next(p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir())
CONFIGS = ((4, 4), (3, 3), (2, 4), (4, 8))


def top1(proto, x: np.ndarray, y: np.ndarray) -> float:
    runner = onnx_model.Runner(proto)
    logits = np.concatenate([runner.run(x[i : i + 256])[0] for i in range(0, len(x), 256)])
    return float((logits.argmax(1) == y).mean())


def bench_plan(layers: Sequence[Layer], weight_bits: int, act_bits: int, *, paper: bool) -> Plan:
    """W/A bits for every layer; the output layer float (Plan.uniform's default), or with
    `paper` the first and output layers at W8A8."""
    entries = []
    for index, layer in enumerate(layers):
        if paper and (index == 0 or layer.is_output):
            entries.append(LayerPlan(layer.name, 8, 8))
        elif layer.is_output:
            entries.append(LayerPlan(layer.name, None, None, keep_float=True))
        else:
            entries.append(LayerPlan(layer.name, weight_bits, act_bits))
    return Plan(tuple(entries), method=f"w{weight_bits}a{act_bits}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--methods", default="adaround,brecq")
    parser.add_argument("--configs", default=",".join(f"{w}/{a}" for w, a in CONFIGS), help="W/A pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paper", action="store_true", help="first and output layers at W8A8")
    parser.add_argument(
        "--first-output", action="store_true",
        help="with --paper, the first layer's output at 8 bits too (its readers' input), as --first-last-bits 8 writes it",
    )
    parser.add_argument("--ranges", default="minmax", help="quantize()'s activation range method")
    parser.add_argument("--join-operand-bits", type=int, default=None, help="PtqSettings.join_operand_bits")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("quanos_onnx.twin").setLevel(logging.WARNING)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    logging.getLogger("quanos_onnx.passes").setLevel(logging.WARNING)
    test = np.load(SHARED / "data/cifar10/cifar10_test_first932.npz")
    x = test["x"].transpose(0, 3, 1, 2).astype(np.float32) / 255
    y = test["y"]
    jpeg = np.load(SHARED / "data/cifar10/cifar10_test_jpeg_q75.npz")
    images = jpeg["x"][932 : 932 + args.samples].transpose(0, 3, 1, 2).astype(np.float32) / 255
    calibration = [images[i : i + 256] for i in range(0, len(images), 256)]
    model = onnx_model.load_model(SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx")
    layers = list_layers(model)
    print(f"float top-1 {top1(model, x, y):.1%}", flush=True)
    settings = PtqSettings(join_operand_bits=args.join_operand_bits)
    rows = []
    for pair in args.configs.split(","):
        weight_bits, act_bits = (int(v) for v in pair.split("/"))
        plan = bench_plan(layers, weight_bits, act_bits, paper=args.paper)
        if args.first_output:
            plan = FirstOutputBits(output_readers(model, layers, layers[0].name), 8).apply(plan)
        nearest = quantize(model, plan, calibration, method=args.ranges, ptq=settings)
        row = [f"W{weight_bits}A{act_bits}", f"{top1(nearest.model, x, y):.1%}"]
        print(f"W{weight_bits}A{act_bits} nearest {row[1]}", flush=True)
        for method in args.methods.split(","):
            start, cpu = time.perf_counter(), time.process_time()
            grids = reconstruct_weights(
                model, nearest.model, layers, nearest.plan, calibration,
                method=method, iterations=args.iterations, seed=args.seed,
            )
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            accuracy = top1(
                quantize(model, plan, calibration, method=args.ranges, weight_grids=grids, ptq=settings).model, x, y
            )
            print(f"W{weight_bits}A{act_bits} {method} {accuracy:.1%} in {seconds:.0f} s ({cpu:.0f} s CPU)", flush=True)
            row.append(f"{accuracy:.1%} ({seconds:.0f} s, {cpu:.0f} s CPU)")
        rows.append(row)
    print(f"\n| bits | nearest | {' | '.join(args.methods.split(','))} |")
    print("|---|---|" + "---|" * len(args.methods.split(",")))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
