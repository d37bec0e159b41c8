"""QUANOS on ResNet-20 through the library functions: ANS, Eqn-3 bits, budgeted and
iterative allocation, and the float model's clean/FGSM/PGD accuracy. Writes
docs/results-resnet20.md.

ANS: 1000 images of cifar10_test_jpeg_q75.npz from index 932 (the images after the exact
932 test images), FGSM eps 0.05, k_init 16. Accuracy: the exact first 932 test images.

    PYTHONPATH=. python bench/resnet20_quanos.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx"
CALIBRATION = SHARED / "data/cifar10/cifar10_test_jpeg_q75.npz"
TEST = SHARED / "data/cifar10/cifar10_test_first932.npz"
FIRST_CALIBRATION_INDEX = 932
BATCH = 100


def batches(path: Path, start: int, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    archive = np.load(path)
    images, labels = archive["x"], archive["y"].astype(np.int64)
    for first in range(start, start + count, BATCH):
        last = min(first + BATCH, start + count)
        yield np.ascontiguousarray(images[first:last].transpose(0, 3, 1, 2).astype(np.float32) / 255.0), labels[first:last]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--output", type=Path, default=REPO / "docs/results-resnet20.md")
    parser.add_argument(
        "--evaluate-quantized", action="store_true",
        help="also attack the QDQ models on the 932 images (slow: fake-quant twins)",
    )
    options = parser.parse_args()

    import torch

    from quanos_onnx.allocate import allocate, allocate_budgeted, allocate_iterative
    from quanos_onnx.harness.ans import measure_ans
    from quanos_onnx.harness.attacks import Attack, twin_of
    from quanos_onnx.harness.evaluate import attack_grid, evaluate
    from quanos_onnx.layers import find_joins, list_layers
    from quanos_onnx.model import load_model
    from quanos_onnx.passes.align import align_plan
    from quanos_onnx.quantize import quantize
    from quanos_onnx.plan import Plan

    torch.set_num_threads(options.threads)
    proto = load_model(MODEL)
    layers = list_layers(proto)
    joins = find_joins(proto, layers)
    params = {layer.name: layer.params for layer in layers}
    twin = twin_of(proto)
    attack = Attack.fgsm(0.05)

    def ans_batches():
        return batches(CALIBRATION, FIRST_CALIBRATION_INDEX, options.samples)

    started = time.perf_counter()
    measured = measure_ans(proto, layers, ans_batches(), attack, twin=twin)
    ans_seconds = time.perf_counter() - started
    again = measure_ans(proto, layers, ans_batches(), attack, twin=twin)
    plan = allocate(layers, measured.layers, k_init=16, k_min=2)
    aligned = align_plan(plan, layers, joins)

    budgeted = allocate_budgeted(layers, measured.layers, 5.0)
    calibration = [x for x, _ in batches(CALIBRATION, FIRST_CALIBRATION_INDEX, 500)]

    def quantize_plan(candidate):
        return quantize(proto, candidate, calibration).model

    round_measurements = []

    def measure_quantized(model):
        result = measure_ans(model, layers, ans_batches(), attack, twin=twin_of(model))
        round_measurements.append(result)
        return result.layers

    iterative = allocate_iterative(
        layers, measured.layers, quantize=quantize_plan, measure=measure_quantized, rounds=options.rounds
    )
    iterative_measurements = list(round_measurements)
    round_measurements.clear()
    iterative_budgeted = allocate_iterative(
        layers, measured.layers, quantize=quantize_plan, measure=measure_quantized,
        rounds=options.rounds, target_average_bits=5.0,
    )
    budgeted_measurements = list(round_measurements)

    grid = attack_grid(["pgd"], [2 / 255], steps=10) + attack_grid(["fgsm"], [0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    started = time.perf_counter()
    evaluation = evaluate(proto, batches(TEST, 0, 932), grid, twin=twin)
    evaluate_seconds = time.perf_counter() - started

    quantized_grid = attack_grid(["fgsm"], [0.05]) + attack_grid(["pgd"], [2 / 255], steps=10)
    quantized_rows = []
    candidates = (
        *((f"uniform {bits}-bit", Plan.uniform(layers, bits)) for bits in (8, 6, 5, 4)),
        ("QUANOS Eqn 3", plan),
        *((f"QUANOS budget {target:g}", allocate_budgeted(layers, measured.layers, target)) for target in (5.0, 6.0, 8.0)),
    )
    for label, candidate in candidates:
        quantized = quantize(proto, candidate, calibration)
        grid_here = quantized_grid if options.evaluate_quantized else ()
        twin_here = twin_of(quantized.model) if options.evaluate_quantized else None
        result = evaluate(quantized.model, batches(TEST, 0, 932), grid_here, twin=twin_here)
        attacked = " | ".join(f"{100 * entry.accuracy:.1f}%" for entry in result.attacks)
        quantized_rows.append(
            f"| {label} | {quantized.plan.average_weight_bits(params):.2f} | {100 * result.clean_accuracy:.1f}% |"
            + (f" {attacked} |" if attacked else "")
        )

    quantized_header = (
        "| plan | average bits (aligned) | clean | FGSM eps=0.05 | PGD-10 eps=2/255 |\n|---|---:|---:|---:|---:|"
        if options.evaluate_quantized
        else "| plan | average bits (aligned) | clean |\n|---|---:|---:|"
    )
    rows = []
    for index, (layer, result, entry, aligned_entry) in enumerate(zip(layers, measured.layers, plan.layers, aligned.layers)):
        rows.append(
            f"| {index} | `{layer.name}` | {layer.params} | {result.mean:.4f} | {result.std:.4f} | "
            f"{_bits(entry)} | {_bits(aligned_entry)} | {_bits(budgeted.layers[index])} |"
        )
    accuracy_rows = [
        f"| {entry.attack.describe()} | {100 * entry.accuracy:.1f}% | {100 * entry.loss:.1f} |"
        for entry in evaluation.attacks
    ]
    iteration_rows = [
        f"| {label} | {record['round']} | {', '.join(str(b) for b in record['bits'].values())} | "
        f"{_average(record['bits'], params):.2f} |"
        for label, result in (("Eqn 3", iterative), ("budget 5.0", iterative_budgeted))
        for record in result.details["rounds"]
    ]
    measurement_rows = [
        f"| {label} | {index + 2} | {100 * m.clean_accuracy:.1f}% | {100 * m.adversarial_accuracy:.1f}% | "
        f"{m.unperturbed} of {m.samples} | {max(r.mean for r in m.layers):.4f} |"
        for label, measurements in (("Eqn 3", iterative_measurements), ("budget 5.0", budgeted_measurements))
        for index, m in enumerate(measurements)
    ]
    text = f"""# QUANOS on ResNet-20 (bench/resnet20_quanos.py)

Model: `{MODEL.name}`. ANS: {measured.samples} images of `{CALIBRATION.name}` from index
{FIRST_CALIBRATION_INDEX}, labels from the data, {attack.describe()} on the torch twin, block
outputs from onnxruntime ({ans_seconds:.1f} s at {options.threads} torch threads). On these
images the float model's accuracy is {100 * measured.clean_accuracy:.1f}% clean and
{100 * measured.adversarial_accuracy:.1f}% under the attack. A second identical run gives
{"identical" if again.layers == measured.layers else "DIFFERENT"} ANS values.

Bits: Eqn 3 with k_init 16, k_min 2, output layer float; "aligned" is after the residual
alignment pass (what the QDQ model gets); "budget 5.0" scales ANS by
{budgeted.details['ans_scale']:.4f} for a parameter-weighted average of
{budgeted.details['achieved_average_bits']:.3f} bits (achievable neighbours
{budgeted.details['bracket_average_bits'][0]:.3f} and {budgeted.details['bracket_average_bits'][1]:.3f}).
Eqn-3 average: {plan.average_weight_bits(params):.3f} bits (aligned: {aligned.average_weight_bits(params):.3f}).

| # | layer | params | ANS mean | ANS std | Eqn 3 | aligned | budget 5.0 |
|---:|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

## Iterative QUANOS

Each round quantizes the previous round's plan (quantize.quantize, 500 calibration images),
measures ANS on that QDQ model (attack on its fake-quant twin) and applies Eqn 3 from
k_init 16 to the mean of every ANS measured so far (the float model's included; see
docs/method.md); with the budget, it re-allocates 5.0 average bits on that mean.
`--rounds {options.rounds}`. Eqn 3: {_outcome(iterative.details)}. Budget 5.0:
{_outcome(iterative_budgeted.details)}.

| mode | round | bits per layer | average bits |
|---|---:|---|---:|
{chr(10).join(iteration_rows)}

The measurements on the quantized models (round r measures the model of round r-1's bits;
accuracy of the QDQ model on the ANS images; "unperturbed": samples whose input gradient
through the fake-quant twin was zero, so FGSM left them unchanged):

| mode | round | clean | FGSM | unperturbed | largest layer ANS |
|---|---:|---:|---:|---:|---:|
{chr(10).join(measurement_rows)}

## Accuracy of the float model on the exact first 932 test images

Attacks on the torch twin, accuracy counted by onnxruntime ({evaluate_seconds:.0f} s).
Clean accuracy: {100 * evaluation.clean_accuracy:.1f}%.

| attack | accuracy | adversarial loss (points) |
|---|---:|---:|
{chr(10).join(accuracy_rows)}

## Quantized models (post-training, no fine-tuning) on the same 932 images

QDQ models from quantize.quantize (residual alignment applied; 500 calibration images),
accuracy counted by onnxruntime{", attacks through their fake-quant twins" if options.evaluate_quantized else ""}.

{quantized_header}
{chr(10).join(quantized_rows)}
"""
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text)
    print(text)


def _outcome(details) -> str:
    rounds = details["rounds_run"]
    if details["converged"]:
        return f"converged (bits unchanged) after {rounds} rounds"
    if "stopped" in details:
        return f"stopped after {rounds} rounds ({details['stopped']})"
    return f"not converged after {rounds} rounds"


def _bits(entry) -> str:
    return "float" if entry.keep_float else str(entry.weight_bits)


def _average(bits: dict[str, int | None], params: dict[str, int]) -> float:
    quantized = {name: value for name, value in bits.items() if value is not None}
    return sum(params[name] * value for name, value in quantized.items()) / sum(params[name] for name in quantized)


if __name__ == "__main__":
    main()
