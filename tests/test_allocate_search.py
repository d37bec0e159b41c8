"""allocate/search.py: repair until a guard holds, the smallest plan within it, a Pareto front."""

from __future__ import annotations

import numpy as np
import pytest

from quanos_onnx.allocate.search import no_worse_than_uniform, pareto_front, repair, smallest_within_guard
from quanos_onnx.allocate.sensitivity import Sensitivity
from quanos_onnx.allocate.solve import Budget, solve
from quanos_onnx.layers import find_joins, list_layers
from quanos_onnx.model import normalize
from quanos_onnx.passes.align import align_plan
from quanos_onnx.plan import Plan

from tiny_models import resnet_style

BITS = (2, 3, 4, 5, 6, 7, 8)


@pytest.fixture(scope="module")
def resnet():
    model = normalize(resnet_style())
    layers = list_layers(model)
    return layers, find_joins(model, layers)


def _table(layers) -> Sensitivity:
    names = [layer.name for layer in layers if not layer.is_output]
    rng = np.random.default_rng(1)
    rows = tuple(tuple(float(rng.uniform(0.5, 2) * 2.0 ** -b) for b in BITS) for _ in names)
    return Sensitivity(tuple(names), BITS, rows, "test", 0, 0.0)


def _bits(plan: Plan) -> dict[str, int]:
    return {e.name: e.weight_bits for e in plan.layers if e.quantized}


class Counting:
    """A guard callback: 'accuracy' 1.0 when `layer` has at least `needed` bits, else 0.5."""

    def __init__(self, layer: str, needed: int) -> None:
        self.layer, self.needed, self.calls = layer, needed, 0

    def __call__(self, plan: Plan) -> float:
        self.calls += 1
        return 1.0 if plan.by_name()[self.layer].weight_bits >= self.needed else 0.5


def test_repair_raises_bits_until_the_guard_passes(resnet):
    layers, joins = resnet
    table = _table(layers)
    plan = solve(layers, joins, table, Budget("avg-bits", 3.0))
    assert _bits(plan)["block1.conv2"] < 7
    guard = Counting("block1.conv2", 7)
    result = repair(plan, layers, joins, table, guard, 0.99, max_evaluations=200)
    assert result.passed and result.accuracy == 1.0
    assert result.evaluations == guard.calls == len(result.steps) + 1
    before, after = _bits(plan), _bits(result.plan)
    assert after["block1.conv2"] >= 7
    assert all(after[name] >= before[name] for name in before)
    assert all(step.to_bits > step.from_bits for step in result.steps)
    assert result.steps[-1].accuracy == 1.0 and all(step.accuracy == 0.5 for step in result.steps[:-1])
    assert result.plan.details["repair"]["passed"] is True
    # the repaired plan is still aligned
    aligned = align_plan(result.plan, layers, joins).by_name()
    assert all(aligned[name].weight_bits == bits for name, bits in after.items())


def test_repair_takes_the_best_predicted_gain_per_bit_first(resnet):
    layers, joins = resnet
    table = _table(layers)
    plan = Plan.uniform(layers, 2)
    result = repair(plan, layers, joins, table, lambda p: 0.0, 0.5, max_evaluations=2)
    params = {layer.name: layer.params for layer in layers}
    gains = {
        name: (table.of(name, 2) - table.of(name, 3)) / params[name]
        for name in table.layers
    }
    assert result.steps[0].layers[0] == max(gains, key=gains.get)
    assert not result.passed and result.evaluations == 2


def test_repair_of_a_passing_plan_changes_nothing(resnet):
    layers, joins = resnet
    plan = Plan.uniform(layers, 4)
    result = repair(plan, layers, joins, _table(layers), lambda p: 0.9, 0.8)
    assert result.passed and result.steps == () and _bits(result.plan) == _bits(plan)


def test_accuracy_target_finds_the_smallest_passing_budget(resnet):
    layers, joins = resnet
    table = _table(layers)
    params = {layer.name: layer.params for layer in layers}

    def accuracy(plan: Plan) -> float:
        return 0.9 if plan.average_weight_bits(params) >= 5.0 else 0.3

    result = smallest_within_guard(layers, joins, table, accuracy, 0.8, ans=None, max_evaluations=12)
    assert result.passed
    average = result.plan.average_weight_bits(params)
    assert 5.0 <= average <= 5.0 + 0.25
    probes = result.plan.details["search"]
    assert probes[0]["budget"] == 8.0 and len(probes) == result.evaluations


def test_accuracy_target_reports_failure_when_even_the_widest_plans_fail(resnet):
    layers, joins = resnet
    result = smallest_within_guard(layers, joins, _table(layers), lambda p: 0.1, 0.8)
    assert not result.passed and result.evaluations == 2
    assert set(_bits(result.plan).values()) == {8}
    assert [probe["budget"] for probe in result.plan.details["search"]] == [8.0, 7.0]


def test_a_failing_widest_plan_hands_the_search_to_the_next_narrower_anchor(resnet):
    """8-bit layers saturate onnxruntime's kernels on CPUs without VNNI: the widest plan can
    fail where 5 to 7 bits pass, and the search must still find the smallest passing plan."""
    layers, joins = resnet
    params = {layer.name: layer.params for layer in layers}

    def accuracy(plan: Plan) -> float:
        average = plan.average_weight_bits(params)
        return 0.9 if 5.0 <= average <= 7.0 + 1e-9 else 0.3

    result = smallest_within_guard(layers, joins, _table(layers), accuracy, 0.8, ans=None, max_evaluations=12)
    assert result.passed
    assert 5.0 <= result.plan.average_weight_bits(params) <= 5.0 + 0.25
    assert [probe["budget"] for probe in result.plan.details["search"]][:2] == [8.0, 7.0]


def test_widest_plans_that_fail_are_repaired_on_the_data(resnet):
    """A table that prices 8 bits above 7 (saturating kernels) makes both anchors the same
    all-7-bit plan; when the data needs a layer at 8, the search repairs that plan."""
    layers, joins = resnet
    names = [layer.name for layer in layers if not layer.is_output]
    rows = tuple(tuple(2.0 ** -b if b < 8 else 2.0 ** -6 for b in BITS) for _ in names)
    table = Sensitivity(tuple(names), BITS, rows, "test", 0, 0.0)
    guard = Counting("block1.conv2", 8)
    result = smallest_within_guard(layers, joins, table, guard, 0.99, ans=None, max_evaluations=12)
    assert result.passed and _bits(result.plan)["block1.conv2"] == 8
    assert [probe["budget"] for probe in result.plan.details["search"]] == [8.0, 7.0]
    assert result.plan.details["repair"]["passed"] is True and result.steps
    # the budget-8 plan is uniform 7 itself: measured once
    assert result.evaluations == guard.calls == 1 + len(result.steps)


def test_pareto_marks_dominated_points(resnet):
    layers, joins = resnet
    params = {layer.name: layer.params for layer in layers}
    # accuracy that falls at 6 bits: the 6-bit point is beaten by the smaller 5-bit one
    scores = {3: 0.5, 4: 0.7, 5: 0.8, 6: 0.6}

    def accuracy(plan: Plan) -> float:
        return scores[round(plan.average_weight_bits(params))]

    points = pareto_front(layers, joins, _table(layers), accuracy, [Budget("avg-bits", b) for b in scores])
    assert [p.dominated for p in points] == [False, False, False, True]
    assert all(p.size <= p.budget.value + 1e-9 for p in points)


@pytest.mark.parametrize("parallel", [2, 3, 7])
def test_bisection_measured_several_plans_at_a_time_walks_the_same_path(resnet, parallel):
    """With `parallel` plans per round (Ray jobs in compile) the search measures the budgets
    its next steps may probe, then keeps only those on its path: same plan, same probes."""
    layers, joins = resnet
    table = _table(layers)
    params = {layer.name: layer.params for layer in layers}

    def accuracy(plan: Plan) -> float:
        return 1.0 if plan.average_weight_bits(params) >= 5.3 else 0.5

    rounds: list[int] = []

    def many(plans):
        rounds.append(len(plans))
        return [accuracy(plan) for plan in plans]

    one = smallest_within_guard(layers, joins, table, accuracy, 0.8, max_evaluations=12)
    together = smallest_within_guard(
        layers, joins, table, accuracy, 0.8, max_evaluations=12, evaluate_many=many, parallel=parallel
    )
    assert together.plan == one.plan and together.accuracy == one.accuracy and together.evaluations == one.evaluations
    assert together.plan.details["search"] == one.plan.details["search"]
    assert max(rounds) <= parallel and sum(rounds) >= one.evaluations
    assert len(rounds) < one.evaluations


def test_pareto_front_measures_its_plans_together(resnet):
    layers, joins = resnet
    params = {layer.name: layer.params for layer in layers}
    batches: list[int] = []

    def many(plans):
        batches.append(len(plans))
        return [plan.average_weight_bits(params) / 8 for plan in plans]

    budgets = [Budget("avg-bits", b) for b in (3, 4, 5)]
    points = pareto_front(layers, joins, _table(layers), lambda plan: 0.0, budgets, evaluate_many=many)
    assert batches == [3] and [round(p.accuracy * 8) for p in points] == [3, 4, 5]


def test_fixed_layers_keep_their_bits_in_every_probe_and_repair_step(resnet):
    """--first-last-bits pins layers in the integer program: the search and its repair never move them."""
    layers, joins = resnet
    params = {layer.name: layer.params for layer in layers}
    fixed = {"stem": 8}

    def accuracy(plan: Plan) -> float:
        return 0.9 if plan.average_weight_bits(params) >= 5.0 else 0.3

    result = smallest_within_guard(layers, joins, _table(layers), accuracy, 0.8, ans=None, max_evaluations=12, fixed=fixed)
    assert result.passed and _bits(result.plan)["stem"] == 8
    repaired = repair(
        Plan.uniform(layers, 2).with_bits(("stem",), 8), layers, joins, _table(layers), lambda p: 0.0, 0.5,
        max_evaluations=6, fixed=fixed,
    )
    assert repaired.steps and all("stem" not in step.layers for step in repaired.steps)
    points = pareto_front(layers, joins, _table(layers), accuracy, [Budget("avg-bits", b) for b in (2, 4, 6)], fixed=fixed)
    assert [point.budget.value for point in points] == [4, 6]  # no plan with the stem at 8 bits fits 2 average bits
    assert all(_bits(point.plan)["stem"] == 8 for point in points)


def test_a_budget_keeps_the_uniform_plan_of_its_size_when_that_measures_better(resnet):
    layers, joins = resnet
    table = _table(layers)
    budget = Budget("avg-bits", 5.0)
    solved = solve(layers, joins, table, budget, ans_weight=0.0)
    assert len(set(_bits(solved).values())) > 1  # a mixed plan
    measured: list[dict[str, int]] = []

    def uniform_wins(plan: Plan) -> float:
        measured.append(_bits(plan))
        return 0.9 if len(set(_bits(plan).values())) == 1 else 0.8

    kept = no_worse_than_uniform(solved, 0.8, layers, budget, BITS, uniform_wins)
    assert measured == [dict.fromkeys(_bits(solved), 5)] and kept.evaluations == 1
    assert set(_bits(kept.plan).values()) == {5} and kept.accuracy == 0.9
    assert kept.plan.details["uniform_check"] == {
        "uniform_bits": 5, "uniform_accuracy": 0.9, "solved_accuracy": 0.8, "kept": "uniform",
    }
    assert kept.plan.details["budget"] == "avg-bits=5" and kept.plan.details["achieved"] == 5.0


def test_a_budget_keeps_the_solved_plan_on_a_tie_and_below_every_uniform_plan(resnet):
    layers, joins = resnet
    table = _table(layers)
    budget = Budget("avg-bits", 4.5)
    solved = solve(layers, joins, table, budget, ans_weight=0.0)
    tie = no_worse_than_uniform(solved, 0.8, layers, budget, BITS, lambda plan: 0.8)
    assert tie.plan.layers == solved.layers and tie.plan.details["uniform_check"]["uniform_bits"] == 4
    assert tie.plan.details["uniform_check"]["kept"] == "solved"
    narrow = Budget("avg-bits", 2.5)
    below = no_worse_than_uniform(solve(layers, joins, table, narrow, ans_weight=0.0), 0.5, layers, narrow, (3, 4), Counting("x", 0))
    assert below.evaluations == 0  # no uniform plan of bits 3..4 fits 2.5 average bits
