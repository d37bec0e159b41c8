"""Hardware model: hand-computed layer counts and the paper's Tables II, III, V and VI.

The golden tests rebuild the paper's two models as ONNX graphs here (the layer
configurations of kuangliu/pytorch-cifar's VGG('VGG19') and ResNet18 at 32x32 input, with
10 and 100 classes) and compare against the printed numbers. docs/hardware.md explains
every number that is or is not reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.errors import PlanError
from quanos_onnx.hwmodel import (
    FLOAT_BITS,
    compare_to_uniform,
    count_layer,
    estimate,
    estimate_all,
    load_profile,
    to_json,
)
from quanos_onnx.layers import Layer, find_joins, list_layers
from quanos_onnx.model import infer_shapes
from quanos_onnx.passes.align import align_plan
from quanos_onnx.plan import LayerPlan, Plan

STANDARD = load_profile("standard")
DG = load_profile("dg")
DVAFS = load_profile("dvafs")

PJ_PER_MJ = 1e9
BITS_PER_GBIT = 1e9


# --------------------------------------------------------------------------------------
# Building models


class GraphBuilder:
    """Just enough of onnx.helper to write a CNN as a sequence of calls."""

    def __init__(self, input_shape: Sequence[int]) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.input = helper.make_tensor_value_info("image", TensorProto.FLOAT, list(input_shape))
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def weight(self, name: str, shape: Sequence[int]) -> str:
        self.initializers.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str | None = None, **attrs: object) -> str:
        name = name or self._name(op.lower())
        output = f"{name}_out"
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def conv(
        self, x: str, name: str, c_in: int, c_out: int, kernel: int, stride: int = 1, group: int = 1
    ) -> str:
        w = self.weight(f"{name}.weight", (c_out, c_in // group, kernel, kernel))
        pad = kernel // 2
        return self.node(
            "Conv", [x, w], name, kernel_shape=[kernel, kernel], strides=[stride, stride],
            pads=[pad] * 4, group=group,
        )

    def gemm(self, x: str, name: str, c_in: int, c_out: int) -> str:
        w = self.weight(f"{name}.weight", (c_out, c_in))
        b = self.weight(f"{name}.bias", (c_out,))
        return self.node("Gemm", [x, w, b], name, transB=1)

    def model(self, output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test", [self.input],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            self.initializers,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        proto.ir_version = 10
        return infer_shapes(proto)


VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def vgg19_cifar10() -> onnx.ModelProto:
    """kuangliu/pytorch-cifar VGG('VGG19'): 16 3x3 convs (pad 1), 5 max-pools, Linear(512, 10)."""
    g = GraphBuilder((1, 3, 32, 32))
    x, channels, index = "image", 3, 0
    for entry in VGG19_CONFIG:
        if entry == "M":
            x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            continue
        index += 1
        x = g.node("Relu", [g.conv(x, f"conv{index}", channels, int(entry), 3)])
        channels = int(entry)
    x = g.node("Flatten", [x])
    return g.model(g.gemm(x, "classifier", 512, 10))


def resnet18_cifar100() -> onnx.ModelProto:
    """kuangliu/pytorch-cifar ResNet18 with 100 classes: a 3x3 stem, four stages of two
    BasicBlocks (64, 128, 256, 512 channels; stride 2 and a 1x1 projection shortcut at the
    start of stages 2-4), a 4x4 average pool and Linear(512, 100)."""
    g = GraphBuilder((1, 3, 32, 32))
    x = g.node("Relu", [g.conv("image", "conv1", 3, 64, 3)])
    channels, index = 64, 1
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            y = g.node("Relu", [g.conv(x, f"conv{index + 1}", channels, planes, 3, stride)])
            y = g.conv(y, f"conv{index + 2}", planes, planes, 3)
            shortcut = x
            if stride != 1 or channels != planes:
                shortcut = g.conv(x, f"shortcut{stage}", channels, planes, 1, stride)
            x = g.node("Relu", [g.node("Add", [y, shortcut])])
            channels, index = planes, index + 2
    x = g.node("Flatten", [g.node("AveragePool", [x], kernel_shape=[4, 4])])
    return g.model(g.gemm(x, "classifier", 512, 100))


@pytest.fixture(scope="module")
def vgg_layers() -> tuple[Layer, ...]:
    return list_layers(vgg19_cifar10())


RESNET18 = resnet18_cifar100()


@pytest.fixture(scope="module")
def resnet_layers() -> tuple[Layer, ...]:
    return list_layers(RESNET18)


def single_layer(node_op: str, x_shape: Sequence[int], w_shape: Sequence[int], **attrs: object) -> Layer:
    g = GraphBuilder(x_shape)
    w = g.weight("w", w_shape)
    (layer,) = list_layers(g.model(g.node(node_op, ["image", w], "layer", **attrs)))
    return layer


# --------------------------------------------------------------------------------------
# Plans and comparisons


def plan_from_bits(layers: Sequence[Layer], bits: dict[str, int]) -> Plan:
    """Weights and input activations at the given bits; layers not named stay float."""
    entries = tuple(
        LayerPlan(layer.name, bits[layer.name], bits[layer.name])
        if layer.name in bits
        else LayerPlan(layer.name, None, None, keep_float=True)
        for layer in layers
    )
    return Plan(entries, method="paper-bits")


def uniform(layers: Sequence[Layer], bits: int) -> Plan:
    """The paper's baselines: all layers at `bits`, the output layer at 32 bits."""
    return Plan.uniform(layers, bits, keep_output_float=True)


def conv_rows_only(layers: Sequence[Layer], plan: Plan, profile=STANDARD):
    """The estimate restricted to convolutions (the paper's C1..C17 without the classifier)."""
    return estimate([layer for layer in layers if layer.op == "Conv"], plan, profile)


def matches_printed(computed: float, printed: str) -> bool:
    """Within 1% of the printed value or within its printed rounding, whichever is looser."""
    value = Decimal(printed)
    half_unit = Decimal(1).scaleb(value.as_tuple().exponent) / 2
    tolerance = max(float(value) * 0.01, float(half_unit))
    return abs(computed - float(value)) <= tolerance + 1e-12


def test_matches_printed_uses_the_looser_of_one_percent_and_rounding() -> None:
    assert matches_printed(0.0463, "0.05")  # rounding: 0.045..0.055
    assert not matches_printed(0.0446, "0.05")
    assert matches_printed(1.4666, "1.47")
    assert not matches_printed(1.42, "1.44")


# --------------------------------------------------------------------------------------
# Hand-computed single layers


def test_depthwise_conv_divides_by_groups() -> None:
    # 8 channels, 10x10, 3x3 depthwise (group 8), pad 1: N_A = 8*10*10 + 8*1*3*3 = 872,
    # N_C = 10*10 positions * 8 out * (8/8 in) * 9 = 7200.
    layer = single_layer("Conv", (1, 8, 10, 10), (8, 1, 3, 3), group=8, pads=[1, 1, 1, 1])
    counts = count_layer(layer)
    assert (counts.activation_accesses, counts.weight_accesses, counts.macs) == (800, 72, 7200)
    row = estimate([layer], plan_from_bits([layer], {"layer": 8}), STANDARD).layers[0]
    assert row.mem_accesses == 872
    # 872 accesses * 2.5 pJ * 8 bits + 7200 MACs * (3.1 * 8 / 32 + 0.1) pJ
    assert row.energy_pj == pytest.approx(872 * 20 + 7200 * 0.875)
    assert row.weight_memory_bits == 72 * 8


def test_strided_conv_counts_the_output_map() -> None:
    # 3 -> 4 channels, 3x3, stride 2, no padding, 9x9 input -> 4x4 output.
    # N_A = 3*81 + 4*3*9 = 243 + 108 = 351; N_C = 16 * 4 * 3 * 9 = 1728.
    layer = single_layer("Conv", (1, 3, 9, 9), (4, 3, 3, 3), strides=[2, 2])
    assert layer.output_shape == (1, 4, 4, 4)
    counts = count_layer(layer)
    assert (counts.activation_accesses + counts.weight_accesses, counts.macs) == (351, 1728)


def test_gemm_is_a_1x1_conv_on_a_1x1_map() -> None:
    # 20 -> 5 features (transB): N_A = 20 + 100, N_C = 100.
    layer = single_layer("Gemm", (1, 20), (5, 20), transB=1)
    counts = count_layer(layer)
    assert (counts.activation_accesses, counts.weight_accesses, counts.macs) == (20, 100, 100)


def test_batched_matmul_repeats_per_row() -> None:
    # 7 rows of 6 features times a 6x3 weight: N_A = 7*6 + 18 = 60, N_C = 7 * 18 = 126.
    layer = single_layer("MatMul", (1, 7, 6), (6, 3))
    counts = count_layer(layer)
    assert (counts.activation_accesses, counts.weight_accesses, counts.macs) == (42, 18, 126)


@pytest.mark.parametrize(("group", "macs"), [(1, 1800), (2, 900)])
def test_conv_transpose_counts_each_input_pixel_against_its_group(group: int, macs: int) -> None:
    # 4 -> 2 channels, 5x5 input, 3x3 kernel, stride 2 -> 11x11 output. Every input pixel
    # meets every weight of its group once: 25 * 4 * (2 / group) * 9. This equals the MACs of
    # the Conv it is the transpose of (11x11x2 -> 5x5x4, stride 2): 25 * 4 * (2 / group) * 9.
    layer = single_layer("ConvTranspose", (1, 4, 5, 5), (4, 2 // group, 3, 3), strides=[2, 2], group=group)
    assert layer.output_shape == (1, 2, 11, 11)
    counts = count_layer(layer)
    assert (counts.activation_accesses, counts.weight_accesses, counts.macs) == (100, 72 // group, macs)


def test_weight_and_activation_bits_are_priced_separately() -> None:
    # Weights 4-bit, activations 8-bit: each access at its own width, the MAC at 8 bits.
    layer = single_layer("Conv", (1, 8, 10, 10), (8, 1, 3, 3), group=8, pads=[1, 1, 1, 1])
    plan = Plan((LayerPlan("layer", weight_bits=4, act_bits=8),))
    for profile, scale in ((STANDARD, 1.0), (DG, 0.610), (DVAFS, 0.177)):
        row = estimate([layer], plan, profile).layers[0]
        assert row.access_energy_pj == pytest.approx(800 * 2.5 * 8 + 72 * 2.5 * 4)
        assert row.mac_energy_pj == pytest.approx(7200 * 0.875 * scale)
        assert row.mac_bits == 8
        assert row.weight_memory_bits == 72 * 4


def test_float_layers_and_a_missing_plan_count_at_32_bits() -> None:
    layer = single_layer("Gemm", (1, 20), (5, 20), transB=1)
    no_plan = estimate([layer], None, DG).layers[0]
    kept_float = estimate([layer], plan_from_bits([layer], {}), DG).layers[0]
    assert no_plan == kept_float
    assert (no_plan.weight_bits, no_plan.act_bits) == (FLOAT_BITS, FLOAT_BITS)
    # 32-bit MACs get no DG scaling: 120 * 2.5 * 32 + 100 * (3.1 + 0.1)
    assert no_plan.energy_pj == pytest.approx(120 * 80 + 100 * 3.2)
    assert no_plan.weight_memory_bits == 100 * 32


def test_a_plan_without_the_layer_is_refused() -> None:
    layer = single_layer("Gemm", (1, 20), (5, 20), transB=1)
    with pytest.raises(PlanError, match="'layer'"):
        estimate([layer], Plan((LayerPlan("other", 8, 8),)), STANDARD)


def test_estimate_all_and_json_cover_the_three_profiles(resnet_layers) -> None:
    plan = uniform(resnet_layers, 8)
    estimates = estimate_all(resnet_layers, plan)
    assert list(estimates) == ["standard", "dg", "dvafs"]
    assert estimates["standard"].energy_pj > estimates["dg"].energy_pj > estimates["dvafs"].energy_pj
    document = to_json(resnet_layers, plan)
    assert document["format"] == "quanos-energy"
    assert list(document["profiles"]) == ["standard", "dg", "dvafs"]
    dg = document["profiles"]["dg"]
    assert dg["totals"]["energy_pj"] == pytest.approx(estimates["dg"].energy_pj)
    assert [row["name"] for row in dg["layers"]] == [layer.name for layer in resnet_layers]
    assert [entry["bits"] for entry in dg["vs_uniform"]] == [16, 8]
    assert dg["vs_uniform"][1]["energy_ratio"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# CIFAR-10 VGG-19 (paper Tables II and III)


def test_vgg19_has_the_papers_layers(vgg_layers) -> None:
    assert [layer.op for layer in vgg_layers] == ["Conv"] * 16 + ["Gemm"]
    assert vgg_layers[-1].is_output
    # The weight tensors of kuangliu's VGG('VGG19') in torch hold 20,024,000 elements.
    assert sum(count_layer(layer).weight_accesses for layer in vgg_layers) == 20_024_000


@pytest.mark.parametrize(("bits", "memory_gbit"), [(16, "0.32"), (8, "0.16"), (5, "0.1")])
def test_vgg19_uniform_memory_matches_table_ii(vgg_layers, bits: int, memory_gbit: str) -> None:
    plan = uniform(vgg_layers, bits)
    with_classifier = estimate(vgg_layers, plan, STANDARD).weight_memory_bits / BITS_PER_GBIT
    convs_only = conv_rows_only(vgg_layers, plan).weight_memory_bits / BITS_PER_GBIT
    assert matches_printed(with_classifier, memory_gbit)
    assert matches_printed(convs_only, memory_gbit)


@pytest.mark.parametrize(
    ("bits", "profile", "energy_mj"),
    [
        (16, STANDARD, "1.47"), (8, STANDARD, "0.75"), (5, STANDARD, "0.49"),
        # E_cfg is fitted to these four, so they check the data file, not the method.
        (8, DG, "0.62"), (5, DG, "0.36"), (8, DVAFS, "0.47"), (5, DVAFS, "0.29"),
        # "integrating DG, DVAFS does not change the energy of the 16-bit model"
        (16, DG, "1.47"), (16, DVAFS, "1.47"),
    ],
)
def test_vgg19_uniform_energy_matches_table_iii(vgg_layers, bits, profile, energy_mj) -> None:
    plan = uniform(vgg_layers, bits)
    assert matches_printed(estimate(vgg_layers, plan, profile).energy_pj / PJ_PER_MJ, energy_mj)
    assert matches_printed(conv_rows_only(vgg_layers, plan, profile).energy_pj / PJ_PER_MJ, energy_mj)


VGG_QUANOS_PRINTED_BITS = (9, 4, 5, 3, 3, 3, 4, 2, 4, 6, 9, 8, 9, 7, 3, 2, 2)


def test_vgg19_quanos_row_does_not_follow_from_its_printed_bits(vgg_layers) -> None:
    # Table II prints C1..C17 and 0.09 Gbit, Table III 0.39 / 0.29 / 0.25 mJ. C1..C16 on the
    # convs and C17 on the classifier give 5.78 weight-weighted bits, not the <= 4.75 that
    # 0.09 Gbit needs (docs/hardware.md). These pins make a change of counting visible.
    bits = {layer.name: b for layer, b in zip(vgg_layers, VGG_QUANOS_PRINTED_BITS)}
    plan = plan_from_bits(vgg_layers, bits)
    assert estimate(vgg_layers, plan, STANDARD).weight_memory_bits == 115_705_024
    energies = [estimate(vgg_layers, plan, p).energy_pj / PJ_PER_MJ for p in (STANDARD, DG, DVAFS)]
    assert energies == pytest.approx([0.5166, 0.4037, 0.3417], abs=1e-4)
    assert not matches_printed(115_705_024 / BITS_PER_GBIT, "0.09")


# --------------------------------------------------------------------------------------
# CIFAR-100 ResNet-18 (paper Tables V and VI)

RESNET_QUANOS_PRINTED_BITS = (9, 8, 7, 4, 5, 3, 4, 2, 3, 2, 3, 2, 2, 2, 2, 2, 2)
RESNET_16BIT_STANDARD_MJ = 1.44


def resnet_quanos_plan(layers: Sequence[Layer]) -> Plan:
    """C1..C17 on the stem and the 16 block convs; the residual-alignment pass gives each
    projection shortcut the bits of the first conv after its join ("the shortcut has the
    precision of the layer into which it feeds"); the classifier stays float, as the paper says."""
    bits = {f"conv{index}": b for index, b in enumerate(RESNET_QUANOS_PRINTED_BITS, start=1)}
    bits.update(shortcut2=16, shortcut3=16, shortcut4=16)
    return align_plan(plan_from_bits(layers, bits), layers, find_joins(RESNET18, layers))


def test_resnet18_has_the_papers_layers(resnet_layers) -> None:
    names = [layer.name for layer in resnet_layers]
    assert names.count("classifier") == 1 and resnet_layers[-1].is_output
    assert len([n for n in names if n.startswith("conv")]) == 17
    assert len([n for n in names if n.startswith("shortcut")]) == 3
    # The weight tensors of kuangliu's ResNet18(num_classes=100) hold 11,210,432 elements.
    assert sum(count_layer(layer).weight_accesses for layer in resnet_layers) == 11_210_432


@pytest.mark.parametrize(("bits", "memory_gbit"), [(16, "0.18"), (8, "0.09"), (4, "0.05")])
def test_resnet18_uniform_memory_matches_table_v_with_the_32_bit_classifier(
    resnet_layers, bits: int, memory_gbit: str
) -> None:
    memory = estimate(resnet_layers, uniform(resnet_layers, bits), STANDARD).weight_memory_bits
    assert matches_printed(memory / BITS_PER_GBIT, memory_gbit)


def test_resnet18_4_bit_memory_convs_only_does_not_round_to_the_printed_value(resnet_layers) -> None:
    convs_only = conv_rows_only(resnet_layers, uniform(resnet_layers, 4)).weight_memory_bits
    assert convs_only == 44_636_928  # 0.0446 Gbit: prints as 0.04, the paper prints 0.05
    assert not matches_printed(convs_only / BITS_PER_GBIT, "0.05")


@pytest.mark.parametrize(("bits", "ratio"), [(8, "0.52"), (4, "0.28")])
def test_resnet18_standard_energy_ratios_match_table_vi(resnet_layers, bits: int, ratio: str) -> None:
    for counting in (estimate, lambda layers, plan, profile: conv_rows_only(layers, plan, profile)):
        full = counting(resnet_layers, uniform(resnet_layers, 16), STANDARD).energy_pj
        low = counting(resnet_layers, uniform(resnet_layers, bits), STANDARD).energy_pj
        assert matches_printed(low / full, ratio)


@pytest.mark.parametrize(("bits", "energy_mj"), [(16, 1.44), (8, 0.75), (4, 0.40)])
def test_resnet18_standard_energy_sits_a_steady_offset_below_table_vi(
    resnet_layers, bits: int, energy_mj: float
) -> None:
    # The absolute ResNet-18 energies are 2.7-3.7% (convs only) below the paper; no counting
    # variant we tried closes the gap for all three bit-widths (docs/hardware.md).
    computed = conv_rows_only(resnet_layers, uniform(resnet_layers, bits)).energy_pj / PJ_PER_MJ
    assert 0.96 <= computed / energy_mj <= 0.975


def test_resnet18_shortcuts_take_the_bits_of_the_layer_they_feed(resnet_layers) -> None:
    plan = resnet_quanos_plan(resnet_layers)
    for shortcut, fed in (("shortcut2", "conv8"), ("shortcut3", "conv12"), ("shortcut4", "conv16")):
        assert plan.layer(shortcut).weight_bits == plan.layer(fed).weight_bits == 2


def test_resnet18_quanos_memory_matches_table_v_convs_only(resnet_layers) -> None:
    plan = resnet_quanos_plan(resnet_layers)
    convs_only = conv_rows_only(resnet_layers, plan).weight_memory_bits / BITS_PER_GBIT
    assert convs_only == pytest.approx(0.024, rel=0.01)
    with_classifier = estimate(resnet_layers, plan, STANDARD).weight_memory_bits / BITS_PER_GBIT
    assert with_classifier == pytest.approx(0.0257, abs=1e-4)  # not the printed 0.024


@pytest.mark.parametrize(("profile", "energy_mj"), [(DG, 0.17), (DVAFS, 0.095)])
def test_resnet18_quanos_dg_dvafs_energy_matches_table_vi(resnet_layers, profile, energy_mj) -> None:
    computed = estimate(resnet_layers, resnet_quanos_plan(resnet_layers), profile).energy_pj
    assert computed / PJ_PER_MJ == pytest.approx(energy_mj, rel=0.03)


def test_resnet18_quanos_standard_energy_and_ratio(resnet_layers) -> None:
    plan = resnet_quanos_plan(resnet_layers)
    (vs16, vs8) = compare_to_uniform(resnet_layers, plan, STANDARD)
    assert (vs16.bits, vs8.bits) == (16, 8)
    assert matches_printed(vs16.energy_ratio, "0.22")  # Table VI: 0.32 (0.22x)
    computed = estimate(resnet_layers, plan, STANDARD).energy_pj / PJ_PER_MJ
    assert 0.96 <= computed / 0.32 <= 0.975  # the same offset as the baselines
    assert vs8.memory_ratio == pytest.approx(
        estimate(resnet_layers, plan, STANDARD).weight_memory_bits / vs8.weight_memory_bits
    )
