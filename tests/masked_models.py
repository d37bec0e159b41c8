"""A smooth tiny classifier and the same network with a hard step before the logits.

The step (Sign after the last Relu) makes every input gradient exactly zero, the textbook
gradient-masking defence (Carlini et al. 2019): white-box attacks cannot move, while the
smooth model's attacks, transferred, still break it. The masking diagnostics must flag the
second and not the first.
"""

from __future__ import annotations

import onnx
from onnx import helper

from harness_models import tiny_onnx, tiny_weights


def smooth_model() -> onnx.ModelProto:
    return tiny_onnx(tiny_weights())


def stepped_model() -> onnx.ModelProto:
    """smooth_model() with Sign between the last Relu and the classifier."""
    model = smooth_model()
    nodes = list(model.graph.node)
    flatten = next(node for node in nodes if node.op_type == "Flatten")
    stepped_input = flatten.input[0]
    flatten.input[0] = "stepped"
    model.graph.node.insert(nodes.index(flatten), helper.make_node("Sign", [stepped_input], ["stepped"], name="step"))
    onnx.checker.check_model(model)
    return model
