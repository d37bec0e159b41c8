"""ptq/reconstruct.py: learned rounding stays on the k-bit grid, lowers the reconstructed
outputs' error against round-to-nearest, is deterministic per seed, and reconstructs
residual blocks (projection shortcuts included) together."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.errors import UsageError
from quanos_onnx.layers import list_layers
from quanos_onnx.model import make_session, normalize, with_outputs
from quanos_onnx.plan import LayerPlan, Plan
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.ptq.reconstruct import (
    DEFAULT_ITERATIONS,
    SoftRounding,
    reconstruct_weights,
    reconstruction_units,
    rounded_weights,
)
from quanos_onnx.quantize import quantize

from tiny_models import mobilenet_style, random_inputs, resnet_style, vgg_chain

ITERATIONS = 150
ROUND_TO_NEAREST = PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=False)
"""The baseline these tests measure learned rounding against: min/max ranges and absmax
scales (PtqSettings' defaults clip the weights for the output error already)."""


def _setup(model: onnx.ModelProto, bits: dict[str, tuple[int, int]] | int, samples: int = 64):
    model = normalize(model)
    layers = list_layers(model)
    chosen = bits if isinstance(bits, dict) else {layer.name: (bits, bits) for layer in layers}
    plan = Plan(tuple(LayerPlan(layer.name, *chosen[layer.name]) for layer in layers))
    calibration = [random_inputs(model, samples, seed=1)]
    return model, layers, plan, calibration, quantize(model, plan, calibration, ptq=ROUND_TO_NEAREST)


def _outputs(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    session = make_session(with_outputs(model, names))
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: x})))


def _error(model: onnx.ModelProto, reference: onnx.ModelProto, name: str, x: np.ndarray) -> float:
    return float(np.mean((_outputs(model, [name], x)[name] - _outputs(reference, [name], x)[name]) ** 2))


@pytest.mark.parametrize("method", ["adaround", "brecq"])
def test_grids_are_k_bit_integers_that_quantize_writes(method: str) -> None:
    mixed = {"stem": (3, 4), "block1.conv1": (2, 4), "block1.conv2": (4, 4), "block2.conv1": (3, 3),
             "block2.conv2": (2, 3), "block2.shortcut": (4, 3), "classifier": (5, 6)}
    model, layers, plan, calibration, nearest = _setup(resnet_style(), mixed)
    grids = reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                                method=method, iterations=20, seed=0)
    assert set(grids) == set(mixed)
    aligned = nearest.plan.by_name()
    for name, grid in grids.items():
        limit = 2 ** (aligned[name].weight_bits - 1) - 1
        assert np.issubdtype(grid.integers.dtype, np.integer)
        assert np.abs(grid.integers).max() <= limit
    written = quantize(model, plan, calibration, weight_grids=grids, ptq=ROUND_TO_NEAREST).model
    onnx.checker.check_model(written)
    logits = _outputs(written, [written.graph.output[0].name], random_inputs(model, 8, seed=2))
    assert np.all(np.isfinite(next(iter(logits.values()))))


def test_adaround_lowers_the_layer_output_errors() -> None:
    model, layers, plan, calibration, nearest = _setup(vgg_chain(), 3)
    grids = reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                                method="adaround", iterations=ITERATIONS, seed=0)
    learned = quantize(model, plan, calibration, weight_grids=grids, ptq=ROUND_TO_NEAREST).model
    x = calibration[0]
    learned_errors = [_error(learned, model, layer.block_output, x) for layer in layers]
    nearest_errors = [_error(nearest.model, model, layer.block_output, x) for layer in layers]
    assert learned_errors[0] < nearest_errors[0]
    assert sum(learned_errors) < 0.97 * sum(nearest_errors)


def test_a_unit_whose_learned_rounding_is_worse_keeps_round_to_nearest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every weight rounded the other way than the optimization says: each unit's error
    rises, so every layer keeps its round-to-nearest integers."""
    model, layers, plan, calibration, nearest = _setup(vgg_chain(), 3)

    def the_other_way(self: SoftRounding) -> np.ndarray:
        rounded = self.floor + (self.logits.detach() < 0).float()
        return rounded.clamp(-self.limit, self.limit).numpy().astype(np.int32)

    monkeypatch.setattr(SoftRounding, "integers", the_other_way)
    grids = reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                                method="adaround", iterations=5, seed=0)
    weights = rounded_weights(model, nearest.model, layers, nearest.plan)
    assert set(grids) == {layer.name for layer in layers}
    for name, grid in grids.items():
        np.testing.assert_array_equal(grid.integers, weights[name].integers)


def test_a_block_keeps_each_layers_better_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer of a block rounded the other way than its optimization says: that layer
    keeps round-to-nearest, the block's other layers their learned rounding."""
    model, layers, plan, calibration, nearest = _setup(resnet_style(), 3)
    spoiled = "block2.shortcut"
    original_init, original_integers = SoftRounding.__init__, SoftRounding.integers

    def remembering(self: SoftRounding, weight) -> None:
        original_init(self, weight)
        self.layer = weight.layer

    def spoiled_integers(self: SoftRounding) -> np.ndarray:
        if self.layer != spoiled:
            return original_integers(self)
        rounded = self.floor + (self.logits.detach() < 0).float()
        return rounded.clamp(-self.limit, self.limit).numpy().astype(np.int32)

    monkeypatch.setattr(SoftRounding, "__init__", remembering)
    monkeypatch.setattr(SoftRounding, "integers", spoiled_integers)
    grids = reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                                method="brecq", iterations=ITERATIONS, seed=0)
    weights = rounded_weights(model, nearest.model, layers, nearest.plan)
    np.testing.assert_array_equal(grids[spoiled].integers, weights[spoiled].integers)
    for other in ("block2.conv1", "block2.conv2"):
        assert not np.array_equal(grids[other].integers, weights[other].integers)


def test_brecq_reconstructs_residual_blocks_and_lowers_their_output_error() -> None:
    model, layers, plan, calibration, nearest = _setup(resnet_style(), 3)
    units = reconstruction_units(model, layers, nearest.plan, method="brecq")
    assert [unit.layers for unit in units] == [
        ("stem",), ("block1.conv1", "block1.conv2"), ("block2.conv1", "block2.conv2", "block2.shortcut"), ("classifier",)
    ]
    assert units[1].input == units[0].output and units[2].input == units[1].output
    grids = reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                                method="brecq", iterations=ITERATIONS, seed=0)
    learned = quantize(model, plan, calibration, weight_grids=grids, ptq=ROUND_TO_NEAREST).model
    x = calibration[0]
    for unit in units[1:3]:
        assert _error(learned, model, unit.output, x) < _error(nearest.model, model, unit.output, x)


def test_brecq_reconstructs_an_inverted_residual_block_without_shortcut_as_one_unit() -> None:
    """BRECQ's blocks of a MobileNet: expand, depthwise and linear projection together,
    with or without the shortcut; the first and last layers alone. A chain of layers that
    all end in an activation (VGG) is not a block."""
    model, layers, plan, calibration, nearest = _setup(mobilenet_style(), 4)
    units = reconstruction_units(model, layers, nearest.plan, method="brecq")
    assert [(unit.label.split(" ")[0], unit.layers) for unit in units] == [
        ("layer", ("stem",)),
        ("chain", ("a.expand", "a.depthwise", "a.project")),
        ("block", ("b.expand", "b.depthwise", "b.project")),
        ("layer", ("classifier",)),
    ]
    assert units[1].input == units[0].output and units[2].input == units[1].output
    grids = reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                                method="brecq", iterations=ITERATIONS, seed=0)
    learned = quantize(model, plan, calibration, weight_grids=grids, ptq=ROUND_TO_NEAREST).model
    x = calibration[0]
    assert _error(learned, model, units[1].output, x) < _error(nearest.model, model, units[1].output, x)
    vgg = normalize(vgg_chain())
    vgg_layers = list_layers(vgg)
    vgg_units = reconstruction_units(vgg, vgg_layers, Plan.uniform(vgg_layers, 4), method="brecq")
    assert all(len(unit.layers) == 1 for unit in vgg_units)


def test_same_seed_same_rounding_and_kept_float_layers_are_left_alone() -> None:
    bits = {"stem": (4, 4), "block1.conv1": (3, 4), "block1.conv2": (3, 4), "block2.conv1": (3, 4),
            "block2.conv2": (3, 4), "block2.shortcut": (3, 4)}
    model = normalize(resnet_style())
    layers = list_layers(model)
    plan = Plan(tuple(LayerPlan(n, *bits[n]) if n in bits else LayerPlan(n, None, None, keep_float=True)
                      for n in (layer.name for layer in layers)))
    calibration = [random_inputs(model, 48, seed=3)]
    nearest = quantize(model, plan, calibration, ptq=ROUND_TO_NEAREST)
    runs = [
        reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                            method="brecq", iterations=40, seed=7)
        for _ in range(2)
    ]
    assert set(runs[0]) == set(bits)
    for name in bits:
        assert np.array_equal(runs[0][name].integers, runs[1][name].integers)
        assert np.array_equal(runs[0][name].scale, runs[1][name].scale)


def test_progress_is_reported_per_unit_with_the_iteration_count() -> None:
    from contextlib import contextmanager

    model, layers, plan, calibration, nearest = _setup(vgg_chain(), 4, samples=16)
    reported: dict[str, int] = {}
    totals: dict[str, int] = {}

    @contextmanager
    def progress(label: str, total: int):
        totals[label] = total
        reported[label] = 0

        def advance(done: int) -> None:
            reported[label] += done

        yield advance

    reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                        method="adaround", iterations=5, seed=0, progress=progress)
    assert list(totals) == [f"layer {layer.name}" for layer in layers]
    assert set(totals.values()) == {5} and reported == totals


def test_unknown_method_and_no_iterations_are_usage_errors() -> None:
    model, layers, plan, calibration, nearest = _setup(vgg_chain(), 4, samples=8)
    with pytest.raises(UsageError, match="rounding method 'qdrop'"):
        reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration, method="qdrop", iterations=5, seed=0)
    with pytest.raises(UsageError, match="at least 1"):
        reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration, method="brecq", iterations=0, seed=0)


def _tied_inputs_gemm(fractions: tuple[float, ...], step: float) -> onnx.ModelProto:
    """y = x W^T for one output: a 7-step weight on an input of its own fixes the 4-bit
    scale at `step`, and weights of `fractions` steps read the same input column."""
    weight = np.array([[7.0, *fractions]], dtype=np.float32) * step
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)],
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_default_iterations_flip_weights_far_from_a_half() -> None:
    """Three weights of 0.2-0.25 steps read one input: nearest rounds all three down and
    loses 0.67 steps of it, while rounding one up loses 0.33. Finding that needs a
    rounding variable to travel from a fractional part of about 0.2 across a half within
    the default iterations (the learning rate follows the iteration count)."""
    step = 0.05
    model = _tied_inputs_gemm((0.2, 0.22, 0.25), step)
    layers = list_layers(model)
    plan = Plan((LayerPlan("fc", 4, 8),))
    rng = np.random.default_rng(0)
    shared, own = rng.uniform(0, 1, (256, 1)), rng.uniform(0, 1, (256, 1))
    calibration = [np.concatenate([own, shared, shared, shared], axis=1).astype(np.float32)]
    nearest = quantize(model, plan, calibration, ptq=ROUND_TO_NEAREST)
    grids = reconstruct_weights(model, nearest.model, layers, nearest.plan, calibration,
                                method="adaround", iterations=DEFAULT_ITERATIONS, seed=0)
    integers = grids["fc"].integers.reshape(-1)
    assert integers[0] == 7
    assert int(integers[1:].sum()) == 1
    learned = quantize(model, plan, calibration, weight_grids=grids, ptq=ROUND_TO_NEAREST).model
    assert _error(learned, model, "y", calibration[0]) < 0.5 * _error(nearest.model, model, "y", calibration[0])
