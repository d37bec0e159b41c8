"""The twin reproduces onnxruntime's fused integer kernels (QLinearConv, QGemm) bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.twin import build_twin, fusion
from quanos_onnx.twin.fusion import FusedKernels, PairSaturation, fused_kernels, pair_saturation
from quanos_onnx.twin.graph import compile_graph, prepare_model
from quanos_onnx.twin.module import OnnxTwin

RNG = np.random.default_rng(5)


def quantized_conv(activation_scale: float = 0.1, weight_scale_range: tuple[float, float] = (0.05, 0.15)) -> onnx.ModelProto:
    """Q -> DQ -> Conv(int8 weights, float bias) -> Relu -> Q -> DQ: ORT fuses it into QLinearConv."""
    weight_scale = RNG.uniform(*weight_scale_range, 8).astype(np.float32)
    initializers = [
        numpy_helper.from_array(RNG.integers(-7, 8, (8, 4, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(activation_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
        numpy_helper.from_array(np.array(0.2, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zp"),
        numpy_helper.from_array(RNG.uniform(-0.3, 0.3, 8).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=0, name="w_DQ"),
        helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("QuantizeLinear", ["relu", "y_scale", "y_zp"], ["y_q"], name="y_Q"),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"], name="y_DQ"),
    ]
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def onnxruntime_output(model: onnx.ModelProto, x: np.ndarray, *, optimized: bool) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fused_conv_with_float_bias_is_detected_and_matched_exactly() -> None:
    model = quantized_conv()
    x = RNG.uniform(0, 0.8, (64, 4, 6, 6)).astype(np.float32)
    saturating = frozenset({"conv"}) if pair_saturation().conv else frozenset()
    assert fused_kernels(model) == FusedKernels(frozenset({"conv"}), frozenset({"conv"}), saturating)
    np.testing.assert_array_equal(build_twin(model)(torch.from_numpy(x)).numpy(), onnxruntime_output(model, x, optimized=True))


def test_without_emulation_the_deployed_model_differs() -> None:
    """Why the emulation exists: plain graph semantics match only the unoptimized session."""
    model = quantized_conv()
    x = RNG.uniform(0, 0.8, (64, 4, 6, 6)).astype(np.float32)
    plain = OnnxTwin(compile_graph(prepare_model(model), trainable=False))
    got = plain(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, onnxruntime_output(model, x, optimized=False))
    assert not np.array_equal(got, onnxruntime_output(model, x, optimized=True))


def test_bias_gradient_passes_straight_through_the_rounding() -> None:
    twin = build_twin(quantized_conv(), trainable=True)
    x = torch.from_numpy(RNG.uniform(0, 0.8, (8, 4, 6, 6)).astype(np.float32))
    twin(x).sum().backward()
    bias = twin.parameters_by_name()["bias"]
    assert bias.grad is not None and torch.count_nonzero(bias.grad) > 0


def test_int32_bias_overflow_in_onnxruntime_is_reported(caplog) -> None:
    """With tiny scales round(bias / (s_x * s_w)) exceeds int32 and ORT stores INT_MIN."""
    model = quantized_conv(activation_scale=1e-5, weight_scale_range=(1e-5, 2e-5))
    with caplog.at_level(logging.WARNING, logger="quanos_onnx.twin.fusion"):
        assert fused_kernels(model).integer_bias == {"conv"}
    assert "'conv'" in caplog.text and "overflows" in caplog.text


def test_float_models_skip_the_onnxruntime_probe() -> None:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        "float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w"), numpy_helper.from_array(np.ones(3, np.float32), "b")],
    )
    assert fused_kernels(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])) == FusedKernels()


def integer_layer(
    op_type: str,
    channels: int = 48,
    depth: int = 32,
    *,
    group: int = 1,
    batch: int | None = None,
    kernel: tuple[int, ...] = (3, 3),
    geometry: dict | None = None,
) -> tuple[onnx.ModelProto, np.ndarray]:
    """DQ(uint8 input) and DQ(int8 per-channel weights) with an int32 bias, as the compiler writes
    them, feeding Conv (pads 1 unless `geometry` gives other attributes) or MatMul+Add, then
    Q(uint8): a large accumulator with many rounding ties."""
    weight_shape = (channels, depth // group, *kernel) if op_type == "Conv" else (depth * 9, channels)
    axis = 0 if op_type == "Conv" else 1
    weight_scale = RNG.uniform(0.001, 0.01, channels).astype(np.float32)
    input_scale = np.float32(0.0123)
    initializers = [
        numpy_helper.from_array(RNG.integers(-127, 128, weight_shape).astype(np.int8), "w_q"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(input_scale), "x_scale"),
        numpy_helper.from_array(np.array(3, np.uint8), "x_zp"),
        numpy_helper.from_array(np.array(0.0567, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(5, np.uint8), "y_zp"),
        numpy_helper.from_array(RNG.integers(-3000, 3000, channels).astype(np.int32), "b_q"),
        numpy_helper.from_array((input_scale * weight_scale).astype(np.float32), "b_scale"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=axis, name="w_DQ"),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b_dq"], axis=0, name="b_DQ"),
    ]
    if op_type == "Conv":
        attributes = geometry or {"pads": [1] * 2 * len(kernel)}
        nodes.append(helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["layer"], group=group, name="layer", **attributes))
        shape = ["n", depth, *[10] * len(kernel)]
        x = RNG.integers(0, 256, (batch or 96, depth, *[10] * len(kernel))).astype(np.uint8)
    else:
        nodes.append(helper.make_node("MatMul", ["x_dq", "w_dq"], ["product"], name="layer"))
        nodes.append(helper.make_node("Add", ["product", "b_dq"], ["layer"], name="bias"))
        shape = ["n", depth * 9]
        x = RNG.integers(0, 256, (batch or 4096, depth * 9)).astype(np.uint8)
    nodes += [
        helper.make_node("QuantizeLinear", ["layer", "y_scale", "y_zp"], ["y_q"], name="y_Q"),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"], name="y_DQ"),
    ]
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x_q", TensorProto.UINT8, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), x


@pytest.mark.parametrize("op_type", ["Conv", "MatMul"])
def test_integer_kernels_are_reproduced_bit_for_bit(op_type: str) -> None:
    """The float path misses onnxruntime's requantization on a few ties; the emulation does not."""
    model, x = integer_layer(op_type)
    expected = onnxruntime_output_named(model, {"x_q": x})
    assert fused_kernels(model).integer_layers == {"layer"}
    twin = build_twin(model)
    with torch.no_grad():
        got = twin.run({"x_q": torch.from_numpy(x)})[0][0].numpy()
        plain = OnnxTwin(compile_graph(prepare_model(model), trainable=False)).run({"x_q": torch.from_numpy(x)})[0][0].numpy()
    np.testing.assert_array_equal(got, expected)
    if op_type == "Conv":
        assert np.count_nonzero(plain != expected) > 0


def integer_reference(model: onnx.ModelProto, x: np.ndarray, *, saturating: bool) -> np.ndarray:
    """integer_layer's output computed in numpy as onnxruntime's integer kernel does: raw uint8
    inputs times int8 weights summed in int32, or with `saturating`, adjacent pairs along K summed
    in int16 with saturation first (VPMADDUBSW). A conv's K is (kernel position, channel) per
    group; the depthwise kernel (one input and one output channel per group) is always exact."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight, zero_point = values["w_q"].astype(np.int64), int(values["x_zp"])
    raw = x.astype(np.int64)
    if weight.ndim == 4:
        conv = next(node for node in model.graph.node if node.op_type == "Conv")
        group = next(helper.get_attribute_value(a) for a in conv.attribute if a.name == "group")
        saturating = saturating and not (weight.shape[1] == 1 and weight.shape[0] == group)
        padded = np.pad(raw, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zero_point)
        height, width = raw.shape[2:]
        patches = np.stack([padded[:, :, i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=1)
        per_group, outputs = weight.shape[1], weight.shape[0] // group
        accumulators = []
        for index in range(group):
            columns = patches[:, :, index * per_group : (index + 1) * per_group].reshape(len(raw), 9 * per_group, -1)
            rows = weight[index * outputs : (index + 1) * outputs].transpose(0, 2, 3, 1).reshape(outputs, -1)
            accumulators.append(_sum_products(columns, rows, saturating) - zero_point * rows.sum(1)[None, :, None])
        accumulator = np.concatenate(accumulators, axis=1).reshape(len(raw), -1, height, width)
        channel_shape = (1, -1, 1, 1)
    else:
        accumulator = _sum_products(raw[:, :, None], weight.T, saturating)[:, :, 0] - zero_point * weight.sum(0)
        channel_shape = (1, -1)
    return requantized_output(values, accumulator, channel_shape)


def requantized_output(values: dict[str, np.ndarray], accumulator: np.ndarray, channel_shape: tuple[int, ...]) -> np.ndarray:
    """integer_layer's output from its accumulator before the bias: add the int32 bias,
    requantize to uint8 with the float32 multiplier, dequantize."""
    accumulator = accumulator + values["b_q"].reshape(channel_shape)
    multiplier = (values["x_scale"] * values["w_scale"]).astype(np.float32) / values["y_scale"]
    requantized = np.round(accumulator.astype(np.float32) * multiplier.reshape(channel_shape)) + int(values["y_zp"])
    return ((np.clip(requantized, 0, 255) - int(values["y_zp"])) * values["y_scale"]).astype(np.float32)


def _sum_products(columns: np.ndarray, rows: np.ndarray, saturating: bool) -> np.ndarray:
    """(N, K, L) inputs times (O, K) weights -> (N, O, L), pairs (2j, 2j + 1) clamped to int16 if `saturating`."""
    if not saturating:
        return np.einsum("nkl,ok->nol", columns, rows)
    if columns.shape[1] % 2:
        columns, rows = np.pad(columns, ((0, 0), (0, 1), (0, 0))), np.pad(rows, ((0, 0), (0, 1)))
    pairs = [columns[:, 0::2] * row[None, 0::2, None] + columns[:, 1::2] * row[None, 1::2, None] for row in rows]
    sums = [np.clip(pair, -32768, 32767).sum(1) for pair in pairs]
    return np.stack(sums, axis=1)


@pytest.mark.parametrize("op_type", ["Conv", "MatMul"])
def test_the_probe_says_what_onnxruntime_computes(op_type: str) -> None:
    """Against an independent reference: onnxruntime's fused kernel saturates pairs exactly when the probe says so."""
    model, x = integer_layer(op_type, 16, 12, batch=64)
    probe = pair_saturation()
    saturating = probe.conv if op_type == "Conv" else probe.gemm
    deployed = onnxruntime_output_named(model, {"x_q": x})
    exact, saturated = (integer_reference(model, x, saturating=mode) for mode in (False, True))
    assert not np.array_equal(exact, saturated)
    np.testing.assert_array_equal(deployed, saturated if saturating else exact)


@pytest.mark.parametrize("saturating", [False, True], ids=["exact-cpu", "saturating-cpu"])
@pytest.mark.parametrize(("op_type", "group"), [("Conv", 1), ("Conv", 4), ("Conv", 12), ("MatMul", 1)])
def test_the_emulation_follows_the_probe_on_either_kind_of_cpu(
    monkeypatch, op_type: str, group: int, saturating: bool
) -> None:
    """Whatever this machine's CPU does, the twin computes what the probe reports (depthwise convs are exact)."""
    monkeypatch.setattr(fusion, "pair_saturation", lambda: PairSaturation(conv=saturating, gemm=saturating))
    model, x = integer_layer(op_type, 12, 12, group=group, batch=16)
    depthwise = group == 12
    expected = frozenset({"layer"}) if saturating and not depthwise else frozenset()
    assert fused_kernels(model).saturating_pairs == expected
    with torch.no_grad():
        got = build_twin(model).run({"x_q": torch.from_numpy(x)})[0][0].numpy()
    np.testing.assert_array_equal(got, integer_reference(model, x, saturating=saturating))


@pytest.mark.parametrize(("op_type", "group"), [("Conv", 1), ("Conv", 4), ("Conv", 12), ("MatMul", 1)])
def test_saturation_change_turns_the_exact_accumulator_into_the_saturating_kernels(
    monkeypatch, op_type: str, group: int
) -> None:
    """For a layer run outside a QDQ graph (the allocator's gradient score): the exact integer
    accumulator plus saturation_change is what a saturating kernel accumulates; None for the
    depthwise kernel, which is exact, and on CPUs whose kernels are exact."""
    model, x = integer_layer(op_type, 12, 12, group=group, batch=16)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    step = next(s for s in OnnxTwin(compile_graph(prepare_model(model), trainable=False)).program.steps if s.node_name == "layer")
    zero_point = int(values["x_zp"])
    centered = torch.from_numpy(x.astype(np.float64) - zero_point)
    weight = torch.from_numpy(values["w_q"].astype(np.float64))
    exact = step.function(step.attributes, [centered, weight])[0]
    monkeypatch.setattr(fusion, "pair_saturation", lambda: PairSaturation(conv=False, gemm=False))
    assert fusion.saturation_change(step, centered, zero_point, weight, exact) is None
    monkeypatch.setattr(fusion, "pair_saturation", lambda: PairSaturation(conv=True, gemm=True))
    change = fusion.saturation_change(step, centered, zero_point, weight, exact)
    if group == 12:
        assert change is None
        return
    channel_shape = (1, -1, 1, 1) if op_type == "Conv" else (1, -1)
    got = requantized_output(values, (exact + change).numpy(), channel_shape)
    np.testing.assert_array_equal(got, integer_reference(model, x, saturating=True))
    assert not np.array_equal(got, integer_reference(model, x, saturating=False))


@pytest.mark.parametrize(
    ("kernel", "geometry"),
    [
        ((3, 3), {"strides": [2, 2], "pads": [0, 1, 2, 1]}),
        ((3, 2), {"dilations": [2, 1], "pads": [2, 0, 2, 1]}),
        ((2, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 1]}),
        ((5,), {"strides": [2], "pads": [2, 1]}),
    ],
    ids=["strided-asymmetric", "dilated", "same-upper", "conv1d"],
)
def test_conv_geometry_is_reproduced_bit_for_bit(kernel: tuple[int, ...], geometry: dict) -> None:
    """Strides, dilations, asymmetric and automatic padding, 1-D: the pairs are gathered where the conv reads."""
    model, x = integer_layer("Conv", 16, 10, batch=32, kernel=kernel, geometry=geometry)
    assert fused_kernels(model).integer_layers == {"layer"}
    with torch.no_grad():
        got = build_twin(model).run({"x_q": torch.from_numpy(x)})[0][0].numpy()
    np.testing.assert_array_equal(got, onnxruntime_output_named(model, {"x_q": x}))


@pytest.mark.parametrize(
    ("requantized", "saturating"),
    [([127, 127, 127], False), ([64, 64, 127], True), ([64, 127, 127], None)],
    ids=["exact", "pairs", "unknown"],
)
def test_the_probe_reads_onnxruntime_answer(monkeypatch, caplog, requantized: list[int], saturating: bool | None) -> None:
    """Probe outputs: exact sums, the pairs the twin emulates, or another pattern (warned about, treated as exact)."""

    class Answer:
        def run(self, outputs, feeds):
            return [np.array(requantized, np.uint8)]

    monkeypatch.setattr(fusion, "make_session", lambda model: Answer())
    with caplog.at_level(logging.WARNING, logger="quanos_onnx.twin.fusion"):
        assert fusion._probe_pairs("Conv") is bool(saturating)
    assert ("in a way the twin does not know" in caplog.text) == (saturating is None)


def test_the_depthwise_kernel_is_exact_on_this_cpu() -> None:
    model, x = integer_layer("Conv", 12, 12, group=12, batch=16)
    assert fused_kernels(model).integer_layers == {"layer"} and not fused_kernels(model).saturating_pairs
    with torch.no_grad():
        got = build_twin(model).run({"x_q": torch.from_numpy(x)})[0][0].numpy()
    np.testing.assert_array_equal(got, onnxruntime_output_named(model, {"x_q": x}))


def test_emulated_layer_keeps_the_float_paths_gradient() -> None:
    model = quantized_conv()
    x = RNG.uniform(0, 0.8, (16, 4, 6, 6)).astype(np.float32)
    gradients = []
    for twin in (build_twin(model), OnnxTwin(compile_graph(prepare_model(model), trainable=False))):
        inputs = torch.from_numpy(x).requires_grad_()
        (twin(inputs) * torch.linspace(-1, 1, 8).reshape(1, 8, 1, 1)).sum().backward()
        gradients.append(inputs.grad.flatten())
    assert torch.nn.functional.cosine_similarity(*gradients, dim=0) > 0.99


def onnxruntime_output_named(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]
