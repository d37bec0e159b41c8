"""Why a unit's learned rounding can end worse than round-to-nearest (docs/benchmarks.md,
"Learned rounding (BRECQ) on EfficientNet-Lite0").

Runs bench/ptq.py's BRECQ row (W4A8, first conv and classifier W8A8, 64 calibration
images) with `reconstruct.reconstruction_units` cut down to the first layer and the
named units, and `reconstruct._optimize` wrapped: on each named unit's own data it runs
the optimization again per variant (iterations, learning rate, QDrop on or off) from fresh
rounding variables and the same seed, and prints one JSON line each: the unit's output
error (quantized inputs, no drop, as reconstruct_weights' keep-nearest check measures it)
with round-to-nearest, with the final soft weights and with the rounded ones, the share
of rounding variables h(V) still strictly between 0.01 and 0.99, and the share of weights
whose integer differs from round-to-nearest. The first layer keeps round-to-nearest (it
is there so the named units' seeds are those of the full run when they follow it
directly); the units before a named one keep round-to-nearest, so only a unit right
after the first layer sees the inputs of the full run:

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/rounding_gap.py --model mobilenetv2 \
        --units Conv_6,Add_70 --variants 100:0.01:qdrop,100:0.01:plain,500:0.01:qdrop
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import ptq as bench
from quanos_onnx.layers import list_layers
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.ptq import reconstruct
from quanos_onnx.quantize import quantize

ROW = "auto + output clip + brecq 100 it. + bias corr., first/last W8A8, 64 calib."


@dataclass(frozen=True)
class Variant:
    iterations: int
    learning_rate: float
    qdrop: bool

    @classmethod
    def parse(cls, text: str) -> Variant:
        iterations, rate, drop = text.split(":")
        return cls(int(iterations), float(rate), drop == "qdrop")


def measure(
    twin: Any, weights: Sequence[reconstruct.RoundedWeight], data: reconstruct.UnitData, generator_state: Any,
    variant: Variant, optimize: Callable[..., None],
) -> dict[str, Any]:
    """One variant's optimization from fresh rounding variables on the unit's data."""
    import torch

    roundings = [reconstruct.SoftRounding(weight) for weight in weights]
    generator = torch.Generator()
    generator.set_state(generator_state)
    trained = data if variant.qdrop else reconstruct.UnitData(data.quantized, None, data.target)
    default_rate = reconstruct.learning_rate
    reconstruct.learning_rate = lambda iterations: variant.learning_rate
    try:
        cpu = time.process_time()
        optimize(twin, roundings, weights, trained, variant.iterations, generator, lambda steps: None)
        cpu = time.process_time() - cpu
    finally:
        reconstruct.learning_rate = default_rate
    rectified = torch.cat([rounding.rectified().detach().flatten() for rounding in roundings])

    def error(values: Sequence[Any]) -> float:
        return reconstruct._unit_error(twin, data, {w.feed: v for w, v in zip(weights, values)})

    return {
        "unit": [weight.layer for weight in weights],
        "weights": int(sum(weight.weight.size for weight in weights)),
        "iterations": variant.iterations, "learning_rate": variant.learning_rate, "qdrop": variant.qdrop,
        "nearest": error([w.dequantized(w.integers) for w in weights]),
        "soft": error([r.soft_weight().detach() for r in roundings]),
        "rounded": error([w.dequantized(r.integers()) for w, r in zip(weights, roundings)]),
        "undecided": float(((rectified > 0.01) & (rectified < 0.99)).float().mean()),
        "flipped": float(np.mean(np.concatenate([(r.integers() != w.integers).ravel() for w, r in zip(weights, roundings)]))),
        "cpu_seconds": cpu,
    }


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("efficientnet", "mobilenetv2"), required=True)
    parser.add_argument("--shared", type=Path, default=bench.SHARED)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/quanos_ptq_bench"))
    parser.add_argument("--units", required=True, help="unit names as the log gives them (Conv_6, Add_70, ...)")
    parser.add_argument("--variants", default="100:0.01:qdrop", help="ITERATIONS:LEARNING_RATE:qdrop|plain, ','-separated")
    args = parser.parse_args()
    setup = bench.imagenet(args.shared, args.model, 256, args.cache)
    wanted = set(args.units.split(","))
    variants = [Variant.parse(text) for text in args.variants.split(",")]
    first_layer = list_layers(setup.model)[0].name
    all_units, optimize = reconstruct.reconstruction_units, reconstruct._optimize

    def chosen_units(*arguments: Any, **keywords: Any) -> tuple[reconstruct.Unit, ...]:
        units = all_units(*arguments, **keywords)
        return (units[0], *(unit for unit in units[1:] if unit.label.split(" ", 1)[1] in wanted))

    def diagnosed(
        twin: Any, roundings: Any, weights: Sequence[reconstruct.RoundedWeight], data: reconstruct.UnitData,
        iterations: int, generator: Any, advance: Any,
    ) -> None:
        """In place of reconstruct._optimize: the variants on this unit's data, and the unit
        itself left at round-to-nearest."""
        if weights[0].layer == first_layer and first_layer not in wanted:
            return
        state = generator.get_state()
        for variant in variants:
            print(json.dumps({"model": args.model, **measure(twin, weights, data, state, variant, optimize)}), flush=True)

    reconstruct.reconstruction_units, reconstruct._optimize = chosen_units, diagnosed
    options = dict(bench.METHODS[ROW])
    first, last = options.pop("first_layer_bits"), options.pop("last_layer_bits")
    calibration = bench._first_images(setup.calibration, options.pop("calibration_images"))
    plan = bench.uniform_plan(setup.model, *bench.CONFIGS["W4A8"], first, last)
    quantize(setup.model, plan, calibration, ptq=PtqSettings(**{**options, "bias_correction": False}))


if __name__ == "__main__":
    main()
