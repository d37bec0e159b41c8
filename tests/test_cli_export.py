"""`quanos export` and `quanos compile --storage` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from residual_net import compiled, float_model, inputs

from quanos_onnx.cli import main
from quanos_onnx.model import save_model


@pytest.fixture()
def qmodel(tmp_path):
    return save_model(compiled({"conv1": 3, "conv2": 8, "conv3": 4, "fc": None}).model, tmp_path / "model.quanos.onnx")


def test_export_to_qonnx_writes_quant_nodes(qmodel, tmp_path):
    target = tmp_path / "out" / "q.onnx"
    result = CliRunner().invoke(main, ["export", str(qmodel), "--to", "qonnx", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {target}"
    exported = onnx.load(str(target))
    assert sum(n.op_type == "Quant" for n in exported.graph.node) > 0


def test_export_to_ort_overrides_warns_about_rounded_layers_on_stderr(qmodel):
    result = CliRunner().invoke(main, ["export", str(qmodel), "--to", "ort-overrides"])
    assert result.exit_code == 0, result.output
    target = qmodel.with_name("model.quanos.ort_overrides.json")
    document = json.loads(target.read_text())
    assert document["nodes_to_exclude"] == ["fc"]
    assert document["TensorQuantOverrides"]["w1"][0]["quant_type"] == "QInt4"
    assert result.stderr.splitlines() == [
        "warning: layer 'conv1': weights 3 -> 4 bits, activations 3 -> 4 bits "
        "(onnxruntime.quantization has 4, 8 and 16)"
    ]


def test_export_never_overwrites_its_input(qmodel):
    before = qmodel.read_bytes()
    result = CliRunner().invoke(main, ["export", str(qmodel), "--to", "qonnx", "-o", str(qmodel)])
    assert result.exit_code == 1
    assert "refusing to overwrite an input file" in result.stderr
    assert qmodel.read_bytes() == before


def test_export_of_a_float_model_is_one_line_naming_the_file(tmp_path):
    source = save_model(float_model(), tmp_path / "float.onnx")
    result = CliRunner().invoke(main, ["export", str(source), "--to", "qonnx"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {source}: no 'quanos.plan' metadata")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "float.qonnx.onnx").exists()


def test_export_needs_a_known_target(qmodel):
    result = CliRunner().invoke(main, ["export", str(qmodel), "--to", "tflite"])
    assert result.exit_code == 2


def test_compile_storage_int4_writes_packed_weights(tmp_path):
    pytest.importorskip("quanos_onnx.data")
    model = save_model(float_model(), tmp_path / "float.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=inputs(16), y=np.zeros(16, dtype=np.int64))
    out = tmp_path / "out"
    args = ["compile", str(model), "--data", str(data), "--bits", "4", "--storage", "int4", "--input-range", "-1,1", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out / "model.quanos.onnx"))
    dequantized = {n.input[0] for n in written.graph.node if n.op_type == "DequantizeLinear"}
    packed = [t.name for t in written.graph.initializer if t.data_type == onnx.TensorProto.INT4 and t.name in dequantized]
    assert len(packed) == 3, "the three convs; the float output layer has no integer weight"


def test_compile_refuses_an_unknown_storage(tmp_path):
    result = CliRunner().invoke(main, ["compile", "m.onnx", "--bits", "4", "--storage", "int3"])
    assert result.exit_code == 2
    assert "int3" in result.stderr
