from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness_models import CLASSES, TinyTorch, tiny_inputs, tiny_weights
from quanos_onnx.errors import DataError, UsageError
from quanos_onnx.harness.attacks import (
    Attack,
    InputRange,
    attack_labels,
    eps_text,
    parse_eps,
    perturb,
)


@pytest.fixture(scope="module")
def model() -> TinyTorch:
    return TinyTorch(tiny_weights())


def _loss(model: TinyTorch, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="sum"))


def _labels(model: TinyTorch, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


def test_fgsm_raises_the_loss_within_eps_and_the_input_range(model):
    x = tiny_inputs(16)
    y = _labels(model, x)
    attack = Attack.fgsm(0.05)
    x_adv = perturb(model, x, y, attack)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert _loss(model, x_adv, y) > _loss(model, x, y)
    assert np.abs(x_adv - x).max() <= 0.05 + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    interior = (x > 0.05) & (x < 0.95)
    # FGSM moves every pixel with a non-zero gradient by exactly eps (clipping aside).
    moved = np.abs(x_adv - x)[interior]
    assert np.isclose(moved[moved > 0], 0.05, atol=1e-6).all()


def test_eps_is_scaled_by_the_declared_input_range(model):
    x01 = tiny_inputs(8)
    y = _labels(model, x01)

    class RawPixels(torch.nn.Module):
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return model(pixels / 255.0)

    x255 = x01 * 255.0
    attack = Attack.fgsm(0.05, InputRange.parse("0,255"))
    x_adv = perturb(RawPixels(), x255, y, attack)
    assert np.abs(x_adv - x255).max() == pytest.approx(0.05 * 255, rel=1e-5)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 255.0
    # The same perturbation in [0,1] units as attacking the [0,1] model directly.
    same = perturb(model, x01, y, Attack.fgsm(0.05))
    np.testing.assert_allclose(x_adv / 255.0, same, atol=1e-5)


def test_pgd_is_stronger_than_fgsm_and_stays_in_the_ball(model):
    x = tiny_inputs(32)
    y = _labels(model, x)
    eps = 0.1
    fgsm = perturb(model, x, y, Attack.fgsm(eps))
    pgd = perturb(model, x, y, Attack.pgd(eps, steps=20), rng=np.random.default_rng(0))
    assert _loss(model, pgd, y) > _loss(model, fgsm, y)
    assert np.abs(pgd - x).max() <= eps + 1e-6
    assert pgd.min() >= 0.0 and pgd.max() <= 1.0


def test_pgd_random_start_is_deterministic_with_the_seed(model):
    x = tiny_inputs(8)
    y = _labels(model, x)
    attack = Attack.pgd(0.1, steps=3, random_start=True)
    first = perturb(model, x, y, attack, rng=np.random.default_rng(7))
    again = perturb(model, x, y, attack, rng=np.random.default_rng(7))
    other = perturb(model, x, y, attack, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.abs(first - x).max() <= 0.1 + 1e-6


def test_default_pgd_step_follows_eps_and_steps():
    assert Attack.pgd(8 / 255, steps=10).step_size == pytest.approx(2.5 * 8 / 255 / 10)
    assert Attack.pgd(8 / 255, steps=7, alpha=2 / 255).step_size == pytest.approx(2 / 255)
    assert Attack.fgsm(0.05).step_size == 0.05


@pytest.mark.parametrize("text, expected", [("0,1", (0.0, 1.0)), ("0,255", (0.0, 255.0)), (" -1 , 1 ", (-1.0, 1.0))])
def test_input_range_parses(text, expected):
    parsed = InputRange.parse(text)
    assert (parsed.low, parsed.high) == expected


@pytest.mark.parametrize("text", ["", "0", "0-1", "a,b", "0,1,2", "1,0", "5,5", "0,inf", "nan,1"])
def test_input_range_rejects_junk_naming_the_option(text):
    with pytest.raises(UsageError, match="input_range"):
        InputRange.parse(text)


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_eps_outside_zero_one_is_a_usage_error(eps):
    with pytest.raises(UsageError, match="eps"):
        Attack.fgsm(eps)
    with pytest.raises(UsageError, match="eps"):
        Attack.pgd(eps)


def test_eps_parses_fractions_and_rejects_text():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.05") == 0.05
    assert parse_eps(1) == 1.0
    for bad in ("abc", "8/0", "8", "0"):
        with pytest.raises(UsageError, match="eps"):
            parse_eps(bad)


def test_bad_attack_options_name_the_option():
    with pytest.raises(UsageError, match="attack"):
        Attack("cw", 0.1)
    with pytest.raises(UsageError, match="pgd_steps"):
        Attack.pgd(0.1, steps=0)
    with pytest.raises(UsageError, match="pgd_alpha"):
        Attack.pgd(0.1, alpha=0.0)


def test_labels_come_from_the_data_else_from_the_clean_predictions():
    logits = np.array([[0.1, 2.0, 0.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(attack_labels(None, logits), [1, 0])
    np.testing.assert_array_equal(attack_labels(np.array([2, 2]), logits), [2, 2])


@pytest.mark.parametrize("labels", [np.array([0, CLASSES]), np.array([-1, 0])])
def test_labels_outside_the_model_classes_are_a_data_error(labels):
    logits = np.zeros((2, CLASSES), dtype=np.float32)
    with pytest.raises(DataError, match=f"model's {CLASSES} outputs"):
        attack_labels(labels, logits)


def test_float_labels_are_a_data_error():
    with pytest.raises(DataError, match="integer"):
        attack_labels(np.array([0.0, 1.0]), np.zeros((2, 3), dtype=np.float32))


def test_the_twin_of_the_onnx_model_gives_the_same_attack(model):
    from harness_models import tiny_onnx

    from quanos_onnx.harness.attacks import twin_of

    twin = twin_of(tiny_onnx(tiny_weights()))
    x = tiny_inputs(16)
    y = _labels(model, x)
    np.testing.assert_array_equal(
        perturb(twin, x, y, Attack.fgsm(0.05)), perturb(model, x, y, Attack.fgsm(0.05))
    )


def test_eps_reads_as_the_paper_writes_it():
    assert eps_text(8 / 255) == "8/255" and eps_text(0.05) == "0.05" and eps_text(0.5) == "0.5"


class _Counting(torch.nn.Module):
    """Counts the samples each forward pass sees (the attack's gradient work)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.model(x)


def test_until_fooled_keeps_each_sample_at_its_first_fooling_iterate(model):
    x = tiny_inputs(32)
    y = _labels(model, x)
    attack = Attack.pgd(0.04, steps=6)
    every = perturb(model, x, y, attack)
    stopped = perturb(model, x, y, attack, until_fooled=True)
    assert np.abs(stopped - x).max() <= 0.04 + 1e-6
    # Replay the plain walk step by step: a sample stops where the model first misses it.
    point = x.copy()
    first_miss = np.full(len(x), -1)
    walk = [point]
    for step in range(1, attack.steps + 1):
        point = perturb(model, x, y, Attack.pgd(0.04, steps=step, alpha=attack.step_size))
        walk.append(point)
    for index in range(len(x)):
        for step in range(1, attack.steps):
            if _labels(model, walk[step][index : index + 1])[0] != y[index]:
                first_miss[index] = step
                break
    assert (first_miss > 0).any() and (first_miss < 0).any()  # the case is not vacuous
    for index in range(len(x)):
        expected = walk[first_miss[index]][index] if first_miss[index] > 0 else every[index]
        np.testing.assert_allclose(stopped[index], expected, atol=1e-6)


def test_until_fooled_skips_the_gradients_of_fooled_samples(model):
    x = tiny_inputs(32)
    y = _labels(model, x)
    attack = Attack.pgd(0.3, steps=6)
    plain, stopping = _Counting(model), _Counting(model)
    perturb(plain, x, y, attack)
    adversarial = perturb(stopping, x, y, attack, until_fooled=True)
    assert plain.rows == 6 * len(x)
    assert stopping.rows < plain.rows
    # never weaker on the model attacked: every sample the full walk ends fooling, it fools
    fooled_by_every_step = _labels(model, perturb(model, x, y, attack)) != y
    assert not (fooled_by_every_step & (_labels(model, adversarial) == y)).any()


def test_gradients_are_taken_in_chunks_and_equal_the_whole_batchs(model, monkeypatch):
    import quanos_onnx.harness.attacks as attacks

    x = tiny_inputs(10)
    y = _labels(model, x)
    whole = attacks.loss_gradient(model, torch.from_numpy(x), torch.from_numpy(y))
    seen: list[int] = []

    class Sizes(torch.nn.Module):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            seen.append(len(batch))
            return model(batch)

    monkeypatch.setattr(attacks, "GRADIENT_CHUNK_ELEMENTS", 3 * x[0].size)
    chunked = attacks.loss_gradient(Sizes(), torch.from_numpy(x), torch.from_numpy(y))
    assert seen == [3, 3, 3, 1]
    torch.testing.assert_close(chunked, whole)
    stopped = perturb(Sizes(), x, y, Attack.pgd(0.04, steps=4), until_fooled=True)
    monkeypatch.setattr(attacks, "GRADIENT_CHUNK_ELEMENTS", 10**9)
    np.testing.assert_array_equal(stopped, perturb(model, x, y, Attack.pgd(0.04, steps=4), until_fooled=True))
