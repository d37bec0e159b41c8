"""Compiling a graph: support checks before any work, folding, parameters, order, liveness."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import quanos_onnx.twin.module as twin_module
from quanos_onnx.errors import UnsupportedOpError
from quanos_onnx.twin import build_twin
from quanos_onnx.twin.graph import check_supported, compile_graph, prepare_model


def model_of(nodes, inputs, outputs, initializers=(), opset: int = 21, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def float_info(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_unknown_custom_op_is_named_with_node_domain_and_opset_before_any_work(monkeypatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("work started before the support check")

    monkeypatch.setattr(twin_module, "dynamic_batch", must_not_run)
    monkeypatch.setattr(twin_module, "compile_graph", must_not_run)
    model = model_of(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("FancyActivation", ["r"], ["y"], name="my_fancy_node", domain="com.example"),
        ],
        [float_info("x", [1, 4])],
        [float_info("y", [1, 4])],
        extra_opsets=[("com.example", 3)],
    )
    with pytest.raises(UnsupportedOpError) as failure:
        build_twin(model)
    message = str(failure.value)
    assert "FancyActivation" in message and "my_fancy_node" in message
    assert "com.example opset 3" in message and "relu" not in message


def test_every_unsupported_node_is_listed_including_old_opset_versions() -> None:
    model = model_of(
        [
            helper.make_node("Add", ["x", "x"], ["a"], name="old_add"),
            helper.make_node("MaxPool", ["a"], ["p", "indices"], kernel_shape=[2], name="pool_with_indices"),
        ],
        [float_info("x", [2, 3, 4])],
        [float_info("p", None)],
        opset=6,
    )
    with pytest.raises(UnsupportedOpError) as failure:
        check_supported(model)
    message = str(failure.value)
    assert "2 node(s)" in message
    assert "Add node 'old_add' (ai.onnx opset 6)" in message
    assert "pool_with_indices" in message and "Indices" in message


def test_constant_subgraphs_are_folded_and_parameters_are_not() -> None:
    """DQ of an integer weight and Shape of an initializer run once; the float path stays live."""
    model = model_of(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0, name="w_dq"),
            helper.make_node("Shape", ["bias"], ["bias_shape"], name="bias_shape"),
            helper.make_node("Reshape", ["bias", "bias_shape"], ["bias_again"], name="reshape_bias"),
            helper.make_node("Gemm", ["x", "w", "bias_again"], ["y"], transB=1, name="gemm"),
        ],
        [float_info("x", ["n", 3])],
        [float_info("y", None)],
        [
            numpy_helper.from_array(np.array([[1, -2, 3], [4, 5, -6]], np.int8), "w_q"),
            numpy_helper.from_array(np.array([0.5, 0.25], np.float32), "w_scale"),
            numpy_helper.from_array(np.array([0.1, -0.2], np.float32), "bias"),
        ],
    )
    compiled = compile_graph(prepare_model(model), trainable=True)
    assert [step.node_name for step in compiled.program.folded] == ["w_dq", "bias_shape"]
    assert [step.node_name for step in compiled.program.steps] == ["reshape_bias", "gemm"]
    assert set(compiled.parameters) == {"bias"} and compiled.trainable == {"bias"}
    assert "w_scale" in compiled.constants and "w" in compiled.constants


def test_only_weights_become_trainable() -> None:
    """Running statistics, clipping bounds and scalars stay fixed; scale/bias/weights train."""
    channels = 3
    stats = {name: numpy_helper.from_array(np.full(channels, value, np.float32), name) for name, value in
             [("gamma", 1.0), ("beta", 0.0), ("mean", 0.1), ("var", 0.9)]}
    model = model_of(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
            helper.make_node("Clip", ["b", "low", "high"], ["r"], name="relu6"),
            helper.make_node("Mul", ["r", "half"], ["y"], name="half"),
        ],
        [float_info("x", ["n", 2, 4, 4])],
        [float_info("y", None)],
        [
            numpy_helper.from_array(np.ones((channels, 2, 1, 1), np.float32), "w"),
            *stats.values(),
            numpy_helper.from_array(np.array(0.0, np.float32), "low"),
            numpy_helper.from_array(np.array(6.0, np.float32), "high"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        ],
    )
    twin = build_twin(model, trainable=True)
    trainable = {name for name, parameter in twin.parameters_by_name().items() if parameter.requires_grad}
    assert trainable == {"w", "gamma", "beta"}
    assert set(twin.parameters_by_name()) == {"w", "gamma", "beta", "mean", "var", "low", "high", "half"}
    assert not any(p.requires_grad for p in build_twin(model).parameters())


def test_initializers_shared_through_identity_keep_their_role() -> None:
    """The legacy exporter shares equal initializers via Identity nodes; a running statistic
    reached that way stays fixed and the twin still differentiates."""
    model = model_of(
        [
            helper.make_node("Identity", ["shared_zeros"], ["running_mean"], name="alias"),
            helper.make_node("BatchNormalization", ["x", "gamma", "beta", "running_mean", "var"], ["y"], name="bn"),
        ],
        [float_info("x", ["n", 3, 2, 2])],
        [float_info("y", None)],
        [
            numpy_helper.from_array(np.zeros(3, np.float32), "shared_zeros"),
            numpy_helper.from_array(np.full(3, 2.0, np.float32), "gamma"),
            numpy_helper.from_array(np.full(3, 0.5, np.float32), "beta"),
            numpy_helper.from_array(np.full(3, 4.0, np.float32), "var"),
        ],
    )
    twin = build_twin(model, trainable=True)
    assert {n for n, p in twin.parameters_by_name().items() if p.requires_grad} == {"gamma", "beta"}
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    twin(x).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0 / (4.0 + 1e-5) ** 0.5))


def test_nodes_out_of_order_are_sorted() -> None:
    model = model_of(
        [
            helper.make_node("Mul", ["r", "r"], ["y"], name="square"),
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
        ],
        [float_info("x", [2, 2])],
        [float_info("y", [2, 2])],
    )
    x = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    np.testing.assert_array_equal(build_twin(model)(x).numpy(), [[0.0, 4.0], [9.0, 0.0]])


def test_intermediates_are_released_after_their_last_use_but_outputs_are_kept() -> None:
    model = model_of(
        [
            helper.make_node("Relu", ["x"], ["a"], name="first"),
            helper.make_node("Neg", ["a"], ["b"], name="second"),
            helper.make_node("Add", ["a", "b"], ["y"], name="third"),
            helper.make_node("Abs", ["y"], ["z"], name="fourth"),
        ],
        [float_info("x", [2])],
        [float_info("y", [2]), float_info("z", [2])],
    )
    steps = compile_graph(prepare_model(model), trainable=False).program.steps
    assert [step.release for step in steps] == [(), (), ("a", "b"), ()]
