"""`quanos energy`: per-layer and total figures as a table or JSON, from a model and a plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.cli import main
from quanos_onnx.hwmodel import estimate, load_profile
from quanos_onnx.layers import list_layers
from quanos_onnx.model import load_model
from quanos_onnx.plan import LayerPlan, Plan


def tiny_model(path: Path) -> Path:
    """Conv(1->4, 3x3, pad 1) on 1x6x6, Relu, Flatten, Gemm(144 -> 3)."""
    nodes = [
        helper.make_node("Conv", ["image", "conv.w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w"], ["logits"], name="fc", transB=1),
    ]
    weights = [
        numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "conv.w"),
        numpy_helper.from_array(np.ones((3, 144), np.float32), "fc.w"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "tiny.onnx")


def run(*args: str):
    return CliRunner().invoke(main, ["energy", *args])


def test_table_lists_every_layer_and_the_total(model_path: Path) -> None:
    result = run(str(model_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("hardware: standard (built-in:standard)")
    assert any(line.startswith("conv ") and "32/32" in line for line in lines)
    assert any(line.startswith("fc ") for line in lines)
    total = next(line for line in lines if line.startswith("total "))
    # conv: 36 input + 36 weight accesses, 36*4*9 MACs; fc: 144 + 432 accesses, 432 MACs
    assert total.split()[3:5] == ["648", "1728"]
    assert any(line.startswith("vs uniform 16-bit: energy") for line in lines)


def test_json_document_matches_the_library(model_path: Path) -> None:
    result = run(str(model_path), "--hw", "dvafs", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["format"] == "quanos-energy"
    assert list(document["profiles"]) == ["dvafs"]
    layers = list_layers(load_model(model_path))
    expected = estimate(layers, None, load_profile("dvafs"))
    totals = document["profiles"]["dvafs"]["totals"]
    assert totals["energy_pj"] == pytest.approx(expected.energy_pj)
    assert totals["mem_accesses"] == 648 and totals["macs"] == 1728


def test_plan_bits_are_used_and_missing_layers_count_as_float(model_path: Path, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(Plan((LayerPlan("conv", 4, 8),), method="given").dumps())
    result = run(str(model_path), "--plan", str(plan_path), "--json")
    assert result.exit_code == 0, result.output
    # click 8.2+ keeps stderr apart from stdout; the note goes to stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["profiles"]["standard"]["layers"]}
    assert (rows["conv"]["weight_bits"], rows["conv"]["act_bits"], rows["conv"]["mac_bits"]) == (4, 8, 8)
    assert rows["fc"]["weight_bits"] == 32
    assert "fc" in result.stderr and "float" in result.stderr


def test_bad_profile_is_one_line_naming_the_field(model_path: Path, tmp_path: Path) -> None:
    profile = tmp_path / "hw.json"
    profile.write_text(json.dumps({**json.loads(_standard_profile_text()), "mac_add_pj": "x"}))
    result = run(str(model_path), "--hw", str(profile))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "'mac_add_pj'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plan_naming_an_unknown_layer_is_refused(model_path: Path, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(Plan((LayerPlan("conv9", 4, 4),)).dumps())
    result = run(str(model_path), "--plan", str(plan_path))
    assert result.exit_code == 1
    assert "conv9" in result.stderr


def test_model_without_layers_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["out"], name="relu")], "empty",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "relu.onnx")
    result = run(str(tmp_path / "relu.onnx"))
    assert result.exit_code == 1
    assert "no quantizable layers" in result.stderr


def _standard_profile_text() -> str:
    from importlib import resources

    return resources.files("quanos_onnx.hwmodel").joinpath("profiles", "standard.json").read_text()


@pytest.mark.parametrize(
    "relative", ["models/mnist/mnist-8.onnx", "models/cifar10/resnet20_cifar10_akamaster.onnx"]
)
def test_shared_models_print_per_layer_and_total_figures(shared_dir: Path, relative: str) -> None:
    model = shared_dir / relative
    result = run(str(model), "--hw", "dg")
    assert result.exit_code == 0, result.output
    layers = list_layers(load_model(model))
    lines = result.stdout.splitlines()
    for layer in layers:
        assert any(line.startswith(f"{layer.name} ") for line in lines), layer.name
    expected = estimate(layers, None, load_profile("dg"))
    assert f"total energy {expected.energy_pj / 1e9:.4f} mJ" in result.stdout
