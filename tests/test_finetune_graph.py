"""The fake-quant training graph and the float model recovered from a compiled one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from finetune_task import trained_task
from quanos_onnx.finetune import compiled_plan, float_model_of, training_graph
from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.quantize import quantize
from quanos_onnx.plan import LayerPlan, Plan
from quanos_onnx.twin import build_twin


@pytest.fixture(scope="module")
def compiled():
    model, train, _ = trained_task()
    layers = list_layers(model)
    bits = {layers[0].name: 3, layers[1].name: 5, layers[2].name: 12}
    plan = Plan(tuple(LayerPlan(layer.name, bits[layer.name], bits[layer.name]) for layer in layers))
    # finetune compiles with round-to-nearest absmax weights and no bias correction
    # (finetune/train.py plain_ptq): the training graph rebuilds exactly those grids each step.
    plain = PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=False)
    return model, layers, quantize(model, plan, [train.x[:256]], ptq=plain), train


def _twin_logits(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_twin(proto)(torch.from_numpy(x)).numpy()


def test_training_graph_computes_the_compiled_model(compiled):
    model, layers, quantized, train = compiled
    graph = training_graph(quantized.model, model, layers, quantized.plan)
    expected = Runner(quantized.model).run(train.x[:200])[0]
    got = _twin_logits(graph, np.array(train.x[:200]))
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 1e-4 * scale
    assert (got.argmax(1) == expected.argmax(1)).all()
    in_onnxruntime = Runner(graph).run(train.x[:200])[0]
    assert np.abs(in_onnxruntime - expected).max() < 1e-4 * scale


def test_training_graph_trains_the_float_weights_under_their_names(compiled):
    model, layers, quantized, train = compiled
    twin = build_twin(training_graph(quantized.model, model, layers, quantized.plan))
    parameters = twin.parameters_by_name()
    float_weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for layer in layers:
        assert np.array_equal(parameters[layer.weight].detach().numpy(), float_weights[layer.weight])
        parameters[layer.weight].requires_grad_(True)
        parameters[layer.bias].requires_grad_(True)
    loss = twin(torch.from_numpy(np.array(train.x[:32]))).logsumexp(1).sum()
    loss.backward()
    for layer in layers:
        assert parameters[layer.weight].grad.abs().sum() > 0
        assert parameters[layer.bias].grad.abs().sum() > 0


def test_weight_grid_follows_the_weights(compiled):
    model, layers, quantized, train = compiled
    twin = build_twin(training_graph(quantized.model, model, layers, quantized.plan))
    first = layers[0]
    with torch.no_grad():
        twin.parameters_by_name()[first.weight].mul_(2.0)
    _, captured = twin.run({"x": torch.from_numpy(np.array(train.x[:4]))}, capture=[f"{first.name}.weight_grid_dequantized"])
    dequantized = captured[f"{first.name}.weight_grid_dequantized"].numpy()
    float_weight = 2.0 * next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == first.weight)
    limit = 2 ** (3 - 1) - 1
    scale = np.abs(float_weight).reshape(len(float_weight), -1).max(1) / limit
    expected = np.clip(np.round(float_weight / scale[:, None, None, None]), -limit, limit) * scale[:, None, None, None]
    assert np.allclose(dequantized, expected, atol=1e-6)


def test_float_model_of_a_compiled_model_recompiles_to_the_same_integers(compiled):
    model, layers, quantized, train = compiled
    assert compiled_plan(model) is None
    stored = compiled_plan(quantized.model)
    assert stored is not None and stored.by_name() == quantized.plan.by_name()
    recovered = float_model_of(quantized.model)
    assert not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in recovered.graph.node)
    assert [(layer.name, layer.weight) for layer in list_layers(recovered)] == [(layer.name, layer.weight) for layer in layers]
    again = quantize(recovered, stored, [train.x[:256]])
    integers = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.model.graph.initializer if t.name.endswith("weight_w3_quantized")}
    assert integers
    for name, values in integers.items():
        assert np.array_equal(values, next(onnx.numpy_helper.to_array(t) for t in again.model.graph.initializer if t.name == name))
    x = train.x[:200]
    assert (Runner(again.model).run(x)[0].argmax(1) == Runner(quantized.model).run(x)[0].argmax(1)).mean() > 0.98
