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

On x86 CPUs with AVX2 but without VNNI, onnxruntime's (MLAS) u8 x s8 kernels are not exact:
they multiply with VPMADDUBSW, which adds each pair of adjacent u8 * s8 products along K in
int16 with saturation before the int32 sum, so a pair whose sum leaves [-32768, 32767]
(possible once 255 * (|w_a| + |w_b|) > 32767, i.e. with 8-bit weights) is clamped. Measured
with onnxruntime 1.32 on an AMD EPYC (AVX2): the pairs are the raw (uncentered) uint8 input
at K indices (2j, 2j + 1); K is the GEMM's inner axis for QGemm/QLinearMatMul and, per group,
(kernel position, input channel) with the channel fastest for QLinearConv; padding holds the
zero point; the depthwise kernel (one input and one output channel per group) and u8 x u8
kernels are exact. A tiny probe session, run once per process (`pair_saturation`), tells
whether the running onnxruntime does this, and the twin then clamps the same pairs.
"""

from __future__ import annotations

import functools
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..model import make_session
from .fakequant import CONTAINERS, broadcast_parameter, round_straight_through
from .graph import QUANTIZER_OPS, CompiledGraph, Step, with_releases
from .ops.nn import spatial_pads, strides_and_dilations, torch_pads
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
_UINT8 = CONTAINERS[onnx.TensorProto.UINT8]
_INT16 = CONTAINERS[onnx.TensorProto.INT16]
_PROBE_SAMPLES = ((0, 1), (2, 3), (1, 2))
"""K indices at 255 in each probe sample, with weights 127: two pairs (in the probe conv the
second straddles two kernel positions) and two neighbours from different pairs."""
_PROBE_SCALE = 512.0
"""Output scale of the probe: a pair sum of 2 * 255 * 127 = 64770 requantizes to 127, one
saturated to 32767 requantizes to 64."""


@dataclass(frozen=True)
class FusedKernels:
    """Node names from the original graph, by what onnxruntime does with them."""

    integer_layers: frozenset[str] = frozenset()
    """Conv/Gemm/MatMul nodes run as QLinearConv/QGemm/QLinearMatMul."""
    integer_bias: frozenset[str] = frozenset()
    """Conv/Gemm nodes whose float bias ORT rounds to the int32 grid."""
    saturating_pairs: frozenset[str] = frozenset()
    """Integer layers whose kernel adds adjacent u8 x s8 products in int16 with saturation
    (AVX2 without VNNI; see the module docstring)."""


@dataclass(frozen=True)
class PairSaturation:
    """Which of onnxruntime's u8 x s8 layer kernels on this CPU saturate sums of product pairs."""

    conv: bool = False
    """QLinearConv (not its depthwise kernel)."""
    gemm: bool = False
    """QGemm and QLinearMatMul."""


@functools.cache
def pair_saturation() -> PairSaturation:
    """Ask onnxruntime, once per process, whether its fused kernels clamp pairs of products to int16."""
    saturation = PairSaturation(conv=_probe_pairs("Conv"), gemm=_probe_pairs("MatMul"))
    log.debug("onnxruntime's u8 x s8 kernels saturate pairs of products: %s", saturation)
    return saturation


def saturation_change(
    layer: Step, centered_input: torch.Tensor, input_zero_point: int, centered_weight: torch.Tensor, output: torch.Tensor
) -> torch.Tensor | None:
    """What this CPU's onnxruntime kernel changes in a Conv/Gemm/MatMul layer's exact integer
    accumulator by clamping pairs of u8 x s8 products to int16 (a tensor shaped like
    `output` and of its dtype, in accumulator units), or None where it changes nothing: no pair of the
    weights can leave int16 (7 bits or fewer), a depthwise conv, another op, or kernels
    that are exact here.

    `centered_input` is the layer's uint8 input minus `input_zero_point` and
    `centered_weight` its int8 weight (zero point 0), both as float integers. The twin of a
    QDQ model emulates this inside its fused steps; a layer's quantization error measured
    outside a QDQ graph (allocate.sensitivity's gradient score) adds it here."""
    saturation = pair_saturation()
    if layer.op_type == "Conv":
        depthwise = centered_weight.shape[1] == 1 and centered_weight.shape[0] == layer.attributes.get("group", 1)
        if not saturation.conv or depthwise:
            return None
    elif layer.op_type not in ("Gemm", "MatMul") or not saturation.gemm:
        return None
    pairs = _saturable_pairs(layer, centered_weight.double())
    if pairs is None:
        return None
    attrs = {**layer.attributes, "channel_axis": 1 if layer.op_type == "Conv" else -1}
    zero_point = torch.tensor(float(input_zero_point))
    return _pair_saturation(attrs, centered_input, centered_weight.shape[2:], zero_point, pairs, output)


def _probe_pairs(op_type: str) -> bool:
    """True when the fused kernel of `op_type` clamps exactly the pairs (2j, 2j + 1) of its K axis."""
    model, inputs = _probe_model(op_type)
    requantized = make_session(model).run(None, {"x": inputs})[0].reshape(-1).tolist()
    exact, saturated = round(2 * 255 * 127 / _PROBE_SCALE), round(_INT16.maximum / _PROBE_SCALE)
    if requantized == [exact] * len(_PROBE_SAMPLES):
        return False
    if requantized == [saturated, saturated, exact]:
        return True
    log.warning(
        "onnxruntime's integer %s kernel on this CPU sums u8 x s8 products in a way the twin does not know "
        "(probe gave %s, exact is %d, pair saturation %d): fused layers with 8-bit weights may differ from the twin",
        op_type,
        requantized,
        exact,
        saturated,
    )
    return False


def _probe_model(op_type: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """DQ(uint8) -> Conv or MatMul with int8 weights of 127 -> Q(uint8), and one input per probe sample.

    The conv has 3 input channels and a 1x2 kernel, so K index = kernel position * 3 + channel."""
    channels, positions = (3, 2) if op_type == "Conv" else (4, 1)
    inputs = np.zeros((len(_PROBE_SAMPLES), positions * channels), np.uint8)
    for sample, indices in enumerate(_PROBE_SAMPLES):
        inputs[sample, list(indices)] = _UINT8.maximum
    if op_type == "Conv":
        inputs = inputs.reshape(-1, positions, channels).transpose(0, 2, 1).reshape(-1, channels, 1, positions)
        weight_shape: tuple[int, ...] = (1, channels, 1, positions)
    else:
        weight_shape = (channels, 1)
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    initializers = [
        numpy_helper.from_array(np.full(weight_shape, 127, np.int8), "w_q"),
        numpy_helper.from_array(np.array(1.0, np.float32), "unit_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
        numpy_helper.from_array(np.array(_PROBE_SCALE, np.float32), "y_scale"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "unit_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "unit_scale", "w_zp"], ["w_dq"]),
        helper.make_node(op_type, ["x_dq", "w_dq"], ["layer"]),
        helper.make_node("QuantizeLinear", ["layer", "y_scale", "x_zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pair_saturation_probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, inputs.shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), inputs


def fused_kernels(model: onnx.ModelProto) -> FusedKernels:
    """Ask onnxruntime which nodes of a QDQ model it runs as fused integer kernels."""
    if not any(node.op_type in QUANTIZER_OPS for node in model.graph.node):
        return FusedKernels()
    with tempfile.TemporaryDirectory(prefix="quanos-twin-") as directory:
        path = Path(directory) / "optimized.onnx"
        make_session(model, optimized_model_path=str(path))
        optimized = onnx.load(str(path), load_external_data=False)
    op_types = {node.name: node.op_type for node in model.graph.node}
    layer_kernels = {
        _original_name(node.name): node
        for node in optimized.graph.node
        if node.op_type in LAYER_KERNELS and op_types.get(_original_name(node.name)) in ("Conv", "Gemm", "MatMul")
    }
    integer_layers = frozenset(layer_kernels)
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
    initializers = {t.name: t for t in optimized.graph.initializer}
    pairwise = {
        name: node.op_type for name, node in layer_kernels.items() if _multiplies_u8_by_s8_in_pairs(node, initializers)
    }
    saturation = pair_saturation() if pairwise else PairSaturation()
    saturating_pairs = frozenset(
        name for name, op_type in pairwise.items() if (saturation.conv if op_type == "QLinearConv" else saturation.gemm)
    )
    log.debug(
        "onnxruntime fuses %d layer(s) (%d with saturating pairs), quantizes %d bias(es)",
        len(integer_layers),
        len(saturating_pairs),
        len(integer_bias),
    )
    return FusedKernels(integer_layers, integer_bias, saturating_pairs)


def _multiplies_u8_by_s8_in_pairs(kernel: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]) -> bool:
    """Whether a fused layer runs the u8 x s8 GEMM that VPMADDUBSW serves: uint8 activations, int8
    weights with zero point 0, and not the depthwise conv kernel (one input and one output channel
    per group), which multiplies exactly. QLinearConv, QLinearMatMul and QGemm all take the
    activation zero point, weight and weight zero point as inputs 2, 3 and 5."""
    inputs = list(kernel.input) + [""] * 6
    activation_zero_point, weight = initializers.get(inputs[2]), initializers.get(inputs[3])
    if activation_zero_point is None or weight is None:
        return False
    if activation_zero_point.data_type != onnx.TensorProto.UINT8 or weight.data_type != onnx.TensorProto.INT8:
        return False
    weight_zero_point = initializers.get(inputs[5])
    if weight_zero_point is not None and np.any(onnx.numpy_helper.to_array(weight_zero_point)):
        log.debug("not emulating pair saturation in '%s': its weights' zero point is not 0", kernel.name)
        return False
    if kernel.op_type == "QLinearConv":
        group = next((attribute.i for attribute in kernel.attribute if attribute.name == "group"), 1)
        return not (weight.dims[1] == 1 and weight.dims[0] == group)
    return True


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
        saturating = step.node_name in kernels.saturating_pairs
        if step.node_name in kernels.integer_layers and plan.integer_layer(step, saturating=saturating):
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

    def integer_layer(self, layer: Step, *, saturating: bool) -> bool:
        """Rewrite layer -> [bias Add] -> [Relu/Clip] -> Q into ORT's integer arithmetic
        (clamping pairs of products to int16 when `saturating`)."""
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
        pair_inputs: tuple[str, ...] = ("",)
        pairs = _saturable_pairs(layer, centered) if saturating else None
        if pairs is not None:
            pair_inputs = (
                self.add_constant(prefix + "input_zero_point", _zero_point(source, self.constants)),
                *(self.add_constant(f"{prefix}pair_{field.name}", getattr(pairs, field.name)) for field in fields(pairs)),
            )
            log.debug("'%s': %d pair(s) of products can saturate int16", layer.node_name, pairs.channels.numel())
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
                *pair_inputs,
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


def _zero_point(source: Step, constants: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The (per-tensor) zero point of a dequantized input, as a float scalar; 0 when omitted."""
    has_zero_point = len(source.inputs) > 2 and bool(source.inputs[2])
    return constants[source.inputs[2]].reshape(-1)[0].float() if has_zero_point else torch.zeros(())


@dataclass(frozen=True)
class _Pairs:
    """The (output channel, pair of adjacent K entries) whose u8 x s8 product sum can leave int16."""

    sources: torch.Tensor
    """Input channel (Conv) or K index (Gemm/MatMul) of each pair's two entries, interleaved (2 * pairs, int64)."""
    offsets: torch.Tensor
    """Kernel position of each entry of a Conv, one column per spatial axis (2 * pairs, spatial); no columns otherwise."""
    weight: torch.Tensor
    """The two centered weights of each pair (pairs, 2)."""
    channels: torch.Tensor
    """The layer's output channel each pair belongs to (int64)."""


def _saturable_pairs(layer: Step, centered: torch.Tensor) -> _Pairs | None:
    """The pairs (2j, 2j + 1) of the kernel's K axis that a uint8 input can push out of int16; None if none can.

    K is the weight's input axis for Gemm/MatMul and, for a Conv, (kernel position, channel
    within the group) with the channel fastest, as onnxruntime's NHWC im2col orders it."""
    if layer.op_type == "Conv":
        outputs, group_channels, *kernel = centered.shape
        by_k = centered.movedim(1, -1).reshape(outputs, -1)
    elif layer.op_type == "Gemm" and layer.attributes.get("transB", 0):
        by_k = centered
    elif centered.dim() == 2:
        by_k = centered.t()
    else:
        log.warning("not emulating pair saturation in '%s': its weight has %d axes", layer.node_name, centered.dim())
        return None
    depth = by_k.shape[1]
    even = torch.nn.functional.pad(by_k, (0, depth % 2))
    first, second = even[:, 0::2], even[:, 1::2]
    highest = _UINT8.maximum * (first.clamp(min=0) + second.clamp(min=0))
    lowest = _UINT8.maximum * (first.clamp(max=0) + second.clamp(max=0))
    channels, pairs = torch.nonzero((highest > _INT16.maximum) | (lowest < _INT16.minimum), as_tuple=True)
    if channels.numel() == 0:
        return None
    entries = torch.stack([2 * pairs, (2 * pairs + 1).clamp(max=depth - 1)], dim=1).reshape(-1)
    weight = torch.stack([first[channels, pairs], second[channels, pairs]], dim=1)
    if layer.op_type != "Conv":
        return _Pairs(entries, torch.zeros(entries.numel(), 0, dtype=torch.int64), weight, channels)
    group = (channels // (outputs // layer.attributes.get("group", 1))).repeat_interleave(2)
    positions = torch.stack(torch.unravel_index(entries // group_channels, tuple(kernel)), dim=1)
    return _Pairs(group * group_channels + entries % group_channels, positions, weight, channels)


def _pair_saturation(
    attrs: Mapping[str, Any],
    integers: torch.Tensor,
    kernel: Sequence[int],
    zero_point: torch.Tensor,
    pairs: _Pairs,
    accumulator: torch.Tensor,
) -> torch.Tensor:
    """What clamping each pair's sum of raw uint8 x int8 products to int16 changes in the exact accumulator.

    The raw input is the centered one plus the zero point (padding included), so a pair's raw
    sum is its centered sum plus zp * (w_a + w_b). The sums are formed in float32 whatever
    the accumulator's type: a raw pair sum is at most 2 * 255 * 127 in magnitude, far inside
    float32's exact integers (2^24), and gathering every pair at every position, most of
    this function's time, moves half the bytes it would in float64."""
    axis = attrs["channel_axis"] % accumulator.dim()
    integers = integers.to(torch.float32)
    weight = pairs.weight.to(torch.float32)
    sums = _pair_sums(attrs, integers, kernel, pairs.sources, pairs.offsets, weight)
    sums += zero_point.to(torch.float32) * _along(weight.sum(dim=1), axis, accumulator.dim())
    excess = sums - torch.clamp(sums, _INT16.minimum, _INT16.maximum)
    where = list(torch.nonzero(excess, as_tuple=True))
    change = excess[tuple(where)].neg_().to(accumulator.dtype)
    where[axis] = pairs.channels[where[axis]]
    return torch.zeros_like(accumulator).index_put_(tuple(where), change, accumulate=True)


def _pair_sums(
    attrs: Mapping[str, Any],
    integers: torch.Tensor,
    kernel: Sequence[int],
    sources: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """Each pair's sum of its two centered products, with the pairs along the layer's channel axis.

    For a Conv the two inputs of each pair at every output position are gathered from the
    padded input (padding, strides and dilations resolved as the Conv op does)."""
    if offsets.shape[1] == 0:
        gathered = integers.index_select(-1, sources).unflatten(-1, weight.shape)
        return torch.addcmul(gathered[..., 0] * weight[:, 0], gathered[..., 1], weight[:, 1])
    spatial = integers.dim() - 2
    strides, dilations = strides_and_dilations(attrs, spatial)
    pads = spatial_pads(attrs, integers.shape[2:], kernel, strides, dilations)
    padded = torch.nn.functional.pad(integers, torch_pads(pads)).contiguous()
    sizes = [
        (size - dilation * (extent - 1) - 1) // stride + 1
        for size, extent, stride, dilation in zip(padded.shape[2:], kernel, strides, dilations)
    ]
    start = sources * padded.stride(1)
    window = torch.zeros((), dtype=torch.int64)
    for axis in range(spatial):
        step = padded.stride(2 + axis)
        start = start + offsets[:, axis] * dilations[axis] * step
        window = window.unsqueeze(-1) + torch.arange(sizes[axis]) * strides[axis] * step
    index = (start.reshape(-1, *[1] * spatial) + window).reshape(-1)
    gathered = padded.flatten(1).index_select(1, index).reshape(len(integers), *weight.shape, *sizes)
    first, second = (weight[:, entry].reshape(-1, *[1] * spatial) for entry in (0, 1))
    return torch.addcmul(gathered[:, :, 0] * first, gathered[:, :, 1], second)


def _accumulator_bound(
    source: Step, centered: torch.Tensor, output_axis: int, constants: Mapping[str, torch.Tensor]
) -> float:
    """An upper bound on |accumulator| before the bias: max |x_q - zp_x| (8-bit input) times
    the largest output channel's sum of |w_q - zp_w|."""
    largest_input = 255.0 + abs(float(_zero_point(source, constants)))
    reduce = tuple(axis for axis in range(centered.dim()) if axis != output_axis) or (0,)
    return largest_input * float(centered.abs().sum(dim=reduce).max())


def _integer_accumulation(function: OpFunction, dtype: torch.dtype) -> OpFunction:
    """The layer computed as ORT's integer kernel: exact accumulator, float output = acc * s_x * s_w.

    Inputs: x (dequantized), centered integer weight, own bias or None, bias of a following
    Add or None, s_x, s_x * s_w shaped for the output, s_x * s_w per channel, then for a kernel
    that saturates pairs of products the input zero point and the _Pairs fields (else None).
    Outputs: the layer's float output and the accumulator the unit's QuantizeLinear requantizes.
    """

    def run(attrs: Mapping[str, Any], inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        values, weight, own_bias, unit_bias, input_scale, output_scale, bias_scale, *pairs = inputs
        integers = round_straight_through(values / input_scale)
        accumulator = function(attrs, [integers.to(dtype), weight.to(dtype)])[0]
        zero_point, *pair_fields = pairs
        if zero_point is not None:
            pair_integers = integers.detach().to(dtype)
            accumulator = accumulator + _pair_saturation(
                attrs, pair_integers, weight.shape[2:], zero_point, _Pairs(*pair_fields), accumulator
            )
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
