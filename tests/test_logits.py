"""logits.py: the divergences every quantized model is judged by against float."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quanos_onnx.logits import kl_divergence, log_softmax, mean_squared_error, model_logits


def test_log_softmax_is_normalized_and_shift_invariant():
    logits = np.array([[1000.0, 1001.0, 999.0], [-3.0, 0.0, 2.0]], dtype=np.float32)
    result = log_softmax(logits)
    assert np.allclose(np.exp(result).sum(axis=1), 1.0)
    assert np.allclose(result, log_softmax(logits - 7.0))
    assert np.all(np.isfinite(result))


def test_kl_matches_a_hand_computation_and_is_zero_only_for_the_same_distribution():
    reference = np.array([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    other = np.array([[0.0, 0.0]])  # (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_divergence(reference, other) == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(reference, reference + 5.0) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(other, reference) != pytest.approx(expected)  # KL is not symmetric


def test_kl_is_the_mean_over_samples():
    first, second = np.array([[0.0, math.log(3.0)]]), np.array([[2.0, 0.0]])
    zeros = np.zeros((1, 2))
    both = kl_divergence(np.concatenate([first, second]), np.concatenate([zeros, zeros]))
    assert both == pytest.approx((kl_divergence(first, zeros) + kl_divergence(second, zeros)) / 2)


def test_mean_squared_error_of_raw_logits():
    assert mean_squared_error(np.array([[1.0, 2.0]]), np.array([[0.0, 4.0]])) == pytest.approx(2.5)


def test_model_logits_are_the_models_outputs_over_every_batch_in_order():
    from quanos_onnx.model import Runner, normalize, output_names

    from tiny_models import random_inputs, vgg_chain

    model = normalize(vgg_chain())
    x = random_inputs(model, 10)
    output = output_names(model)[0]
    batches = [x[:4], x[4:7], x[7:]]
    expected = Runner(model, [output]).run(x, [output])[0].reshape(10, -1)
    assert np.allclose(model_logits(model, output, batches), expected, rtol=1e-5, atol=1e-6)
