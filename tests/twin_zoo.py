"""Small torch models and their ONNX exports, shared by the twin tests and bench scripts.

Widths are tiny so that exporting a model with both exporters at several opsets stays fast;
the architectures still contain every construct real exports carry (BatchNorm, projection
shortcuts, depthwise convs, ReLU6/HardSigmoid/HardSwish, global pooling, LayerNorm,
attention with shape arithmetic, Gelu in both forms).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

IMAGE_SHAPE = (3, 16, 16)


class Vgg(nn.Module):
    """VGG-style stack with BatchNorm after every conv and a two-layer classifier."""

    def __init__(self, widths: tuple[int, ...] = (8, "M", 16, "M", 16), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = IMAGE_SHAPE[0]
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(channels, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 strided conv + BN projects the shortcut when shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """kuangliu-style CIFAR ResNet-18 (2-2-2-2 basic blocks) with a width multiplier."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        channels = width
        for stage, multiplier in enumerate((1, 2, 4, 8)):
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width * multiplier, stride))
                channels = width * multiplier
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.linear(out.flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, squeeze-excite with HardSigmoid, project."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.excite = nn.Sequential(nn.Conv2d(hidden, hidden // 4, 1), nn.ReLU(), nn.Conv2d(hidden // 4, hidden, 1))
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.depthwise(self.expand(x))
        out = out * F.hardsigmoid(self.excite(out.mean((2, 3), keepdim=True)))
        out = self.project(out)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """A three-block MobileNetV2/V3 hybrid ending in GlobalAveragePool and a linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.head(self.blocks(self.stem(x))), 1))


class ViTBlock(nn.Module):
    """Patch embedding, class token, one pre-norm transformer block and a linear head.

    Attention is written out (reshape/transpose/matmul/softmax) so both exporters emit the
    shape arithmetic real ViT exports contain; the two MLP activations are exact Gelu
    (Gelu op or its Erf form, depending on exporter and opset) and tanh Gelu.
    """

    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(IMAGE_SHAPE[0], dim, patch, patch)
        tokens = (IMAGE_SHAPE[1] // patch) * (IMAGE_SHAPE[2] // patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.position = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.1)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(query @ key.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ value).transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.position
        x = x + self.attention(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        return self.head(F.gelu(x[:, 0]))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg": Vgg,
    "resnet18": ResNet18,
    "mobilenetv2": MobileNetV2,
    "vit": ViTBlock,
}


def make_model(name: str, seed: int = 0, **options: int) -> nn.Module:
    """The named zoo model with seeded random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batchnorm(MODELS[name](**options)).eval()


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters as after training (not the all-ones/zeros init,
    which the legacy exporter would share between layers as one initializer)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def export(
    model: nn.Module,
    *,
    dynamo: bool,
    opset: int,
    batch: int = 2,
    dynamic_batch: bool = True,
    fold: bool | None = None,
    image_shape: tuple[int, int, int] = IMAGE_SHAPE,
) -> onnx.ModelProto:
    """Export with the legacy TorchScript exporter or the dynamo exporter, optionally with a symbolic batch.

    `fold=False` turns off the exporters' graph optimizations, which keeps BatchNormalization
    unfolded (and, with dynamo, leaves its raw decomposition: CastLike, Expand of weight
    shapes, ...); by default only the VGG is exported that way, as the BatchNorm model.
    """
    if fold is None:
        fold = not isinstance(model, Vgg)
    example = torch.randn(batch, *image_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                input_names=["input"], output_names=["logits"], verbose=False, optimize=fold,
            )
            return program.model_proto
        dynamic_axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=opset, do_constant_folding=fold,
            input_names=["input"], output_names=["logits"], dynamic_axes=dynamic_axes,
        )
    return onnx.load_from_string(buffer.getvalue())


def quantize_model(
    proto: onnx.ModelProto, calibration: np.ndarray, bits: Sequence[int], *, keep_last_float: bool = True
) -> onnx.ModelProto:
    """A mixed-bit QDQ model in the compiler's form (DESIGN section 3), built from a float one.

    Layer i (Conv/Gemm/MatMul with an initializer weight, in graph order) gets
    bits[i % len(bits)] for its weight and its input activation:
    - weight: symmetric per-output-channel integer initializer (int8 for k <= 8, else int16),
      zero point 0, values in +-(2^(k-1) - 1), read through DequantizeLinear;
    - activation, k <= 8: QuantizeLinear to uint8 (zero point 0 when calibration saw no
      negative value, else 128) -> Clip on the integer grid (omitted at k = 8) -> DequantizeLinear;
    - activation, k > 8: float Clip to the grid's range -> QuantizeLinear int16 -> DequantizeLinear.
    The last layer stays float unless keep_last_float is False.
    """
    model = onnx.version_converter.convert_version(proto, 21) if _opset(proto) != 21 else _copy(proto)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    layers = [i for i, n in enumerate(graph.node) if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in weights]
    if keep_last_float:
        layers = layers[:-1]
    ranges = _activation_ranges(model, [graph.node[i].input[0] for i in layers], calibration)
    plan = {position: bits[index % len(bits)] for index, position in enumerate(layers)}
    nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        if position in plan:
            k = plan[position]
            tag = node.name or f"layer{position}"
            nodes += _activation_qdq(graph, node, tag, k, ranges[node.input[0]])
            nodes.append(_weight_dq(graph, node, tag, k, weights[node.input[1]]))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _activation_ranges(model: onnx.ModelProto, names: Sequence[str], calibration: np.ndarray) -> dict[str, tuple[float, float]]:
    probe = _copy(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in present)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: calibration})))
    return {name: (float(values[name].min()), float(values[name].max())) for name in names}


def _add(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _activation_qdq(graph: onnx.GraphProto, node: onnx.NodeProto, tag: str, k: int, value_range: tuple[float, float]) -> list[onnx.NodeProto]:
    source = node.input[0]
    low, high = value_range
    quantized, dequantized = f"{tag}_act_q", f"{tag}_act_dq"
    if k <= 8:
        signed = low < 0
        zero_point = 128 if signed else 0
        levels = 2 ** (k - 1) - 1 if signed else 2**k - 1
        scale = np.float32(max(abs(low), abs(high)) / levels if signed else high / levels)
        grid = (128 - 2 ** (k - 1), 128 + 2 ** (k - 1) - 1) if signed else (0, 2**k - 1)
        zp = _add(graph, f"{tag}_act_zp", np.array(zero_point, np.uint8))
        sc = _add(graph, f"{tag}_act_scale", np.array(scale, np.float32))
        nodes = [onnx.helper.make_node("QuantizeLinear", [source, sc, zp], [quantized], name=f"{tag}_act_Q")]
        if k < 8:
            low_bound = _add(graph, f"{tag}_act_lo", np.array(grid[0], np.uint8))
            high_bound = _add(graph, f"{tag}_act_hi", np.array(grid[1], np.uint8))
            nodes.append(onnx.helper.make_node("Clip", [quantized, low_bound, high_bound], [f"{tag}_act_clip"], name=f"{tag}_act_Clip"))
            quantized = f"{tag}_act_clip"
        nodes.append(onnx.helper.make_node("DequantizeLinear", [quantized, sc, zp], [dequantized], name=f"{tag}_act_DQ"))
    else:
        levels = 2 ** (k - 1) - 1
        scale = np.float32(max(abs(low), abs(high)) / levels)
        zp = _add(graph, f"{tag}_act_zp", np.array(0, np.int16))
        sc = _add(graph, f"{tag}_act_scale", np.array(scale, np.float32))
        low_bound = _add(graph, f"{tag}_act_lo", np.array(-(2 ** (k - 1)) * scale, np.float32))
        high_bound = _add(graph, f"{tag}_act_hi", np.array(levels * scale, np.float32))
        nodes = [
            onnx.helper.make_node("Clip", [source, low_bound, high_bound], [f"{tag}_act_clip"], name=f"{tag}_act_Clip"),
            onnx.helper.make_node("QuantizeLinear", [f"{tag}_act_clip", sc, zp], [quantized], name=f"{tag}_act_Q"),
            onnx.helper.make_node("DequantizeLinear", [quantized, sc, zp], [dequantized], name=f"{tag}_act_DQ"),
        ]
    node.input[0] = dequantized
    return nodes


def _weight_dq(graph: onnx.GraphProto, node: onnx.NodeProto, tag: str, k: int, weight: onnx.TensorProto) -> onnx.NodeProto:
    values = numpy_helper.to_array(weight).astype(np.float32)
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else 1
    levels = 2 ** (k - 1) - 1
    reduce_axes = tuple(i for i in range(values.ndim) if i != axis)
    scale = (np.abs(values).max(axis=reduce_axes) / levels).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    container = np.int8 if k <= 8 else np.int16
    integers = np.clip(np.round(values / scale.reshape(shape)), -levels, levels).astype(container)
    q = _add(graph, f"{tag}_w_q", integers)
    sc = _add(graph, f"{tag}_w_scale", scale)
    zp = _add(graph, f"{tag}_w_zp", np.zeros(scale.shape, container))
    node.input[1] = f"{tag}_w_dq"
    return onnx.helper.make_node("DequantizeLinear", [q, sc, zp], [f"{tag}_w_dq"], axis=axis, name=f"{tag}_w_DQ")
