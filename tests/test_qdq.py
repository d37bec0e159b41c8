"""passes/qdq.py: every quantized weight and activation lies on an exact k-bit grid, and
onnxruntime still fuses the layers into integer kernels."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quanos_onnx.layers import list_layers
from quanos_onnx.model import make_session, normalize, with_outputs
from quanos_onnx.passes.calibrate import Range
from quanos_onnx.errors import PlanError
from quanos_onnx.passes.qdq import PLAN_METADATA_KEY, WeightGrid, activation_quantizer, quantize_weight
from quanos_onnx.quantize import quantize
from quanos_onnx.plan import LayerPlan, Plan, plan_from_json

from tiny_models import random_inputs, resnet_style, vgg_chain

BITS = list(range(2, 17))


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _dequantize_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "DequantizeLinear"]


def _weight_dequantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """DQs of integer weights (int32 biases are not on a k-bit grid, by design)."""
    constants = _initializers(model)
    return [
        node for node in _dequantize_nodes(model)
        if node.input[0] in constants and constants[node.input[0]].dtype != np.int32
    ]


def _activation_values(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, float, int]]:
    """Each activation DQ's output on x (run in onnxruntime) with its scale and zero-point."""
    constants = _initializers(model)
    nodes = [node for node in _dequantize_nodes(model) if node.input[0] not in constants]
    session = make_session(with_outputs(model, [node.output[0] for node in nodes]))
    values = session.run([node.output[0] for node in nodes], {session.get_inputs()[0].name: x})
    return {
        node.output[0]: (value, float(constants[node.input[1]]), int(constants[node.input[2]]))
        for node, value in zip(nodes, values)
    }


def _grid_span(value: np.ndarray, scale: float, zero_point: int) -> int:
    """How many consecutive integer levels the dequantized values occupy (fails off-grid)."""
    levels = value.astype(np.float64) / scale + zero_point
    rounded = np.round(levels)
    assert np.abs(levels - rounded).max() < 1e-2, "dequantized values are off the integer grid"
    return int(rounded.max() - rounded.min()) + 1


def _quantized(model: onnx.ModelProto, plan: Plan, calibration: np.ndarray) -> onnx.ModelProto:
    return quantize(model, plan, [calibration]).model


@pytest.fixture(scope="module")
def models():
    built = {"vgg": normalize(vgg_chain()), "resnet": normalize(resnet_style())}
    return {name: (model, list_layers(model)) for name, model in built.items()}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_exact_grid_at_uniform_bits(models, name: str, bits: int):
    model, layers = models[name]
    calibration = random_inputs(model, 16, seed=1)
    quantized = _quantized(model, Plan.uniform(layers, bits, keep_output_float=False), calibration)
    constants = _initializers(quantized)
    weights = _weight_dequantizers(quantized)
    assert len(weights) == len(layers)
    limit = 2 ** (bits - 1) - 1
    for node in weights:
        integers = constants[node.input[0]]
        assert integers.dtype == (np.int8 if bits <= 8 else np.int16)
        assert np.abs(integers.astype(np.int32)).max() == limit
        scale = constants[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        per_channel = np.moveaxis(integers.astype(np.float64), axis, 0).reshape(len(scale), -1)
        per_channel = per_channel * scale.reshape(-1, 1)
        assert max(len(np.unique(row)) for row in per_channel) <= 2**bits
    # Inputs beyond the calibrated range (and negative) drive every quantizer into its clip.
    stressed = 3.0 * random_inputs(model, 16, seed=2) - 1.0
    activations = _activation_values(quantized, stressed)
    assert activations
    for tensor, (value, scale, zero_point) in activations.items():
        assert len(np.unique(value)) <= 2**bits, tensor
        assert _grid_span(value, scale, zero_point) <= 2**bits, tensor


def test_mixed_plan_puts_each_layer_input_and_join_on_its_own_grid(models):
    model, layers = models["resnet"]
    bits = {layer.name: 2 + (3 * index) % 15 for index, layer in enumerate(layers)}
    plan = Plan(tuple(LayerPlan(name, b, b) for name, b in bits.items()))
    result = quantize(model, plan, [random_inputs(model, 16, seed=1)])
    aligned = result.plan.by_name()
    activations = _activation_values(result.model, 3.0 * random_inputs(model, 16, seed=2) - 1.0)
    nodes = {node.name: node for node in result.model.graph.node}
    for layer in layers:
        value, scale, zero_point = activations[nodes[layer.name].input[0]]
        assert _grid_span(value, scale, zero_point) <= 2 ** aligned[layer.name].act_bits, layer.name
    for join in result.plan.joins:
        for operand in nodes[join.name].input:
            value, scale, zero_point = activations[operand]
            assert _grid_span(value, scale, zero_point) <= 2**join.bits, (join.name, operand)


@pytest.mark.parametrize(("bits", "container"), [(2, 255), (7, 255), (8, 255), (9, 65535), (16, 65535)])
def test_signed_and_unsigned_activation_grids(bits: int, container: int):
    unsigned = activation_quantizer(bits, Range(0.0, 6.0))
    signed = activation_quantizer(bits, Range(-2.0, 3.0))
    assert not unsigned.signed and signed.signed
    for quantizer in (unsigned, signed):
        low, high = quantizer.levels
        assert high - low + 1 == 2**bits
        assert quantizer.needs_clip == (2**bits - 1 != container)
    assert unsigned.levels[0] == unsigned.zero_point
    assert (unsigned.levels[1] - unsigned.zero_point) * unsigned.scale == pytest.approx(6.0, rel=1e-6)
    if bits <= 8:
        assert unsigned.zero_point == 0
        # The signed grid spans exactly [-2, 3]: its end levels dequantize to the range ends.
        low_value = (signed.levels[0] - signed.zero_point) * signed.scale
        high_value = (signed.levels[1] - signed.zero_point) * signed.scale
        assert low_value == pytest.approx(-2.0, abs=signed.scale / 2)
        assert high_value == pytest.approx(3.0, abs=signed.scale / 2)
        assert signed.levels[0] <= signed.zero_point <= signed.levels[1]


def test_weight_quantization_is_symmetric_per_channel_and_round_trips_at_16_bits():
    weight = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    weight[2] *= 100.0
    integers, scale = quantize_weight(weight, 16, axis=0)
    assert scale.shape == (4,)
    assert np.abs(integers).reshape(4, -1).max(axis=1).tolist() == [32767] * 4
    np.testing.assert_allclose(integers * scale.reshape(-1, 1, 1, 1), weight, rtol=0, atol=float(scale.max()))
    zero = np.zeros((2, 5), np.float32)
    integers, scale = quantize_weight(zero, 4, axis=1)
    assert not integers.any() and np.all(scale == 1.0)


def test_eight_bit_model_stays_close_to_float(models):
    """The quantizer's error, measured with exact integer kernels. onnxruntime's default u8 x s8
    kernels on x86 CPUs with AVX2 but no VNNI clamp pairs of products to int16 (docs/twin.md):
    on such a CPU they moved this model's logits by 6% of their range against 0.8% exact;
    session.x64quantprecision=1 makes them exact there (and changes nothing on other CPUs)."""
    model, layers = models["vgg"]
    x = random_inputs(model, 64, seed=3)
    quantized = _quantized(model, Plan.uniform(layers, 8), x)
    name = model.graph.input[0].name
    want = make_session(model).run(None, {name: x})[0]
    got = make_session(quantized, config=[("session.x64quantprecision", "1")]).run(None, {name: x})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    deployed = make_session(quantized).run(None, {name: x})[0]
    assert (deployed.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_weight_storage_shrinks_about_four_times_at_8_bits(models):
    model, layers = models["vgg"]
    quantized = _quantized(model, Plan.uniform(layers, 8, keep_output_float=False), random_inputs(model, 8))
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    stored = sum(numpy_helper.to_array(t).nbytes for t in quantized.graph.initializer)
    assert stored < 0.4 * float_bytes


def test_output_opset_is_21_and_the_plan_rides_along(models):
    model, layers = models["resnet"]
    result = quantize(model, Plan.uniform(layers, 6), [random_inputs(model, 8)])
    assert [(o.domain, o.version) for o in result.model.opset_import if o.domain in ("", "ai.onnx")] == [("", 21)]
    onnx.checker.check_model(result.model)
    metadata = {p.key: p.value for p in result.model.metadata_props}
    assert plan_from_json(json.loads(metadata[PLAN_METADATA_KEY])) == result.plan


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> collections.Counter:
    """Op counts of onnxruntime's optimized graph (what actually runs)."""
    path = tmp_path / "optimized.onnx"
    make_session(model, optimized_model_path=str(path))
    return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


@pytest.mark.parametrize(
    "bits", [[8, 8, 8, 8], [2, 3, 4, 5], [8, 2, 7, 3], [6, 6, 6, 6]], ids=["u8", "2-5", "mixed", "u6"]
)
def test_every_conv_at_8_bits_or_less_becomes_qlinearconv(models, tmp_path: Path, bits: list[int]):
    model, layers = models["vgg"]
    convs = [layer for layer in layers if layer.op == "Conv"]
    plan = Plan(tuple(LayerPlan(layer.name, b, b) for layer, b in zip(convs, bits)))
    quantized = _quantized(model, plan, random_inputs(model, 16))
    ops = _optimized_ops(quantized, tmp_path)
    assert ops["QLinearConv"] == len(convs)
    assert ops["Conv"] == ops["FusedConv"] == 0


@pytest.mark.parametrize(
    ("bits", "integer_adds"),
    [([8] * 7, 1), ([2, 3, 4, 5, 6, 7, 8], 2), ([8, 2, 8, 3, 8, 4, 8], 2)],
    ids=["u8", "2-8", "alternating"],
)
def test_residual_blocks_fuse_into_qlinearconv_and_qlinearadd(models, tmp_path: Path, bits: list[int], integer_adds: int):
    """The stem's Relu output feeds a signed join and the first join's output feeds both a
    conv and the next join: still every conv and the inner join run as integer kernels.
    With different bits for the conv and the next join, block1.add is computed once per
    grid (two QLinearAdds) instead of requantizing in float; block2.add feeds the float
    GlobalAveragePool and stays a float Add."""
    model, layers = models["resnet"]
    plan = Plan(tuple(LayerPlan(layer.name, b, b) for layer, b in zip(layers, bits)))
    ops = _optimized_ops(_quantized(model, plan, random_inputs(model, 16)), tmp_path)
    assert ops["QLinearConv"] == 6 and ops["Conv"] == ops["FusedConv"] == 0
    assert (ops["QLinearAdd"], ops["Add"]) == (integer_adds, 1)


def test_join_operands_share_one_quantizer_at_the_downstream_bits(models):
    """One scale and one k-bit grid for all operands of each join. A Relu-produced operand of
    a signed group stores the grid's non-negative half from zero-point 0 (same values)."""
    model, layers = models["resnet"]
    bits = {"stem": 3, "block1.conv1": 5, "block1.conv2": 4, "block2.conv1": 7,
            "block2.conv2": 2, "block2.shortcut": 8, "classifier": 6}
    plan = Plan(tuple(LayerPlan(name, b, b) for name, b in bits.items()))
    result = quantize(model, plan, [random_inputs(model, 16)])
    producers = {out: node for node in result.model.graph.node for out in node.output}
    expected_bits = {"block1.add": bits["block2.conv1"], "block2.add": bits["classifier"]}
    activations = _activation_values(result.model, 3.0 * random_inputs(model, 16, seed=5) - 1.0)
    for join_plan in result.plan.joins:
        assert join_plan.bits == expected_bits[join_plan.name]
        add = next(node for node in result.model.graph.node if node.name == join_plan.name)
        assert all(producers[operand].op_type == "DequantizeLinear" for operand in add.input)
        scales = {activations[operand][1] for operand in add.input}
        assert len(scales) == 1, join_plan.name
        (scale,) = scales
        levels = np.concatenate([activations[operand][0].ravel() / scale for operand in add.input])
        assert np.abs(levels - np.round(levels)).max() < 1e-2
        assert np.round(levels).max() - np.round(levels).min() + 1 <= 2**join_plan.bits, join_plan.name
    shortcut = result.plan.by_name()["block2.shortcut"]
    assert (shortcut.weight_bits, shortcut.act_bits, shortcut.group) == (6, 6, "block2.add")


def test_16_bit_layers_with_large_biases_run_the_same_under_onnxruntime_optimization():
    """At 16 bits the bias would overflow int32 at input x weight scale; a coarser bias scale
    keeps it integer, and onnxruntime's optimized session must agree with the plain one."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(scale=0.01, size=(8, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(scale=50.0, size=(8,)).astype(np.float32)
    weight2 = rng.normal(scale=0.01, size=(4, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"), numpy_helper.from_array(weight2, "w2")],
    )
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    layers = list_layers(model)
    plan = Plan(tuple(LayerPlan(layer.name, 16, 16) for layer in layers))
    x = rng.random((4, 3, 8, 8), dtype=np.float32)
    quantized = quantize(model, plan, [x], layers=layers).model
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x})[0])
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(outputs[1], reference, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_non_negative_half_of_a_signed_grid_dequantizes_identically(bits: int):
    signed = activation_quantizer(bits, Range(-3.0, 2.0))
    half = signed.for_non_negative()
    assert (half.scale, half.zero_point) == (signed.scale, 0)
    x = np.linspace(0.0, 4.0, 1001)
    def dequantized(q):
        return (np.clip(np.round(x / q.scale) + q.zero_point, *q.levels) - q.zero_point) * q.scale
    np.testing.assert_array_equal(dequantized(half), dequantized(signed))
    assert activation_quantizer(bits, Range(0.0, 2.0)).for_non_negative() == activation_quantizer(bits, Range(0.0, 2.0))


def test_a_tensor_with_two_grids_is_quantized_once(models):
    """The stem output is read by a conv at 3 bits and by a join at 7: one QuantizeLinear on
    the float tensor, the coarser grid requantized from the finer one."""
    model, layers = models["resnet"]
    bits = {"stem": 4, "block1.conv1": 3, "block1.conv2": 4, "block2.conv1": 7,
            "block2.conv2": 5, "block2.shortcut": 6, "classifier": 6}
    quantized = quantize(model, Plan(tuple(LayerPlan(n, b, b) for n, b in bits.items())), [random_inputs(model, 16)]).model
    readers = [node for node in quantized.graph.node if "relu1_out" in node.input]
    assert [node.op_type for node in readers] == ["QuantizeLinear"]
    nodes = {node.name: node for node in quantized.graph.node}
    producers = {out: node for node in quantized.graph.node for out in node.output}
    chain = []
    tensor = nodes["block1.conv1"].input[0]
    while tensor != "relu1_out":
        chain.append(producers[tensor].op_type)
        tensor = producers[tensor].input[0]
    assert chain == ["DequantizeLinear", "Clip", "QuantizeLinear", "DequantizeLinear", "Clip", "QuantizeLinear"]


def test_a_transparent_op_reading_its_groups_grid_needs_no_second_clip(models):
    """Relu -> Q -> Clip -> DQ -> MaxPool -> Q -> DQ -> Conv: the pooled values are already on
    the grid and inside its levels, so only the first quantizer clips."""
    model, layers = models["vgg"]
    plan = Plan(tuple(LayerPlan(layer.name, 4, 4) for layer in layers[:-1]))
    quantized = _quantized(model, plan, random_inputs(model, 16))
    consumers: dict[str, list[str]] = collections.defaultdict(list)
    for node in quantized.graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    pool = next(node for node in quantized.graph.node if node.op_type == "MaxPool")
    producers = {out: node for node in quantized.graph.node for out in node.output}
    assert producers[pool.input[0]].op_type == "DequantizeLinear"
    assert producers[producers[pool.input[0]].input[0]].op_type == "Clip"
    assert consumers[pool.output[0]] == ["QuantizeLinear"]
    (after_pool,) = (node for node in quantized.graph.node if pool.output[0] in node.input)
    assert consumers[after_pool.output[0]] == ["DequantizeLinear"]


def test_a_join_needed_on_two_grids_is_added_once_per_grid(models):
    """block1's output feeds block2.conv1 at 5 bits and the projection shortcut at the join's
    7: block1.add (and its Relu) run twice, each quantized from the exact sum."""
    model, layers = models["resnet"]
    bits = {"stem": 4, "block1.conv1": 3, "block1.conv2": 4, "block2.conv1": 5,
            "block2.conv2": 5, "block2.shortcut": 6, "classifier": 7}
    quantized = quantize(model, Plan(tuple(LayerPlan(n, b, b) for n, b in bits.items())), [random_inputs(model, 16)]).model
    adds = [node for node in quantized.graph.node if node.op_type == "Add" and node.name.startswith("block1.add")]
    assert len(adds) == 2 and adds[0].input == adds[1].input
    producers = {out: node for node in quantized.graph.node for out in node.output}
    relus = [node for node in quantized.graph.node if node.op_type == "Relu" and producers[node.input[0]] in adds]
    readers = [node for node in quantized.graph.node
               if node.op_type == "QuantizeLinear" and producers.get(node.input[0]) in relus]
    assert len(readers) == 2
    nodes = {node.name: node for node in quantized.graph.node}
    scales = set()
    for layer in ("block2.conv1", "block2.shortcut"):
        dequantize = producers[nodes[layer].input[0]]
        quantize_node = producers[dequantize.input[0]]
        while quantize_node.op_type != "QuantizeLinear":
            quantize_node = producers[quantize_node.input[0]]
        assert quantize_node in readers
        scales.add(quantize_node.input[1])
    assert len(scales) == 2


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_a_ptq_weight_grid_replaces_round_to_nearest_for_its_layer(models):
    model, layers = models["vgg"]
    x = random_inputs(model, 16, seed=1)
    first = layers[0]
    weight = _initializer(model, first.weight)
    integers, scale = quantize_weight(weight * 0.5, 4, first.weight_axis)
    bias = np.full(weight.shape[0], 0.25, np.float32)
    grid = WeightGrid(integers, scale * 2, bias)
    written = quantize(model, Plan.uniform(layers, 4), [x], weight_grids={first.name: grid}).model
    np.testing.assert_array_equal(_initializer(written, f"{first.name}.weight_w4_quantized"), integers)
    np.testing.assert_array_equal(_initializer(written, f"{first.name}.weight_w4_scale"), scale * 2)
    bias_q = _initializer(written, f"{first.name}.bias_i32_quantized")
    bias_scale = _initializer(written, f"{first.name}.bias_i32_scale")
    np.testing.assert_allclose(bias_q * bias_scale, bias, atol=float(bias_scale.max()))
    untouched = quantize(model, Plan.uniform(layers, 4), [x]).model
    second = f"{layers[1].name}.weight_w4_quantized"
    np.testing.assert_array_equal(_initializer(written, second), _initializer(untouched, second))


def test_a_weight_grid_off_the_k_bit_integers_is_refused(models):
    model, layers = models["vgg"]
    first = layers[0]
    weight = _initializer(model, first.weight)
    integers, scale = quantize_weight(weight, 8, first.weight_axis)
    with pytest.raises(PlanError, match=f"layer '{first.name}': weight grid is not on the 4-bit integers"):
        quantize(model, Plan.uniform(layers, 4), [random_inputs(model, 4)], weight_grids={first.name: WeightGrid(integers, scale)})
