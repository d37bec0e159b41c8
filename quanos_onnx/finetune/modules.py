"""apply_plan: a plan's grids on a user's own torch model, for training in their own loop.

Workflow: export the model with torch.onnx (legacy or dynamo exporter), `quanos-compile`
the export, then `apply_plan(model, plan, onnx_model=export, compiled=compiled)`, train,
and export again: the planned modules export as the plain float layers (fake quantization
is skipped during torch.onnx export), so the new export has the same node names and
`quanos-compile --plan plan.json` re-applies the same bits to the trained weights.

Which module a plan layer is: plan layers are named after the export's nodes. For each one
the node is looked up in the export and its module path taken from, in order,
1. the weight initializer's name ('layer1.0.conv1.weight' -> layer1.0.conv1; both exporters
   keep parameter names unless they fold a BatchNorm into the weight),
2. the dynamo exporter's node metadata 'pkg.torch.onnx.name_scopes' (innermost scope first),
3. the legacy exporter's node name ('/layer1/layer1.0/conv1/Conv' -> layer1.0.conv1).
The first candidate that is an nn.Conv1d/2d/3d or nn.Linear of the model (of the node's
kind) is taken. A layer with no such module, or two layers on one module, is a PlanError.

What a planned module computes, in eval and train mode alike:
- weight: symmetric per-output-channel fake quantization at the layer's weight bits, the
  scale re-derived from the current weight (fakequant.fake_quant_weight). A BatchNorm that
  follows a conv stays a module of its own: per-channel weight quantization commutes with
  its per-channel scale, so the compiled model (which folds the BatchNorm into the conv
  first) has the same weight grid;
- input: the activation grid of the compiled model for that layer's input when `compiled`
  is given (its scales, zero points and clip levels; exactly what onnxruntime runs; a grid
  the compiler placed before a MaxPool, Flatten or Reshape is the same grid after it), else a
  grid at the layer's activation bits over the running min/max of the inputs seen in train
  mode;
- bias: on the int32 grid of input scale x weight scale when the compiled model has an
  int32 bias there (or, without `compiled`, whenever the input is quantized). With a
  BatchNorm after the conv that grid belongs to the folded bias; the conv then adds the
  bias that, through the BatchNorm's running statistics, gives the folded bias on its
  grid, which is exactly what the compiled model adds. Which BatchNorm reads a conv's
  output is found by running the model once (eval mode, no gradients) on `example_input`,
  by default zeros shaped like the ONNX model's input.
Gradients are straight-through. Quantizers the compiled model puts on tensors no Conv or
Linear reads directly (operands of residual Adds and Concats) have no module to live in;
for models with such joins the wrapped module approximates the compiled one.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import PlanError, UsageError
from ..passes.points import TRANSPARENT_OPS
from ..passes.qdq import WEIGHT_SOURCE_KEY
from ..plan import Plan, read_plan
from .fakequant import ActivationGrid, fake_quant_bias, fake_quant_weight
from .graph import compiled_plan

log = logging.getLogger(__name__)

ModelSource = onnx.ModelProto | str | os.PathLike[str]

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_PASS_THROUGH_OPS = frozenset({"Transpose", "Identity", "Cast", "Reshape"})
_LAYER_KINDS: Mapping[str, tuple[type[nn.Module], ...]] = {
    "Conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "Gemm": (nn.Linear,),
    "MatMul": (nn.Linear,),
}


@dataclass(frozen=True)
class ModulePlan:
    """What apply_plan put on one module."""

    layer: str
    module: str
    found_by: str
    weight_bits: int | None
    act_bits: int | None
    input_grid: ActivationGrid | None
    quantize_bias: bool
    batch_norm: str | None = None
    """The BatchNorm module after this conv whose folded bias the bias grid is for."""


class _Planned:
    """Mixin of the planned module classes: quantized forward, float export."""

    quanos_plan: ModulePlan

    def quantized_input(self, values: torch.Tensor) -> torch.Tensor:
        plan = self.quanos_plan
        if plan.input_grid is not None:
            return plan.input_grid(values)
        if plan.act_bits is None:
            return values
        low, high = self.quanos_input_low, self.quanos_input_high  # type: ignore[attr-defined]
        if self.training:  # type: ignore[attr-defined]
            with torch.no_grad():
                low.copy_(torch.minimum(low, values.detach().min()))
                high.copy_(torch.maximum(high, values.detach().max()))
        if not bool(low <= high):
            raise UsageError(
                f"module '{plan.module}' (layer '{plan.layer}'): no input range observed yet",
                hint="run training batches in train mode first, or pass compiled= to apply_plan",
            )
        return self.observed_grid()(values)

    def observed_grid(self) -> ActivationGrid:
        low, high = self.quanos_input_low, self.quanos_input_high  # type: ignore[attr-defined]
        return ActivationGrid.calibrated(self.quanos_plan.act_bits or 0, float(low), float(high))

    def quantized_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        plan = self.quanos_plan
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        if plan.weight_bits is None:
            return weight, bias
        quantized = fake_quant_weight(weight, plan.weight_bits, 0)
        grid = plan.input_grid if plan.input_grid is not None else self.observed_grid() if plan.act_bits else None
        if grid is None or not plan.quantize_bias:
            return quantized, bias
        norm = self.__dict__.get("quanos_batch_norm")
        if norm is None:
            if bias is None:
                return quantized, bias
            return quantized, fake_quant_bias(bias, weight, plan.weight_bits, 0, grid.scale)
        return quantized, _bias_through(norm, bias, weight, plan.weight_bits, grid.scale)


def _bias_through(
    norm: nn.modules.batchnorm._BatchNorm, bias: torch.Tensor | None, weight: torch.Tensor, bits: int, input_scale: float
) -> torch.Tensor:
    """The conv bias that makes conv -> BatchNorm add the folded bias on its int32 grid.

    Folding (running statistics): w' = w * g, b' = (b - mean) * g + beta with
    g = gamma / sqrt(var + eps). The compiled model adds round(b' / (s_x * s_w')) on that
    grid; inverting the fold on that value gives the bias to add before the BatchNorm (a
    channel with g = 0 keeps its bias: the BatchNorm ignores it).
    """
    mean = norm.running_mean
    scale = norm.weight if norm.weight is not None else torch.ones_like(mean)
    shift = norm.bias if norm.bias is not None else torch.zeros_like(mean)
    gain = scale / torch.sqrt(norm.running_var + norm.eps)
    raw = bias if bias is not None else torch.zeros_like(mean)
    folded = (raw - mean) * gain + shift
    shape = [-1] + [1] * (weight.dim() - 1)
    on_grid = fake_quant_bias(folded, weight * gain.reshape(shape), bits, 0, input_scale)
    safe_gain = torch.where(gain != 0, gain, torch.ones_like(gain))
    return torch.where(gain != 0, (on_grid - shift) / safe_gain + mean, raw)


class _PlannedConv(_Planned):
    """Conv1d/2d/3d: the module's own convolution on the fake-quant input and parameters."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return super().forward(input)  # type: ignore[misc]
        quantized = self.quantized_input(input)
        weight, bias = self.quantized_parameters()
        return self._conv_forward(quantized, weight, bias)  # type: ignore[attr-defined]


class PlannedConv1d(_PlannedConv, nn.Conv1d):
    pass


class PlannedConv2d(_PlannedConv, nn.Conv2d):
    pass


class PlannedConv3d(_PlannedConv, nn.Conv3d):
    pass


class PlannedLinear(_Planned, nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return super().forward(input)
        quantized = self.quantized_input(input)
        weight, bias = self.quantized_parameters()
        return nn.functional.linear(quantized, weight, bias)


_PLANNED: Mapping[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: PlannedConv1d,
    nn.Conv2d: PlannedConv2d,
    nn.Conv3d: PlannedConv3d,
    nn.Linear: PlannedLinear,
}
_ORIGINAL = {planned: original for original, planned in _PLANNED.items()}


def apply_plan(
    module: nn.Module,
    plan: Plan | str | os.PathLike[str] | None = None,
    onnx_model: ModelSource | None = None,
    *,
    compiled: ModelSource | None = None,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Put the plan's fake quantization on the model's Conv/Linear modules, in place.

    `plan`: a Plan or plan.json (default: the plan stored in `compiled`). `onnx_model`: the
    export that was compiled, which names the modules (default: `compiled`, whose node
    names still carry legacy exporter paths). `compiled`: the quanos-compile output, whose
    activation grids the inputs then use. `example_input`: one input batch for finding the
    BatchNorm after each conv (default: zeros of the ONNX model's input shape). Returns
    `module`; remove_plan() undoes it.
    """
    compiled_proto = _load(compiled) if compiled is not None else None
    resolved = _resolve_plan(plan, compiled_proto)
    naming = _load(onnx_model) if onnx_model is not None else compiled_proto
    nodes = {node.name: node for node in naming.graph.node} if naming is not None else {}
    grids = _CompiledGrids(compiled_proto) if compiled_proto is not None else None
    found: dict[str, tuple[str, str]] = {}
    for entry in resolved.layers:
        path, found_by = _find_module(module, entry.name, nodes.get(entry.name), naming)
        if path in found:
            raise PlanError(
                f"layers '{found[path][0]}' and '{entry.name}' both map to module '{path}'",
                hint="a module called more than once cannot carry one plan per call",
            )
        found[path] = (entry.name, found_by)
    norms = _batch_norms_after(module, list(found), _example(example_input, naming))
    planned: list[tuple[str, ModulePlan]] = []
    for path, (layer, found_by) in found.items():
        entry = resolved.layer(layer)
        input_grid = grids.input_grid(layer) if grids is not None else None
        if not entry.quantized and input_grid is None:
            continue
        norm_path = norms[path][0] if path in norms else None
        planned.append(
            (
                path,
                ModulePlan(
                    layer=layer,
                    module=path,
                    found_by=found_by,
                    weight_bits=entry.weight_bits if entry.quantized else None,
                    act_bits=entry.act_bits if entry.quantized else None,
                    input_grid=input_grid,
                    quantize_bias=grids.has_integer_bias(layer) if grids is not None else True,
                    batch_norm=norm_path,
                ),
            )
        )
    for path, plan_for_module in planned:
        _wrap(module.get_submodule(path), plan_for_module, norms[path][1] if path in norms else None)
    return module


def _example(given: torch.Tensor | None, model: onnx.ModelProto | None) -> torch.Tensor | None:
    """The input used to find BatchNorms: the given one, else zeros of the model's input
    shape (batch 1), else None when the shape is not fully known."""
    if given is not None or model is None:
        return given
    initializers = {t.name for t in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [1] + [d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:]]
    if not dims or 0 in shape:
        return None
    return torch.zeros(shape)


def _batch_norms_after(
    root: nn.Module, paths: Sequence[str], example: torch.Tensor | None
) -> dict[str, tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Conv path -> (path, module) of the BatchNorm that reads exactly that conv's output."""
    norms = [
        (name, child)
        for name, child in root.named_modules()
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.running_mean is not None
    ]
    convs = [path for path in paths if isinstance(root.get_submodule(path), (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not norms or not convs:
        return {}
    if example is None:
        log.warning(
            "apply_plan: no example input to find the BatchNorm after each conv; biases are put on the grid "
            "as if there were none (pass example_input= for an exact match with the compiled model)"
        )
        return {}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    found: dict[str, tuple[str, nn.modules.batchnorm._BatchNorm]] = {}

    def remember(path: str) -> Any:
        def hook(_: nn.Module, __: Any, output: torch.Tensor) -> None:
            outputs[id(output)] = (path, output)

        return hook

    def match(name: str, norm: nn.modules.batchnorm._BatchNorm) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            entry = outputs.get(id(args[0])) if args else None
            if entry is not None and entry[1] is args[0]:
                found[entry[0]] = (name, norm)

        return hook

    handles = [root.get_submodule(path).register_forward_hook(remember(path)) for path in convs]
    handles += [norm.register_forward_pre_hook(match(name, norm)) for name, norm in norms]
    was_training = root.training
    root.eval()
    try:
        with torch.no_grad():
            root(example)
    finally:
        for handle in handles:
            handle.remove()
        root.train(was_training)
    return found


def planned_modules(module: nn.Module) -> dict[str, ModulePlan]:
    """Module path -> what apply_plan put there."""
    return {name: child.quanos_plan for name, child in module.named_modules() if isinstance(child, _Planned)}


def remove_plan(module: nn.Module) -> nn.Module:
    """Turn every planned module back into the plain torch class (weights kept), in place."""
    for child in module.modules():
        original = _ORIGINAL.get(type(child))
        if original is None:
            continue
        for name in ("quanos_input_low", "quanos_input_high"):
            delattr(child, name)
        del child.quanos_plan
        del child.__dict__["quanos_batch_norm"]
        child.__class__ = original
    return module


def _wrap(child: nn.Module, plan: ModulePlan, norm: nn.Module | None) -> None:
    if isinstance(child, _Planned):
        raise PlanError(f"module '{plan.module}' already carries a plan (apply_plan twice?)")
    child.__class__ = _PLANNED[type(child)]
    child.quanos_plan = plan
    child.__dict__["quanos_batch_norm"] = norm  # not a submodule: no second path to it
    device = child.weight.device
    child.register_buffer("quanos_input_low", torch.tensor(float("inf"), device=device), persistent=False)
    child.register_buffer("quanos_input_high", torch.tensor(float("-inf"), device=device), persistent=False)


def _load(source: ModelSource) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    from pathlib import Path

    from ..model import read_model

    return read_model(Path(source))


def _resolve_plan(plan: Plan | str | os.PathLike[str] | None, compiled: onnx.ModelProto | None) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if plan is not None:
        return read_plan(plan)
    stored = compiled_plan(compiled) if compiled is not None else None
    if stored is None:
        raise UsageError("apply_plan needs a plan: pass plan= or the compiled model as compiled=")
    return stored


def _find_module(
    root: nn.Module, layer: str, node: onnx.NodeProto | None, model: onnx.ModelProto | None
) -> tuple[str, str]:
    """The path of the layer's Conv/Linear module and how it was found (module docstring)."""
    if model is not None and node is None:
        raise PlanError(f"plan layer '{layer}' is not a node of the ONNX model", hint="pass the model the plan was made for")
    candidates = _candidates(root, layer, node, model)
    kinds = _LAYER_KINDS.get(node.op_type, ()) if node is not None else tuple(_PLANNED)
    for path, found_by in candidates:
        child = _submodule(root, path)
        if child is not None and type(child) in _PLANNED and isinstance(child, kinds):
            return path, found_by
        if isinstance(child, _Planned):
            return path, found_by
    tried = ", ".join(f"'{path}' ({how})" for path, how in candidates) or "no module path in its name or metadata"
    raise PlanError(
        f"plan layer '{layer}': no nn.Conv1d/2d/3d or nn.Linear found (tried {tried})",
        hint="pass onnx_model= the torch export the plan was compiled from",
    )


def _candidates(root: nn.Module, layer: str, node: onnx.NodeProto | None, model: onnx.ModelProto | None) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if node is not None and model is not None and len(node.input) > 1:
        weight = _weight_source(node.input[1], model)
        if weight is not None and weight.endswith(".weight"):
            found.append((weight[: -len(".weight")], f"weight '{weight}'"))
        for scope in reversed(_name_scopes(node)):
            if scope:
                found.append((scope, f"name scope '{scope}'"))
    legacy = _legacy_path(root, node.name if node is not None else layer)
    if legacy is not None:
        found.append((legacy, "legacy node name"))
    return found


def _weight_source(name: str, model: onnx.ModelProto) -> str | None:
    """The initializer a weight input comes from, through Transpose/Cast/Identity/Reshape,
    or, in a compiled model, the float weight its DequantizeLinear records."""
    initializers = {t.name for t in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    for _ in range(len(model.graph.node) + 1):
        producer = producers.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return next((entry.value for entry in producer.metadata_props if entry.key == WEIGHT_SOURCE_KEY), None)
        if name in initializers:
            return name
        if producer is None or producer.op_type not in _PASS_THROUGH_OPS:
            return None
        name = producer.input[0]
    return None


def _name_scopes(node: onnx.NodeProto) -> list[str]:
    for entry in node.metadata_props:
        if entry.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(entry.value)
            except (ValueError, SyntaxError):
                return []
            return [str(scope) for scope in scopes] if isinstance(scopes, (list, tuple)) else []
    return []


def _legacy_path(root: nn.Module, name: str) -> str | None:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1': each scope is either the full path
    of a submodule (Sequential children) or an attribute of the previous one."""
    segments = [segment for segment in name.split("/") if segment][:-1]
    if not name.startswith("/") or not segments:
        return None
    path = ""
    for segment in segments:
        nested = f"{path}.{segment}" if path else segment
        if (not path or segment.startswith(path + ".")) and _submodule(root, segment) is not None:
            path = segment
        elif _submodule(root, nested) is not None:
            path = nested
        else:
            return None
    return path


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class _CompiledGrids:
    """The activation grid in front of each layer of a compiled model, read from its
    QuantizeLinear -> (Clip) -> DequantizeLinear chains."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = {node.name: node for node in model.graph.node}
        self.producers = {output: node for node in model.graph.node for output in node.output}
        self.initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}

    def input_grid(self, layer: str) -> ActivationGrid | None:
        node = self.nodes.get(layer)
        if node is None:
            raise PlanError(f"plan layer '{layer}' is not a node of the compiled model")
        dequantize = self.producers.get(node.input[0])
        while dequantize is not None and dequantize.op_type in TRANSPARENT_OPS:
            dequantize = self.producers.get(dequantize.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        scale = float(self._constant(dequantize.input[1]).reshape(-1)[0])
        zero_array = self._constant(dequantize.input[2]) if len(dequantize.input) > 2 and dequantize.input[2] else np.zeros((), np.uint8)
        info = np.iinfo(zero_array.dtype)
        low, high = int(info.min), int(info.max)
        source = self.producers.get(dequantize.input[0])
        if source is not None and source.op_type == "Clip":
            low = max(low, int(self._constant(source.input[1])))
            high = min(high, int(self._constant(source.input[2])))
            source = self.producers.get(source.input[0])
        if source is None or source.op_type != "QuantizeLinear":
            raise PlanError(f"layer '{layer}': its input DequantizeLinear is not fed by a QuantizeLinear")
        float_clip = None
        before = self.producers.get(source.input[0])
        if before is not None and before.op_type == "Clip" and source.input[1].endswith("_scale") and before.output[0] == source.input[1][: -len("_scale")] + "_clipped":
            float_clip = (float(self._constant(before.input[1])), float(self._constant(before.input[2])))
        return ActivationGrid(scale, int(zero_array.reshape(-1)[0]), low, high, float_clip)

    def has_integer_bias(self, layer: str) -> bool:
        node = self.nodes[layer]
        if len(node.input) < 3 or not node.input[2]:
            return False
        producer = self.producers.get(node.input[2])
        return producer is not None and producer.op_type == "DequantizeLinear"

    def _constant(self, name: str) -> np.ndarray:
        value = self.initializers.get(name)
        if value is None:
            raise PlanError(f"compiled model: quantizer parameter '{name}' is not an initializer")
        return value
