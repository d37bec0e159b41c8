"""layers.py: what a layer is (shapes, params, MACs, block, output flag) and the residual joins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quanos_onnx.cli import main
from quanos_onnx.layers import find_joins, layer_table, list_layers
from quanos_onnx.model import normalize

from tiny_models import GraphBuilder, resnet_style


def _zoo_model() -> onnx.ModelProto:
    """One of each layer kind: dense, grouped and depthwise Conv, ConvTranspose, Gemm
    (transB 0) with a BatchNormalization after it, and a MatMul with a separate bias Add."""
    builder = GraphBuilder()
    x = builder.relu(builder.conv("x", 4, 8, name="dense"))
    x = builder.conv(x, 8, 8, group=2, name="grouped")
    x = builder.relu(builder.conv(x, 8, 8, group=8, name="depthwise"))
    up_weight = builder.weight("up.w", (8, 4, 2, 2), 32)
    x = builder.node("ConvTranspose", [x, up_weight], "up", kernel_shape=[2, 2], strides=[2, 2])
    x = builder.node("Flatten", [builder.node("GlobalAveragePool", [x])])
    x = builder.gemm(x, 4, 6, trans_b=0, name="fc")
    stats = [builder.constant(f"bn.{n}", v) for n, v in
             [("scale", np.full(6, 2, np.float32)), ("shift", np.ones(6, np.float32)),
              ("mean", np.zeros(6, np.float32)), ("var", np.ones(6, np.float32))]]
    x = builder.relu(builder.node("BatchNormalization", [x, *stats], "bn"))
    x = builder.node("MatMul", [x, builder.weight("mm.w", (6, 5), 6)], "mm")
    x = builder.node("Add", [x, builder.constant("mm.b", np.zeros(5, np.float32))], "mm_bias")
    return normalize(builder.model(["N", 4, 6, 6], x, 5))


@pytest.fixture(scope="module")
def zoo():
    return {layer.name: layer for layer in list_layers(_zoo_model())}


def test_every_kind_of_layer_is_found_in_graph_order(zoo):
    assert list(zoo) == ["dense", "grouped", "depthwise", "up", "fc", "mm"]
    assert [layer.op for layer in zoo.values()] == ["Conv", "Conv", "Conv", "ConvTranspose", "Gemm", "MatMul"]


@pytest.mark.parametrize(
    ("name", "weight_shape", "input_shape", "output_shape", "groups", "params", "macs"),
    [
        ("dense", (8, 4, 3, 3), (1, 4, 6, 6), (1, 8, 6, 6), 1, 8 * 4 * 9 + 8, 8 * 36 * 4 * 9),
        ("grouped", (8, 4, 3, 3), (1, 8, 6, 6), (1, 8, 6, 6), 2, 8 * 4 * 9 + 8, 8 * 36 * 4 * 9),
        ("depthwise", (8, 1, 3, 3), (1, 8, 6, 6), (1, 8, 6, 6), 8, 8 * 9 + 8, 8 * 36 * 9),
        ("up", (8, 4, 2, 2), (1, 8, 6, 6), (1, 4, 12, 12), 1, 8 * 4 * 4, 8 * 36 * 4 * 4),
        ("fc", (4, 6), (1, 4), (1, 6), 1, 4 * 6 + 6, 4 * 6),
        ("mm", (6, 5), (1, 6), (1, 5), 1, 6 * 5 + 5, 6 * 5),
    ],
)
def test_shapes_params_and_macs_per_sample(zoo, name, weight_shape, input_shape, output_shape, groups, params, macs):
    layer = zoo[name]
    assert layer.weight_shape == weight_shape
    assert layer.input_shape == input_shape
    assert layer.output_shape == output_shape
    assert layer.groups == groups
    assert layer.params == params
    assert layer.macs == macs


def test_per_channel_axis_is_the_output_channel_axis(zoo):
    assert {name: layer.weight_axis for name, layer in zoo.items()} == {
        "dense": 0, "grouped": 0, "depthwise": 0, "up": 1, "fc": 1, "mm": 1,
    }
    assert (zoo["fc"].in_features, zoo["fc"].out_features) == (4, 6)
    assert (zoo["up"].in_features, zoo["up"].out_features) == (8, 4)


def test_gemm_with_transposed_weight_reads_its_output_axis_first():
    builder = GraphBuilder()
    flat = builder.node("Flatten", ["x"])
    out = builder.gemm(flat, 12, 7, trans_b=1, name="fc")
    (layer,) = list_layers(normalize(builder.model(["N", 3, 2, 2], out, 7)))
    assert layer.weight_shape == (7, 12)
    assert layer.weight_axis == 0
    assert (layer.in_features, layer.out_features, layer.macs) == (12, 7, 84)


def test_blocks_take_bias_add_batchnorm_and_activation(zoo):
    assert zoo["dense"].block_nodes == ("relu1",)
    assert zoo["grouped"].block_nodes == ()
    assert zoo["fc"].block_nodes == ("bn", "relu5")
    assert zoo["fc"].block_output == "relu5_out"
    assert zoo["mm"].block_nodes == ("mm_bias",)
    assert zoo["mm"].bias == "mm.b"


def test_batchnorm_after_conv_is_folded_into_the_layer():
    builder = GraphBuilder()
    conv = builder.conv("x", 3, 4, name="conv", bias=False)
    stats = [builder.constant(f"bn.{n}", np.full(4, v, np.float32)) for n, v in
             [("scale", 2.0), ("shift", 0.5), ("mean", 0.1), ("var", 4.0)]]
    out = builder.relu(builder.node("BatchNormalization", [conv, *stats], "bn"))
    model = normalize(builder.model(["N", 3, 4, 4], out))
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}
    (layer,) = list_layers(model)
    assert layer.bias is not None
    assert layer.block_nodes == ("relu1",)


def test_only_the_classifier_is_the_output_layer(zoo):
    assert [name for name, layer in zoo.items() if layer.is_output] == ["mm"]


def test_a_matmul_of_two_computed_tensors_is_not_a_layer():
    builder = GraphBuilder()
    left = builder.node("Flatten", ["x"])
    right = builder.node("Transpose", [left], perm=[1, 0])
    out = builder.node("MatMul", [left, right], "gram")
    assert list_layers(normalize(builder.model([2, 3, 2, 2], out))) == ()


@pytest.fixture(scope="module")
def resnet():
    model = normalize(resnet_style())
    layers = list_layers(model)
    return model, layers, {join.name: join for join in find_joins(model, layers)}


def test_residual_joins_and_the_layers_they_feed(resnet):
    _, _, joins = resnet
    assert list(joins) == ["block1.add", "block2.add"]
    assert joins["block1.add"].inputs == ("block1.conv2_out", "relu1_out")
    assert joins["block1.add"].downstream_layers == ("block2.conv1", "block2.shortcut")
    assert joins["block2.add"].downstream_layers == ("classifier",)


def test_projection_shortcut_is_detected(resnet):
    _, _, joins = resnet
    assert joins["block1.add"].shortcut_layers == ()
    assert joins["block2.add"].shortcut_layers == ("block2.shortcut",)


def test_concat_of_two_branches_is_a_join_but_a_bias_add_is_not():
    builder = GraphBuilder()
    left = builder.relu(builder.conv("x", 3, 4, name="left"))
    right = builder.relu(builder.conv("x", 3, 4, name="right"))
    merged = builder.node("Concat", [left, right], "merge", axis=1)
    shifted = builder.node("Add", [merged, builder.constant("shift", np.ones((1, 8, 1, 1), np.float32))], "shift_add")
    out = builder.conv(shifted, 8, 2, name="after")
    model = normalize(builder.model(["N", 3, 4, 4], out))
    (join,) = find_joins(model, list_layers(model))
    assert (join.name, join.op) == ("merge", "Concat")
    assert join.downstream_layers == ("after",)
    assert join.shortcut_layers == ()


def test_layer_table_rows_are_what_a_user_picks_bits_from(zoo):
    rows = layer_table(list(zoo.values()))
    assert rows[2]["layer"] == "depthwise"
    assert rows[2]["weight"] == "8x1x3x3"
    assert rows[2]["groups"] == 8
    assert rows[-1]["output_layer"] is True


@pytest.fixture()
def resnet_file(tmp_path: Path) -> Path:
    path = tmp_path / "resnet.onnx"
    onnx.save(resnet_style(), path)
    return path


def test_cli_layers_prints_a_table(resnet_file: Path):
    result = CliRunner().invoke(main, ["layers", str(resnet_file)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["layer", "op"]
    assert any(line.startswith("block2.shortcut ") for line in lines)
    assert any(line.startswith("block2.add ") and line.split()[-1] == "classifier" for line in lines)


def test_cli_layers_json(resnet_file: Path):
    result = CliRunner().invoke(main, ["layers", str(resnet_file), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert [layer["name"] for layer in document["layers"]] == [
        "stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "block2.shortcut", "classifier",
    ]
    assert document["layers"][0]["macs"] == 8 * 64 * 3 * 9
    assert document["joins"][1]["shortcut_layers"] == ["block2.shortcut"]


def test_cli_layers_on_a_missing_model_is_one_line(tmp_path: Path):
    missing = tmp_path / "nope.onnx"
    result = CliRunner().invoke(main, ["layers", str(missing)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "nope.onnx" in result.output and "not found" in result.output
