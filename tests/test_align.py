"""passes/align.py: the plan is made consistent at the residual joins before any insertion."""

from __future__ import annotations

import pytest

from quanos_onnx.layers import find_joins, list_layers
from quanos_onnx.model import normalize
from quanos_onnx.passes.align import align_plan
from quanos_onnx.plan import LayerPlan, Plan

from tiny_models import resnet_style

BITS = {"stem": 3, "block1.conv1": 5, "block1.conv2": 4, "block2.conv1": 7,
        "block2.conv2": 2, "block2.shortcut": 8, "classifier": 6}


@pytest.fixture(scope="module")
def resnet():
    model = normalize(resnet_style())
    layers = list_layers(model)
    return layers, find_joins(model, layers)


def _plan(bits: dict[str, int | None]) -> Plan:
    return Plan(tuple(
        LayerPlan(name, None, None, keep_float=True) if b is None else LayerPlan(name, b, b)
        for name, b in bits.items()
    ))


def test_each_join_takes_the_bits_of_the_layer_it_feeds(resnet):
    layers, joins = resnet
    aligned = align_plan(_plan(BITS), layers, joins)
    assert {j.name: (j.bits, j.downstream) for j in aligned.joins} == {
        "block1.add": (7, "block2.conv1"),
        "block2.add": (6, "classifier"),
    }
    assert {j.name: set(j.operands) for j in aligned.joins} == {
        "block1.add": {"block1.conv2_out", "relu1_out"},
        "block2.add": {"block2.conv2_out", "block2.shortcut_out"},
    }


def test_projection_shortcut_takes_its_joins_bits(resnet):
    layers, joins = resnet
    aligned = align_plan(_plan(BITS), layers, joins).by_name()
    shortcut = aligned["block2.shortcut"]
    assert (shortcut.weight_bits, shortcut.act_bits, shortcut.group) == (6, 6, "block2.add")
    assert aligned["block2.conv2"].weight_bits == 2
    assert aligned["block2.conv1"].group == "block1.add"


def test_join_before_a_float_classifier_takes_the_widest_feeding_layer(resnet):
    layers, joins = resnet
    aligned = align_plan(_plan({**BITS, "classifier": None}), layers, joins)
    join = {j.name: j for j in aligned.joins}["block2.add"]
    assert (join.bits, join.downstream) == (8, None)
    assert aligned.by_name()["block2.shortcut"].weight_bits == 8


def test_all_float_plan_leaves_joins_float(resnet):
    layers, joins = resnet
    aligned = align_plan(_plan({name: None for name in BITS}), layers, joins)
    assert [j.bits for j in aligned.joins] == [None, None]
    assert not any(e.quantized for e in aligned.layers)


def test_alignment_is_idempotent_and_keeps_layer_order(resnet):
    layers, joins = resnet
    once = align_plan(_plan(dict(reversed(list(BITS.items())))), layers, joins)
    assert [e.name for e in once.layers] == [layer.name for layer in layers]
    assert align_plan(once, layers, joins) == once
