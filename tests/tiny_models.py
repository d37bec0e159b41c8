"""Tiny ONNX models built in code for the tests (random weights, fixed seeds).

Kept apart from conftest.py because the tests call these builders directly with
parameters; every model is small enough to build, normalize and run in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


class GraphBuilder:
    """Appends nodes and random initializers; names follow the op and a counter."""

    def __init__(self, seed: int = 0, opset: int = OPSET) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{op.lower()}{self.count}"

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape: Sequence[int], fan_in: int) -> str:
        values = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=tuple(shape)).astype(np.float32)
        return self.constant(name, values)

    def node(self, op: str, inputs: Sequence[str], name: str | None = None, **attributes: object) -> str:
        name = name or self._name(op)
        output = f"{name}_out"
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attributes))
        return output

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        kernel: int = 3,
        *,
        stride: int = 1,
        group: int = 1,
        bias: bool = True,
        name: str | None = None,
    ) -> str:
        name = name or self._name("Conv")
        inputs = [x, self.weight(f"{name}.w", (cout, cin // group, kernel, kernel), cin // group * kernel * kernel)]
        if bias:
            inputs.append(self.constant(f"{name}.b", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        pad = kernel // 2
        return self.node(
            "Conv", inputs, name, kernel_shape=[kernel, kernel], strides=[stride, stride],
            pads=[pad] * 4, group=group,
        )

    def gemm(self, x: str, cin: int, cout: int, *, trans_b: int = 1, name: str | None = None) -> str:
        name = name or self._name("Gemm")
        shape = (cout, cin) if trans_b else (cin, cout)
        inputs = [x, self.weight(f"{name}.w", shape, cin), self.constant(f"{name}.b", np.zeros(cout, np.float32))]
        return self.node("Gemm", inputs, name, transB=trans_b)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def head(self, x: str, channels: int, classes: int) -> str:
        pooled = self.node("GlobalAveragePool", [x])
        flat = self.node("Flatten", [pooled], axis=1)
        return self.gemm(flat, channels, classes, name="classifier")

    def model(self, x_shape: Sequence[int | str], output: str, classes: int | None = None) -> onnx.ModelProto:
        out_shape = [x_shape[0], classes] if classes is not None else None
        graph = helper.make_graph(
            self.nodes,
            "tiny",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10 if self.opset >= 21 else 4
        return model


def vgg_chain(seed: int = 0, channels: Sequence[int] = (4, 8, 8, 16), batch: int | str = "N") -> onnx.ModelProto:
    """Conv -> Relu blocks with a MaxPool, then GAP -> Flatten -> Gemm: the plain CNN shape."""
    builder = GraphBuilder(seed)
    x, cin = "x", 3
    for index, cout in enumerate(channels):
        x = builder.relu(builder.conv(x, cin, cout, name=f"conv{index}"))
        if index == 1:
            x = builder.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        cin = cout
    return builder.model([batch, 3, 8, 8], builder.head(x, cin, 10), 10)


def resnet_style(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """Stem, an identity residual block, and a block with a strided 1x1 projection shortcut."""
    builder = GraphBuilder(seed)
    stem = builder.relu(builder.conv("x", 3, 8, name="stem"))
    inner = builder.relu(builder.conv(stem, 8, 8, name="block1.conv1"))
    inner = builder.conv(inner, 8, 8, name="block1.conv2")
    block1 = builder.relu(builder.node("Add", [inner, stem], name="block1.add"))
    inner = builder.relu(builder.conv(block1, 8, 16, stride=2, name="block2.conv1"))
    inner = builder.conv(inner, 16, 16, name="block2.conv2")
    shortcut = builder.conv(block1, 8, 16, kernel=1, stride=2, name="block2.shortcut")
    block2 = builder.relu(builder.node("Add", [inner, shortcut], name="block2.add"))
    return builder.model([batch, 3, 8, 8], builder.head(block2, 16, 10), 10)


def mobilenet_style(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """Stem, an inverted residual block without a shortcut (strided depthwise) and one with
    it: expand 1x1 -> Relu, depthwise 3x3 -> Relu, linear 1x1 projection."""
    builder = GraphBuilder(seed)
    stem = builder.relu(builder.conv("x", 3, 8, name="stem"))
    inner = builder.relu(builder.conv(stem, 8, 16, kernel=1, name="a.expand"))
    inner = builder.relu(builder.conv(inner, 16, 16, stride=2, group=16, name="a.depthwise"))
    block_a = builder.conv(inner, 16, 8, kernel=1, name="a.project")
    inner = builder.relu(builder.conv(block_a, 8, 16, kernel=1, name="b.expand"))
    inner = builder.relu(builder.conv(inner, 16, 16, group=16, name="b.depthwise"))
    inner = builder.conv(inner, 16, 8, kernel=1, name="b.project")
    block_b = builder.node("Add", [inner, block_a], name="b.add")
    return builder.model([batch, 3, 8, 8], builder.head(block_b, 8, 10), 10)


def random_inputs(model: onnx.ModelProto, count: int, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) inputs of the model's per-sample shape."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    return np.random.default_rng(seed).random((count, *shape), dtype=np.float32)


def dynamic_size_classifier(classes: int) -> onnx.ModelProto:
    """Conv -> GlobalAveragePool -> Flatten -> Gemm on [N,3,H,W]: height and width dynamic,
    as OCR and detection backbones export."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc", transB=1),
        ],
        "dynamic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "fc_w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
