"""Bits from ANS (paper Eqn 3), with a budgeted and an iterative mode.

k_l = k_init - round(ANS_l * k_init), rounded half away from zero and clamped to
[k_min, k_init]; weights and the layer's input activation both get k_l. The layers whose
block reaches the model output stay float unless asked (the paper keeps the classifier
at full precision). The result is the raw Eqn-3 plan: residual alignment is applied when
the plan is quantized (quantize.quantize), so the plan keeps what the method decided.

Budgeted mode scales every ANS by one factor s (found by bisection) so that the
parameter-weighted average bits come as close to a target as integer bits allow; one
factor keeps the layers' order of sensitivity intact. Iterative mode (Algorithm 1 repeated)
re-measures ANS on the model quantized to the current bits and applies Eqn 3 from k_init
to the mean of every ANS measured so far, until no layer's bits change or the rounds run
out (docs/method.md explains this reading of the paper and why the mean).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import PlanError, UsageError, arg
from ..harness.ans import AnsResult
from ..layers import Layer
from ..plan import LayerPlan, Plan

log = logging.getLogger(__name__)

K_INIT_MAX = 32
K_MIN_FLOOR = 2
_BISECTION_STEPS = 200

QuantizedModel = TypeVar("QuantizedModel")


def round_half_away_from_zero(value: float) -> int:
    """2.5 -> 3, -2.5 -> -3 (Python's round() would give 2: half to even)."""
    magnitude = abs(value)
    whole = math.floor(magnitude)
    rounded = whole + 1 if magnitude - whole >= 0.5 else whole
    return int(math.copysign(rounded, value))


def eqn3_bits(ans: float, k_init: int, k_min: int) -> int:
    """Paper Eqn 3 with the clamp: ANS 0 keeps k_init, a large ANS bottoms out at k_min."""
    bits = k_init - round_half_away_from_zero(ans * k_init)
    return min(k_init, max(k_min, bits))


def check_bit_range(k_init: int, k_min: int) -> None:
    if isinstance(k_init, bool) or not isinstance(k_init, int) or not 2 <= k_init <= K_INIT_MAX:
        raise UsageError(f"{arg('k_init')} {k_init!r} must be a whole number in 2..{K_INIT_MAX}")
    if isinstance(k_min, bool) or not isinstance(k_min, int) or not K_MIN_FLOOR <= k_min <= k_init:
        raise UsageError(f"{arg('k_min')} {k_min!r} must be a whole number in {K_MIN_FLOOR}..{k_init} ({arg('k_init')})")


def allocate(
    layers: Sequence[Layer],
    ans: Sequence[AnsResult],
    *,
    k_init: int = 16,
    k_min: int = 2,
    quantize_output: bool = False,
    ans_scale: float = 1.0,
) -> Plan:
    """The Eqn-3 plan for these layers (in their order), each entry carrying its ANS.

    `ans_scale` multiplies every ANS before Eqn 3 (budgeted mode; 1 is the paper's method).
    """
    check_bit_range(k_init, k_min)
    by_layer = _ans_by_layer(layers, ans)
    entries = []
    for layer in layers:
        result = by_layer[layer.name]
        if layer.is_output and not quantize_output:
            entries.append(
                LayerPlan(layer.name, None, None, keep_float=True, ans_mean=result.mean, ans_std=result.std)
            )
            continue
        bits = eqn3_bits(result.mean * ans_scale, k_init, k_min)
        entries.append(LayerPlan(layer.name, bits, bits, ans_mean=result.mean, ans_std=result.std))
    return Plan(
        tuple(entries),
        k_init=k_init,
        k_min=k_min,
        method="quanos",
        details={"mode": "eqn3", "ans_scale": ans_scale},
    )


def _ans_by_layer(layers: Sequence[Layer], ans: Sequence[AnsResult]) -> Mapping[str, AnsResult]:
    by_layer = {result.layer: result for result in ans}
    for layer in layers:
        result = by_layer.get(layer.name)
        if result is None:
            raise PlanError(f"layer '{layer.name}': no ANS measured for it")
        if not (math.isfinite(result.mean) and result.mean >= 0.0):
            raise PlanError(f"layer '{layer.name}': ANS {result.mean!r} is not a non-negative number")
    return by_layer


def allocate_budgeted(
    layers: Sequence[Layer],
    ans: Sequence[AnsResult],
    target_average_bits: float,
    *,
    k_init: int = 16,
    k_min: int = 2,
    quantize_output: bool = False,
) -> Plan:
    """Eqn 3 on ANS * s, with s chosen so the average bits are closest to the target.

    The average (parameter-weighted over quantized layers) only falls as s grows, in
    integer steps. Bisection brackets the step where it crosses the target; of the two
    averages on either side, the closer one wins (a tie goes to the one under the target).
    The details record the target, the achieved average, the scale and both bracketing
    averages, so a user sees how close integer bits allow.
    """
    check_bit_range(k_init, k_min)
    if not (math.isfinite(target_average_bits) and k_min <= target_average_bits <= k_init):
        raise UsageError(
            f"{arg('target_avg_bits')} {target_average_bits:g} must lie between {arg('k_min')} {k_min} and {arg('k_init')} {k_init}"
        )
    params = {layer.name: layer.params for layer in layers}

    def plan_at(scale: float) -> Plan:
        return allocate(
            layers, ans, k_init=k_init, k_min=k_min, quantize_output=quantize_output, ans_scale=scale
        )

    def average(plan: Plan) -> float:
        return plan.average_weight_bits(params)

    low, high = 0.0, _saturating_scale(layers, ans, k_init, quantize_output)
    low_plan, high_plan = plan_at(low), plan_at(high)
    if average(low_plan) <= target_average_bits:
        high, high_plan = low, low_plan
    elif average(high_plan) >= target_average_bits:
        if average(high_plan) > target_average_bits:
            log.warning(
                "no ANS scaling brings the average down to %.4g bits; the closest is %.4g",
                target_average_bits, average(high_plan),
            )
        low, low_plan = high, high_plan
    else:
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            if middle in (low, high):
                break
            middle_plan = plan_at(middle)
            if average(middle_plan) >= target_average_bits:
                low, low_plan = middle, middle_plan
            else:
                high, high_plan = middle, middle_plan
    above = average(low_plan) - target_average_bits
    below = target_average_bits - average(high_plan)
    chosen, scale = (low_plan, low) if above < below else (high_plan, high)
    return chosen.with_details(
        mode="budgeted",
        ans_scale=scale,
        target_average_bits=target_average_bits,
        achieved_average_bits=average(chosen),
        bracket_average_bits=[average(high_plan), average(low_plan)],
    )


def _saturating_scale(
    layers: Sequence[Layer], ans: Sequence[AnsResult], k_init: int, quantize_output: bool
) -> float:
    """A scale at which every quantized layer with ANS > 0 is clamped to k_min."""
    by_layer = _ans_by_layer(layers, ans)
    positive = [
        by_layer[layer.name].mean
        for layer in layers
        if (quantize_output or not layer.is_output) and by_layer[layer.name].mean > 0
    ]
    if not positive:
        return 0.0
    return 2.0 * (k_init + 1) / (min(positive) * k_init)


def allocate_iterative(
    layers: Sequence[Layer],
    first_ans: Sequence[AnsResult],
    *,
    quantize: Callable[[Plan], QuantizedModel],
    measure: Callable[[QuantizedModel], Sequence[AnsResult]],
    rounds: int,
    k_init: int = 16,
    k_min: int = 2,
    quantize_output: bool = False,
    target_average_bits: float | None = None,
) -> Plan:
    """Iterative QUANOS: ANS -> bits -> quantize -> ANS on the quantized model -> bits ...

    Round 1 allocates from `first_ans` (the float model). Each later round quantizes the
    previous round's plan (`quantize` may fine-tune too, as Algorithm 1 does), measures ANS
    on that model, and allocates from k_init again (Eqn 3, or the budget when
    `target_average_bits` is given) on the running mean of every ANS measured so far, the
    float model's included. The plain fixed-point reading (each round's ANS alone) cycles:
    a 2-bit model has low ANS, so the next round raises its bits, whose model has high ANS
    again. The mean damps that: it moves by 1/r of a measurement in round r, so the bits
    settle. The loop ends when a round leaves every layer's bits unchanged (converged) or
    after `rounds` rounds. A round whose ANS is zero in every quantized layer (the attack
    found no gradient: a heavily quantized model can mask it) carries no information: the
    loop stops there and keeps the previous plan. The details record every round's
    measured and averaged ANS and its bits.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UsageError(f"{arg('rounds')} {rounds!r} must be a whole number of at least 1")

    def allocate_round(ans: Sequence[AnsResult]) -> Plan:
        if target_average_bits is not None:
            return allocate_budgeted(
                layers, ans, target_average_bits, k_init=k_init, k_min=k_min, quantize_output=quantize_output
            )
        return allocate(layers, ans, k_init=k_init, k_min=k_min, quantize_output=quantize_output)

    measurements = [_ans_by_layer(layers, first_ans)]
    plan = allocate_round(first_ans)
    history = [_round_record(1, plan, measurements[-1])]
    converged = False
    stopped = None
    for round_number in range(2, rounds + 1):
        measured = measure(quantize(plan))
        if _no_signal(plan, measured):
            stopped = f"round {round_number}: ANS is zero in every quantized layer (no gradient reached the input)"
            log.warning("iterative QUANOS stops at %s; keeping round %d's bits", stopped, round_number - 1)
            break
        measurements.append(_ans_by_layer(layers, measured))
        next_plan = allocate_round(_mean_ans(layers, measurements))
        history.append(_round_record(round_number, next_plan, measurements[-1]))
        converged = _bits(next_plan) == _bits(plan)
        plan = next_plan
        log.info("QUANOS round %d: bits %s", round_number, "unchanged" if converged else "changed")
        if converged:
            break
    if not converged and stopped is None and rounds > 1:
        log.warning(
            "iterative QUANOS: the bits still changed in round %d of %d; writing that round's plan "
            "(more --rounds may settle it; plan.json details list every round)", len(history), rounds
        )
    details: dict[str, Any] = {
        "mode": "iterative" if target_average_bits is None else "iterative-budgeted",
        "rounds": history,
        "rounds_run": len(history),
        "max_rounds": rounds,
        "converged": converged,
    }
    if stopped:
        details["stopped"] = stopped
    return plan.with_details(**details)


def _mean_ans(layers: Sequence[Layer], measurements: Sequence[Mapping[str, AnsResult]]) -> list[AnsResult]:
    """Per layer, the mean over rounds of the measured ANS mean and std (counts add up)."""
    averaged = []
    for layer in layers:
        results = [measured[layer.name] for measured in measurements]
        averaged.append(
            AnsResult(
                layer.name,
                results[0].tensor,
                math.fsum(result.mean for result in results) / len(results),
                math.fsum(result.std for result in results) / len(results),
                sum(result.count for result in results),
            )
        )
    return averaged


def _no_signal(plan: Plan, ans: Sequence[AnsResult]) -> bool:
    by_layer = {result.layer: result.mean for result in ans}
    return all(by_layer.get(entry.name, 0.0) == 0.0 for entry in plan.layers if entry.quantized)


def _bits(plan: Plan) -> tuple[int | None, ...]:
    return tuple(entry.weight_bits for entry in plan.layers)


def _round_record(round_number: int, plan: Plan, measured: Mapping[str, AnsResult]) -> dict[str, Any]:
    """The bits, the ANS they came from (averaged over rounds) and this round's measurement."""
    record: dict[str, Any] = {
        "round": round_number,
        "bits": {entry.name: entry.weight_bits for entry in plan.layers},
        "ans_mean": {entry.name: entry.ans_mean for entry in plan.layers},
        "measured_ans_mean": {entry.name: measured[entry.name].mean for entry in plan.layers},
    }
    if "achieved_average_bits" in plan.details:
        record["ans_scale"] = plan.details["ans_scale"]
        record["achieved_average_bits"] = plan.details["achieved_average_bits"]
    return record
