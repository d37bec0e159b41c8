from __future__ import annotations

import json

import numpy as np
import pytest

from harness_models import TinyTorch, tiny_inputs, tiny_onnx, tiny_weights
from quanos_onnx.errors import DataError, UsageError
from quanos_onnx.harness.attacks import Attack, InputRange, perturb
from quanos_onnx.harness.evaluate import attack_grid, evaluate
from quanos_onnx.model import Runner


@pytest.fixture(scope="module")
def tiny():
    weights = tiny_weights()
    return tiny_onnx(weights), TinyTorch(weights)


def _batches(x, y, size):
    for start in range(0, len(x), size):
        yield x[start : start + size], None if y is None else y[start : start + size]


def test_accuracies_are_counted_by_onnxruntime_on_the_attacked_inputs(tiny):
    proto, model = tiny
    x = tiny_inputs(20)
    y = np.arange(20) % 5
    attacks = attack_grid(["fgsm", "pgd"], [0.05, 0.2], steps=5)
    result = evaluate(proto, _batches(x, y, 7), attacks, twin=model, seed=3)

    runner = Runner(proto)
    clean = runner.run(x)[0].argmax(1) == y
    assert result.samples == 20 and result.labels == "data"
    assert result.clean_accuracy == pytest.approx(clean.mean())
    np.testing.assert_array_equal(result.clean_outcomes, clean)  # per sample, across the batches of 7
    fgsm_small = result.attacks[0]
    x_adv = perturb(model, x, y, fgsm_small.attack)
    assert fgsm_small.accuracy == pytest.approx(np.mean(runner.run(x_adv)[0].argmax(1) == y))
    for entry in result.attacks:
        assert entry.loss == pytest.approx(result.clean_accuracy - entry.accuracy)
    assert [(a.attack.method, a.attack.eps) for a in result.attacks] == [
        ("fgsm", 0.05), ("fgsm", 0.2), ("pgd", 0.05), ("pgd", 0.2)
    ]


def test_without_labels_clean_accuracy_is_one_and_attacks_flip_predictions(tiny):
    proto, model = tiny
    x = tiny_inputs(24)
    result = evaluate(proto, _batches(x, None, 10), [Attack.fgsm(0.3)], twin=model)
    assert result.labels == "model" and result.clean_accuracy == 1.0
    assert result.attacks[0].accuracy < 1.0


def test_results_serialize_to_json(tiny):
    proto, model = tiny
    result = evaluate(proto, _batches(tiny_inputs(4), None, 4), [Attack.pgd(0.1, steps=2)], twin=model)
    document = json.loads(json.dumps(result.to_json()))
    assert document["attacks"][0]["method"] == "pgd"
    assert document["attacks"][0]["steps"] == 2
    assert set(document["attacks"][0]) >= {"eps", "alpha", "accuracy", "adversarial_loss"}


def test_attack_grid_carries_the_input_range_and_rejects_empty_lists():
    grid = attack_grid(["pgd"], [8 / 255], steps=7, alpha=2 / 255, input_range=InputRange(0, 255))
    assert grid[0].input_range.width == 255 and grid[0].step_size == pytest.approx(2 / 255)
    with pytest.raises(UsageError):
        attack_grid([], [0.1])
    with pytest.raises(UsageError, match="attack"):
        attack_grid(["deepfool"], [0.1])


def test_empty_data_is_a_data_error(tiny):
    proto, model = tiny
    with pytest.raises(DataError, match="no samples"):
        evaluate(proto, iter(()), [Attack.fgsm(0.1)], twin=model)


@pytest.mark.slow
def test_resnet20_falls_to_pgd_and_further_with_fgsm_eps(shared_dir):
    from quanos_onnx.model import load_model

    proto = load_model(shared_dir / "models/cifar10/resnet20_cifar10_akamaster.onnx")
    archive = np.load(shared_dir / "data/cifar10/cifar10_test_first932.npz")
    x = np.ascontiguousarray(archive["x"][:96].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    y = archive["y"][:96].astype(np.int64)
    attacks = (
        attack_grid(["pgd"], [2 / 255], steps=10)
        + attack_grid(["fgsm"], [0.5 / 255, 1 / 255, 2 / 255, 4 / 255])
    )
    result = evaluate(proto, _batches(x, y, 48), attacks)
    assert result.clean_accuracy > 0.85
    pgd, *fgsm = result.attacks
    assert pgd.accuracy < 0.1
    accuracies = [entry.accuracy for entry in fgsm]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] > accuracies[-1] + 0.2
    assert pgd.accuracy <= fgsm[2].accuracy  # PGD at 2/255 beats FGSM at 2/255


def test_until_fooled_attacks_only_correct_samples_and_counts_clean_misses_as_broken(tiny):
    proto, model = tiny
    x = tiny_inputs(40)
    y = np.arange(40) % 5  # about one in five right, so most samples are clean misses
    attacks = (Attack.fgsm(0.05), Attack.pgd(0.05, steps=4))
    plain = evaluate(proto, _batches(x, y, 16), attacks, twin=model)
    stopping = evaluate(proto, _batches(x, y, 16), attacks, twin=model, until_fooled=True)
    assert stopping.clean_accuracy == plain.clean_accuracy
    correct = Runner(proto).run(x)[0].argmax(1) == y
    for row, attack in zip(stopping.attacks, attacks):
        assert row.accuracy <= stopping.clean_accuracy
        # the surviving samples are exactly the correct ones whose attack fails in onnxruntime
        x_adv = perturb(model, x[correct], y[correct], attack, until_fooled=True)
        survived = Runner(proto).run(x_adv)[0].argmax(1) == y[correct]
        assert row.accuracy == pytest.approx(survived.sum() / len(x))
