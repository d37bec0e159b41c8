"""A tiny task where low-bit post-hoc quantization hurts and fine-tuning can recover.

4 classes of 8x8 grey images: uniform noise with one brighter quadrant (the class). A
two-conv net trained briefly in torch reaches about 99%; quantized post hoc at 2 bits
(every layer) it drops to about 75%. Trained once per test session (lru_cache), exported
with the legacy exporter and normalized, as quanos-compile loads it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from quanos_onnx.data import Dataset
from quanos_onnx.model import normalize

CLASSES = 4
SHAPE = (1, 8, 8)


def quadrant_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    images = rng.uniform(0.0, 0.8, (count, *SHAPE)).astype(np.float32)
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 2)
        images[index, 0, row * 4 : row * 4 + 4, column * 4 : column * 4 + 4] += 0.2
    return np.clip(images, 0.0, 1.0), labels.astype(np.int64)


class QuadrantNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.flatten(torch.relu(self.conv2(hidden)), 1))


@functools.lru_cache(maxsize=1)
def trained_task() -> tuple[onnx.ModelProto, Dataset, Dataset]:
    """(normalized float ONNX model, 1024 training samples, 512 validation samples)."""
    torch.manual_seed(0)
    x_train, y_train = quadrant_data(1024, 0)
    x_val, y_val = quadrant_data(512, 1)
    net = QuadrantNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(300):
        picked = np.random.default_rng(step).integers(0, len(x_train), 64)
        loss = nn.functional.cross_entropy(net(torch.from_numpy(x_train[picked])), torch.from_numpy(y_train[picked]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    return normalize(export(net), "quadrant-net"), Dataset(x_train, y_train, "quadrants-train"), Dataset(x_val, y_val, "quadrants-val")


def export(net: nn.Module, *, dynamo: bool = False) -> onnx.ModelProto:
    """The raw torch.onnx export at batch 1 (dynamic batch for the legacy exporter)."""
    buffer = io.BytesIO()
    example = torch.zeros(1, *SHAPE)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(net, (example,), dynamo=True, input_names=["x"], output_names=["y"])
            return program.model_proto
        else:
            torch.onnx.export(
                net, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            )
    return onnx.load_from_string(buffer.getvalue())
