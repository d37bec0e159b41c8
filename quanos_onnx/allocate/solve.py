"""The exact integer program: one bit-width per layer under one budget (scipy's HiGHS).

Variables: x[l, b] in {0, 1} for every allocatable layer l and candidate b, one per layer
(sum_b x[l, b] = 1). Minimize

    sum_{l,b} cost[l][b] x[l, b]  +  ans_weight * C0 * sum_{l,b} share_l (b - b_min)/(b_max - b_min) x[l, b]

where cost is the measured sensitivity (sensitivity.py), share_l = ANS_l / sum ANS (the
layers that carry adversarial noise pay more for their bits), and C0 is the optimum of the
same program without the ANS term: `ans_weight` is the fraction of the best predicted cost
one accepts to spend on moving the whole ANS mass from b_max to b_min (scale-free, so one
default serves every model). `robustness_signal` "lipschitz" replaces the ANS term with

    ans_weight * C0 * sum_{l,b} lshare_l (b_max - b)/(b_max - b_min) x[l, b],

lshare_l = L_l / sum L with L_l the layer block's Lipschitz bound (harness/lipschitz.py):
a block that stretches its input passes more of its quantization noise on, so it pays for
few bits; "both" adds the two terms at half weight each (docs/method.md). Subject to one
budget, a sum of per-layer prices:

- avg-bits: sum p_l b x[l, b] <= B * sum p_l (parameter-weighted, as Plan.average_weight_bits);
- bytes: packed weight bytes, sum p_l b / 8, plus float layers at 4 bytes per parameter;
- energy: the hardware model's pJ per image on a profile (hwmodel.price_layer), float layers at 32 bits;
- bitops: sum MACs_l * b_w * b_a, float layers at 32 x 32.

Residual alignment (passes/align.py) as constraints, so the solver's plan is already the
aligned one: a shortcut conv feeding a join with a quantized layer downstream takes that
layer's bits (x[s, b] = x[d, b] for every b); a shortcut conv feeding a join with no
quantized layer downstream takes the widest bits among the layers feeding the join
(sum_b b x[s, b] >= sum_b b x[f, b]).

`fixed` layers (the first and last layers a user keeps at N bits, compile's
--first-last-bits) get x[l, N] = 1: the budget counts them at N bits and the other layers
share what is left.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import UsageError, arg
from ..hwmodel.energy import FLOAT_BITS, price_layer
from ..hwmodel.profiles import HardwareProfile, load_profile
from ..layers import Join, Layer
from ..plan import LayerPlan, Plan
from .sensitivity import Sensitivity

BUDGET_KINDS = ("avg-bits", "bytes", "energy", "bitops")
DEFAULT_ANS_WEIGHT = 0.25
"""Chosen by measurement on ResNet-20 (docs/method.md, "The integer program")."""

RobustnessSignal = Literal["ans", "lipschitz", "both"]
ROBUSTNESS_SIGNALS: tuple[RobustnessSignal, ...] = ("ans", "lipschitz", "both")


@dataclass(frozen=True)
class Budget:
    """One constraint on the plan: `kind` (BUDGET_KINDS) at most `value`.

    Units: avg-bits in bits, bytes in bytes, energy in pJ per image on `profile`, bitops in
    bit-operations per image.
    """

    kind: str
    value: float
    profile: HardwareProfile | None = None

    def describe(self) -> str:
        if self.kind == "energy" and self.profile is not None:
            return f"energy={self.profile.name}:{self.value:g}"
        return f"{self.kind}={self.value:g}"


def parse_budget(text: str) -> Budget:
    """'avg-bits=4', 'bytes=150000', 'energy=dg:2.5e6' (profile name or file), 'bitops=1e9'."""
    kind, separator, value_text = text.partition("=")
    kind = kind.strip()
    if not separator or kind not in BUDGET_KINDS:
        raise UsageError(f"--budget {text!r}: write KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)}")
    profile = None
    if kind == "energy":
        profile_name, colon, value_text = value_text.rpartition(":")
        if not colon or not profile_name:
            raise UsageError(f"--budget {text!r}: an energy budget is energy=PROFILE:PJ (e.g. energy=dg:2.5e6)")
        profile = load_profile(profile_name)
    try:
        value = float(value_text)
    except ValueError:
        raise UsageError(f"--budget {text!r}: {value_text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--budget {text!r}: the value must be a positive number")
    return Budget(kind, value, profile)


def layer_price(budget: Budget, layer: Layer, bits: int | None) -> float:
    """What a layer at `bits` (None: float) adds to the budget's sum."""
    width = FLOAT_BITS if bits is None else bits
    if budget.kind == "avg-bits":
        return layer.params * width
    if budget.kind == "bytes":
        return layer.params * width / 8
    if budget.kind == "bitops":
        return layer.macs * width * width
    if budget.profile is None:
        raise UsageError("an energy budget needs a hardware profile")
    return price_layer(layer, width, width, budget.profile).energy_pj


def plan_price(budget: Budget, layers: Sequence[Layer], plan: Plan) -> float:
    """The plan's value of the budgeted quantity (average bits: over its quantized layers)."""
    entries = plan.by_name()
    if budget.kind == "avg-bits":
        return plan.average_weight_bits({layer.name: layer.params for layer in layers})
    return math.fsum(
        layer_price(budget, layer, None if entries[layer.name].keep_float else entries[layer.name].weight_bits)
        for layer in layers
    )


@dataclass(frozen=True)
class Alignment:
    """Constraints from residual joins: equal bits, and at-least pairs (wide >= narrow)."""

    equal: tuple[tuple[str, str], ...]
    at_least: tuple[tuple[str, str], ...]


def alignment_constraints(layers: Sequence[Layer], joins: Sequence[Join], allocated: Sequence[str]) -> Alignment:
    """What align_plan would enforce on a plan that quantizes exactly `allocated`."""
    names = set(allocated)
    feeding = {layer.block_output: layer.name for layer in layers}
    equal, at_least = [], []
    for join in joins:
        shortcuts = [s for s in join.shortcut_layers if s in names]
        downstream = next((d for d in join.downstream_layers if d in names), None)
        for shortcut in shortcuts:
            if downstream is not None:
                if downstream != shortcut:
                    equal.append((shortcut, downstream))
                continue
            for tensor in join.inputs:
                other = feeding.get(tensor)
                if other in names and other != shortcut:
                    at_least.append((shortcut, other))
    return Alignment(tuple(equal), tuple(at_least))


def solve(
    layers: Sequence[Layer],
    joins: Sequence[Join],
    sensitivity: Sensitivity,
    budget: Budget,
    *,
    ans: Mapping[str, float] | None = None,
    ans_weight: float = DEFAULT_ANS_WEIGHT,
    lipschitz: Mapping[str, float] | None = None,
    robustness_signal: RobustnessSignal = "ans",
    quantize_output: bool = False,
    fixed: Mapping[str, int] | None = None,
) -> Plan:
    """The plan minimizing predicted cost (+ the robustness term) within the budget, exactly.

    The robustness term is ANS's (`ans`), the Lipschitz bounds' (`lipschitz`) or both, as
    `robustness_signal` says; a signal without values (or all zero) adds nothing. `fixed`
    (layer name -> bits, one of the table's candidates) pins those layers' bits.
    """
    if not (math.isfinite(ans_weight) and ans_weight >= 0):
        raise UsageError(f"--ans-weight {ans_weight!r} must be a non-negative number")
    if robustness_signal not in ROBUSTNESS_SIGNALS:
        raise UsageError(f"{arg('robustness_signal')} {robustness_signal!r} is not one of {', '.join(ROBUSTNESS_SIGNALS)}")
    problem = _Problem(layers, joins, sensitivity, budget, quantize_output, fixed or {})
    base = problem.optimum(problem.cost)
    term = problem.robustness_term(
        _ans_shares(problem.names, ans) if robustness_signal != "lipschitz" else None,
        _ans_shares(problem.names, lipschitz) if robustness_signal != "ans" else None,
    )
    chosen = base
    if ans_weight > 0 and term is not None:
        chosen = problem.optimum(problem.cost + ans_weight * max(base.value, 0.0) * term)
    bits = problem.bits_of(chosen.x)
    plan = _plan(layers, bits, ans, problem.candidates)
    return plan.with_details(
        mode="milp",
        budget=budget.describe(),
        achieved=plan_price(budget, layers, plan),
        predicted_cost=sensitivity.predict(plan),
        predicted_cost_without_ans=base.value,
        sensitivity=sensitivity.method,
        ans_weight=ans_weight if term is not None else 0.0,
        robustness_signal=robustness_signal,
        candidates=list(problem.candidates),
    )


@dataclass(frozen=True)
class _Optimum:
    x: np.ndarray
    value: float


class _Problem:
    """The fixed part of the program (variables, constraints); objectives vary."""

    def __init__(
        self,
        layers: Sequence[Layer],
        joins: Sequence[Join],
        sensitivity: Sensitivity,
        budget: Budget,
        quantize_output: bool,
        fixed: Mapping[str, int],
    ) -> None:
        from scipy.optimize import LinearConstraint

        self.budget = budget
        by_name = {layer.name: layer for layer in layers}
        allocated = [layer for layer in layers if quantize_output or not layer.is_output]
        missing = [layer.name for layer in allocated if layer.name not in sensitivity.layers]
        if missing:
            raise UsageError(f"layer '{missing[0]}': the sensitivity table has no row for it")
        self.names = [layer.name for layer in allocated]
        self.candidates = sensitivity.bits
        width = len(self.candidates)
        self.size = len(self.names) * width
        self.cost = np.array([sensitivity.of(name, b) for name in self.names for b in self.candidates])
        if not np.all(np.isfinite(self.cost)):
            raise UsageError("the sensitivity table has non-finite costs; measure it on more or other data")
        rows, lower, upper = [], [], []
        for index in range(len(self.names)):
            row = np.zeros(self.size)
            row[index * width : (index + 1) * width] = 1.0
            rows.append(row)
            lower.append(1.0)
            upper.append(1.0)
        pinned = _pinned_columns(self.names, self.candidates, fixed)
        for column in pinned.values():
            row = np.zeros(self.size)
            row[column] = 1.0
            rows.append(row)
            lower.append(1.0)
            upper.append(1.0)
        price = np.array([layer_price(budget, by_name[name], b) for name in self.names for b in self.candidates])
        fixed = math.fsum(layer_price(budget, layer, None) for layer in layers if layer not in allocated)
        if budget.kind == "avg-bits":
            limit = budget.value * sum(by_name[name].params for name in self.names)
        else:
            limit = budget.value - fixed
        rows.append(price)
        lower.append(-np.inf)
        upper.append(limit)
        alignment = alignment_constraints(layers, joins, self.names)
        position = {name: index for index, name in enumerate(self.names)}
        for first, second in alignment.equal:
            for column in range(width):
                row = np.zeros(self.size)
                row[position[first] * width + column] = 1.0
                row[position[second] * width + column] = -1.0
                rows.append(row)
                lower.append(0.0)
                upper.append(0.0)
        for wide, narrow in alignment.at_least:
            row = np.zeros(self.size)
            row[position[wide] * width : (position[wide] + 1) * width] = self.candidates
            row[position[narrow] * width : (position[narrow] + 1) * width] -= np.asarray(self.candidates, float)
            rows.append(row)
            lower.append(0.0)
            upper.append(np.inf)
        self.constraints = LinearConstraint(np.vstack(rows), np.array(lower), np.array(upper))
        cheapest = price.reshape(len(self.names), width).min(axis=1)
        for index, name in enumerate(self.names):
            if name in pinned:
                cheapest[index] = price[pinned[name]]
        smallest = float(cheapest.sum())
        if smallest > limit * (1 + 1e-9):
            floor = smallest / sum(by_name[n].params for n in self.names) if budget.kind == "avg-bits" else smallest + fixed
            raise UsageError(
                f"--budget {budget.describe()}: no plan with bits {self.candidates[0]}..{self.candidates[-1]} fits "
                f"(the smallest needs {floor:g})"
            )

    def ans_term(self, shares: np.ndarray) -> np.ndarray:
        low, high = self.candidates[0], self.candidates[-1]
        span = max(high - low, 1)
        steps = np.array([(b - low) / span for b in self.candidates])
        return np.concatenate([share * steps for share in shares])

    def lipschitz_term(self, shares: np.ndarray) -> np.ndarray:
        """Few bits cost a layer in proportion to its Lipschitz share (b_max: nothing)."""
        low, high = self.candidates[0], self.candidates[-1]
        span = max(high - low, 1)
        steps = np.array([(high - b) / span for b in self.candidates])
        return np.concatenate([share * steps for share in shares])

    def robustness_term(self, ans_shares: np.ndarray | None, lipschitz_shares: np.ndarray | None) -> np.ndarray | None:
        """The ANS term, the Lipschitz term, or their mean when both signals are given."""
        terms = [
            term
            for shares, build in ((ans_shares, self.ans_term), (lipschitz_shares, self.lipschitz_term))
            if shares is not None
            for term in [build(shares)]
        ]
        return sum(terms) / len(terms) if terms else None

    def optimum(self, objective: np.ndarray) -> _Optimum:
        from scipy.optimize import Bounds, milp

        with _quiet_c_stdout():
            result = milp(
                objective,
                constraints=self.constraints,
                integrality=np.ones(self.size),
                bounds=Bounds(0, 1),
            )
        if result.status != 0 or result.x is None:
            raise UsageError(f"--budget {self.budget.describe()}: the integer program has no solution ({result.message})")
        x = np.round(result.x)
        return _Optimum(x, float(self.cost @ x))

    def bits_of(self, x: np.ndarray) -> dict[str, int]:
        width = len(self.candidates)
        return {
            name: self.candidates[int(np.argmax(x[index * width : (index + 1) * width]))]
            for index, name in enumerate(self.names)
        }


@contextlib.contextmanager
def _quiet_c_stdout() -> Iterator[None]:
    """The process's C-level stdout sent to the null device for the duration.

    The HiGHS bundled with scipy prints a stray debug line,
    "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();", straight to
    file descriptor 1 on some integer programs, whatever its output options
    (ERGO-Code/HiGHS#2783); in a compile's output, or in its --json, it reads as a fault."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _pinned_columns(names: Sequence[str], candidates: Sequence[int], fixed: Mapping[str, int]) -> dict[str, int]:
    """The variable x[l, b] each fixed layer must take, by layer name."""
    position = {name: index for index, name in enumerate(names)}
    columns = {}
    for name, bits in fixed.items():
        if name not in position:
            raise UsageError(f"layer '{name}': fixed at {bits} bits but not allocated (unknown, or the float output layer)")
        if bits not in candidates:
            raise UsageError(
                f"layer '{name}': fixed at {bits} bits, outside the candidates {candidates[0]}..{candidates[-1]}"
            )
        columns[name] = position[name] * len(candidates) + list(candidates).index(bits)
    return columns


def _ans_shares(names: Sequence[str], ans: Mapping[str, float] | None) -> np.ndarray | None:
    if ans is None:
        return None
    values = np.array([max(float(ans.get(name, 0.0)), 0.0) for name in names])
    total = values.sum()
    if not math.isfinite(total) or total <= 0:
        return None
    return values / total


def _plan(layers: Sequence[Layer], bits: Mapping[str, int], ans: Mapping[str, float] | None, candidates: Sequence[int]) -> Plan:
    entries = []
    for layer in layers:
        ans_mean = None if ans is None else ans.get(layer.name)
        if layer.name in bits:
            entries.append(LayerPlan(layer.name, bits[layer.name], bits[layer.name], ans_mean=ans_mean))
        else:
            entries.append(LayerPlan(layer.name, None, None, keep_float=True, ans_mean=ans_mean))
    return Plan(tuple(entries), k_init=max(candidates), k_min=min(candidates), method="milp")
