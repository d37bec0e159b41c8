"""A tiny conv net as an ONNX model and as the equivalent torch module, same weights.

The harness tests need a model onnxruntime runs (activations, accuracy) and a model torch
differentiates (attacks); building both from one set of arrays keeps them identical
without depending on an exporter or on the twin.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from quanos_onnx.model import normalize

INPUT_SHAPE = (1, 6, 6)
CLASSES = 5


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 0.6, (3, 1, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, (3,)).astype(np.float32),
        "w2": rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, (4,)).astype(np.float32),
        "w3": rng.normal(0, 0.3, (CLASSES, 64)).astype(np.float32),
        "b3": rng.normal(0, 0.1, (CLASSES,)).astype(np.float32),
    }


def tiny_onnx(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Conv(pad 1)+Relu -> Conv+Relu -> Flatten -> Gemm, dynamic batch, normalized."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return normalize(proto, "tiny")


class TinyTorch(nn.Module):
    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(64, CLASSES)
        with torch.no_grad():
            for module, weight, bias in ((self.conv1, "w1", "b1"), (self.conv2, "w2", "b2"), (self.fc, "w3", "b3")):
                module.weight.copy_(torch.from_numpy(weights[weight]))
                module.bias.copy_(torch.from_numpy(weights[bias]))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(hidden, 1))


def tiny_inputs(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((count, *INPUT_SHAPE), dtype=np.float32)
