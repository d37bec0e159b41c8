from __future__ import annotations

import itertools

import pytest

from quanos_onnx.allocate.eqn3 import (
    allocate,
    allocate_budgeted,
    allocate_iterative,
    eqn3_bits,
    round_half_away_from_zero,
)
from quanos_onnx.errors import PlanError, UsageError
from quanos_onnx.harness.ans import AnsResult
from quanos_onnx.layers import Layer
from quanos_onnx.plan import Plan


def _layer(name: str, params: int = 100, is_output: bool = False) -> Layer:
    return Layer(
        name=name, op="Conv", weight=f"{name}.w", bias=None, input=f"{name}.in", output=f"{name}.out",
        block_output=f"{name}.out", block_nodes=(), weight_shape=(params,), weight_axis=0,
        input_shape=(1,), output_shape=(1,), groups=1, kernel=(), strides=(), in_features=1,
        out_features=1, params=params, macs=1, is_output=is_output,
    )


def _ans(values: dict[str, float]) -> list[AnsResult]:
    return [AnsResult(name, f"{name}.out", mean, 0.01, 10) for name, mean in values.items()]


def _bits(plan: Plan) -> list[int | None]:
    return [entry.weight_bits for entry in plan.layers]


def test_the_paper_example():
    layers = [_layer("a"), _layer("b"), _layer("c")]
    plan = allocate(layers, _ans({"a": 0.7, "b": 0.4, "c": 0.9}), k_init=16)
    assert _bits(plan) == [5, 10, 2]
    assert [e.act_bits for e in plan.layers] == [5, 10, 2]
    assert plan.method == "quanos" and plan.k_init == 16 and plan.k_min == 2
    assert [e.ans_mean for e in plan.layers] == [0.7, 0.4, 0.9]
    assert all(e.ans_std == 0.01 for e in plan.layers)


@pytest.mark.parametrize(
    "ans, bits",
    [
        (0.03125, 15),  # 0.5 exactly: away from zero gives 1, half-to-even would give 0
        (0.15625, 13),  # 2.5 exactly: 3, not 2
        (0.21875, 12),  # 3.5 exactly: 4 either way
        (0.0, 16),
        (1.0, 2),
        (1.7, 2),  # ANS > 1 clamps to k_min
    ],
)
def test_eqn3_rounds_half_away_from_zero_and_clamps(ans, bits):
    assert eqn3_bits(ans, 16, 2) == bits


def test_round_half_away_from_zero():
    assert [round_half_away_from_zero(v) for v in (0.5, 1.5, 2.5, -2.5, 2.4999999, 0.49999999999999994)] == [
        1, 2, 3, -3, 2, 0
    ]


def test_clamps_to_k_min_and_k_init():
    assert eqn3_bits(0.8, 16, 5) == 5
    assert eqn3_bits(0.5, 8, 2) == 4
    assert eqn3_bits(-0.2, 16, 2) == 16
    layers = [_layer("a"), _layer("b")]
    plan = allocate(layers, _ans({"a": 2.0, "b": 0.0}), k_init=12, k_min=6)
    assert _bits(plan) == [6, 12]


def test_output_layer_stays_float_unless_asked():
    layers = [_layer("conv"), _layer("fc", is_output=True)]
    ans = _ans({"conv": 0.25, "fc": 0.5})
    kept = allocate(layers, ans)
    assert _bits(kept) == [12, None] and kept.layers[1].keep_float
    assert kept.layers[1].ans_mean == 0.5
    quantized = allocate(layers, ans, quantize_output=True)
    assert _bits(quantized) == [12, 8] and not quantized.layers[1].keep_float


def test_a_layer_without_ans_or_with_a_negative_ans_is_refused():
    with pytest.raises(PlanError, match="'b'"):
        allocate([_layer("a"), _layer("b")], _ans({"a": 0.1}))
    with pytest.raises(PlanError, match="'a'"):
        allocate([_layer("a")], _ans({"a": -0.1}))


@pytest.mark.parametrize(
    "k_init, k_min, option",
    [(1, 1, "^k_init"), (33, 2, "^k_init"), (16.0, 2, "^k_init"), (16, 1, "^k_min"), (8, 9, "^k_min")],
)
def test_bit_options_are_validated(k_init, k_min, option):
    with pytest.raises(UsageError, match=option):
        allocate([_layer("a")], _ans({"a": 0.1}), k_init=k_init, k_min=k_min)


def test_32_bit_start_is_allowed():
    assert _bits(allocate([_layer("a")], _ans({"a": 0.3}), k_init=32)) == [22]


# Budgeted mode: a synthetic table shaped like a small ResNet (params grow with depth).
_TABLE = [_layer(f"l{i}", params) for i, params in enumerate([432, 2304, 2304, 4608, 9216, 9216, 18432, 36864, 36864])]
_TABLE_ANS = _ans({f"l{i}": v for i, v in enumerate([0.05, 0.21, 0.34, 0.18, 0.42, 0.27, 0.61, 0.33, 0.48])})


def _achievable_averages(k_init: int, k_min: int) -> set[float]:
    """Every average one common ANS scale can reach: evaluated between all breakpoints."""
    params = {layer.name: layer.params for layer in _TABLE}
    breakpoints = sorted(
        (m + 0.5) / (result.mean * k_init) for result in _TABLE_ANS for m in range(k_init + 1)
    )
    probes = [0.0, *(a + (b - a) / 2 for a, b in itertools.pairwise(breakpoints)), breakpoints[-1] * 2]
    return {
        allocate(_TABLE, _TABLE_ANS, k_init=k_init, k_min=k_min, ans_scale=s).average_weight_bits(params)
        for s in probes
    }


@pytest.mark.parametrize("target", [5.0, 3.3, 8.0, 11.75])
def test_budgeted_mode_gets_as_close_to_the_target_as_integer_bits_allow(target):
    plan = allocate_budgeted(_TABLE, _TABLE_ANS, target, k_init=16, k_min=2)
    params = {layer.name: layer.params for layer in _TABLE}
    achieved = plan.average_weight_bits(params)
    assert plan.details["achieved_average_bits"] == pytest.approx(achieved)
    best = min(abs(a - target) for a in _achievable_averages(16, 2))
    assert abs(achieved - target) == pytest.approx(best, abs=1e-12)
    low, high = plan.details["bracket_average_bits"]
    assert low <= target <= high
    rebuilt = allocate(_TABLE, _TABLE_ANS, k_init=16, k_min=2, ans_scale=plan.details["ans_scale"])
    assert _bits(rebuilt) == _bits(plan)


def test_budgeted_mode_keeps_the_order_of_sensitivity():
    plan = allocate_budgeted(_TABLE, _TABLE_ANS, 5.0)
    ranked = sorted(zip(_TABLE_ANS, _bits(plan)), key=lambda pair: pair[0].mean)
    assert [bits for _, bits in ranked] == sorted((bits for _, bits in ranked), reverse=True)


def test_budgeted_mode_at_the_ends_of_the_range():
    top = allocate_budgeted(_TABLE, _TABLE_ANS, 16.0)
    assert set(_bits(top)) == {16} and top.details["ans_scale"] == 0.0
    bottom = allocate_budgeted(_TABLE, _TABLE_ANS, 2.0)
    assert set(_bits(bottom)) == {2}


@pytest.mark.parametrize("target", [1.5, 17.0, float("nan")])
def test_budget_outside_k_min_k_init_is_a_usage_error(target):
    with pytest.raises(UsageError, match="target_avg_bits"):
        allocate_budgeted(_TABLE, _TABLE_ANS, target)


def test_budget_ignores_the_float_output_layer():
    layers = [*_TABLE, _layer("fc", 100000, is_output=True)]
    ans = [*_TABLE_ANS, *_ans({"fc": 0.0})]
    plan = allocate_budgeted(layers, ans, 5.0)
    assert plan.layers[-1].keep_float
    assert _bits(plan)[:-1] == _bits(allocate_budgeted(_TABLE, _TABLE_ANS, 5.0))


# Iterative mode, with a fake "quantize" and "measure" that model a network whose
# sensitivity falls as its precision falls (the paper's Fig. 3a observation).
def _fake_loop(base: dict[str, float]):
    calls: list[Plan] = []

    def quantize(plan: Plan) -> dict[str, int]:
        calls.append(plan)
        return {entry.name: entry.weight_bits for entry in plan.layers}

    def measure(bits: dict[str, int]) -> list[AnsResult]:
        return _ans({name: base[name] * (bits[name] / 16) ** 2 for name in base})

    return quantize, measure, calls


def _assert_rounds_use_the_mean_of_every_measurement(rounds: list[dict], k_init: int = 16) -> None:
    for index, record in enumerate(rounds):
        for name, mean in record["ans_mean"].items():
            measured = [earlier["measured_ans_mean"][name] for earlier in rounds[: index + 1]]
            assert mean == pytest.approx(sum(measured) / len(measured))
            if record["bits"][name] is not None:
                assert record["bits"][name] == eqn3_bits(mean, k_init, 2)


def test_iterative_mode_allocates_from_k_init_on_the_mean_of_every_measured_ans():
    base = {"a": 0.2, "b": 0.45, "c": 0.7}
    layers = [_layer(name) for name in base]
    quantize, measure, calls = _fake_loop(base)
    plan = allocate_iterative(layers, _ans(base), quantize=quantize, measure=measure, rounds=20, k_init=16)
    rounds = plan.details["rounds"]
    assert plan.details["converged"] is True and "stopped" not in plan.details
    assert rounds[0]["bits"] == {"a": 13, "b": 9, "c": 5}
    assert rounds[0]["measured_ans_mean"] == base
    for before, after in itertools.pairwise(rounds):
        for name in base:
            assert after["measured_ans_mean"][name] == pytest.approx(base[name] * (before["bits"][name] / 16) ** 2)
    _assert_rounds_use_the_mean_of_every_measurement(rounds)
    assert rounds[-1]["bits"] == rounds[-2]["bits"] != rounds[0]["bits"]
    assert plan.details["rounds_run"] == len(rounds) == len(calls) + 1 < 20
    assert _bits(plan) == list(rounds[-1]["bits"].values())
    assert _bits(calls[0]) == [13, 9, 5]


def _flipping_measure(model: dict[str, int]) -> list[AnsResult]:
    """A layer that looks robust at low bits and sensitive at high bits (as ResNet-20's
    middle layers do): Eqn 3 on each round's ANS alone alternates 10, 3, 10, 3, ..."""
    return _ans({"a": 0.4 if model["a"] <= 4 else 0.8})


def test_the_mean_settles_what_each_round_alone_would_cycle_through():
    quantize, _, _ = _fake_loop({"a": 0.9})
    plan = allocate_iterative(
        [_layer("a")], _ans({"a": 0.9}), quantize=quantize, measure=_flipping_measure, rounds=20, k_init=16
    )
    rounds = plan.details["rounds"]
    assert [record["bits"]["a"] for record in rounds] == [2, 6, 5, 4, 5, 5]
    assert plan.details["converged"] is True and _bits(plan) == [5]
    _assert_rounds_use_the_mean_of_every_measurement(rounds)


def test_iterative_mode_stops_after_the_rounds_and_says_so(caplog):
    quantize, _, calls = _fake_loop({"a": 0.9})
    with caplog.at_level("WARNING", logger="quanos_onnx.allocate"):
        plan = allocate_iterative(
            [_layer("a")], _ans({"a": 0.9}), quantize=quantize, measure=_flipping_measure, rounds=3, k_init=16
        )
    assert plan.details["converged"] is False and plan.details["rounds_run"] == 3 == len(calls) + 1
    assert _bits(plan) == [5]
    assert "still changed in round 3 of 3" in caplog.text


def test_a_model_whose_ans_does_not_change_converges_in_two_rounds():
    plan = allocate_iterative(
        [_layer("a")], _ans({"a": 0.25}), quantize=lambda p: p, measure=lambda model: _ans({"a": 0.25}),
        rounds=5, k_init=32,
    )
    assert plan.details["converged"] is True and plan.details["rounds_run"] == 2
    assert _bits(plan) == [24] and plan.k_init == 32


def test_one_round_is_plain_eqn3():
    layers = [_layer("a")]
    plan = allocate_iterative(
        layers, _ans({"a": 0.25}), quantize=pytest.fail, measure=pytest.fail, rounds=1
    )
    assert _bits(plan) == [12] and plan.details["rounds_run"] == 1


def test_a_round_without_gradient_signal_stops_and_keeps_the_previous_bits():
    layers = [_layer("a"), _layer("fc", is_output=True)]
    plan = allocate_iterative(
        layers,
        _ans({"a": 0.25, "fc": 0.3}),
        quantize=lambda p: p,
        measure=lambda model: _ans({"a": 0.0, "fc": 0.0}),
        rounds=5,
        target_average_bits=6.0,
    )
    assert _bits(plan) == [6, None]
    assert plan.details["converged"] is False and plan.details["rounds_run"] == 1
    assert "round 2" in plan.details["stopped"]


def test_iterative_budgeted_mode_meets_the_budget_every_round():
    base = {layer.name: result.mean for layer, result in zip(_TABLE, _TABLE_ANS)}
    quantize, measure, _ = _fake_loop(base)
    plan = allocate_iterative(
        _TABLE, _TABLE_ANS, quantize=quantize, measure=measure, rounds=6, target_average_bits=5.0
    )
    assert plan.details["mode"] == "iterative-budgeted"
    assert plan.details["rounds_run"] >= 2
    for record in plan.details["rounds"]:
        assert abs(record["achieved_average_bits"] - 5.0) < 0.5


@pytest.mark.parametrize("rounds", [0, -1, 2.5, True])
def test_rounds_must_be_a_positive_whole_number(rounds):
    with pytest.raises(UsageError, match="rounds"):
        allocate_iterative([_layer("a")], _ans({"a": 0.1}), quantize=print, measure=print, rounds=rounds)


def test_iterative_mode_wires_to_quantize_and_measure_ans():
    """The composition the CLI uses: quantize.quantize and measure_ans on the QDQ model."""
    from harness_models import tiny_inputs, tiny_onnx, tiny_weights

    from quanos_onnx.harness.ans import measure_ans
    from quanos_onnx.harness.attacks import Attack
    from quanos_onnx.layers import list_layers
    from quanos_onnx.quantize import quantize

    proto = tiny_onnx(tiny_weights())
    layers = list_layers(proto)
    x = tiny_inputs(32)
    attack = Attack.fgsm(0.05)

    def measure(model):
        return measure_ans(model, layers, [(x, None)], attack).layers

    plan = allocate_iterative(
        layers,
        measure_ans(proto, layers, [(x, None)], attack).layers,
        quantize=lambda candidate: quantize(proto, candidate, [x]).model,
        measure=measure,
        rounds=4,
    )
    rounds = plan.details["rounds"]
    assert len(rounds) >= 2 and plan.layers[-1].keep_float
    assert all(record["measured_ans_mean"]["conv1"] > 0 for record in rounds)
    _assert_rounds_use_the_mean_of_every_measurement(rounds)
