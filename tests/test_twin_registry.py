"""Op resolution by domain, op type and opset."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

from quanos_onnx.twin import build_twin, register, supported_ops
from quanos_onnx.twin.ops import shape
from quanos_onnx.twin.registry import MAX_OPSET, lookup


def test_an_op_resolves_to_the_form_of_its_opset() -> None:
    assert lookup("", "Slice", 9).function is shape.slice_attributes
    assert lookup("", "Slice", 10).function is shape.slice_inputs
    assert lookup("ai.onnx", "Slice", 21).function is shape.slice_inputs
    assert lookup("", "ReduceSum", 12).since_version == 1
    assert lookup("", "ReduceSum", 13).since_version == 13
    assert lookup("", "ReduceMean", 17).since_version == 1
    assert lookup("", "ReduceMean", 18).since_version == 18


def test_versions_older_than_any_registration_or_newer_than_verified_do_not_resolve() -> None:
    assert lookup("", "Add", 6) is None
    assert lookup("", "Add", 7) is not None
    assert lookup("", "Add", MAX_OPSET + 1) is None
    assert lookup("com.example", "Add", 1) is None


def test_supported_ops_lists_both_forms_of_a_moved_attribute() -> None:
    listed = supported_ops()
    assert ("", "Split", 2) in listed and ("", "Split", 13) in listed
    assert ("", "QuantizeLinear", 10) in listed and ("", "Attention", 23) in listed


def test_a_registered_custom_domain_op_runs_in_the_twin() -> None:
    @register("Twice", domain="test.quanos.twin")
    def twice(attrs, inputs):
        return [inputs[0] * attrs.get("factor", 2.0)]

    graph = helper.make_graph(
        [helper.make_node("Twice", ["x"], ["y"], domain="test.quanos.twin", factor=3.0)],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("test.quanos.twin", 1)]
    )
    out = build_twin(model)(torch.tensor([1.0, -2.0]))
    np.testing.assert_allclose(out.numpy(), [3.0, -6.0])
