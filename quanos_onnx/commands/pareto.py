"""compile --pareto: the front's plans written and measured like the compiled model.

The search solves one plan per average-bits budget and judges it on the search split
(allocate/search.pareto_front). A user picking a plan from the front needs what each plan's
deployed model does, so every mixed plan of the front and every uniform plan of the
candidate bits is written with the compile's own PTQ (the function that wrote the compiled
model) and measured on the held-out evaluation split exactly as verification measures the
compiled model: clean accuracy in onnxruntime, the evaluation attacks through the twin.
The front (JSON: plan.json's allocation.pareto and report.json's pareto) and its chart
(pareto.png, and a figure of report.html) plot clean and robust accuracy against weight
memory and against energy per image on one hardware profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import onnx

from ..layers import Layer
from ..plan import FirstOutputBits, LayerPlan, Plan
from ..progress import ProgressFactory, no_progress

if TYPE_CHECKING:
    from ..data import Dataset
    from ..hwmodel.profiles import HardwareProfile
    from ..verify import ModelRow, Quantizer, Verification, VerifySettings

PARETO_CHART = "pareto.png"


def measured_front(
    float_model: onnx.ModelProto,
    layers: Sequence[Layer],
    plan: Plan,
    quantize_plan: Quantizer,
    evaluation: Dataset,
    settings: VerifySettings,
    verification: Verification,
    *,
    candidates: Sequence[int],
    profile: HardwareProfile,
    quantize_output: bool = False,
    input_bits: int | None = None,
    act_bits: int | None = None,
    first_output: FirstOutputBits | None = None,
    progress: ProgressFactory = no_progress,
) -> dict[str, Any]:
    """The front document: one point per solved mixed plan (with the compile's `act_bits`,
    `input_bits` and `first_output`, as the search measured it) and per uniform bit-width (with `act_bits`),
    plus the compiled and float models
    from the verification; `dominated` marks the points another beats on both weight memory
    and clean accuracy."""
    from ..plan import with_activation_bits
    from ..verify import measure_plans, uniform_name

    searched = plan.details["allocation"]["pareto"]
    mixed = [
        (
            f"mixed {point['budget']}", "mixed",
            with_activation_bits(
                _plan_of(point["bits"]), layers, act_bits=act_bits, input_bits=input_bits, first_output=first_output
            ),
        )
        for point in searched
    ]
    uniform = [
        (
            uniform_name(bits, act_bits), "uniform",
            with_activation_bits(Plan.uniform(layers, bits, keep_output_float=not quantize_output), layers, act_bits=act_bits),
        )
        for bits in candidates
    ]
    measured = measure_plans(
        float_model, mixed + uniform, quantize_plan, evaluation, settings, layers=layers, progress=progress
    )
    points = [
        _point(row, each, layers, profile, budget=search["budget"], search_accuracy=search["accuracy"])
        for row, (_, _, each), search in zip(measured, mixed, searched)
    ]
    points += [_point(row, each, layers, profile) for row, (_, _, each) in zip(measured[len(mixed):], uniform)]
    points.append(_point(verification.compiled, plan, layers, profile))
    points.append(_point(verification.float_row, None, layers, profile))
    for point in points:
        point["dominated"] = any(
            other["weight_memory_bits"] <= point["weight_memory_bits"]
            and other["clean_accuracy"] >= point["clean_accuracy"]
            and (other["weight_memory_bits"] < point["weight_memory_bits"] or other["clean_accuracy"] > point["clean_accuracy"])
            for other in points
        )
    return {
        "profile": profile.name,
        "samples": verification.samples,
        "robust_samples": verification.robust_samples,
        "labels": verification.labels,
        "attacks": [attack.to_json() for attack in settings.attacks],
        "points": points,
    }


def _plan_of(bits: Mapping[str, int | None]) -> Plan:
    return Plan(
        tuple(
            LayerPlan(name, None, None, keep_float=True) if b is None else LayerPlan(name, b, b)
            for name, b in bits.items()
        ),
        method="milp",
    )


def _point(
    row: ModelRow,
    plan: Plan | None,
    layers: Sequence[Layer],
    profile: HardwareProfile,
    *,
    budget: str | None = None,
    search_accuracy: float | None = None,
) -> dict[str, Any]:
    from ..hwmodel import estimate

    return {
        "name": row.name,
        "kind": row.kind,
        "budget": budget,
        "search_accuracy": search_accuracy,
        "average_weight_bits": round(row.average_weight_bits, 4),
        "clean_accuracy": row.clean_accuracy,
        "attacks": [result.to_json() for result in row.attacks],
        "weight_memory_bits": row.weight_memory_bits,
        "energy_pj": estimate(layers, plan, profile).energy_pj,
        "dominated": False,
        "bits": {} if plan is None else {e.name: e.weight_bits for e in plan.layers},
    }
