"""Reproduce what onnxruntime's QDQ fusion computes, so a fake-quant twin matches the deployed model.

The optimized ORT session does not run a QDQ graph node by node. It fuses
DQ -> Conv/Gemm/MatMul -> [Relu/Clip] -> Q into one integer kernel (QLinearConv, QGemm,
QLinearMatMul) that accumulates exact integer products in int32 and requantizes once:

    q = saturate(round_half_even(float32(acc) * M) + zero_point_y),
    acc = sum((x_q - zp_x) * (w_q - zp_w)) + bias_int32,   M = float32(s_x * s_w) / s_y

while the graph's semantics sum float products and divide by s_y. The two differ in the
last bit often enough to move roughly one value in 10^5 by a quantization step, and those
flips multiply through a deep network (1% of values by the last ResNet stage, argmax flips
on about 1 image in 1000). A float bias is first rounded to the int32 grid of s_x * s_w;
ORT also does that when it leaves the conv in float (int16 activations), and when the
rounded bias overflows int32 it stores INT_MIN.

The twin does not guess which nodes ORT fuses (that depends on its optimizer's rules): it
asks onnxruntime for the optimized graph once at build time. Fused kernels keep the
original node's name ("_token_<n>" appended when ORT also changed the layout,
"/MatMulAddFusion" when it merged MatMul and Add into Gemm first); quantized
biases are initializers named "<node>_bias_int32". For each fused layer the twin's step
then computes the exact accumulator from the integer values it recovers from the
dequantized input, and the unit's QuantizeLinear returns ORT's integers, with gradients
still flowing straight through the float path. Elementwise fused kernels (QLinearAdd,
QLinearMul, QLinearGlobalAveragePool) round as the float path does except on exact ties
and are not emulated.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..model import make_session
from .fakequant import broadcast_parameter, round_straight_through
from .graph import QUANTIZER_OPS, CompiledGraph, Step, with_releases
from .registry import OpFunction

log = logging.getLogger(__name__)

LAYER_KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul"})
BIAS_INITIALIZER_SUFFIX = "_bias_int32"
_FUSION_SUFFIX = re.compile(r"(_token_\d+|/MatMulAddFusion)$")
"""What ORT appends to a fused node's name: a layout change, or MatMul+Add becoming Gemm."""
_BIASED_OPS = {"Conv": 2, "Gemm": 2}
_ABSORBED_ACTIVATIONS = frozenset({"Relu", "Clip"})
_EXACT_FLOAT32 = 2**24
"""Integers up to here are exact in float32, so an integer conv with smaller partial sums is too."""


@dataclass(frozen=True)
class FusedKernels:
    """Node names from the original graph, by what onnxruntime does with them."""

    integer_layers: frozenset[str] = frozenset()
    """Conv/Gemm/MatMul nodes run as QLinearConv/QGemm/QLinearMatMul."""
    integer_bias: frozenset[str] = frozenset()
    """Conv/Gemm nodes whose float bias ORT rounds to the int32 grid."""


def fused_kernels(model: onnx.ModelProto) -> FusedKernels:
    """Ask onnxruntime which nodes of a QDQ model it runs as fused integer kernels."""
    if not any(node.op_type in QUANTIZER_OPS for node in model.graph.node):
        return FusedKernels()
    with tempfile.TemporaryDirectory(prefix="quanos-twin-") as directory:
        path = Path(directory) / "optimized.onnx"
        make_session(model, optimized_model_path=str(path))
        optimized = onnx.load(str(path), load_external_data=False)
    op_types = {node.name: node.op_type for node in model.graph.node}
    integer_layers = frozenset(
        name
        for name in (_original_name(node.name) for node in optimized.graph.node if node.op_type in LAYER_KERNELS)
        if op_types.get(name) in ("Conv", "Gemm", "MatMul")
    )
    quantized_bias = {
        t.name[: -len(BIAS_INITIALIZER_SUFFIX)]: t
        for t in optimized.graph.initializer
        if t.name.endswith(BIAS_INITIALIZER_SUFFIX)
    }
    integer_bias = frozenset(name for name in quantized_bias if op_types.get(name) in _BIASED_OPS)
    for name in sorted(integer_bias):
        if np.any(onnx.numpy_helper.to_array(quantized_bias[name]) == np.iinfo(np.int32).min):
            log.warning(
                "onnxruntime's int32 bias of node '%s' overflows (|bias| / (input scale * weight scale) > 2^31) "
                "and becomes INT_MIN: the deployed model adds a wrong bias there; the twin keeps the true one",
                name,
            )
    log.debug("onnxruntime fuses %d layer(s), quantizes %d bias(es)", len(integer_layers), len(integer_bias))
    return FusedKernels(integer_layers, integer_bias)


def _original_name(fused_name: str) -> str:
    name = fused_name
    while _FUSION_SUFFIX.search(name):
        name = _FUSION_SUFFIX.sub("", name)
    return name


def emulate(compiled: CompiledGraph, kernels: FusedKernels) -> CompiledGraph:
    """The compiled plan with the fused kernels' arithmetic in place of the nodes' plain semantics."""
    if not kernels.integer_layers and not kernels.integer_bias:
        return compiled
    program = compiled.program
    plan = _Plan(list(program.steps), [*program.folded, *program.steps], dict(compiled.constants), compiled.parameters)
    for step in list(plan.steps):
        if step.node_name in kernels.integer_layers and plan.integer_layer(step):
            continue
        if step.node_name in kernels.integer_bias:
            plan.rounded_bias(step)
    steps = with_releases(plan.steps, set(program.outputs))
    return replace(compiled, program=replace(program, steps=tuple(steps)), constants=plan.constants)


@dataclass
class _Plan:
    """Runtime steps being rewritten, with the lookups the rewrites need."""

    steps: list[Step]
    all_steps: list[Step]
    constants: dict[str, torch.Tensor]
    parameters: Mapping[str, torch.Tensor]

    def producer(self, name: str) -> Step | None:
        return next((step for step in self.all_steps if name in step.outputs), None)

    def consumers(self, name: str) -> list[Step]:
        return [step for step in self.steps if name in step.inputs]

    def dequantized_from(self, name: str) -> Step | None:
        """The DequantizeLinear producing `name`, if its scale and zero point are constants."""
        step = self.producer(name)
        if step is None or step.op_type != "DequantizeLinear":
            return None
        if not all(operand in self.constants for operand in step.inputs[1:] if operand):
            return None
        return step

    def add_constant(self, name: str, value: torch.Tensor) -> str:
        self.constants[name] = value
        return name

    def replace_step(self, old: Step, new: Step) -> None:
        self.steps[self.steps.index(old)] = new

    def rounded_bias(self, step: Step) -> None:
        """ORT left the layer in float but rounded its bias to the grid of s_x * s_w."""
        scales = self._input_and_weight_scales(step)
        if scales is None or len(step.inputs) <= 2 or not step.inputs[2]:
            return
        name = self.add_constant(f"{step.node_name}::bias_scale", (scales[0] * scales[1]).reshape(-1))
        self.replace_step(
            step, replace(step, function=_with_rounded_bias(step.function), inputs=(*step.inputs, name), emulated=True)
        )

    def _input_and_weight_scales(self, step: Step) -> tuple[torch.Tensor, torch.Tensor] | None:
        source, weight = self.dequantized_from(step.inputs[0]), self.dequantized_from(step.inputs[1])
        if source is None or weight is None:
            log.debug("not emulating '%s': its input or weight is not dequantized from constants", step.node_name)
            return None
        return self.constants[source.inputs[1]].float(), self.constants[weight.inputs[1]].float()

    def integer_layer(self, layer: Step) -> bool:
        """Rewrite layer -> [bias Add] -> [Relu/Clip] -> Q into ORT's integer arithmetic."""
        source, weight_dq = self.dequantized_from(layer.inputs[0]), self.dequantized_from(layer.inputs[1])
        chain = self._chain_to_quantizer(layer)
        if source is None or weight_dq is None or chain is None or layer.inputs[1] not in self.constants:
            log.debug("not emulating '%s' as an integer kernel: unexpected neighbourhood", layer.node_name)
            return False
        unit_bias, quantizer = chain
        attrs = layer.attributes
        scaled = attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
        if layer.op_type == "Gemm" and (attrs.get("transA", 0) or scaled):
            return False
        input_scale = self.constants[source.inputs[1]].float()
        weight_scale = self.constants[weight_dq.inputs[1]].float()
        if input_scale.numel() != 1 or weight_dq.attributes["block_size"]:
            return False
        weight = self.constants[layer.inputs[1]]
        weight_axis = weight_dq.attributes["axis"] % weight.dim()
        output_axis = 0 if layer.op_type == "Conv" or attrs.get("transB", 0) else weight.dim() - 1
        per_channel = broadcast_parameter(weight_scale, weight.dim(), weight_axis, 0, weight.shape[weight_axis])
        centered = torch.round(weight / per_channel)
        channel_axis = 1 if layer.op_type == "Conv" else -1
        output_rank = max(weight.dim(), 2)
        channel_scale = (input_scale.reshape(()) * weight_scale).reshape(-1)
        output_scale = _along(channel_scale, channel_axis, output_rank)
        output_quantizer_scale = self.constants[quantizer.inputs[1]].float().reshape(())
        multiplier = (input_scale.reshape(()) * weight_scale).reshape(-1) / output_quantizer_scale
        prefix = layer.node_name + "::"
        names = {
            "weight": self.add_constant(prefix + "centered_weight", centered),
            "input_scale": self.add_constant(prefix + "input_scale", input_scale.reshape(())),
            "output_scale": self.add_constant(prefix + "output_scale", output_scale),
            "bias_scale": self.add_constant(prefix + "bias_scale", channel_scale),
            "multiplier": self.add_constant(prefix + "multiplier", _along(multiplier, channel_axis, output_rank)),
        }
        accumulator = prefix + "accumulator"
        bound = _accumulator_bound(source, centered, output_axis, self.constants)
        accumulate_dtype = torch.float32 if bound < _EXACT_FLOAT32 else torch.float64
        own_bias = layer.inputs[2] if len(layer.inputs) > 2 else ""
        new_layer = replace(
            layer,
            function=_integer_accumulation(layer.function, accumulate_dtype),
            attributes={**attrs, "channel_axis": channel_axis},
            inputs=(
                layer.inputs[0],
                names["weight"],
                own_bias,
                unit_bias,
                names["input_scale"],
                names["output_scale"],
                names["bias_scale"],
            ),
            outputs=(layer.outputs[0], accumulator),
            emulated=True,
        )
        new_quantizer = replace(
            quantizer,
            function=_exact_requantization(quantizer.function),
            inputs=(*quantizer.inputs[:3], accumulator, names["multiplier"]),
            emulated=True,
        )
        self.replace_step(layer, new_layer)
        self.replace_step(quantizer, new_quantizer)
        return True

    def _chain_to_quantizer(self, layer: Step) -> tuple[str, Step] | None:
        """(name of a bias added by a following Add, or "", the QuantizeLinear ending the unit)."""
        value, unit_bias = layer.outputs[0], ""
        while True:
            readers = self.consumers(value)
            if len(readers) != 1:
                return None
            step = readers[0]
            if step.op_type == "QuantizeLinear":
                return unit_bias, step
            if step.op_type == "Add" and layer.op_type == "MatMul" and not unit_bias:
                unit_bias = next((name for name in step.inputs if name != value), "")
                if unit_bias not in self.constants and unit_bias not in self.parameters:
                    return None
            elif step.op_type not in _ABSORBED_ACTIVATIONS:
                return None
            value = step.outputs[0]


def _along(values: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """Per-channel values shaped to broadcast along `axis` of a rank-`rank` tensor."""
    if values.numel() == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis] = values.numel()
    return values.reshape(shape)


def _accumulator_bound(
    source: Step, centered: torch.Tensor, output_axis: int, constants: Mapping[str, torch.Tensor]
) -> float:
    """An upper bound on |accumulator| before the bias: max |x_q - zp_x| (8-bit input) times
    the largest output channel's sum of |w_q - zp_w|."""
    has_zero_point = len(source.inputs) > 2 and bool(source.inputs[2])
    zero_point = float(constants[source.inputs[2]].reshape(-1)[0]) if has_zero_point else 0.0
    largest_input = 255.0 + abs(zero_point)
    reduce = tuple(axis for axis in range(centered.dim()) if axis != output_axis) or (0,)
    return largest_input * float(centered.abs().sum(dim=reduce).max())


def _integer_accumulation(function: OpFunction, dtype: torch.dtype) -> OpFunction:
    """The layer computed as ORT's integer kernel: exact accumulator, float output = acc * s_x * s_w.

    Inputs: x (dequantized), centered integer weight, own bias or None, bias of a following
    Add or None, s_x, s_x * s_w shaped for the output, s_x * s_w per channel. Outputs: the
    layer's float output and the accumulator the unit's QuantizeLinear requantizes.
    """

    def run(attrs: Mapping[str, Any], inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        values, weight, own_bias, unit_bias, input_scale, output_scale, bias_scale = inputs
        integers = round_straight_through(values / input_scale)
        accumulator = function(attrs, [integers.to(dtype), weight.to(dtype)])[0]
        if own_bias is not None:
            accumulator = accumulator + _on_grid(own_bias, bias_scale, attrs["channel_axis"], accumulator).to(dtype)
        output = accumulator.to(values.dtype) * output_scale
        if unit_bias is not None:
            accumulator = accumulator + _on_grid(unit_bias, bias_scale, -1, accumulator).to(dtype)
        return [output, accumulator.to(values.dtype)]

    return run


def _on_grid(bias: torch.Tensor, scale: torch.Tensor, axis: int, like: torch.Tensor) -> torch.Tensor:
    """A bias as int32-grid integers (straight-through), shaped to add to `like`."""
    integers = round_straight_through((bias.reshape(-1) if bias.numel() > 1 else bias) / scale)
    return _along(integers, axis, like.dim()) if integers.numel() > 1 else integers.reshape(())


def _exact_requantization(function: OpFunction) -> OpFunction:
    """QuantizeLinear whose value is ORT's requantized accumulator and whose gradient is the float path's."""

    def run(attrs: Mapping[str, Any], inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        *operands, accumulator, multiplier = inputs
        reference = function(attrs, operands)[0]
        zero_point = operands[2] if len(operands) > 2 and operands[2] is not None else torch.zeros(())
        container = attrs["container"]
        requantized = torch.round(accumulator * multiplier) + zero_point.to(accumulator.dtype)
        exact = torch.clamp(requantized, container.minimum, container.maximum)
        return [reference + (exact - reference).detach()]

    return run


def _with_rounded_bias(function: OpFunction) -> OpFunction:
    """The layer with its bias first rounded to the int32 grid (scale passed as the last input)."""

    def run(attrs: Mapping[str, Any], inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        *operands, bias_scale = inputs
        operands[2] = round_straight_through(operands[2] / bias_scale) * bias_scale
        return function(attrs, operands)

    return run
