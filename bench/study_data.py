"""The study's models and data (bench/study.py, bench/peers.py): one `Setup` per model.

Every array is float32 NCHW in [0,1] with int64 labels, so the library's attacks (eps in
[0,1] input units) mean the same thing on all three models.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
SHARED = next(
    (p for p in (REPO.parent / "shared", REPO.parent.parent / "shared", REPO / "shared") if p.exists()), REPO.parent / "shared"
)
"""Beside the checkout (/work/main -> /work/shared), or two up from a worktree in /work/wt/."""
CACHE = REPO / "bench/cache/study"
RESNET20 = SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx"
MNIST8 = SHARED / "models/mnist/mnist-8.onnx"
CIFAR_TUNE = SHARED / "data/cifar10/cifar10_test_jpeg_q75.npz"
CIFAR_TEST = SHARED / "data/cifar10/cifar10_test_first932.npz"
FIRST_TUNE_INDEX = 932
SETUP_NAMES = ("resnet20", "mnist8", "fashion", "efficientnet")


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """JSON cell: read it if a previous run finished it, else compute and write it."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


def cost_row(layers: Any, plan: Any | None, params: dict[str, int]) -> dict[str, float]:
    """A plan's energy per image on each hardware profile (pJ), weight memory (kB) and average
    weight bits (the float model's when `plan` is None: 32)."""
    from quanos_onnx.hwmodel import estimate_all

    estimates = estimate_all(layers, plan)
    row = {name: e.energy_pj for name, e in estimates.items()}
    row["memory_kb"] = estimates["standard"].weight_memory_bits / 8e3
    row["average_bits"] = 32.0 if plan is None else plan.average_weight_bits(params)
    return row


@dataclass(frozen=True)
class Setup:
    """A float model and its data: `tune` calibrates, attacks for ANS and fine-tunes; `test` tests."""

    name: str
    model_path: Path
    tune_x: np.ndarray
    tune_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    description: str


def load_setup(name: str, test_samples: int | None = None) -> Setup:
    loaders = {"resnet20": _resnet20, "mnist8": _mnist8, "fashion": _fashion, "efficientnet": _efficientnet}
    setup = loaders[name]()
    if test_samples is not None:
        return Setup(
            setup.name, setup.model_path, setup.tune_x, setup.tune_y,
            setup.test_x[:test_samples], setup.test_y[:test_samples], setup.description,
        )
    return setup


def _nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def _resnet20() -> Setup:
    tune, test = np.load(CIFAR_TUNE), np.load(CIFAR_TEST)
    return Setup(
        "resnet20", RESNET20,
        _nchw(tune["x"][FIRST_TUNE_INDEX:]), tune["y"][FIRST_TUNE_INDEX:].astype(np.int64),
        _nchw(test["x"]), test["y"].astype(np.int64),
        "ResNet-20 (akamaster, CIFAR-10); tune: cifar10_test_jpeg_q75.npz index >= 932 (9068 images); "
        "test: the exact first 932 CIFAR-10 test images",
    )


def _idx_images(path: Path) -> np.ndarray:
    with gzip.open(path) as stream:
        data = stream.read()
    count, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    pixels = np.frombuffer(data, np.uint8, offset=16).reshape(count, 1, rows, cols)
    return pixels.astype(np.float32) / 255.0


def _idx_labels(path: Path) -> np.ndarray:
    with gzip.open(path) as stream:
        return np.frombuffer(stream.read(), np.uint8, offset=8).astype(np.int64)


def _mnist8() -> Setup:
    rows = np.loadtxt(SHARED / "data/mnist/mnist_5k.csv.gz", delimiter=",", dtype=np.float32)
    mnist = SHARED / "data/mnist"
    return Setup(
        "mnist8", MNIST8,
        (rows[:, :784] / 255.0).reshape(-1, 1, 28, 28), rows[:, 784].astype(np.int64),
        _idx_images(mnist / "t10k-images-idx3-ubyte.gz"), _idx_labels(mnist / "t10k-labels-idx1-ubyte.gz"),
        "mnist-8 (ONNX model zoo); tune: mnist_5k.csv.gz (5000 training images); test: MNIST t10k",
    )


FASHION = SHARED / "data/fashion-mnist"
FASHION_TUNE = 5000
"""Tune on the first 5000 Fashion-MNIST training images (the CNN saw all 60000 in training)."""


def _fashion() -> Setup:
    model_path = CACHE / "fashion/fashion_cnn.onnx"
    train_x = _idx_images(FASHION / "train-images-idx3-ubyte.gz")
    train_y = _idx_labels(FASHION / "train-labels-idx1-ubyte.gz")
    if not model_path.exists():
        train_fashion_cnn(train_x, train_y, model_path)
    return Setup(
        "fashion", model_path, train_x[:FASHION_TUNE], train_y[:FASHION_TUNE],
        _idx_images(FASHION / "t10k-images-idx3-ubyte.gz"), _idx_labels(FASHION / "t10k-labels-idx1-ubyte.gz"),
        "small CNN trained here (2 epochs of Fashion-MNIST train, Adam); tune: first 5000 train images; "
        "test: Fashion-MNIST t10k",
    )


def train_fashion_cnn(x: np.ndarray, y: np.ndarray, target: Path, epochs: int = 2) -> None:
    """conv16-conv32-conv64 (stride 2) + linear: a few minutes on 2 cores."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for first in range(0, len(inputs), 128):
            batch = order[first : first + 128]
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (inputs[:1],), str(target), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13, dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(target)))
    print(f"trained {target} in {time.perf_counter() - started:.0f} s")


EFFICIENTNET = SHARED / "models/imagenet/efficientnet_lite0.onnx"
IMAGENET = SHARED / "data/imagenet/val1300"
IMAGENET_TUNE = 640
"""Tune on the first 640 val1300 images (labels.csv order), test on the other 660: the study
(bench/study_iso.py) calibrates on the first 256 and gives all 640 to the default compile,
which needs search and held-out images of its own that the test images must not be."""


def _efficientnet() -> Setup:
    images, labels = _val1300_224()
    return Setup(
        "efficientnet", EFFICIENTNET,
        images[:IMAGENET_TUNE], labels[:IMAGENET_TUNE], images[IMAGENET_TUNE:], labels[IMAGENET_TUNE:],
        "EfficientNet-Lite0 (shared ONNX, ImageNet); val1300 resized to 224x224 (bilinear), inputs in [0,1] "
        "as bench/ptq.py feeds it; tune: the first 640 images (labels.csv order); test: the other 660",
    )


def _val1300_224() -> tuple[np.ndarray, np.ndarray]:
    """The 1300 images as float32 NCHW in [0,1] with their labels; the uint8 arrays are cached
    under bench/cache (never committed)."""
    arrays = CACHE / "imagenet/val1300_224.npz"
    if not arrays.exists():
        import csv

        from PIL import Image

        with open(IMAGENET / "labels.csv") as handle:
            rows = [row for row in csv.reader(handle) if row and row[0] != "file"]
        pixels = np.stack([
            np.asarray(Image.open(IMAGENET / "images" / file).convert("RGB").resize((224, 224), Image.BILINEAR), np.uint8)
            for file, _ in rows
        ])
        arrays.parent.mkdir(parents=True, exist_ok=True)
        np.savez(arrays, x=pixels, y=np.array([int(label) for _, label in rows], np.int64))
    data = np.load(arrays)
    return _nchw(data["x"]), data["y"].astype(np.int64)
