"""allocate/solve.py: the integer program is exact, keeps its budget and residual alignment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from quanos_onnx.allocate.sensitivity import Sensitivity
from quanos_onnx.allocate.solve import (
    Budget,
    alignment_constraints,
    layer_price,
    parse_budget,
    plan_price,
    solve,
)
from quanos_onnx.errors import UsageError
from quanos_onnx.hwmodel.profiles import load_profile
from quanos_onnx.layers import find_joins, list_layers
from quanos_onnx.model import normalize
from quanos_onnx.passes.align import align_plan
from quanos_onnx.plan import LayerPlan, Plan

from tiny_models import resnet_style

BITS = (2, 4, 8)


@pytest.fixture(scope="module")
def resnet():
    model = normalize(resnet_style())
    layers = list_layers(model)
    return layers, find_joins(model, layers)


def _table(names, seed: int = 0, flat: dict[str, float] | None = None) -> Sensitivity:
    """Costs that fall with bits (random per layer); `flat` scales chosen layers' costs."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        scale = rng.uniform(0.2, 3.0) * (flat or {}).get(name, 1.0)
        rows.append(tuple(float(scale * 2.0 ** (-1.5 * b) * rng.uniform(0.8, 1.2)) for b in BITS))
    return Sensitivity(tuple(names), BITS, tuple(rows), "test", 0, 0.0)


def _allocated(layers, quantize_output):
    return [layer for layer in layers if quantize_output or not layer.is_output]


def _plan_of(layers, bits):
    return Plan(tuple(
        LayerPlan(layer.name, bits[layer.name], bits[layer.name]) if layer.name in bits
        else LayerPlan(layer.name, None, None, keep_float=True)
        for layer in layers
    ))


def _brute_force(layers, joins, table, budget, quantize_output, objective):
    """Every assignment that fits the budget and that alignment leaves unchanged."""
    allocated = _allocated(layers, quantize_output)
    best = None
    for choice in itertools.product(BITS, repeat=len(allocated)):
        bits = {layer.name: b for layer, b in zip(allocated, choice)}
        plan = _plan_of(layers, bits)
        if plan_price(budget, layers, plan) > budget.value + 1e-9:
            continue
        aligned = align_plan(plan, layers, joins).by_name()
        if any(aligned[name].weight_bits != b for name, b in bits.items()):
            continue
        value = objective(bits)
        if best is None or value < best[0]:
            best = (value, bits)
    return best


@pytest.mark.parametrize("quantize_output", [False, True])
@pytest.mark.parametrize("average", [3.0, 4.5, 6.0])
def test_the_program_finds_the_brute_force_optimum(resnet, quantize_output, average):
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, quantize_output)]
    table = _table(names, seed=int(average * 10))
    budget = Budget("avg-bits", average)
    plan = solve(layers, joins, table, budget, quantize_output=quantize_output)
    best_value, _ = _brute_force(
        layers, joins, table, budget, quantize_output,
        lambda bits: sum(table.of(n, b) for n, b in bits.items()),
    )
    assert table.predict(plan) == pytest.approx(best_value, rel=1e-9, abs=1e-15)
    assert plan.details["predicted_cost"] == pytest.approx(best_value, rel=1e-9, abs=1e-15)


def test_the_ans_term_is_optimized_exactly_too(resnet):
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, False)]
    table = _table(names, seed=3)
    ans = {name: value for name, value in zip(names, [1.4, 0.2, 0.9, 1.1, 0.3, 0.7])}
    budget = Budget("avg-bits", 4.0)
    weight = 2.0
    plan = solve(layers, joins, table, budget, ans=ans, ans_weight=weight)
    base = plan.details["predicted_cost_without_ans"]
    total = sum(ans.values())

    def objective(bits):
        return sum(
            table.of(n, b) + weight * base * ans[n] / total * (b - BITS[0]) / (BITS[-1] - BITS[0])
            for n, b in bits.items()
        )

    best_value, _ = _brute_force(layers, joins, table, budget, False, objective)
    chosen = {e.name: e.weight_bits for e in plan.layers if e.quantized}
    assert objective(chosen) == pytest.approx(best_value, rel=1e-9)


@pytest.mark.parametrize(
    "kind, profile",
    [("avg-bits", None), ("bytes", None), ("bitops", None), ("energy", "dg"), ("energy", "standard")],
)
def test_every_budget_kind_is_respected(resnet, kind, profile):
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, False)]
    unit = Budget(kind, 1.0, load_profile(profile) if profile else None)
    narrow, wide = (plan_price(unit, layers, Plan.uniform(layers, b)) for b in (BITS[0], BITS[-1]))
    budget = Budget(kind, narrow + 0.4 * (wide - narrow), unit.profile)
    plan = solve(layers, joins, _table(names), budget)
    assert plan_price(budget, layers, plan) <= budget.value * (1 + 1e-9)
    assert plan.details["achieved"] == pytest.approx(plan_price(budget, layers, plan))
    wider = solve(layers, joins, _table(names), Budget(budget.kind, budget.value * 4, budget.profile))
    assert _table(names).predict(wider) <= _table(names).predict(plan)


@pytest.mark.parametrize("quantize_output", [False, True])
def test_alignment_is_a_constraint_not_a_correction(resnet, quantize_output):
    """The shortcut is nearly free to quantize, so unconstrained it would sit at 2 bits."""
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, quantize_output)]
    table = _table(names, flat={"block2.shortcut": 1e-6, "block2.conv2": 50.0, "classifier": 50.0})
    plan = solve(layers, joins, table, Budget("avg-bits", 5.0), quantize_output=quantize_output)
    aligned = align_plan(plan, layers, joins).by_name()
    assert all(aligned[e.name].weight_bits == e.weight_bits for e in plan.layers if e.quantized)
    bits = plan.by_name()
    if quantize_output:
        assert bits["block2.shortcut"].weight_bits == bits["classifier"].weight_bits
    else:
        assert bits["block2.shortcut"].weight_bits >= bits["block2.conv2"].weight_bits
        assert bits["block2.conv2"].weight_bits > 2


def test_alignment_constraints_follow_the_joins(resnet):
    layers, joins = resnet
    names = [layer.name for layer in layers]
    assert alignment_constraints(layers, joins, names).equal == (("block2.shortcut", "classifier"),)
    float_head = alignment_constraints(layers, joins, names[:-1])
    assert float_head.equal == ()
    assert float_head.at_least == (("block2.shortcut", "block2.conv2"),)


def test_ans_weight_pushes_the_high_ans_layer_down(resnet):
    """Two layers of equal size and near-equal cost; only the ANS term should decide."""
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, False)]
    base = _table(names, seed=5)
    rows = list(base.cost)
    conv1, conv2 = names.index("block1.conv1"), names.index("block1.conv2")
    rows[conv2] = tuple(v * 1.05 for v in rows[conv1])
    table = Sensitivity(base.layers, base.bits, tuple(rows), "test", 0, 0.0)
    ans = {name: 0.2 for name in names} | {"block1.conv2": 1.5}
    budget = Budget("avg-bits", 4.0)
    without = solve(layers, joins, table, budget, ans=ans, ans_weight=0.0).by_name()
    pushed = solve(layers, joins, table, budget, ans=ans, ans_weight=1.0).by_name()
    assert without["block1.conv2"].weight_bits >= without["block1.conv1"].weight_bits
    assert pushed["block1.conv2"].weight_bits < without["block1.conv2"].weight_bits
    assert pushed["block1.conv2"].weight_bits < pushed["block1.conv1"].weight_bits


@pytest.mark.parametrize("signal", ["lipschitz", "both"])
def test_the_lipschitz_and_combined_terms_are_optimized_exactly(resnet, signal):
    """Lipschitz: share_l (b_max - b)/span; both: the mean of the two terms."""
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, False)]
    table = _table(names, seed=4)
    ans = {name: value for name, value in zip(names, [1.4, 0.2, 0.9, 1.1, 0.3, 0.7])}
    bounds = {name: value for name, value in zip(names, [2.0, 9.0, 1.5, 4.0, 3.0, 0.5])}
    budget = Budget("avg-bits", 4.0)
    weight = 2.0
    plan = solve(layers, joins, table, budget, ans=ans, ans_weight=weight, lipschitz=bounds, robustness_signal=signal)
    base = plan.details["predicted_cost_without_ans"]
    span = BITS[-1] - BITS[0]

    def term(n, b):
        lipschitz = bounds[n] / sum(bounds.values()) * (BITS[-1] - b) / span
        if signal == "lipschitz":
            return lipschitz
        return (lipschitz + ans[n] / sum(ans.values()) * (b - BITS[0]) / span) / 2

    def objective(bits):
        return sum(table.of(n, b) + weight * base * term(n, b) for n, b in bits.items())

    best_value, _ = _brute_force(layers, joins, table, budget, False, objective)
    chosen = {e.name: e.weight_bits for e in plan.layers if e.quantized}
    assert objective(chosen) == pytest.approx(best_value, rel=1e-9)
    assert plan.details["robustness_signal"] == signal


def test_the_lipschitz_term_keeps_bits_on_the_high_bound_layer(resnet):
    """Equal size, near-equal cost: the layer with the larger bound keeps more bits."""
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, False)]
    base = _table(names, seed=5)
    rows = list(base.cost)
    conv1, conv2 = names.index("block1.conv1"), names.index("block1.conv2")
    rows[conv1] = tuple(v * 1.05 for v in rows[conv2])
    table = Sensitivity(base.layers, base.bits, tuple(rows), "test", 0, 0.0)
    bounds = {name: 1.0 for name in names} | {"block1.conv2": 20.0}
    budget = Budget("avg-bits", 4.0)
    without = solve(layers, joins, table, budget, lipschitz=bounds, ans_weight=0.0, robustness_signal="lipschitz").by_name()
    kept = solve(layers, joins, table, budget, lipschitz=bounds, ans_weight=1.0, robustness_signal="lipschitz").by_name()
    assert without["block1.conv1"].weight_bits >= without["block1.conv2"].weight_bits
    assert kept["block1.conv2"].weight_bits > without["block1.conv2"].weight_bits
    assert kept["block1.conv2"].weight_bits > kept["block1.conv1"].weight_bits


def test_a_budget_no_plan_fits_is_a_usage_error(resnet):
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, False)]
    with pytest.raises(UsageError, match="avg-bits=1.5.*smallest needs 2"):
        solve(layers, joins, _table(names), Budget("avg-bits", 1.5))
    with pytest.raises(UsageError, match="ans-weight"):
        solve(layers, joins, _table(names), Budget("avg-bits", 4), ans_weight=-1.0)


@pytest.mark.parametrize("average", [3.0, 4.5])
def test_fixed_layers_are_pinned_and_counted_in_the_budget(resnet, average):
    """First and output layer at 8 bits (compile's --first-last-bits): the optimum over the
    assignments that keep them there, with their 8 bits inside the average-bits budget."""
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, True)]
    fixed = {names[0]: 8, next(layer.name for layer in layers if layer.is_output): 8}
    table = _table(names, seed=7, flat={name: 1e-3 for name in fixed})  # left alone, they would take 2 bits
    budget = Budget("avg-bits", average)
    plan = solve(layers, joins, table, budget, quantize_output=True, fixed=fixed)
    chosen = {e.name: e.weight_bits for e in plan.layers if e.quantized}
    assert {name: chosen[name] for name in fixed} == fixed
    assert plan_price(budget, layers, plan) <= average * (1 + 1e-9)

    def objective(bits):
        if any(bits[name] != b for name, b in fixed.items()):
            return np.inf
        return sum(table.of(n, b) for n, b in bits.items())

    best_value, _ = _brute_force(layers, joins, table, budget, True, objective)
    assert table.predict(plan) == pytest.approx(best_value, rel=1e-9)
    free = solve(layers, joins, table, budget, quantize_output=True).by_name()
    assert all(free[name].weight_bits < 8 for name in fixed)


def test_fixed_layers_outside_the_program_are_usage_errors(resnet):
    layers, joins = resnet
    names = [layer.name for layer in _allocated(layers, False)]
    output = next(layer.name for layer in layers if layer.is_output)
    with pytest.raises(UsageError, match=f"layer '{output}': fixed at 8 bits but not allocated"):
        solve(layers, joins, _table(names), Budget("avg-bits", 4), fixed={output: 8})
    with pytest.raises(UsageError, match=f"layer '{names[0]}': fixed at 6 bits, outside the candidates 2..8"):
        solve(layers, joins, _table(names), Budget("avg-bits", 4), fixed={names[0]: 6})
    with pytest.raises(UsageError, match="avg-bits=2.*smallest needs"):
        solve(layers, joins, _table(names), Budget("avg-bits", 2), fixed={names[0]: 8})


def test_budgets_parse_from_the_command_line_form():
    assert parse_budget("avg-bits=4.5") == Budget("avg-bits", 4.5)
    assert parse_budget("bitops=1e9") == Budget("bitops", 1e9)
    energy = parse_budget("energy=dvafs:2.5e6")
    assert (energy.kind, energy.value, energy.profile.name) == ("energy", 2.5e6, "dvafs")
    for text in ("avg-bits", "size=3", "energy=2e6", "bytes=-4", "bytes=lots"):
        with pytest.raises(UsageError, match="--budget"):
            parse_budget(text)


def test_layer_prices(resnet):
    layers, _ = resnet
    stem = layers[0]
    assert layer_price(Budget("avg-bits", 1), stem, 4) == stem.params * 4
    assert layer_price(Budget("bytes", 1), stem, 4) == stem.params / 2
    assert layer_price(Budget("bitops", 1), stem, None) == stem.macs * 32 * 32


def test_the_solver_cannot_print_into_the_commands_output(capfd):
    """HiGHS writes a stray debug line to file descriptor 1 on some programs (ERGO-Code/HiGHS#2783)."""
    import os

    from quanos_onnx.allocate.solve import _quiet_c_stdout

    with _quiet_c_stdout():
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"
