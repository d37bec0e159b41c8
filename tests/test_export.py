"""QONNX export and onnxruntime.quantization overrides, checked by executing both sides."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from residual_net import compiled, float_model, inputs

from quanos_onnx.errors import DataError, ModelError, OutputError, UsageError
from quanos_onnx.export import (
    QONNX_DOMAIN,
    default_output,
    export_file,
    ort_quantize_options,
    read_ort_overrides,
    to_ort_overrides,
    to_qonnx,
)
from quanos_onnx.model import make_session, save_model, with_outputs
from quanos_onnx.passes.qdq import PLAN_METADATA_KEY

MIXED = {"conv1": 3, "conv2": 12, "conv3": 4, "fc": 6}
"""Every grid form: signed 3-bit input (uint8, zero point 128, Clip), 12-bit int16 behind a
float Clip, 4-bit unsigned, and a quantized Gemm behind a transparent MaxPool/Flatten."""
FLOAT_FC = {"conv1": 8, "conv2": 16, "conv3": 2, "fc": None}


@pytest.fixture(scope="module")
def mixed():
    return compiled(MIXED)


def _quant_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Quant"]


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attribute(node: onnx.NodeProto, name: str) -> object:
    return onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


def test_qonnx_replaces_every_quantizer_by_a_quant_node_at_the_plan_bits(mixed):
    exported = to_qonnx(mixed.model)
    onnx.checker.check_model(exported)
    ops = {n.op_type for n in exported.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "Clip"}
    assert {(o.domain, o.version) for o in exported.opset_import} == {("", 21), (QONNX_DOMAIN, 1)}
    values = _initializers(exported)
    consumers = {name: n for n in exported.graph.node for name in n.input}
    weight_bits = {}
    activation_bits = set()
    for node in _quant_nodes(exported):
        assert node.domain == QONNX_DOMAIN
        assert _attribute(node, "rounding_mode") == b"ROUND"
        bits = float(values[node.input[3]])
        if node.input[0] in values:
            assert (_attribute(node, "signed"), _attribute(node, "narrow")) == (1, 1)
            weight_bits[consumers[node.output[0]].name] = bits
        else:
            assert _attribute(node, "narrow") == 0
            activation_bits.add(bits)
    assert weight_bits == {name: float(bits) for name, bits in MIXED.items()}
    assert activation_bits == {3.0, 12.0, 4.0, 6.0}
    quantizers = sum(n.op_type == "QuantizeLinear" for n in mixed.model.graph.node)
    assert len(_quant_nodes(exported)) == quantizers + len(MIXED)


def test_qonnx_weights_are_the_integers_times_their_scales(mixed):
    exported = to_qonnx(mixed.model)
    qdq = _initializers(mixed.model)
    values = _initializers(exported)
    for node in _quant_nodes(exported):
        if node.input[0] not in values:
            continue
        layer = next(n for n in exported.graph.node if node.output[0] in n.input)
        dequantize = next(n for n in mixed.model.graph.node if n.output[0] == layer.input[1])
        integers, scale = qdq[dequantize.input[0]], qdq[dequantize.input[1]]
        expected = integers.astype(np.float32) * scale.reshape(-1, *[1] * (integers.ndim - 1))
        np.testing.assert_array_equal(values[node.input[0]], expected)
        np.testing.assert_array_equal(values[node.input[1]].reshape(-1), scale)
    names = {n.input[0] for n in _quant_nodes(exported)}
    assert {"w1", "w2", "w3", "wf"} <= names, "weights keep the float model's names"


def test_qonnx_export_runs_in_qonnx_with_the_qdq_models_values(mixed):
    pytest.importorskip("qonnx")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    exported = to_qonnx(mixed.model)
    quantized = [n.output[0] for n in _quant_nodes(exported) if n.input[0] not in _initializers(exported)]
    session = make_session(with_outputs(mixed.model, [*quantized, "y"]))
    for seed in range(3):
        x = inputs(1, 100 + seed)
        executed = execute_onnx(ModelWrapper(exported), {"x": x}, return_full_exec_context=True)
        expected = dict(zip([*quantized, "y"], session.run([*quantized, "y"], {"x": x})))
        for name in quantized:
            # Grid values, so any rounding or range difference shows as a whole step.
            np.testing.assert_array_equal(executed[name], expected[name], err_msg=name)
        # The float Conv/Gemm arithmetic is onnxruntime's either way, in another order.
        np.testing.assert_allclose(executed["y"], expected["y"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("fc_bits", [6, 8])
def test_qonnx_export_of_a_relu_output_stored_as_part_of_a_signed_join_grid(fc_bits):
    """'a' (a Relu output) is read by conv2 at 3 bits and by the join at the fc's bits; the
    join grid is the finer one, so it is written from zero-point 0 with only its levels from
    zero up. The export widens it back to the whole grid the join's other operand holds."""
    pytest.importorskip("qonnx")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model = compiled({"conv1": 2, "conv2": 3, "conv3": 4, "fc": fc_bits}).model
    exported = to_qonnx(model)
    quantized = [n.output[0] for n in _quant_nodes(exported) if n.input[0] not in _initializers(exported)]
    session = make_session(with_outputs(model, quantized))
    x = inputs(1, 200)
    executed = execute_onnx(ModelWrapper(exported), {"x": x}, return_full_exec_context=True)
    for name, expected in zip(quantized, session.run(quantized, {"x": x})):
        np.testing.assert_array_equal(executed[name], expected, err_msg=name)


@pytest.mark.parametrize("storage", ["int4", "int2"])
def test_qonnx_export_is_the_same_whatever_the_weight_container(storage):
    reference = to_qonnx(compiled(MIXED).model)
    packed = to_qonnx(compiled(MIXED, storage).model)
    assert {(o.domain, o.version) for o in packed.opset_import} == {("", 21), (QONNX_DOMAIN, 1)}
    assert packed.ir_version == reference.ir_version
    expected = _initializers(reference)
    got = _initializers(packed)
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_export_refuses_a_model_without_a_stored_plan():
    with pytest.raises(ModelError, match="no 'quanos.plan' metadata"):
        to_qonnx(float_model(), "float.onnx")


def _with_plan_bits(model: onnx.ModelProto, layer: str, **bits: int) -> onnx.ModelProto:
    tampered = onnx.ModelProto()
    tampered.CopyFrom(model)
    entry = next(e for e in tampered.metadata_props if e.key == PLAN_METADATA_KEY)
    plan = json.loads(entry.value)
    for layer_entry in plan["layers"]:
        if layer_entry["name"] == layer:
            layer_entry.update(bits)
    entry.value = json.dumps(plan)
    return tampered


def test_export_refuses_weights_outside_the_stored_plans_grid(mixed):
    tampered = _with_plan_bits(mixed.model, "conv3", weight_bits=2)
    with pytest.raises(ModelError, match="conv3.weight_w4/DequantizeLinear.*outside the 2-bit grid"):
        to_qonnx(tampered)


def test_export_refuses_activation_grids_that_differ_from_the_stored_plan(mixed):
    tampered = _with_plan_bits(mixed.model, "conv3", act_bits=5)
    with pytest.raises(ModelError, match="not the 5-bit grid"):
        to_qonnx(tampered)


def test_ort_overrides_round_bits_up_and_warn_per_layer(mixed):
    document, warnings = to_ort_overrides(mixed.model)
    overrides = document["TensorQuantOverrides"]
    assert overrides["w1"] == [{"quant_type": "QInt4", "symmetric": True, "axis": 0}]
    assert overrides["w2"][0]["quant_type"] == "QInt16"
    assert overrides["w3"][0]["quant_type"] == "QInt4"
    assert overrides["wf"][0]["quant_type"] == "QInt8"
    assert overrides["x"] == [{"quant_type": "QUInt4"}]
    assert overrides["r2"] == [{"quant_type": "QUInt4"}]
    assert overrides["f"] == [{"quant_type": "QUInt8"}]
    assert document["nodes_to_exclude"] == []
    assert [w.split("'")[1] for w in warnings] == ["conv1", "conv2", "fc"]
    assert "weights 12 -> 16 bits, activations 12 -> 16 bits" in warnings[1]


def test_ort_overrides_exclude_float_layers_and_keep_the_widest_type_per_tensor():
    document, warnings = to_ort_overrides(compiled(FLOAT_FC).model)
    assert document["nodes_to_exclude"] == ["fc"]
    assert "wf" not in document["TensorQuantOverrides"]
    # 'a' feeds conv2 at 16 bits and the residual join at 8: one tensor, one type.
    assert document["TensorQuantOverrides"]["a"] == [{"quant_type": "QUInt16"}]
    assert [w.split("'")[1] for w in warnings] == ["conv3"]


def test_quantize_static_with_the_overrides_writes_the_planned_types(mixed, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({"x": x[None]} for x in inputs(8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    document, _ = to_ort_overrides(mixed.model)
    source = save_model(float_model(), tmp_path / "float.onnx")
    target = tmp_path / "ort.onnx"
    quantize_static(str(source), str(target), Reader(), **ort_quantize_options(document))
    result = onnx.load(str(target))
    types = {t.name: t.data_type for t in result.graph.initializer}
    activation_types = {n.input[0]: types[n.input[2]] for n in result.graph.node if n.op_type == "QuantizeLinear"}
    weight_types = {
        n.input[0].removesuffix("_quantized"): types[n.input[0]]
        for n in result.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in types
    }
    expected = {
        "QInt4": onnx.TensorProto.INT4,
        "QInt8": onnx.TensorProto.INT8,
        "QInt16": onnx.TensorProto.INT16,
        "QUInt4": onnx.TensorProto.UINT4,
        "QUInt8": onnx.TensorProto.UINT8,
        "QUInt16": onnx.TensorProto.UINT16,
    }
    for tensor, entries in document["TensorQuantOverrides"].items():
        written = weight_types.get(tensor, activation_types.get(tensor))
        assert written == expected[entries[0]["quant_type"]], tensor
    make_session(result).run(None, {"x": inputs(1)})


def test_export_file_writes_next_to_the_model_and_never_over_it(mixed, tmp_path):
    source = save_model(mixed.model, tmp_path / "model.quanos.onnx")
    written = export_file(source, "qonnx")
    assert written.path == tmp_path / "model.quanos.qonnx.onnx"
    assert _quant_nodes(onnx.load(str(written.path)))
    overrides = export_file(source, "ort-overrides", tmp_path / "o.json")
    assert overrides.warnings and read_ort_overrides(overrides.path)["nodes_to_exclude"] == []
    assert default_output(source, "ort-overrides") == tmp_path / "model.quanos.ort_overrides.json"
    with pytest.raises(OutputError, match="refusing to overwrite an input file"):
        export_file(source, "qonnx", source)
    with pytest.raises(UsageError, match="unknown target 'tflite'"):
        export_file(source, "tflite")


def test_overrides_files_with_unknown_types_are_refused_naming_the_tensor(tmp_path):
    broken = tmp_path / "o.json"
    broken.write_text(json.dumps({"TensorQuantOverrides": {"w1": [{"quant_type": "QInt3"}]}}))
    with pytest.raises(DataError, match="tensor 'w1': unknown quant_type 'QInt3'"):
        read_ort_overrides(broken)
