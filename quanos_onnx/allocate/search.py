"""Plans checked on the artifact: verify-and-repair, the smallest plan within a guard, a Pareto front.

The predicted cost (sensitivity.py) is additive and measured one layer at a time, so a plan
the solver likes can still break the accuracy guard once every layer is quantized together.
These searches therefore judge plans by an `Evaluate` callback: compile the plan and return
its clean accuracy on a held-out split (the verify stage's evaluation). Every search counts
its evaluations and says what it changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import UsageError
from ..layers import Join, Layer
from ..plan import Plan
from .sensitivity import Sensitivity
from .solve import DEFAULT_ANS_WEIGHT, Budget, RobustnessSignal, alignment_constraints, layer_price, plan_price, solve

Evaluate = Callable[[Plan], float]
"""Compile the plan and return its clean accuracy (0..1) on the held-out split."""
EvaluateMany = Callable[[Sequence[Plan]], list[float]]
"""`Evaluate` for several independent plans at once, in their order (compile runs them as
parallel jobs with --ray, jobs.py)."""


def one_by_one(evaluate: Evaluate) -> EvaluateMany:
    """`evaluate` applied to each plan in turn: what runs without a parallel evaluator."""
    return lambda plans: [evaluate(plan) for plan in plans]


@dataclass(frozen=True)
class RepairStep:
    layers: tuple[str, ...]
    from_bits: int
    to_bits: int
    accuracy: float

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "from_bits": self.from_bits, "to_bits": self.to_bits, "accuracy": self.accuracy}


@dataclass(frozen=True)
class Verified:
    """A plan with its measured accuracy, whether it keeps the guard, and how it was reached."""

    plan: Plan
    accuracy: float
    passed: bool
    evaluations: int
    steps: tuple[RepairStep, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "passed": self.passed,
            "evaluations": self.evaluations,
            "repairs": [step.to_json() for step in self.steps],
        }


def _groups(layers: Sequence[Layer], joins: Sequence[Join], plan: Plan) -> list[tuple[str, ...]]:
    """Layers whose bits move together (residual alignment's equal pairs), in layer order."""
    names = [e.name for e in plan.layers if e.quantized]
    parent = {name: name for name in names}

    def find(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for first, second in alignment_constraints(layers, joins, names).equal:
        parent[find(first)] = find(second)
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(find(name), []).append(name)
    return [tuple(members) for members in grouped.values()]


def _raise_at_least(layers: Sequence[Layer], joins: Sequence[Join], bits: dict[str, int]) -> None:
    """Restore `wide >= narrow` after a raise (a shortcut conv takes its join's widest bits)."""
    pairs = alignment_constraints(layers, joins, list(bits)).at_least
    changed = True
    while changed:
        changed = False
        for wide, narrow in pairs:
            if bits[wide] < bits[narrow]:
                bits[wide] = bits[narrow]
                changed = True


def repair(
    plan: Plan,
    layers: Sequence[Layer],
    joins: Sequence[Join],
    sensitivity: Sensitivity,
    evaluate: Evaluate,
    minimum_accuracy: float,
    *,
    budget: Budget | None = None,
    max_evaluations: int = 24,
    accuracy: float | None = None,
    fixed: Mapping[str, int] | None = None,
) -> Verified:
    """Raise bits until the plan's measured accuracy reaches `minimum_accuracy`.

    Each step raises one alignment group to its next candidate bit-width: the group with the
    largest predicted gain (drop of predicted cost) per unit of added price (the budget's
    quantity; parameter-bits without a budget). Stops when the guard holds, when every layer
    is at the widest candidate, or after `max_evaluations` evaluations. `accuracy`: the
    plan's accuracy when the caller measured it already; `fixed` layers (solve's) are never
    raised.
    """
    if max_evaluations < 1:
        raise UsageError(f"max_evaluations {max_evaluations} must be at least 1")
    pricing = budget or Budget("avg-bits", float(max(sensitivity.bits)))
    by_name = {layer.name: layer for layer in layers}
    candidates = sensitivity.bits
    bits = {e.name: e.weight_bits for e in plan.layers if e.quantized and e.weight_bits is not None}
    evaluations = 0
    if accuracy is None:
        accuracy = evaluate(plan)
        evaluations = 1
    steps: list[RepairStep] = []
    groups = [group for group in _groups(layers, joins, plan) if not set(group) & set(fixed or {})]
    while accuracy < minimum_accuracy and evaluations < max_evaluations:
        best: tuple[float, float, tuple[str, ...], int] | None = None
        for group in groups:
            current = bits[group[0]]
            higher = [b for b in candidates if b > current]
            if not higher:
                continue
            target = higher[0]
            gain = math.fsum(sensitivity.of(n, current) - sensitivity.of(n, target) for n in group if n in sensitivity.layers)
            price = math.fsum(
                layer_price(pricing, by_name[n], target) - layer_price(pricing, by_name[n], current) for n in group
            )
            key = (gain / max(price, 1e-12), gain, group, target)
            if best is None or key[:2] > best[:2]:
                best = key
        if best is None:
            break
        _, _, group, target = best
        before = bits[group[0]]
        for name in group:
            bits[name] = target
        _raise_at_least(layers, joins, bits)
        plan = _with(plan, bits)
        accuracy = evaluate(plan)
        evaluations += 1
        steps.append(RepairStep(group, before, target, accuracy))
    passed = accuracy >= minimum_accuracy
    repaired = plan.with_details(
        repair={"steps": [step.to_json() for step in steps], "passed": passed, "accuracy": accuracy},
    )
    return Verified(repaired, accuracy, passed, evaluations, tuple(steps))


def _with(plan: Plan, bits: Mapping[str, int]) -> Plan:
    return plan.with_layers(
        replace(e, weight_bits=bits[e.name], act_bits=bits[e.name]) if e.name in bits else e for e in plan.layers
    )


def no_worse_than_uniform(
    plan: Plan,
    accuracy: float,
    layers: Sequence[Layer],
    budget: Budget,
    bits: Sequence[int],
    evaluate: Evaluate,
    *,
    quantize_output: bool = False,
    fixed: Mapping[str, int] | None = None,
) -> Verified:
    """The solved plan, or the widest uniform plan of the candidate `bits` within the same
    budget when that one measured more accurate on the same split (the solved plan on a
    tie).

    The table predicts one layer at a time; the data decides. Judged only by the table, a
    budget gave mixed plans that measured below the uniform plan of their size (ResNet-20 at
    6 average bits, the Fashion CNN at 5 and 6: docs/results.md). The check costs one
    evaluation, none when no uniform plan fits the budget or the solved plan is uniform."""
    uniform, width = None, None
    for candidate in sorted(bits, reverse=True):
        trial = _uniform(layers, candidate, quantize_output, fixed)
        if plan_price(budget, layers, trial) <= budget.value * (1 + 1e-9):
            uniform, width = trial, candidate
            break
    if uniform is None or _signature(uniform) == _signature(plan):
        return Verified(plan, accuracy, True, 0)
    uniform_accuracy = evaluate(uniform)
    kept = "uniform" if uniform_accuracy > accuracy else "solved"
    check = {"uniform_bits": width, "uniform_accuracy": uniform_accuracy, "solved_accuracy": accuracy, "kept": kept}
    if kept == "uniform":
        solved = {key: plan.details[key] for key in ("mode", "budget", "sensitivity", "candidates") if key in plan.details}
        chosen = uniform.with_details(**solved, achieved=plan_price(budget, layers, uniform), uniform_check=check)
        return Verified(chosen, uniform_accuracy, True, 1)
    return Verified(plan.with_details(uniform_check=check), accuracy, True, 1)


def budget_range(
    budget_kind: str,
    layers: Sequence[Layer],
    sensitivity: Sensitivity,
    profile: Any = None,
    quantize_output: bool = False,
    fixed: Mapping[str, int] | None = None,
) -> tuple[float, float]:
    """The budget values of the all-narrowest and all-widest plans (the search interval),
    `fixed` layers at their bits in both."""
    narrow = _uniform(layers, min(sensitivity.bits), quantize_output, fixed)
    wide = _uniform(layers, max(sensitivity.bits), quantize_output, fixed)
    budget = Budget(budget_kind, 1.0, profile)
    return plan_price(budget, layers, narrow), plan_price(budget, layers, wide)


def _uniform(layers: Sequence[Layer], bits: int, quantize_output: bool, fixed: Mapping[str, int] | None) -> Plan:
    plan = Plan.uniform(layers, bits, keep_output_float=not quantize_output)
    for name, pinned in (fixed or {}).items():
        plan = plan.with_bits((name,), pinned)
    return plan


def smallest_within_guard(
    layers: Sequence[Layer],
    joins: Sequence[Join],
    sensitivity: Sensitivity,
    evaluate: Evaluate,
    minimum_accuracy: float,
    *,
    budget_kind: str = "avg-bits",
    profile: Any = None,
    ans: Mapping[str, float] | None = None,
    ans_weight: float = DEFAULT_ANS_WEIGHT,
    lipschitz: Mapping[str, float] | None = None,
    robustness_signal: RobustnessSignal = "ans",
    tolerance: float | None = None,
    max_evaluations: int = 10,
    quantize_output: bool = False,
    evaluate_many: EvaluateMany | None = None,
    parallel: int = 1,
    fixed: Mapping[str, int] | None = None,
) -> Verified:
    """Accuracy-target mode: the smallest budget whose solved plan keeps the guard.

    Bisection over the budget value between the all-narrowest and all-widest plans; every
    probe is solved and evaluated. The answer is the passing plan of the smallest budget
    found (its details list every probe). When the widest plan fails, uniform at the next
    narrower candidate bits anchors the bisection instead; when that fails too, the widest
    plan is repaired (`repair`, within the evaluations left) and returned, or, when even
    that fails (`passed` false), the most accurate plan measured. `tolerance` defaults to
    1/8 bit on average bits and to 1% of the interval otherwise.

    With `parallel` > 1 plans measured at once (`evaluate_many`, e.g. Ray jobs), each round
    measures every budget the next steps may probe (the first round: the widest plan and up
    to parallel-1 of them; then up to `parallel`, a whole number of bisection levels), and
    the bisection then walks its path through them: the answer and the probes it lists are
    those of one probe at a time; the measurements off the path are dropped.
    """
    if parallel < 1:
        raise UsageError(f"parallel {parallel} must be at least 1")
    low, high = budget_range(budget_kind, layers, sensitivity, profile, quantize_output, fixed)
    tolerance = tolerance if tolerance is not None else (0.125 if budget_kind == "avg-bits" else 0.01 * (high - low))
    measure_many = evaluate_many or one_by_one(evaluate)
    measured: dict[float, tuple[Plan, float]] = {}
    by_bits: dict[tuple[tuple[str, int | None, int | None], ...], float] = {}
    """Accuracy by the plan's bits: budgets whose solved plans are the same are measured once."""
    probes: list[dict[str, Any]] = []
    path: set[tuple[tuple[str, int | None, int | None], ...]] = set()
    """The distinct plans the search's path measured (look-ahead measurements off it are dropped)."""

    def measure(values: Sequence[float]) -> None:
        fresh = [value for value in values if value not in measured]
        plans = [
            solve(
                layers, joins, sensitivity, Budget(budget_kind, value, profile),
                ans=ans, ans_weight=ans_weight, lipschitz=lipschitz, robustness_signal=robustness_signal,
                quantize_output=quantize_output, fixed=fixed,
            )
            for value in fresh
        ]
        new = {_signature(plan): plan for plan in plans if _signature(plan) not in by_bits}
        by_bits.update(zip(new, measure_many(list(new.values()))))
        measured.update({value: (plan, by_bits[_signature(plan)]) for value, plan in zip(fresh, plans)})

    def ahead(low: float, high: float, depth: int, used: int) -> list[float]:
        """The budgets bisection may probe in its next `depth` steps from (low, high) after `used` probes."""
        if depth < 1 or high - low <= tolerance or used >= max_evaluations:
            return []
        middle = (low + high) / 2
        return [middle, *ahead(low, middle, depth - 1, used + 1), *ahead(middle, high, depth - 1, used + 1)]

    def probe(value: float) -> tuple[Plan, float]:
        plan, accuracy = measured[value]
        path.add(_signature(plan))
        probes.append({"budget": value, "achieved": plan.details["achieved"], "accuracy": accuracy})
        return plan, accuracy

    measure([high, *ahead(low, high, int(math.log2(parallel)), 1)])
    best_plan, best_accuracy = probe(high)
    if best_accuracy < minimum_accuracy:
        # The widest plan can lose to a narrower one: 8-bit layers saturate onnxruntime's
        # u8 x s8 kernels on x86 CPUs without VNNI (docs/quantization.md), 7 bits do not;
        # and the table can price bits as free that are not (it does not model bias
        # correction). Uniform at the next narrower candidate, which uses neither, is the
        # second anchor.
        bits = sensitivity.bits[-2] if len(sensitivity.bits) > 1 else sensitivity.bits[-1]
        uniform = _uniform(layers, bits, quantize_output, fixed)
        second = plan_price(Budget(budget_kind, 1.0, profile), layers, uniform)
        if len(probes) < max_evaluations and low < second < high:
            if _signature(uniform) not in by_bits:
                by_bits[_signature(uniform)] = measure_many([uniform])[0]
            accuracy = by_bits[_signature(uniform)]
            path.add(_signature(uniform))
            probes.append({"budget": second, "achieved": second, "accuracy": accuracy, "uniform_bits": bits})
            if accuracy >= minimum_accuracy:
                high, best_plan, best_accuracy = second, uniform, accuracy
        if best_accuracy < minimum_accuracy:
            # Raise the widest plan's bits on the data until the guard holds; when even that
            # fails, keep the most accurate plan measured.
            repaired = repair(
                best_plan, layers, joins, sensitivity, evaluate, minimum_accuracy,
                max_evaluations=max(max_evaluations - len(probes), 1), accuracy=best_accuracy, fixed=fixed,
            )
            kept = repaired if repaired.passed or repaired.accuracy >= best_accuracy else replace(
                repaired, plan=best_plan, accuracy=best_accuracy
            )
            return replace(kept, plan=kept.plan.with_details(search=probes), evaluations=len(path) + repaired.evaluations)
    while high - low > tolerance and len(probes) < max_evaluations:
        middle = (low + high) / 2
        if middle not in measured:
            measure(ahead(low, high, int(math.log2(parallel + 1)), len(probes)))
        plan, accuracy = probe(middle)
        if accuracy >= minimum_accuracy:
            high, best_plan, best_accuracy = middle, plan, accuracy
        else:
            low = middle
    return Verified(best_plan.with_details(search=probes), best_accuracy, True, len(path))


def _signature(plan: Plan) -> tuple[tuple[str, int | None, int | None], ...]:
    return tuple((entry.name, entry.weight_bits, entry.act_bits) for entry in plan.layers)


@dataclass(frozen=True)
class ParetoPoint:
    budget: Budget
    plan: Plan
    size: float
    accuracy: float
    dominated: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget.describe(),
            "size": self.size,
            "accuracy": self.accuracy,
            "dominated": self.dominated,
            "bits": {e.name: e.weight_bits for e in self.plan.layers},
        }


def pareto_front(
    layers: Sequence[Layer],
    joins: Sequence[Join],
    sensitivity: Sensitivity,
    evaluate: Evaluate,
    budgets: Sequence[Budget],
    *,
    ans: Mapping[str, float] | None = None,
    ans_weight: float = DEFAULT_ANS_WEIGHT,
    lipschitz: Mapping[str, float] | None = None,
    robustness_signal: RobustnessSignal = "ans",
    quantize_output: bool = False,
    evaluate_many: EvaluateMany | None = None,
    fixed: Mapping[str, int] | None = None,
) -> list[ParetoPoint]:
    """Solve and evaluate one plan per budget; mark the points another beats on both axes.
    The plans are independent: `evaluate_many` may measure them in parallel. With `fixed`
    layers, budgets below the narrowest plan's are left out (no plan fits them)."""
    if fixed:
        budgets = [
            budget for budget in budgets
            if budget.value >= budget_range(budget.kind, layers, sensitivity, budget.profile, quantize_output, fixed)[0] - 1e-9
        ]
    plans = [
        solve(
            layers, joins, sensitivity, budget, ans=ans, ans_weight=ans_weight, lipschitz=lipschitz,
            robustness_signal=robustness_signal, quantize_output=quantize_output, fixed=fixed,
        )
        for budget in budgets
    ]
    accuracies = (evaluate_many or one_by_one(evaluate))(plans)
    measured = [
        (budget, plan, plan_price(budget, layers, plan), accuracy)
        for budget, plan, accuracy in zip(budgets, plans, accuracies)
    ]
    points = []
    for budget, plan, size, accuracy in measured:
        dominated = any(
            other_size <= size and other_accuracy >= accuracy and (other_size < size or other_accuracy > accuracy)
            for other_budget, _, other_size, other_accuracy in measured
            if other_budget.kind == budget.kind
        )
        points.append(ParetoPoint(budget, plan, size, accuracy, dominated))
    return points
