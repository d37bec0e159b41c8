"""The parity gate against onnxruntime: float and fake-quant models, diagnosis, the shared models."""

from __future__ import annotations

import dataclasses
import gzip
from functools import lru_cache

import numpy as np
import onnx
import pytest
import torch

import quanos_onnx.twin.parity as parity
import twin_zoo
from quanos_onnx.errors import ParityError
from quanos_onnx.model import load_model
from quanos_onnx.twin import OnnxTwin, build_twin, check_parity

MIXED_BITS = (8, 4, 6, 3, 12, 5, 2, 7)
"""Weight/activation bits cycled over the layers: uint8 grids with and without a Clip, 2 to 8
bits, and a 12-bit layer in int16 containers with a float Clip."""


@lru_cache(maxsize=None)
def exported(name: str) -> onnx.ModelProto:
    return twin_zoo.export(twin_zoo.make_model(name), dynamo=False, opset=21)


@lru_cache(maxsize=None)
def mixed_bit(name: str) -> onnx.ModelProto:
    calibration = np.random.default_rng(1).standard_normal((32, *twin_zoo.IMAGE_SHAPE)).astype(np.float32)
    return twin_zoo.quantize_model(exported(name), calibration, MIXED_BITS)


def images(count: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *twin_zoo.IMAGE_SHAPE)).astype(np.float32)


def with_broken_step(twin: OnnxTwin, node_name: str, damage) -> OnnxTwin:
    """The twin with one node's implementation replaced by a damaged version."""
    steps = tuple(
        dataclasses.replace(step, function=damage(step.function)) if step.node_name == node_name else step
        for step in twin.program.steps
    )
    twin.program = dataclasses.replace(twin.program, steps=steps)
    return twin


def test_float_model_report() -> None:
    report = check_parity(build_twin(exported("resnet18")), exported("resnet18"), images(16))
    assert not report.is_fake_quant
    assert report.max_rel_diff <= 1e-4 and report.argmax_agreement == 1.0
    assert 0 < report.max_abs_diff < 1e-4


def test_a_wrong_op_is_named_as_the_first_diverging_node() -> None:
    model = exported("resnet18")
    target = [n.name for n in model.graph.node if n.op_type == "Conv"][5]
    twin = with_broken_step(build_twin(model), target, lambda f: lambda attrs, inputs: [f(attrs, inputs)[0] * 1.01])
    with pytest.raises(ParityError) as failure:
        check_parity(twin, model, images(4))
    assert f"first diverging node '{target}' (Conv)" in str(failure.value)
    assert "on onnxruntime's own inputs" in str(failure.value)


def test_mixed_bit_fake_quant_model_matches_onnxruntime() -> None:
    """The compiler's QDQ form at 2..12 bits: argmax identical, and input gradients flow."""
    model = mixed_bit("resnet18")
    twin = build_twin(model)
    report = check_parity(twin, model, images(64))
    assert report.is_fake_quant and report.argmax_agreement == 1.0
    assert report.max_abs_diff < 1e-5
    x = torch.from_numpy(images(8, seed=7)).requires_grad_()
    torch.nn.functional.cross_entropy(twin(x), torch.arange(8) % 10).backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad) > 0.9 * x.numel()


def test_fake_quant_argmax_disagreement_is_an_error_naming_the_node() -> None:
    model = mixed_bit("vgg")
    final = [n.name for n in model.graph.node if n.op_type == "Gemm"][-1]
    twin = with_broken_step(build_twin(model), final, lambda f: lambda attrs, inputs: [-f(attrs, inputs)[0]])
    with pytest.raises(ParityError) as failure:
        check_parity(twin, model, images(16))
    assert "argmaxes" in str(failure.value) and f"'{final}' (Gemm)" in str(failure.value)


def mnist_images(shared_dir, count: int) -> np.ndarray:
    with gzip.open(shared_dir / "data/mnist/t10k-images-idx3-ubyte.gz", "rb") as stream:
        pixels = np.frombuffer(stream.read(), np.uint8, offset=16)
    return (pixels[: count * 784].reshape(count, 1, 28, 28) / 255.0).astype(np.float32)


def cifar_images(shared_dir, count: int) -> np.ndarray:
    with np.load(shared_dir / "data/cifar10/cifar10_test_first932.npz") as archive:
        return (archive["x"][:count].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


@pytest.mark.shared
@pytest.mark.parametrize("normalized", [False, True], ids=["as-shipped", "load_model"])
def test_mnist8_at_batch_64_equals_onnxruntime(shared_dir, normalized: bool) -> None:
    """mnist-8 bakes batch 1 into its input and a Reshape; the twin still takes batch 64."""
    path = shared_dir / "models/mnist/mnist-8.onnx"
    model = load_model(path) if normalized else onnx.load(str(path))
    twin = build_twin(model)
    assert not twin.per_sample
    report = check_parity(twin, model, mnist_images(shared_dir, 64))
    assert report.max_rel_diff <= 1e-4 and report.argmax_agreement == 1.0


@pytest.mark.shared
@pytest.mark.parametrize("normalized", [False, True], ids=["opset13", "load_model"])
def test_resnet20_at_batch_64_equals_onnxruntime(shared_dir, normalized: bool) -> None:
    path = shared_dir / "models/cifar10/resnet20_cifar10_akamaster.onnx"
    model = load_model(path) if normalized else onnx.load(str(path))
    report = check_parity(build_twin(model), model, cifar_images(shared_dir, 64))
    assert report.max_rel_diff <= 1e-4 and report.argmax_agreement == 1.0


def test_rare_argmax_flips_without_a_faulty_op_are_tolerated_up_to_the_allowance(monkeypatch, caplog) -> None:
    """onnxruntime's answer for one sample is nudged across a decision boundary; every op is exact."""
    model = mixed_bit("vgg")
    twin = build_twin(model)
    real = parity.run_onnxruntime

    def nudged(candidate, feeds):
        outputs = real(candidate, feeds)
        if candidate is model:
            logits = outputs[0]
            runner_up = np.argsort(logits[0])[-2]
            logits[0, runner_up] = logits[0].max() + 1e-3
        return outputs

    monkeypatch.setattr(parity, "run_onnxruntime", nudged)
    report = check_parity(twin, model, images(200))
    assert report.argmax_agreement == pytest.approx(199 / 200)
    assert "argmaxes differ" in caplog.text
    with pytest.raises(ParityError, match="no single node diverges"):
        check_parity(twin, model, images(200), flip_allowance=0.0)
