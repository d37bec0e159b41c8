from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from harness_models import TinyTorch, tiny_inputs, tiny_onnx, tiny_weights
from quanos_onnx.errors import DataError, ModelError
from quanos_onnx.harness.ans import RunningMoments, measure_ans, noise_ratios
from quanos_onnx.harness.attacks import Attack, perturb
from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner


@pytest.fixture(scope="module")
def tiny():
    weights = tiny_weights()
    proto = tiny_onnx(weights)
    return proto, list_layers(proto), TinyTorch(weights)


def _batches(x: np.ndarray, y: np.ndarray | None, size: int):
    for start in range(0, len(x), size):
        yield x[start : start + size], None if y is None else y[start : start + size]


def test_streamed_ans_equals_a_whole_array_numpy_computation(tiny):
    proto, layers, model = tiny
    x = tiny_inputs(10)
    y = np.arange(10) % 5
    attack = Attack.fgsm(0.05)
    result = measure_ans(proto, layers, _batches(x, y, 3), attack, twin=model)

    x_adv = perturb(model, x, y, attack)
    tensors = [layer.block_output for layer in layers]
    runner = Runner(proto, tensors)
    clean, adversarial = runner.run(x, tensors), runner.run(x_adv, tensors)
    assert [r.layer for r in result.layers] == [layer.name for layer in layers]
    for entry, a, a_adv in zip(result.layers, clean, adversarial):
        flat, flat_adv = a.reshape(10, -1).astype(np.float64), a_adv.reshape(10, -1).astype(np.float64)
        ratios = np.linalg.norm(flat_adv - flat, axis=1) / np.linalg.norm(flat, axis=1)
        assert entry.count == 10
        assert entry.mean == pytest.approx(ratios.mean(), rel=1e-9)
        assert entry.std == pytest.approx(ratios.std(), rel=1e-9)
    assert result.samples == 10 and result.labels == "data"
    logits = runner.run(x, ["logits"])[0]
    assert result.clean_accuracy == pytest.approx(np.mean(logits.argmax(1) == y))


def test_without_labels_the_attack_uses_the_model_predictions(tiny):
    proto, layers, model = tiny
    x = tiny_inputs(12)
    predicted = Runner(proto).run(x)[0].argmax(1)
    attack = Attack.fgsm(0.1)
    unlabeled = measure_ans(proto, layers, _batches(x, None, 5), attack, twin=model)
    labeled = measure_ans(proto, layers, _batches(x, predicted, 5), attack, twin=model)
    assert unlabeled.labels == "model" and unlabeled.clean_accuracy == 1.0
    assert unlabeled.layers == labeled.layers
    assert unlabeled.adversarial_accuracy == labeled.adversarial_accuracy < 1.0


def test_memory_does_not_grow_with_the_sample_count(tiny):
    """Keeping even one float64 per sample and layer would add 17*256*3*8 B = 102 KiB here."""
    proto, layers, model = tiny
    attack = Attack.fgsm(0.05)

    def peak(batch_count: int) -> int:
        def generate():
            for index in range(batch_count):
                yield tiny_inputs(256, seed=index), None

        measure_ans(proto, layers, generate(), attack, twin=model)  # warm caches
        tracemalloc.start()
        measure_ans(proto, layers, generate(), attack, twin=model)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    few, many = peak(3), peak(20)
    assert many - few < 32 * 1024


def test_all_zero_activations_are_left_out_of_the_mean():
    clean = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    adversarial = np.array([[1.0, 1.0], [0.5, 0.0], [3.0, 4.0]], dtype=np.float32)
    ratios = noise_ratios(clean, adversarial)
    assert ratios[0] == pytest.approx(1.0) and np.isnan(ratios[1]) and ratios[2] == 0.0


def test_running_moments_match_numpy_over_uneven_batches():
    values = np.random.default_rng(3).random(101) * 5
    moments = RunningMoments()
    for chunk in np.array_split(values, [1, 2, 30, 30, 77]):
        moments.add(chunk)
    assert moments.count == 101
    assert moments.mean == pytest.approx(values.mean(), rel=1e-12)
    assert moments.std == pytest.approx(values.std(), rel=1e-10)


def test_ans_on_the_quantized_model_uses_the_float_layer_names(tiny):
    from quanos_onnx.quantize import quantize
    from quanos_onnx.plan import Plan

    proto, layers, model = tiny
    x = tiny_inputs(16)
    quantized = quantize(proto, Plan.uniform(layers, 3), [x]).model
    assert list_layers(quantized) != layers
    attack = Attack.fgsm(0.05)
    float_ans = measure_ans(proto, layers, _batches(x, None, 8), attack, twin=model)
    quantized_ans = measure_ans(quantized, layers, _batches(x, None, 8), attack, twin=model)
    assert [r.tensor for r in quantized_ans.layers] == [r.tensor for r in float_ans.layers]
    # 3-bit inputs make the first layers' activations move differently under the same attack.
    assert quantized_ans.layers[1].mean != pytest.approx(float_ans.layers[1].mean, rel=1e-3)


def test_a_layer_table_from_another_model_is_refused(tiny):
    proto, layers, model = tiny
    from dataclasses import replace

    wrong = [replace(layers[0], block_output="not_here"), *layers[1:]]
    with pytest.raises(ModelError, match="not_here"):
        measure_ans(proto, wrong, _batches(tiny_inputs(2), None, 2), Attack.fgsm(0.1), twin=model)


def test_empty_data_is_a_data_error(tiny):
    proto, layers, model = tiny
    with pytest.raises(DataError, match="no samples"):
        measure_ans(proto, layers, iter(()), Attack.fgsm(0.1), twin=model)


def test_labels_out_of_range_are_a_data_error(tiny):
    proto, layers, model = tiny
    x = tiny_inputs(4)
    with pytest.raises(DataError, match="class 9"):
        measure_ans(proto, layers, _batches(x, np.array([0, 1, 9, 2]), 4), Attack.fgsm(0.1), twin=model)


def test_samples_without_gradient_are_counted_as_unperturbed(tiny):
    proto, layers, _ = tiny

    def flat(x):
        return x.reshape(len(x), -1)[:, :5] * 0.0  # no input gradient at all

    result = measure_ans(proto, layers, _batches(tiny_inputs(6), None, 4), Attack.fgsm(0.1), twin=flat)
    assert result.unperturbed == 6
    assert all(entry.mean == 0.0 and entry.count == 6 for entry in result.layers)


def test_default_twin_is_built_from_the_measured_model(tiny):
    proto, layers, model = tiny
    x = tiny_inputs(8)
    built = measure_ans(proto, layers, _batches(x, None, 8), Attack.fgsm(0.05))
    given = measure_ans(proto, layers, _batches(x, None, 8), Attack.fgsm(0.05), twin=model)
    for mine, theirs in zip(built.layers, given.layers):
        assert mine.mean == pytest.approx(theirs.mean, rel=1e-6)


def _cifar_batches(shared_dir, start: int, count: int, size: int = 32):
    archive = np.load(shared_dir / "data/cifar10/cifar10_test_jpeg_q75.npz")
    for first in range(start, start + count, size):
        x = archive["x"][first : first + size].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        yield np.ascontiguousarray(x), archive["y"][first : first + size].astype(np.int64)


@pytest.mark.slow
def test_resnet20_ans_on_the_float_and_the_quantized_model(shared_dir):
    from quanos_onnx.harness.attacks import twin_of
    from quanos_onnx.model import load_model
    from quanos_onnx.quantize import quantize
    from quanos_onnx.plan import Plan

    proto = load_model(shared_dir / "models/cifar10/resnet20_cifar10_akamaster.onnx")
    layers = list_layers(proto)
    attack = Attack.fgsm(0.05)
    measured = measure_ans(proto, layers, _cifar_batches(shared_dir, 932, 64), attack)
    assert len(measured.layers) == 20 and measured.unperturbed == 0
    assert all(entry.count == 64 and 0.05 < entry.mean < 3.0 for entry in measured.layers)
    assert measured.adversarial_accuracy < measured.clean_accuracy - 0.3

    calibration = [x for x, _ in _cifar_batches(shared_dir, 1100, 64)]
    quantized = quantize(proto, Plan.uniform(layers, 8), calibration).model
    on_quantized = measure_ans(
        quantized, layers, _cifar_batches(shared_dir, 932, 64), attack, twin=twin_of(quantized)
    )
    assert on_quantized.unperturbed == 0
    for mine, float_entry in zip(on_quantized.layers, measured.layers):
        assert mine.mean == pytest.approx(float_entry.mean, rel=0.2)
