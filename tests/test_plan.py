"""plan.py: the versioned JSON plan, read back exactly, refused clearly when wrong."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from quanos_onnx.errors import PlanError
from quanos_onnx.layers import list_layers
from quanos_onnx.model import normalize
from quanos_onnx.plan import (
    PLAN_VERSION,
    FirstOutputBits,
    JoinPlan,
    LayerPlan,
    Plan,
    first_and_last_layers,
    plan_from_json,
    read_plan,
    validate_plan,
    with_act_bits,
    with_activation_bits,
    with_input_bits,
)

from tiny_models import resnet_style


@pytest.fixture(scope="module")
def layers():
    return list_layers(normalize(resnet_style()))


def _plan() -> Plan:
    return Plan(
        (
            LayerPlan("stem", 6, 7, group=None, ans_mean=0.25, ans_std=0.125),
            LayerPlan("block1.conv1", 4, 4, group="block1.add"),
            LayerPlan("classifier", None, None, keep_float=True),
        ),
        k_init=16,
        k_min=3,
        method="quanos",
        details={"eps": 0.05, "rounds": 2},
        joins=(JoinPlan("block1.add", 4, ("a", "b"), "block1.conv1"),),
    )


def _write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    return path


def test_json_round_trip_is_exact(tmp_path: Path):
    plan = _plan()
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    assert read_plan(path) == plan


def test_join_operand_bits_round_trip_and_floor_every_quantized_joins_operands(tmp_path: Path):
    plan = replace(_plan(), join_operand_bits=8)
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    assert read_plan(path) == plan
    assert json.loads(path.read_text())["join_operand_bits"] == 8
    assert plan.operand_bits(JoinPlan("narrow", 4, (), None)) == 8
    assert plan.operand_bits(JoinPlan("wide", 12, (), None)) == 12
    assert plan.operand_bits(JoinPlan("float", None, (), None)) is None
    assert _plan().operand_bits(JoinPlan("narrow", 4, (), None)) == 4


def test_a_plan_without_join_operand_bits_reads_as_the_papers_rule(tmp_path: Path):
    document = json.loads(_plan().dumps())
    del document["join_operand_bits"]
    assert read_plan(_write(tmp_path, document)).join_operand_bits is None


@pytest.mark.parametrize("value", [1, 17, "8", True])
def test_join_operand_bits_outside_2_to_16_are_refused(tmp_path: Path, value: object):
    document = json.loads(_plan().dumps())
    document["join_operand_bits"] = value
    with pytest.raises(PlanError, match="join_operand_bits"):
        read_plan(_write(tmp_path, document))


def test_uniform_plan_keeps_the_output_layer_float(layers):
    plan = Plan.uniform(layers, 5)
    assert [(e.weight_bits, e.act_bits) for e in plan.layers[:-1]] == [(5, 5)] * (len(layers) - 1)
    assert plan.layers[-1].keep_float and plan.layers[-1].name == "classifier"
    assert Plan.uniform(layers, 5, keep_output_float=False).layers[-1].weight_bits == 5


def test_first_and_last_layers_are_the_first_and_the_quantized_output(layers):
    assert first_and_last_layers(layers, quantize_output=True) == ("stem", "classifier")
    assert first_and_last_layers(layers, quantize_output=False) == ("stem",)
    (only,) = [layer for layer in layers if layer.is_output]
    assert first_and_last_layers([only], quantize_output=False) == ()
    assert first_and_last_layers([only], quantize_output=True) == ("classifier",)


def test_with_bits_pins_weights_and_activations_float_included(layers):
    plan = Plan.uniform(layers, 4).with_bits(("stem", "classifier"), 8)
    entries = plan.by_name()
    assert (entries["stem"].weight_bits, entries["stem"].act_bits, entries["classifier"].act_bits) == (8, 8, 8)
    assert entries["classifier"].quantized
    assert {(e.weight_bits, e.act_bits) for e in plan.layers if e.name not in ("stem", "classifier")} == {(4, 4)}
    with pytest.raises(PlanError, match="pinned bits: 17 bits is outside 2..16"):
        plan.with_bits(("stem",), 17)


def test_input_bits_cap_only_the_activation_of_the_layers_reading_the_model_input(layers):
    plan = with_input_bits(Plan.uniform(layers, 6).with_bits(("stem",), 8), layers, 4)
    entries = plan.by_name()
    assert (entries["stem"].weight_bits, entries["stem"].act_bits) == (8, 4)
    assert {(e.weight_bits, e.act_bits) for e in plan.layers if e.name != "stem" and e.quantized} == {(6, 6)}
    assert plan.details["input_bits"] == {"bits": 4, "layers": ["stem"]}
    # a cap, not a floor: a narrower input stays, and an unchanged plan records nothing
    narrow = Plan.uniform(layers, 3)
    assert with_input_bits(narrow, layers, 4) is narrow
    with pytest.raises(PlanError, match="input bits: 1 bits is outside 2..16"):
        with_input_bits(narrow, layers, 1)


def test_act_bits_set_every_quantized_layers_activations_and_leave_weights_and_float_layers(layers):
    plan = with_act_bits(Plan.uniform(layers, 3).with_bits(("stem",), 6), 8)
    assert {e.name: (e.weight_bits, e.act_bits) for e in plan.layers if e.quantized} == {
        e.name: (6 if e.name == "stem" else 3, 8) for e in plan.layers if e.quantized
    }
    assert not plan.by_name()["classifier"].quantized and plan.by_name()["classifier"].act_bits is None
    assert plan.details["act_bits"] == {"bits": 8}
    assert with_act_bits(plan, 4).by_name()["stem"].act_bits == 4  # a setting, not a cap
    with pytest.raises(PlanError, match="activation bits: 1 bits is outside 2..16"):
        with_act_bits(plan, 1)


def test_activation_bits_set_every_activation_then_cap_the_input(layers):
    plan = with_activation_bits(Plan.uniform(layers, 4), layers, act_bits=8, input_bits=3)
    assert plan.by_name()["stem"].act_bits == 3  # the input cap applies after the activation width
    assert {e.act_bits for e in plan.layers if e.quantized and e.name != "stem"} == {8}
    unchanged = Plan.uniform(layers, 4)
    assert with_activation_bits(unchanged, layers) is unchanged


def test_first_output_bits_set_the_readers_inputs_and_leave_their_weights_and_float_readers(layers):
    plan = Plan.uniform(layers, 4)
    pinned = FirstOutputBits(("block1.conv1", "classifier"), 8).apply(plan)
    assert (pinned.by_name()["block1.conv1"].weight_bits, pinned.by_name()["block1.conv1"].act_bits) == (4, 8)
    assert pinned.by_name()["classifier"] == plan.by_name()["classifier"]  # float stays float
    assert [e for e in pinned.layers if e.name != "block1.conv1"] == [e for e in plan.layers if e.name != "block1.conv1"]
    assert FirstOutputBits(("block1.conv1",), 2).apply(Plan.uniform(layers, 6)).by_name()["block1.conv1"].act_bits == 2
    with pytest.raises(PlanError, match="first layer's output bits: 17 bits is outside 2..16"):
        FirstOutputBits(("block1.conv1",), 17)


def test_activation_bits_override_the_first_output_as_they_do_the_first_layer(layers):
    pinned = FirstOutputBits(("block1.conv1",), 8)
    plan = with_activation_bits(Plan.uniform(layers, 4), layers, first_output=pinned)
    assert plan.by_name()["block1.conv1"].act_bits == 8
    plan = with_activation_bits(Plan.uniform(layers, 4), layers, act_bits=6, first_output=pinned)
    assert plan.by_name()["block1.conv1"].act_bits == 6


def test_short_form_bits_sets_weights_and_activations():
    plan = plan_from_json({"format": "quanos-plan", "version": PLAN_VERSION, "layers": [{"name": "stem", "bits": 3}]})
    assert (plan.layers[0].weight_bits, plan.layers[0].act_bits) == (3, 3)


def test_validation_fills_unmentioned_layers_as_float(layers):
    given = plan_from_json({"format": "quanos-plan", "version": PLAN_VERSION, "layers": [{"name": "block1.conv2", "bits": 4}]})
    plan = validate_plan(given, layers)
    assert [e.name for e in plan.layers] == [layer.name for layer in layers]
    assert [e.name for e in plan.layers if e.quantized] == ["block1.conv2"]


def test_version_mismatch_names_the_version(tmp_path: Path):
    document = json.loads(_plan().dumps())
    document["version"] = PLAN_VERSION + 1
    with pytest.raises(PlanError, match=f"version {PLAN_VERSION + 1}") as caught:
        read_plan(_write(tmp_path, document))
    assert "plan.json" in str(caught.value)


def test_unknown_layer_is_named(layers):
    plan = plan_from_json({"format": "quanos-plan", "version": PLAN_VERSION, "layers": [{"name": "conv99", "bits": 4}]})
    with pytest.raises(PlanError, match="'conv99'"):
        validate_plan(plan, layers, "my_plan.json")


@pytest.mark.parametrize("bits", [1, 17])
@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
def test_bits_outside_2_to_16_are_refused(tmp_path: Path, bits: int, field: str):
    entry = {"name": "block1.conv1", "weight_bits": 4, "act_bits": 4, field: bits}
    document = {"format": "quanos-plan", "version": PLAN_VERSION, "layers": [entry]}
    with pytest.raises(PlanError) as caught:
        read_plan(_write(tmp_path, document))
    message = str(caught.value)
    assert "block1.conv1" in message and field in message and f"{bits} bits" in message


def test_uniform_bits_outside_range_are_refused(layers):
    with pytest.raises(PlanError, match="17 bits"):
        Plan.uniform(layers, 17)


def test_malformed_json_names_file_and_line(tmp_path: Path):
    path = tmp_path / "plan.json"
    path.write_text('{\n  "format": "quanos-plan",\n  "layers": [\n')
    with pytest.raises(PlanError, match=r"plan.json: malformed JSON at line \d"):
        read_plan(path)


def test_duplicate_layer_is_named(tmp_path: Path):
    entries = [{"name": "stem", "bits": 4}, {"name": "block1.conv1", "bits": 4}, {"name": "stem", "bits": 5}]
    document = {"format": "quanos-plan", "version": PLAN_VERSION, "layers": entries}
    with pytest.raises(PlanError, match="layer 'stem' appears more than once"):
        read_plan(_write(tmp_path, document))


def test_a_json_file_that_is_not_a_plan_is_refused(tmp_path: Path):
    with pytest.raises(PlanError, match="not a quanos plan"):
        read_plan(_write(tmp_path, {"layers": []}))


def test_missing_plan_file_is_named(tmp_path: Path):
    with pytest.raises(PlanError, match="absent.json: plan file not found"):
        read_plan(tmp_path / "absent.json")


def test_parameter_weighted_average_bits(layers):
    params = {layer.name: layer.params for layer in layers}
    plan = Plan.uniform(layers, 8).with_layers(
        [LayerPlan(layer.name, 4 if layer.name == "stem" else 8, 8) for layer in layers[:-1]]
    )
    quantized = sum(params[layer.name] for layer in layers[:-1])
    expected = (4 * params["stem"] + 8 * (quantized - params["stem"])) / quantized
    assert plan.average_weight_bits(params) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_keep_float_must_be_a_json_boolean(value: object) -> None:
    document = {"format": "quanos-plan", "version": PLAN_VERSION, "layers": [{"name": "a", "bits": 8, "keep_float": value}]}
    with pytest.raises(PlanError, match="\"keep_float\" must be true or false"):
        plan_from_json(document, "plan.json")
