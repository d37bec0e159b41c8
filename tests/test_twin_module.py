"""OnnxTwin as users drive it: run/capture, parameters by name, write-back, training, batch handling."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.nn import functional as F

import twin_zoo
from quanos_onnx.errors import DataError, ModelError
from quanos_onnx.twin import build_twin

RNG = np.random.default_rng(11)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def two_layer_model(batch: int | str = "n") -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm -> (logits, probabilities); the hidden Relu is capturable."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
            helper.make_node("Relu", ["h"], ["hidden"], name="relu"),
            helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], transB=1, name="fc2"),
            helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "w1"),
            numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), "b1"),
            numpy_helper.from_array(RNG.standard_normal((3, 8)).astype(np.float32), "w2"),
            numpy_helper.from_array(RNG.standard_normal(3).astype(np.float32), "b2"),
            numpy_helper.from_array(np.array([2, 3], np.int64), "unused_shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_run_returns_outputs_and_captures_from_the_same_pass() -> None:
    model = two_layer_model()
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    twin = build_twin(model)
    outputs, captured = twin.run({"x": torch.from_numpy(x)}, capture=["hidden", "w1"])
    logits, probabilities, hidden = ort_run(with_output(model, "hidden"), {"x": x})
    np.testing.assert_allclose(outputs[0].numpy(), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[1].numpy(), probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(captured["hidden"].numpy(), hidden, rtol=1e-5, atol=1e-6)
    assert captured["w1"] is twin.parameters_by_name()["w1"]


def with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    extended = copy.deepcopy(model)
    extended.graph.output.append(helper.make_empty_tensor_value_info(name))
    return extended


def test_forward_returns_a_tuple_for_several_outputs_and_checks_its_arguments() -> None:
    twin = build_twin(two_layer_model())
    x = torch.randn(2, 4)
    logits, probabilities = twin(x)
    torch.testing.assert_close(probabilities, torch.softmax(logits, dim=-1))
    with pytest.raises(DataError, match="takes 1 input"):
        twin(x, x)
    with pytest.raises(DataError, match="missing \\['x'\\]"):
        twin.run({"image": x})
    with pytest.raises(ModelError, match="cannot capture 'nonexistent'"):
        twin.run({"x": x}, capture=["nonexistent"])


def test_write_back_puts_trained_floats_into_the_initializers_and_leaves_integers() -> None:
    model = two_layer_model()
    original = copy.deepcopy(model)
    twin = build_twin(model, trainable=True)
    assert set(twin.parameters_by_name()) == {"w1", "b1", "w2", "b2"}
    with torch.no_grad():
        twin.parameters_by_name()["w1"].add_(0.25)
        twin.parameters_by_name()["b2"].mul_(-1.0)
    updated = twin.write_back(model)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(ort_run(updated, {"x": x})[0], twin(torch.from_numpy(x))[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    before = {t.name: t for t in model.graph.initializer}
    after = {t.name: t for t in updated.graph.initializer}
    assert after["unused_shape"] == before["unused_shape"]
    np.testing.assert_allclose(numpy_helper.to_array(after["w1"]), numpy_helper.to_array(before["w1"]) + 0.25, rtol=1e-6)
    assert model == original


def test_write_back_refuses_a_model_without_the_twins_initializers() -> None:
    twin = build_twin(two_layer_model())
    other = two_layer_model()
    other.graph.initializer[0].name = "renamed"
    with pytest.raises(ModelError, match="no initializer 'w1'"):
        twin.write_back(other)


def test_batch_one_model_whose_batch_can_be_freed_runs_batched() -> None:
    """A Reshape baking batch 1 (as in mnist-8) is rewritten; the twin runs whole batches."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "flat"], ["f"], name="flatten"),
            helper.make_node("MatMul", ["f", "w"], ["y"], name="matmul"),
        ],
        "baked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array([1, 6], np.int64), "flat"),
         numpy_helper.from_array(RNG.standard_normal((6, 4)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    twin = build_twin(model)
    assert not twin.per_sample
    x = RNG.standard_normal((7, 2, 3)).astype(np.float32)
    expected = np.concatenate([ort_run(model, {"x": sample[None]})[0] for sample in x])
    np.testing.assert_allclose(twin(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_batch_one_model_that_mixes_samples_falls_back_to_per_sample_runs() -> None:
    """Summing over the batch axis cannot be rewritten safely; batches still go in and come out."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "x"], ["squared"], name="square"),
            helper.make_node("ReduceSum", ["squared", "axes"], ["y"], keepdims=1, name="sum_all"),
        ],
        "mixing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(np.array([0, 1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    twin = build_twin(model)
    assert twin.per_sample
    x = torch.from_numpy(RNG.standard_normal((5, 4)).astype(np.float32)).requires_grad_()
    out, captured = twin.run({"x": x}, capture=["squared"])
    expected = np.concatenate([ort_run(model, {"x": sample[None]})[0] for sample in x.detach().numpy()])
    np.testing.assert_allclose(out[0].detach().numpy(), expected, rtol=1e-5)
    assert captured["squared"].shape == (5, 4)
    out[0].sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_one_sgd_step_on_the_twin_matches_the_same_step_on_the_torch_model() -> None:
    """VGG exported with BatchNorm unfolded has exactly the torch model's parameters."""
    module = twin_zoo.make_model("vgg")
    twin = build_twin(twin_zoo.export(module, dynamo=False, opset=17), trainable=True)
    trainable = {name: p for name, p in twin.parameters_by_name().items() if p.requires_grad}
    assert set(trainable) == {name for name, _ in module.named_parameters()}
    x, labels = torch.randn(16, *twin_zoo.IMAGE_SHAPE), torch.randint(0, 10, (16,))
    losses = {}
    for name, network, parameters in [("torch", module, list(module.parameters())), ("twin", twin, list(trainable.values()))]:
        optimizer = torch.optim.SGD(parameters, lr=0.5)
        before = F.cross_entropy(network(x), labels)
        optimizer.zero_grad()
        before.backward()
        optimizer.step()
        with torch.no_grad():
            losses[name] = (before.item(), F.cross_entropy(network(x), labels).item())
    (torch_before, torch_after), (twin_before, twin_after) = losses["torch"], losses["twin"]
    assert abs(torch_after - torch_before) > 1e-3
    assert twin_before == pytest.approx(torch_before, rel=1e-5)
    assert (twin_after - twin_before) == pytest.approx(torch_after - torch_before, rel=1e-3)
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(trainable[name].detach(), parameter.detach(), rtol=1e-4, atol=1e-6)
