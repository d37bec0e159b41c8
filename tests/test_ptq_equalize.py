"""ptq/equalize.py: cross-layer equalization changes the float weights, never the function."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from quanos_onnx.model import Runner, normalize
from quanos_onnx.ptq.equalize import equalize

from tiny_models import GraphBuilder, random_inputs


def spread_channels(builder: GraphBuilder, name: str, seed: int) -> None:
    """Give a conv's output channels ranges that differ by 100x, as folded BatchNorms do."""
    rng = np.random.default_rng(seed)
    for index, tensor in enumerate(builder.initializers):
        if tensor.name in (f"{name}.w", f"{name}.b"):
            array = numpy_helper.to_array(tensor)
            factors = rng.uniform(0.05, 5.0, array.shape[0]).reshape(-1, *([1] * (array.ndim - 1)))
            builder.initializers[index] = numpy_helper.from_array((array * factors).astype(np.float32), tensor.name)


def mobile_chain(activation: str):
    """pointwise -> act -> depthwise -> act -> pointwise -> (linear) pointwise, MobileNet's shape."""
    builder = GraphBuilder(seed=1)

    def act(x: str) -> str:
        if activation == "Relu":
            return builder.relu(x)
        if activation == "Clip6":
            return builder.node("Clip", [x, builder.constant(builder._name("lo"), np.float32(0)), builder.constant(builder._name("hi"), np.float32(6))])
        return builder.node("LeakyRelu", [x], alpha=0.1)

    x = act(builder.conv("x", 3, 8, kernel=1, name="expand"))
    x = act(builder.conv(x, 8, 8, kernel=3, group=8, name="depthwise"))
    x = builder.conv(x, 8, 4, kernel=1, name="project")
    y = builder.conv(x, 4, 6, kernel=1, name="next")
    for name, seed in (("expand", 1), ("depthwise", 2), ("project", 3)):
        spread_channels(builder, name, seed)
    return normalize(builder.model(["N", 3, 6, 6], y))


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def out_ranges(weight: np.ndarray) -> np.ndarray:
    return np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)


def in_ranges(weight: np.ndarray, group: int) -> np.ndarray:
    if group > 1:
        return np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    return np.abs(weight).max(axis=(0, 2, 3))


@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu"])
def test_outputs_are_unchanged_and_channel_ranges_balanced(activation):
    model = mobile_chain(activation)
    equalized = equalize(model)
    x = random_inputs(model, 16)
    before, after = Runner(model).run(x)[0], Runner(equalized).run(x)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    old, new = weights(model), weights(equalized)
    assert not np.allclose(old["depthwise.w"], new["depthwise.w"])
    for first, second, group in (("expand", "depthwise", 8), ("depthwise", "project", 1), ("project", "next", 1)):
        np.testing.assert_allclose(out_ranges(new[f"{first}.w"]), in_ranges(new[f"{second}.w"], group), rtol=2e-2)
    spread = lambda w: out_ranges(w).max() / out_ranges(w).min()  # noqa: E731
    assert spread(new["depthwise.w"]) < spread(old["depthwise.w"]) / 5


def test_bounded_clip_pairs_are_left_alone():
    model = mobile_chain("Clip6")
    equalized = equalize(model)
    old, new = weights(model), weights(equalized)
    for name in ("expand.w", "depthwise.w"):
        np.testing.assert_array_equal(new[name], old[name])
    # the linear project -> next pair still balances
    assert not np.array_equal(new["next.w"], old["next.w"])
    x = random_inputs(model, 8)
    np.testing.assert_allclose(Runner(equalized).run(x)[0], Runner(model).run(x)[0], rtol=1e-4, atol=1e-5)


def test_a_tensor_read_twice_is_not_equalized():
    builder = GraphBuilder(seed=3)
    x = builder.relu(builder.conv("x", 3, 4, name="a"))
    y = builder.conv(x, 4, 4, name="b")
    model = normalize(builder.model(["N", 3, 5, 5], builder.node("Add", [y, x])))
    np.testing.assert_array_equal(weights(equalize(model))["a.w"], weights(model)["a.w"])
