"""How much of MobileNetV2's W4A4 loss is its linear bottlenecks' 4-bit grids (docs/benchmarks.md,
MobileNetV2, "Learned activation steps: tried, not kept").

The papers' W4A4 plan (first conv and classifier W8A8; bench/ptq.py's split: the first 256
val1300 images calibrate, the other 1044 test; mse ranges, output-error weight clipping, bias
correction, round-to-nearest), and the same plan with 8-bit inputs for the layers that read a
linear bottleneck (a layer output with no activation after it, or a residual Add):

    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/bottleneck_bits.py

`--by-class` starts from the papers' setting as `--first-last-bits 8 --join-operand-bits 8`
writes it (the first layer's output at 8 bits too, each residual join's operands at 8) and
raises one class of MobileNetV2's layers at a time to 8 bits, inputs or weights: the
depthwise convs, the 1x1 projections after them, the other 1x1 convs (the expansions).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import ptq as bench
from quanos_onnx.layers import Layer, list_layers
from quanos_onnx.plan import Plan
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.quantize import quantize


def reads_bottleneck(layer: Layer, producers: dict[str, str], linear_outputs: set[str]) -> bool:
    return producers.get(layer.input) == "Add" or layer.input in linear_outputs


def by_class(setup: bench.Setup, layers: list[Layer]) -> None:
    """The papers' W4A4 with one class of layers' inputs or weights at 8 bits."""
    plan = bench.first_output_at(setup.model, bench.uniform_plan(setup.model, 4, 4, 8, 8), 8)
    pinned = {layers[0].name, *(layer.name for layer in layers if layer.is_output)}
    producer = {layer.block_output: layer for layer in layers}
    depthwise = {layer.name for layer in layers if layer.groups > 1} - pinned
    projection = {layer.name for layer in layers if layer.input in producer and producer[layer.input].groups > 1} - pinned
    expansion = {layer.name for layer in layers if layer.groups == 1} - depthwise - projection - pinned
    settings = PtqSettings(act_range="mse", weight_clipping="output", bias_correction=True, join_operand_bits=8)
    variants = [("W4A4, first output A8, joins A8", plan)]
    for label, names in (("depthwise", depthwise), ("projection", projection), ("expansion", expansion)):
        for part, field in (("inputs", "act_bits"), ("weights", "weight_bits")):
            raised = plan.with_layers(replace(e, **{field: 8}) if e.name in names else e for e in plan.layers)
            variants.append((f"  {label} {part} at 8 ({len(names)} layers)", raised))
    for name, chosen in variants:
        written = quantize(setup.model, chosen, setup.calibration, ptq=settings).model
        print(f"{name}: {bench.top1(setup, written):.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--by-class", action="store_true", help="one class of layers at a time at 8 bits")
    args = parser.parse_args()
    setup = bench.imagenet(bench.SHARED, "mobilenetv2", 256, Path("/tmp/quanos_ptq_bench"))
    layers = list_layers(setup.model)
    if args.by_class:
        by_class(setup, layers)
        return
    producers = {output: node.op_type for node in setup.model.graph.node for output in node.output}
    linear_outputs = {layer.output for layer in layers if layer.block_output == layer.output}
    plan = bench.uniform_plan(setup.model, 4, 4, 8, 8)
    wide = {layer.name for layer in layers if reads_bottleneck(layer, producers, linear_outputs)}
    mixed = Plan(tuple(replace(e, act_bits=8) if e.name in wide and e.act_bits is not None else e for e in plan.layers))
    settings = PtqSettings(act_range="mse", weight_clipping="output", bias_correction=True)
    print(f"{len(wide)} of {len(layers)} layers read a bottleneck")
    for name, chosen in (("W4A4", plan), ("W4A4, bottleneck-reading layers A8", mixed)):
        written = quantize(setup.model, chosen, setup.calibration, ptq=settings).model
        print(f"{name}: {bench.top1(setup, written):.1%}", flush=True)


if __name__ == "__main__":
    main()
