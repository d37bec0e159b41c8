"""apply_plan: a compiled plan's grids on the torch model it was exported from."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from finetune_task import SHAPE, export
from quanos_onnx.errors import PlanError, UsageError
from quanos_onnx.finetune import apply_plan, planned_modules, remove_plan
from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner, normalize
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.quantize import quantize
from quanos_onnx.plan import LayerPlan, Plan


class BatchNormNet(nn.Module):
    """Conv+BN+ReLU, MaxPool, a conv inside a nested Sequential, Conv+BN by attribute, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()),
        )
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn3(self.conv3(self.features(x))))
        return self.fc(torch.flatten(x, 1))


def _network() -> nn.Module:
    torch.manual_seed(0)
    net = BatchNormNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _inputs(count: int = 64) -> torch.Tensor:
    return torch.rand(count, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=[False, True], ids=["legacy", "dynamo"])
def compiled(request):
    net = _network()
    raw = export(net, dynamo=request.param)
    model = normalize(raw, "batchnorm-net")
    layers = list_layers(model)
    bits = (3, 5, 4)
    plan = Plan(
        tuple(LayerPlan(layer.name, b, b) for layer, b in zip(layers, bits)) + (LayerPlan(layers[-1].name, None, None, keep_float=True),)
    )
    # apply_plan quantizes the module's weights round-to-nearest absmax, as finetune compiles
    plain = PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=False)
    quantized = quantize(model, plan, [_inputs().numpy()], ptq=plain)
    return net, raw, quantized, request.param


def test_planned_module_computes_the_compiled_model(compiled):
    net, raw, quantized, _ = compiled
    wrapped = apply_plan(copy.deepcopy(net), quantized.plan, onnx_model=raw, compiled=quantized.model)
    x = _inputs()
    with torch.no_grad():
        got = wrapped(x).numpy()
    expected = Runner(quantized.model).run(x.numpy())[0]
    with torch.no_grad():
        float_difference = np.abs(net(x).numpy() - expected).max()
    assert np.abs(got - expected).max() < 1e-5
    assert float_difference > 1e-3
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_every_layer_is_found_and_batchnorms_are_paired(compiled):
    net, raw, quantized, dynamo = compiled
    planned = planned_modules(apply_plan(copy.deepcopy(net), quantized.plan, onnx_model=raw, compiled=quantized.model))
    assert set(planned) == {"features.0", "features.4.0", "conv3", "fc"}
    assert [planned[p].weight_bits for p in ("features.0", "features.4.0", "conv3", "fc")] == [3, 5, 4, None]
    assert planned["features.0"].batch_norm == "features.1" and planned["conv3"].batch_norm == "bn3"
    assert planned["fc"].input_grid is not None
    if dynamo:
        assert all(plan.found_by.startswith("weight") for plan in planned.values())
    else:
        assert planned["conv3"].found_by == "legacy node name"
    from_compiled_alone = planned_modules(apply_plan(copy.deepcopy(net), compiled=quantized.model))
    assert from_compiled_alone == planned


def test_export_of_a_planned_module_is_the_float_graph_with_the_same_names(compiled):
    net, raw, quantized, dynamo = compiled
    wrapped = apply_plan(copy.deepcopy(net), quantized.plan, onnx_model=raw, compiled=quantized.model)
    again = export(wrapped, dynamo=dynamo)
    assert [node.name for node in again.graph.node] == [node.name for node in raw.graph.node]
    x = _inputs(8)
    assert np.allclose(Runner(normalize(again)).run(x.numpy())[0], net(x).detach().numpy(), atol=1e-5)


def test_training_reaches_the_weights_and_remove_plan_restores_the_module(compiled):
    net, raw, quantized, _ = compiled
    model = copy.deepcopy(net)
    keys = list(model.state_dict())
    apply_plan(model, quantized.plan, onnx_model=raw, compiled=quantized.model)
    assert list(model.state_dict()) == keys
    model(_inputs(16)).logsumexp(1).sum().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in model.parameters())
    remove_plan(model)
    assert type(model.conv3) is nn.Conv2d and not planned_modules(model)
    with torch.no_grad():
        assert torch.equal(model(_inputs(4)), net(_inputs(4)))


def test_without_the_compiled_model_inputs_use_observed_ranges():
    net = _network()
    raw = export(net)
    layers = list_layers(normalize(raw))
    plan = Plan.uniform(layers, 4)
    model = apply_plan(copy.deepcopy(net), plan, onnx_model=raw)
    with pytest.raises(UsageError, match="no input range observed"):
        model(_inputs(4))
    model.train()
    model(_inputs())
    model.eval()
    with torch.no_grad():
        quantized = model(_inputs(8))
        reference = net(_inputs(8))
    assert 1e-4 < float((quantized - reference).abs().max()) < 1.0


def test_mismatches_are_plan_errors():
    net = _network()
    raw = export(net)
    layers = list_layers(normalize(raw))
    missing = Plan((LayerPlan("/not/a/node/Conv", 4, 4),))
    with pytest.raises(PlanError, match="not a node"):
        apply_plan(copy.deepcopy(net), missing, onnx_model=raw)
    with pytest.raises(PlanError, match="no nn.Conv1d/2d/3d or nn.Linear"):
        apply_plan(nn.Sequential(nn.Conv2d(1, 4, 3)), Plan.uniform(layers, 4), onnx_model=raw)


class TwiceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(torch.flatten(x, 1))))


def test_a_module_called_twice_is_ambiguous():
    net = TwiceNet().eval()
    raw = export(net)
    plan = Plan.uniform(list_layers(normalize(raw)), 4, keep_output_float=False)
    assert len(plan.layers) == 2
    with pytest.raises(PlanError, match="both map to module 'fc'"):
        apply_plan(net, plan, onnx_model=raw)
