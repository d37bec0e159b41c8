"""`quanos finetune`: from a float model and plan.json, or from a compiled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from finetune_task import trained_task
from quanos_onnx.cli import main
from quanos_onnx.finetune import compiled_plan
from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner
from quanos_onnx.quantize import quantize
from quanos_onnx.plan import Plan


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model, train, val = trained_task()
    folder = tmp_path_factory.mktemp("finetune")
    plan = Plan.uniform(list_layers(model), 2, keep_output_float=False)
    paths = {
        "float": folder / "float.onnx",
        "plan": folder / "plan.json",
        "compiled": folder / "compiled.onnx",
        "train": folder / "train.npz",
        "val": folder / "val.npz",
    }
    onnx.save(model, paths["float"])
    paths["plan"].write_text(plan.dumps())
    onnx.save(quantize(model, plan, [train.x[:256]]).model, paths["compiled"])
    np.savez(paths["train"], x=np.array(train.x[:512]), y=train.y[:512])
    np.savez(paths["val"], x=np.array(val.x), y=val.y)
    return paths


def _run(*arguments: object) -> object:
    return CliRunner().invoke(main, ["finetune", *map(str, arguments)])


def test_float_model_and_plan_to_a_compiled_model(files, tmp_path):
    output = tmp_path / "tuned.onnx"
    result = _run(
        files["float"], "--plan", files["plan"], "--data", files["train"], "--val", files["val"],
        "--epochs", 3, "--lr", "3e-3", "-o", output, "--json",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output[result.output.index("{") :])
    assert document["format"] == "quanos-finetune" and document["output"] == str(output)
    assert [record["epoch"] for record in document["history"]] == [0, 1, 2, 3]
    assert "epoch 3/3" in result.output
    tuned = onnx.load(output)
    stored = compiled_plan(tuned)
    assert stored is not None and {entry.weight_bits for entry in stored.layers} == {2}
    val = np.load(files["val"])
    accuracy = float((Runner(tuned).run(val["x"])[0].argmax(1) == val["y"]).mean())
    assert accuracy == pytest.approx(document["history"][document["best_epoch"]]["val_accuracy"])
    assert accuracy > document["history"][0]["val_accuracy"]


def test_a_compiled_model_brings_its_plan(files, tmp_path):
    output = tmp_path / "again.onnx"
    result = _run(files["compiled"], "--data", files["train"], "--val-split", "0.25", "--epochs", 1, "-o", output)
    assert result.exit_code == 0, result.output
    assert "kept epoch" in result.output and "round trip on 128 samples" in result.output
    assert compiled_plan(onnx.load(output)).method == "uniform-2"


def test_refusals(files, tmp_path):
    no_plan = _run(files["float"], "--data", files["train"], "--epochs", 1, "-o", tmp_path / "x.onnx")
    assert no_plan.exit_code == 2 and "--plan is required" in no_plan.output
    both = _run(files["compiled"], "--data", files["train"], "--val", files["val"], "--val-split", "0.1", "--epochs", 1, "-o", tmp_path / "x.onnx")
    assert both.exit_code == 2 and "exclude each other" in both.output
    onto_input = _run(files["compiled"], "--data", files["train"], "--epochs", 1, "-o", files["compiled"])
    assert onto_input.exit_code == 1 and "refusing to overwrite" in onto_input.output
    folder = _run(files["compiled"], "--data", files["train"], "--epochs", 1, "-o", tmp_path)
    assert folder.exit_code == 2 and "is a directory" in folder.output
    assert not list(tmp_path.iterdir())


def test_storage_int2_packs_the_written_weights(files, tmp_path):
    output = tmp_path / "packed.onnx"
    result = _run(
        files["float"], "--plan", files["plan"], "--data", files["train"], "--epochs", 1,
        "--storage", "int2", "-o", output, "--json",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output[result.output.index("{") :])
    assert document["settings"]["storage"] == "int2"
    written = onnx.load(output)
    dequantized = {node.input[0] for node in written.graph.node if node.op_type == "DequantizeLinear"}
    packed = [t for t in written.graph.initializer if t.name in dequantized and t.data_type == onnx.TensorProto.INT2]
    assert packed, "2-bit weights should be stored as INT2 initializers"
