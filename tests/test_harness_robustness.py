from __future__ import annotations

import numpy as np
import pytest

from harness_models import TinyTorch, tiny_inputs, tiny_onnx, tiny_weights
from quanos_onnx.errors import UsageError
from quanos_onnx.harness.apgd import apgd_perturb
from quanos_onnx.harness.attacks import InputRange, perturb
from quanos_onnx.harness.robustness import Transfer, audit_robustness, audit_suite, wilson
from quanos_onnx.model import Runner


@pytest.fixture(scope="module")
def tiny():
    weights = tiny_weights()
    return tiny_onnx(weights), TinyTorch(weights)


def test_wilson_interval_is_the_score_interval():
    interval = wilson(0, 200)
    assert interval.low == 0.0 and interval.high == pytest.approx(0.01884, abs=1e-4)
    half = wilson(50, 100)
    assert half.share == 0.5 and half.low == pytest.approx(0.4038, abs=1e-3) and half.high == pytest.approx(0.5962, abs=1e-3)


def test_every_outcome_is_counted_by_onnxruntime_and_the_worst_case_is_per_sample(tiny):
    proto, model = tiny
    x = tiny_inputs(24)
    y = np.arange(24) % 5
    suite = audit_suite(
        [0.05], ["fgsm", "apgd-ce"], input_range=InputRange(), apgd_steps=10, restarts=1,
        pgd_steps=7, pgd_alpha=None, large_eps=None, transfer=False,
    )
    audit = audit_robustness(proto, [(x, y)], suite, twin=model, seed=0)
    runner = Runner(proto)
    clean = runner.run(x)[0].argmax(1) == y
    assert np.array_equal(audit.clean, clean)
    fgsm, apgd = suite.attacks
    correct = clean.copy()
    rows = np.flatnonzero(clean)
    correct[rows] = runner.run(perturb(model, x[rows], y[rows], fgsm))[0].argmax(1) == y[rows]
    assert np.array_equal(audit.outcome(fgsm), correct)
    x_apgd = apgd_perturb(model, x[rows], y[rows], apgd, rng=np.random.default_rng([0, 0, 1]))
    correct_apgd = clean.copy()
    correct_apgd[rows] = runner.run(x_apgd)[0].argmax(1) == y[rows]
    assert np.array_equal(audit.outcome(apgd), correct_apgd)
    worst = audit.worst_case(0.05)
    assert np.array_equal(worst, correct & correct_apgd & audit.effort)
    document = audit.to_json()
    assert document["worst_case"][0]["correct"] == int(worst.sum())
    assert document["clean"]["ci95"][0] <= document["clean"]["accuracy"] <= document["clean"]["ci95"][1]


def test_a_transfer_attack_is_crafted_on_the_source_model(tiny):
    proto, model = tiny
    other = TinyTorch(tiny_weights(seed=5))
    x = tiny_inputs(16)
    suite = audit_suite(
        [0.1], ["transfer"], input_range=InputRange(), apgd_steps=10, restarts=1,
        pgd_steps=7, pgd_alpha=None, large_eps=None, transfer=True,
    )
    (attack,) = suite.attacks
    assert isinstance(attack, Transfer) and attack.to_json()["crafted_with"]["method"] == "apgd-ce"
    audit = audit_robustness(proto, [(x, None)], suite, twin=model, source=other, seed=0)
    x_adv = apgd_perturb(other, x, Runner(proto).run(x)[0].argmax(1), attack.crafted_with, rng=np.random.default_rng([0, 0, 0]))
    assert np.array_equal(audit.outcome(attack), Runner(proto).run(x_adv)[0].argmax(1) == Runner(proto).run(x)[0].argmax(1))


def test_a_transfer_without_a_source_and_unknown_attacks_are_usage_errors(tiny):
    proto, model = tiny
    suite = audit_suite([0.1], ["transfer"], input_range=InputRange(), apgd_steps=5, restarts=1, pgd_steps=7, pgd_alpha=None, large_eps=None, transfer=True)
    with pytest.raises(UsageError, match="source"):
        audit_robustness(proto, [(tiny_inputs(4), None)], suite, twin=model)
    with pytest.raises(UsageError, match="cw"):
        audit_suite([0.1], ["cw"], input_range=InputRange(), apgd_steps=5, restarts=1, pgd_steps=7, pgd_alpha=None, large_eps=None, transfer=False)
    with pytest.raises(UsageError, match="nothing to run"):
        audit_suite([0.1], ["transfer"], input_range=InputRange(), apgd_steps=5, restarts=1, pgd_steps=7, pgd_alpha=None, large_eps=None, transfer=False)
