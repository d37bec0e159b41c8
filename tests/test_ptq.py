"""ptq/ (orchestration) through quantize(): every technique on any plan keeps the k-bit QDQ form."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quanos_onnx.errors import UsageError
from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner, make_session, normalize
from quanos_onnx.plan import LayerPlan, Plan
from quanos_onnx import ptq as ptq_module
from quanos_onnx.logits import kl_divergence
from quanos_onnx.ptq import PROBE_CANDIDATES, PtqSettings, chosen_low_bits_range, low_bits_range
from quanos_onnx.ptq.statistics import CalibrationStatistics
from quanos_onnx.quantize import quantize

from tiny_models import random_inputs, resnet_style, vgg_chain

PLAIN = PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=False)
PROBE = PtqSettings(act_range="probe")
EVERYTHING = PtqSettings(act_range="mse", weight_clipping="output", bias_correction=True, equalize=True)


@pytest.fixture(scope="module")
def resnet():
    model = normalize(resnet_style())
    return model, list_layers(model)


def mixed_plan(layers, bits):
    return Plan(tuple(LayerPlan(layer.name, w, a) for layer, (w, a) in zip(layers, bits)))


MIXED = [(2, 4), (3, 3), (5, 8), (4, 4), (12, 12), (6, 2), (8, 8)]


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> collections.Counter:
    path = tmp_path / "optimized.onnx"
    make_session(model, optimized_model_path=str(path))
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("settings", [PtqSettings(), EVERYTHING, PtqSettings(act_range="entropy", weight_clipping="mse")])
def test_any_settings_keep_the_k_bit_weights_and_the_integer_fusions(resnet, tmp_path, settings):
    model, layers = resnet
    x = random_inputs(model, 32)
    plan = mixed_plan(layers, MIXED)
    result = quantize(model, plan, [x[:16], x[16:]], ptq=settings)
    for entry in result.plan.layers:
        bits = entry.weight_bits
        integers = initializer(result.model, f"{entry.name}.weight_w{bits}_quantized")
        assert np.abs(integers).max() <= 2 ** (bits - 1) - 1
    plain = quantize(model, plan, [x[:16], x[16:]], ptq=PLAIN)
    assert optimized_ops(result.model, tmp_path) == optimized_ops(plain.model, tmp_path)
    assert result.plan == plain.plan


def test_the_result_is_the_same_every_time(resnet):
    model, layers = resnet
    x = random_inputs(model, 16)
    plan = mixed_plan(layers, MIXED)
    first = quantize(model, plan, [x], ptq=EVERYTHING).model
    second = quantize(model, plan, (batch for batch in [x]), ptq=EVERYTHING).model
    assert first.SerializeToString() == second.SerializeToString()


def test_the_defaults_beat_round_to_nearest_at_four_bits():
    model = normalize(vgg_chain(seed=3))
    layers = list_layers(model)
    x = random_inputs(model, 64, seed=4)
    reference = Runner(model).run(x)[0]
    plan = Plan.uniform(layers, 4)

    def error(settings: PtqSettings) -> float:
        quantized = quantize(model, plan, [x[:32], x[32:]], ptq=settings).model
        return float(np.mean((Runner(quantized).run(x)[0] - reference) ** 2))

    assert error(PtqSettings()) < 0.7 * error(PLAIN)


def test_auto_ranges_search_at_low_bits_and_keep_minmax_at_eight():
    settings = PtqSettings()
    assert [settings.range_method(bits) for bits in (2, 4, 6, 7, 8, 16)] == ["entropy"] * 3 + ["minmax"] * 3
    assert PtqSettings(act_range="mse").range_method(3) == "mse"
    probed = PtqSettings(act_range="probe", probed_range="mse")
    assert [probed.range_method(bits) for bits in (2, 4, 6, 7, 8, 16)] == ["mse"] * 3 + ["minmax"] * 3


def test_probe_below_seven_bits_must_be_chosen_before_it_is_used():
    """An unresolved probe setting never silently falls back to one method."""
    with pytest.raises(ValueError, match="resolved"):
        PtqSettings(act_range="probe").range_method(6)
    with pytest.raises(UsageError, match="probed_range"):
        PtqSettings(probed_range="minmax")  # type: ignore[arg-type]


def test_probe_picks_the_method_whose_uniform_4_bit_model_is_closer_to_float(resnet):
    """The probe's divergences are those of the models quantize() writes with each method
    (the settings' weights and bias correction, round-to-nearest), and the smaller one wins."""
    model, layers = resnet
    x = random_inputs(model, 24)
    statistics = CalibrationStatistics(model, [x])
    choice = low_bits_range(layers, statistics, PROBE)
    reference = Runner(model).run(x)[0]
    expected = {}
    for method in PROBE_CANDIDATES:
        written = quantize(model, Plan.uniform(layers, 4), [x], ptq=PtqSettings(act_range=method)).model
        expected[method] = kl_divergence(reference, Runner(written).run(x)[0])
    assert dict(choice.divergence) == pytest.approx(expected, rel=1e-9)
    assert choice.method == ("mse" if expected["mse"] < expected["entropy"] - ptq_module.PROBE_TIE_KL else "entropy")
    assert choice.samples == 24
    assert choice.to_json()["kl_from_float"] == dict(choice.divergence)


@pytest.mark.parametrize(
    ("entropy", "mse", "picked"),
    [(0.5, 0.3, "mse"), (0.3, 0.5, "entropy"), (0.00077, 0.00059, "entropy"), (1.0, 0.995, "entropy")],
)
def test_probe_keeps_entropy_unless_mse_is_clearly_closer_to_float(entropy, mse, picked):
    """A difference under PROBE_TIE_KL is noise (the bundled MNIST example's probes: 0.00077 and 0.00059)."""
    assert ptq_module._preferred([("entropy", entropy), ("mse", mse)]) == picked


def test_probe_measures_once_per_calibration_and_writes_the_chosen_methods_model(resnet, monkeypatch):
    model, layers = resnet
    x = random_inputs(model, 16)
    statistics = CalibrationStatistics(model, [x])
    calls = []
    monkeypatch.setattr(ptq_module, "kl_divergence", lambda *a: calls.append(1) or kl_divergence(*a))
    plan = Plan.uniform(layers, 4)
    first = quantize(model, plan, [x], ptq=PROBE, statistics=statistics).model
    again = quantize(model, mixed_plan(layers, MIXED), [x], ptq=PROBE, statistics=statistics)
    assert len(calls) == len(PROBE_CANDIDATES) and again.model is not None
    chosen = chosen_low_bits_range(statistics, PROBE)
    assert chosen is not None
    explicit = quantize(model, plan, [x], ptq=PtqSettings(act_range=chosen.method)).model
    assert first.SerializeToString() == explicit.SerializeToString()


def test_probe_does_not_measure_plans_above_six_bits_and_auto_never_does(resnet):
    """An 8-bit plan pays nothing for probe (min/max needs no choice); auto is entropy."""
    model, layers = resnet
    x = random_inputs(model, 8)
    statistics = CalibrationStatistics(model, [x])
    quantize(model, Plan.uniform(layers, 8), [x], ptq=PROBE, statistics=statistics)
    assert chosen_low_bits_range(statistics, PROBE) is None
    quantize(model, Plan.uniform(layers, 4), [x], statistics=statistics)
    assert chosen_low_bits_range(statistics, PtqSettings()) is None


def test_method_and_percentile_override_the_settings(resnet):
    model, layers = resnet
    x = random_inputs(model, 16)
    plan = Plan.uniform(layers, 4)
    legacy = quantize(model, plan, [x], method="percentile", percentile=99.0, ptq=PLAIN).model
    explicit = quantize(model, plan, [x], ptq=PtqSettings("percentile", 99.0, "absmax", False)).model
    assert legacy.SerializeToString() == explicit.SerializeToString()


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        ({"act_range": "mean"}, "calibration"),
        ({"percentile": 20.0}, "percentile"),
        ({"weight_clipping": "l1"}, "weight_clipping"),
    ],
)
def test_bad_settings_are_usage_errors_naming_the_option(options, culprit):
    """Named as compile's API argument (the CLI renders it as its flag)."""
    with pytest.raises(UsageError) as raised:
        PtqSettings(**options)
    assert raised.value.arguments == (culprit,)


@pytest.mark.parametrize("rounding", ["gptq", "adaround", "brecq"])
def test_learned_rounding_is_wired_in_and_repeatable(resnet, tmp_path, rounding):
    model, layers = resnet
    x = random_inputs(model, 32)
    plan = mixed_plan(layers, [(3, 4)] * 6 + [(8, 8)])
    settings = PtqSettings(rounding=rounding, rounding_iterations=30, seed=1)
    nearest = quantize(model, plan, [x[:16], x[16:]], ptq=PtqSettings(rounding="nearest"))
    learned = quantize(model, plan, [x[:16], x[16:]], ptq=settings)
    again = quantize(model, plan, [x[:16], x[16:]], ptq=settings)
    assert learned.model.SerializeToString() == again.model.SerializeToString()
    names = [f"{layer.name}.weight_w{entry.weight_bits}_quantized" for layer, entry in zip(layers, learned.plan.layers)]
    changed = [not np.array_equal(initializer(learned.model, n), initializer(nearest.model, n)) for n in names]
    assert any(changed)
    for name, entry in zip(names, learned.plan.layers):
        assert np.abs(initializer(learned.model, name)).max() <= 2 ** (entry.weight_bits - 1) - 1
    # the rounding keeps the clipped scales, so only the integers move
    for layer, entry in zip(layers, learned.plan.layers):
        scale = f"{layer.name}.weight_w{entry.weight_bits}_scale"
        np.testing.assert_array_equal(initializer(learned.model, scale), initializer(nearest.model, scale))
    assert optimized_ops(learned.model, tmp_path) == optimized_ops(nearest.model, tmp_path)


def test_bias_correction_leaves_the_layers_gptq_rounded_alone(resnet):
    """GPTQ's target is already the float model's output (ptq/gptq.py); correcting its
    layers' biases after it lost accuracy on ResNet-20 and MobileNetV2 (docs/quantization.md)."""
    model, layers = resnet
    x = random_inputs(model, 32)
    plan = mixed_plan(layers, [(4, 4)] * 6 + [(8, 8)])

    def written(**settings) -> bytes:
        return quantize(model, plan, [x[:16], x[16:]], ptq=PtqSettings(**settings)).model.SerializeToString()

    assert written(rounding="nearest") != written(rounding="nearest", bias_correction=False)
    assert written(rounding="gptq") == written(rounding="gptq", bias_correction=False)


def test_bad_rounding_settings_name_the_option():
    with pytest.raises(UsageError) as raised:
        PtqSettings(rounding="stochastic")
    assert raised.value.arguments == ("rounding",)
    with pytest.raises(UsageError) as raised:
        PtqSettings(rounding="adaround", rounding_iterations=0)
    assert raised.value.arguments == ("rounding_iterations",)
    with pytest.raises(UsageError) as raised:
        PtqSettings(join_operand_bits=17)
    assert raised.value.arguments == ("join_operand_bits",)
