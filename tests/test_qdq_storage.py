"""Sub-byte weight storage (passes/qdq.py `storage`) and the session config it needs (model.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from residual_net import compiled, float_model, inputs, plan

from quanos_onnx import quantize as quantize_stage
from quanos_onnx.errors import UsageError
from quanos_onnx.model import make_session, session_config

LOW = {"conv1": 2, "conv2": 4, "conv3": 3, "fc": 8}
DISABLE_QDQ_FUSION = [("session.disable_quant_qdq", "1")]


def _weight_types(model: onnx.ModelProto) -> dict[str, str]:
    """Layer -> data type of the integer initializer its weight DequantizeLinear reads."""
    producers = {n.output[0]: n for n in model.graph.node}
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    return {
        n.name: types[producers[n.input[1]].input[0]]
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm")
    }


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _outputs(model: onnx.ModelProto, config=()) -> np.ndarray:
    session = make_session(model, config=config)
    return np.concatenate([session.run(None, {"x": x[None]})[0] for x in inputs(6, seed=5)])


def test_int4_storage_packs_only_layers_of_at_most_4_bits():
    model = compiled(LOW, "int4").model
    assert _weight_types(model) == {"conv1": "INT4", "conv2": "INT4", "conv3": "INT4", "fc": "INT8"}
    assert (_opset(model), model.ir_version) == (21, 10)
    assert session_config(model) == ()


def test_int2_storage_uses_int2_where_bits_allow_and_raises_the_opset_only_then():
    model = compiled(LOW, "int2").model
    assert _weight_types(model) == {"conv1": "INT2", "conv2": "INT4", "conv3": "INT4", "fc": "INT8"}
    assert (_opset(model), model.ir_version) == (25, 13)
    onnx.checker.check_model(model)
    assert session_config(model) == (("session.disable_quant_qdq", "1"),)
    wide = compiled({"conv1": 3, "conv2": 12, "conv3": 4, "fc": 6}, "int2").model
    assert _weight_types(wide) == {"conv1": "INT4", "conv2": "INT16", "conv3": "INT4", "fc": "INT8"}
    assert _opset(wide) == 21


@pytest.mark.parametrize("storage", ["int4", "int2"])
def test_sub_byte_models_run_in_onnxruntime_with_the_int8_models_outputs(storage):
    reference = compiled(LOW).model
    packed = compiled(LOW, storage).model
    # Same kernels on both sides (Q/DQ fusion off): bit for bit the same numbers.
    np.testing.assert_array_equal(_outputs(packed, DISABLE_QDQ_FUSION), _outputs(reference, DISABLE_QDQ_FUSION))
    # Default sessions: onnxruntime fuses the int8 container into QLinearConv and runs the
    # sub-byte layers unfused; only float accumulation order differs.
    np.testing.assert_allclose(_outputs(packed), _outputs(reference), rtol=0, atol=1e-5)
    assert len(packed.SerializeToString()) < len(reference.SerializeToString())


def test_unknown_storage_is_refused_before_calibration():
    def never_read():
        raise AssertionError("calibration data was read")
        yield

    with pytest.raises(UsageError, match="storage: unknown container 'int3'"):
        quantize_stage.quantize(float_model(), plan(LOW), never_read(), storage="int3")
