"""allocate/sensitivity.py: per-layer costs from one calibration, in onnxruntime and through the twin."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from quanos_onnx.ptq import PtqSettings
from quanos_onnx.allocate import sensitivity as sensitivity_module
from quanos_onnx.ptq import statistics as statistics_module
from quanos_onnx.ptq.statistics import CalibrationStatistics
from quanos_onnx.logits import kl_divergence
from quanos_onnx.allocate.sensitivity import (
    QdqBuilder,
    Sensitivity,
    check_candidate_bits,
    measure,
    reference_plan,
)
from quanos_onnx.errors import PlanError, UsageError
from quanos_onnx.layers import find_joins, list_layers
from quanos_onnx.model import Runner, normalize, output_names
from quanos_onnx.passes.align import align_plan
from quanos_onnx.plan import FirstOutputBits, Plan, with_act_bits
from quanos_onnx.quantize import quantize

from tiny_models import random_inputs, resnet_style

BITS = (2, 4, 6)


@pytest.fixture(scope="module")
def resnet():
    model = normalize(resnet_style())
    layers = list_layers(model)
    calibration = [random_inputs(model, 16, seed) for seed in range(2)]
    return model, layers, find_joins(model, layers), calibration


MINMAX_NEAREST = PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=False)
"""The table's quantizer: one min/max calibration, round-to-nearest absmax weights."""


def _count_range_collections(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = statistics_module.collect_histograms

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(statistics_module, "collect_histograms", counting)
    return calls


@pytest.mark.parametrize("background", [5, None])
def test_divergence_table_comes_from_one_calibration(resnet, monkeypatch, background):
    model, layers, joins, calibration = resnet
    calls = _count_range_collections(monkeypatch)
    table = measure("kl", model, layers, joins, calibration, bits=BITS, background=background)
    assert calls == [1]
    assert table.layers == tuple(layer.name for layer in layers if not layer.is_output)
    assert table.bits == BITS and table.samples == 32
    for name, row in zip(table.layers, table.cost):
        assert all(np.isfinite(row))
        # the shortcut conv's bits are set by alignment (the widest layer feeding its join)
        assert row[0] > row[-1] or (name == "block2.shortcut" and row[0] == row[-1])
    if background is None:
        assert all(value >= 0 for row in table.cost for value in row)


def test_table_on_the_compiles_statistics_reads_no_calibration_data(resnet, monkeypatch):
    """Given the compile's calibration statistics, the table's grids are the written models'
    (calibrated on the compile's samples) and cost no extra pass once a plan filled them."""
    model, layers, joins, calibration = resnet
    statistics = CalibrationStatistics(model, calibration)
    quantize(model, reference_plan(layers, 7), calibration, layers=layers, statistics=statistics)
    quantize(model, reference_plan(layers, 2), calibration, layers=layers, statistics=statistics)
    calls = _count_range_collections(monkeypatch)
    table = measure("kl", model, layers, joins, calibration[:1], bits=BITS, ptq=PtqSettings(), statistics=statistics)
    fresh = measure("kl", model, layers, joins, calibration[:1], bits=BITS, ptq=PtqSettings())
    assert len(calls) == 1  # only the fresh table calibrated
    assert table.samples == fresh.samples == 16
    assert table.cost != fresh.cost  # grids from 32 calibration samples, not the 16 measured on


def _plan_divergence(resnet) -> Callable[[Plan], float]:
    """KL of a plan's min/max round-to-nearest model from float on the calibration samples,
    measured independently of the table."""
    model, layers, _, calibration = resnet
    name = output_names(model)[0]
    inputs = np.concatenate(calibration)
    float_logits = Runner(model, [name]).run(inputs, [name])[0]

    def kl(plan: Plan) -> float:
        rounded = quantize(model, plan, calibration, layers=layers, ptq=MINMAX_NEAREST).model
        return kl_divergence(float_logits, Runner(rounded, [name]).run(inputs, [name])[0])

    return kl


@pytest.mark.parametrize("act_bits", [None, 8])
def test_background_costs_are_the_divergence_the_layer_adds(resnet, act_bits):
    """cost(l, b) = KL(background plan with l at b) - KL(background plan), measured
    independently; with `act_bits`, l's weights at b and every activation at act_bits."""
    model, layers, joins, calibration = resnet
    table = measure("kl", model, layers, joins, calibration, bits=BITS, background=5, act_bits=act_bits)
    kl = _plan_divergence(resnet)
    background = reference_plan(layers, 5) if act_bits is None else with_act_bits(reference_plan(layers, 5), act_bits)
    changed = sensitivity_module.with_bits(background, "block1.conv1", 2, act_bits)
    assert {(e.weight_bits, e.act_bits) for e in changed.layers if e.name == "block1.conv1"} == {(2, act_bits or 2)}
    assert table.of("block1.conv1", 2) == pytest.approx(kl(changed) - kl(background), rel=1e-4, abs=1e-7)


def test_with_act_bits_the_divergence_prices_narrow_weights_below_narrow_weights_and_inputs(resnet):
    model, layers, joins, calibration = resnet
    weights_only = measure("kl", model, layers, joins, calibration, bits=BITS, background=5, act_bits=8)
    both = measure("kl", model, layers, joins, calibration, bits=BITS, background=5)
    assert sum(row[0] for row in weights_only.cost) < sum(row[0] for row in both.cost)


def test_with_act_bits_the_gradient_score_quantizes_inputs_at_those_bits(resnet):
    model, layers, joins, calibration = resnet
    labels = [np.arange(len(batch)) % 10 for batch in calibration]
    both = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS)
    weights_only = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS, act_bits=8)
    for with_inputs, alone in zip(both.cost, weights_only.cost):
        assert alone[0] > alone[1] > alone[2] > 0  # still the weights' bits
        assert alone[0] < with_inputs[0]  # 2-bit weights hurt less without 2-bit inputs


def test_with_the_first_output_pinned_the_divergence_prices_the_plans_the_compile_writes(resnet):
    """--first-last-bits 8 reads the first layer's output at 8 bits whatever the reader's
    bits: the background and every candidate carry the pin, so block1.conv1's cost is the
    divergence its weights add under 8-bit inputs."""
    model, layers, joins, calibration = resnet
    pinned = FirstOutputBits(("block1.conv1",), 8)
    free = measure("kl", model, layers, joins, calibration, bits=BITS, background=5)
    table = measure("kl", model, layers, joins, calibration, bits=BITS, background=5, first_output=pinned)
    kl = _plan_divergence(resnet)
    background = pinned.apply(reference_plan(layers, 5))
    changed = sensitivity_module.with_bits(background, "block1.conv1", 2, 8)
    assert table.of("block1.conv1", 2) == pytest.approx(kl(changed) - kl(background), rel=1e-4, abs=1e-7)
    assert table.of("block1.conv1", 2) < free.of("block1.conv1", 2)


def test_with_the_first_output_pinned_the_gradient_score_prices_the_readers_weights_only(resnet):
    model, layers, joins, calibration = resnet
    labels = [np.arange(len(batch)) % 10 for batch in calibration]
    pinned = FirstOutputBits(("block1.conv1",), 8)
    free = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS)
    table = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS, first_output=pinned)
    weights_only = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS, act_bits=8)
    reader = table.layers.index("block1.conv1")
    assert table.cost[reader] == pytest.approx(weights_only.cost[reader], rel=1e-5)
    assert table.cost[reader][0] < free.cost[reader][0]
    assert [row for i, row in enumerate(table.cost) if i != reader] == [row for i, row in enumerate(free.cost) if i != reader]


@pytest.mark.parametrize(("plan_bits", "join_operand_bits"), [(3, None), (5, None), (3, 8)])
def test_ptq_builder_writes_the_compiles_grids_but_bias_correction(resnet, plan_bits, join_operand_bits):
    """With the compile's settings, a table model is the one quantize() writes without bias
    correction (entropy ranges per bit-width, output-error clipped weights, the join operands'
    bits), logits alike."""
    model, layers, joins, calibration = resnet
    settings = PtqSettings(join_operand_bits=join_operand_bits)
    plan = sensitivity_module.with_bits(reference_plan(layers, 7), "block1.conv1", plan_bits)
    builder = QdqBuilder(model, layers, joins, [reference_plan(layers, 7), plan], calibration, settings)
    name = output_names(model)[0]
    inputs = np.concatenate(calibration)
    built = Runner(builder.build(plan), [name]).run(inputs, [name])[0]
    written = quantize(model, plan, calibration, layers=layers, ptq=replace(settings, bias_correction=False)).model
    assert np.allclose(built, Runner(written, [name]).run(inputs, [name])[0], rtol=1e-5, atol=1e-6)
    plain = Runner(QdqBuilder(model, layers, joins, [plan], calibration).build(plan), [name]).run(inputs, [name])[0]
    assert not np.allclose(built, plain, rtol=1e-3, atol=1e-4)


def test_probe_table_uses_the_method_the_probe_chose_for_every_variant(resnet):
    """With --calibration probe the table's grids are the written model's: the method is
    measured once and every table model uses it."""
    model, layers, joins, calibration = resnet
    plan = sensitivity_module.with_bits(reference_plan(layers, 7), "block1.conv1", 3)
    builder = QdqBuilder(model, layers, joins, [reference_plan(layers, 7), plan], calibration, PtqSettings(act_range="probe"))
    chosen = builder.ptq.probed_range
    assert chosen in ("entropy", "mse")
    name = output_names(model)[0]
    inputs = np.concatenate(calibration)
    built = Runner(builder.build(plan), [name]).run(inputs, [name])[0]
    written = quantize(model, plan, calibration, layers=layers, ptq=PtqSettings(act_range="probe", bias_correction=False, probed_range=chosen)).model
    assert np.allclose(built, Runner(written, [name]).run(inputs, [name])[0], rtol=1e-5, atol=1e-6)


def test_ptq_table_is_named_and_differs_from_the_minmax_one(resnet):
    model, layers, joins, calibration = resnet
    minmax = measure("kl", model, layers, joins, calibration, bits=BITS)
    ptq = measure("kl", model, layers, joins, calibration, bits=BITS, ptq=PtqSettings())
    assert (minmax.method, ptq.method) == ("kl@7", "kl@7+ptq")
    assert minmax.cost != ptq.cost


def test_single_layer_model_quantizes_only_that_layer_and_its_joins(resnet):
    model, layers, joins, calibration = resnet
    reference = reference_plan(layers, 8)
    builder = QdqBuilder(model, layers, joins, [reference], calibration)
    single = builder.single_layer(reference, next(l for l in layers if l.name == "block2.conv1"), 3)
    weights = {n.name for n in single.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.name}
    assert len(weights) == 1 and all("block2.conv1" in w for w in weights)
    # block1.add feeds block2.conv1, so its operands' shared quantizer is this layer's, at 3 bits.
    quantized_inputs = {n.input[0] for n in single.graph.node if n.op_type == "QuantizeLinear"}
    aligned = align_plan(reference, layers, joins)
    block1 = next(j for j in aligned.joins if j.name == "block1.add")
    assert set(block1.operands) <= quantized_inputs
    # the shortcut conv is tied to the classifier (quantized) or to the widest feeding layer:
    shortcut = builder.single_layer(reference, next(l for l in layers if l.name == "block2.conv2"), 3)
    weights = {n.name for n in shortcut.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.name}
    assert any("block2.shortcut" in w for w in weights) and any("block2.conv2" in w for w in weights)


def test_gradient_score_grows_as_bits_shrink(resnet):
    model, layers, joins, calibration = resnet
    labels = [np.arange(len(batch)) % 10 for batch in calibration]
    table = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS)
    assert table.method == "fisher" and table.samples == 32
    for row in table.cost:
        assert row[0] > row[1] > row[2] > 0


def test_gradient_score_on_the_compiles_statistics_leaves_no_pass_for_the_plans_after_it(resnet, monkeypatch):
    """The score's ranges come from the compile's statistics, in the one pass that also
    gathers the histograms every candidate's uniform plan needs; the score is the same."""
    model, layers, joins, calibration = resnet
    labels = [np.arange(len(batch)) % 10 for batch in calibration]
    alone = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS)
    statistics = CalibrationStatistics(model, calibration)
    calls = _count_range_collections(monkeypatch)
    shared = measure(
        "fisher", model, layers, joins, calibration, labels=labels, bits=BITS, ptq=PtqSettings(), statistics=statistics
    )
    for bits in BITS:
        quantize(model, reference_plan(layers, bits), calibration, layers=layers, statistics=statistics)
    assert calls == [1]
    assert shared.cost == alone.cost


def test_gradient_score_on_read_only_data_prints_no_warning(tmp_path):
    """Data memory-mapped from .npy is read-only; torch warns once per process about such
    arrays, so the check runs in a fresh Python."""
    script = (
        "import warnings, numpy as np\n"
        "warnings.simplefilter('error')\n"
        "from tiny_models import random_inputs, resnet_style\n"
        "from quanos_onnx.allocate.sensitivity import measure\n"
        "from quanos_onnx.layers import find_joins, list_layers\n"
        "from quanos_onnx.model import normalize\n"
        "model = normalize(resnet_style())\n"
        "layers = list_layers(model)\n"
        "batch = random_inputs(model, 4, 0)\n"
        "labels = np.arange(4) % 2\n"
        "batch.setflags(write=False)\n"
        "labels.setflags(write=False)\n"
        "measure('fisher', model, layers, find_joins(model, layers), [batch], labels=[labels], bits=(2, 8))\n"
    )
    tests = Path(__file__).parent
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("chunk", [5, 64])
def test_gradient_score_does_not_depend_on_how_many_samples_go_through_at_once(resnet, monkeypatch, chunk):
    """The twin runs ACTIVATION_CHUNK samples at a time (memory); the score is a per-sample sum."""
    model, layers, joins, calibration = resnet
    labels = [np.arange(len(batch)) % 10 for batch in calibration]
    reference = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS)
    monkeypatch.setattr(sensitivity_module, "ACTIVATION_CHUNK", chunk)
    chunked = measure("fisher", model, layers, joins, calibration, labels=labels, bits=BITS)
    np.testing.assert_allclose(np.array(chunked.cost), np.array(reference.cost), rtol=1e-4)


def _wide_weight_conv() -> onnx.ModelProto:
    """Conv(3 -> 8, 3x3) with weights spread over [-1, 1] (at 8 bits many adjacent pairs of
    integers sum past 128, so 255 * pair leaves int16), Relu, pooling and a classifier."""
    rng = np.random.default_rng(3)
    return onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                onnx.helper.make_node("Relu", ["c"], ["r"], name="relu"),
                onnx.helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
                onnx.helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
                onnx.helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc"),
            ],
            "wide",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 6, 6])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
            [
                onnx.numpy_helper.from_array(rng.uniform(-1, 1, (8, 3, 3, 3)).astype(np.float32), "w"),
                onnx.numpy_helper.from_array(np.zeros(8, np.float32), "b"),
                onnx.numpy_helper.from_array(rng.uniform(-1, 1, (4, 8)).astype(np.float32), "fc_w"),
                onnx.numpy_helper.from_array(np.zeros(4, np.float32), "fc_b"),
            ],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )


def test_the_gradient_score_counts_the_pair_saturation_of_8_bit_weights(monkeypatch):
    """On a CPU whose u8 x s8 kernels clamp pairs of products (AVX2 without VNNI), 8-bit
    weights cost what the deployed kernel loses; 7 bits cannot saturate and score the same."""
    from quanos_onnx.twin import fusion
    from quanos_onnx.twin.fusion import PairSaturation

    model = normalize(_wide_weight_conv())
    layers = list_layers(model)
    rng = np.random.default_rng(4)
    calibration = [rng.uniform(0.5, 1.0, (16, 3, 6, 6)).astype(np.float32)]
    labels = [np.arange(16) % 4]
    scores = {}
    for saturating in (False, True):
        monkeypatch.setattr(fusion, "pair_saturation", lambda saturating=saturating: PairSaturation(saturating, saturating))
        table = measure("fisher", model, layers, find_joins(model, layers), calibration, labels=labels, bits=(7, 8))
        scores[saturating] = table.of("conv", 7), table.of("conv", 8)
    assert scores[True][0] == scores[False][0]
    assert scores[False][1] < scores[False][0]  # exact kernels: 8 bits beat 7
    assert scores[True][1] > 10 * scores[False][1] and scores[True][1] > scores[True][0]


def test_centered_activation_lands_on_the_qdq_grid():
    import torch

    from quanos_onnx.passes.calibrate import Range
    from quanos_onnx.passes.qdq import activation_quantizer

    x = torch.linspace(-1.3, 2.1, 301)
    grid = activation_quantizer(3, Range(-1.3, 2.1))
    centered = sensitivity_module._centered_activation(x, grid)
    levels = centered + grid.zero_point
    low, high = grid.levels
    expected = torch.clamp(torch.round(x / grid.scale) + grid.zero_point, low, high)
    assert torch.equal(levels, expected)
    assert len(torch.unique(levels)) <= 8 and x.dtype == torch.float32


def test_predict_sums_the_table():
    table = Sensitivity(("a", "b"), (2, 4), ((3.0, 1.0), (5.0, 0.5)), "test", 1, 0.0)
    plan = Plan((
        _entry("a", 2), _entry("b", 4), _entry("c", None),
    ))
    assert table.predict(plan) == 3.5
    assert table.to_json()["cost"]["b"] == {"2": 5.0, "4": 0.5}
    with pytest.raises(PlanError, match="layer 'a' at 8 bits"):
        table.of("a", 8)


def _entry(name, bits):
    from quanos_onnx.plan import LayerPlan

    return LayerPlan(name, None, None, keep_float=True) if bits is None else LayerPlan(name, bits, bits)


def test_candidate_bits_are_checked():
    assert check_candidate_bits([8, 2, 4, 4]) == (2, 4, 8)
    for bad in ([], [1, 4], [4, 17], [2.5]):
        with pytest.raises(UsageError):
            check_candidate_bits(bad)
    with pytest.raises(UsageError, match="--sensitivity"):
        measure("hessian", onnx.ModelProto(), [], [], [])


def test_auto_measures_the_divergence_unless_the_table_would_cost_too_many_macs(resnet):
    from dataclasses import replace as replaced

    from quanos_onnx.allocate.sensitivity import KL_TABLE_MAC_BUDGET, auto_method

    model, layers, joins, calibration = resnet
    assert auto_method(layers, BITS, 256) == "kl"
    assert measure("auto", model, layers, joins, calibration, bits=BITS).method.startswith("kl@")
    per_sample = KL_TABLE_MAC_BUDGET / (256 * (len(layers) - 1) * (len(BITS) - 1))
    heavy = [replaced(layer, macs=int(per_sample / len(layers)) + 1) for layer in layers]
    assert auto_method(heavy, BITS, 256) == "fisher"
    assert auto_method(heavy, BITS, 128) == "kl"  # the same model measured on half the samples


def test_overlapped_measures_in_order_while_the_next_model_is_written():
    """The second thread measures model k while this one writes model k + 1 (the measure of
    the first model waits for the second to be written), in this thread's context."""
    import threading

    from quanos_onnx.threads import session_threads, using_threads

    second_written = threading.Event()

    def build(key: int) -> int:
        if key == 1:
            second_written.set()
        return key * 10

    def measure(model: int) -> float:
        if model == 0:
            assert second_written.wait(timeout=30), "model 1 was not written while model 0 was measured"
        return model + session_threads()

    with using_threads(3):
        assert sensitivity_module.overlapped(build, measure, [0, 1, 2, 3]) == [3, 13, 23, 33]
    assert sensitivity_module.overlapped(build, measure, []) == []


def test_a_failed_measurement_raises_in_the_caller():
    def measure(model: int) -> float:
        raise PlanError(f"model {model} broke")

    with pytest.raises(PlanError, match="model 0 broke"):
        sensitivity_module.overlapped(lambda key: key, measure, [0, 1])
