from __future__ import annotations

import numpy as np
import pytest

from harness_models import tiny_inputs
from masked_models import smooth_model, stepped_model
from quanos_onnx.harness.apgd import Apgd
from quanos_onnx.harness.attacks import Attack, InputRange, twin_of
from quanos_onnx.harness.masking import OVERESTIMATED, diagnose
from quanos_onnx.harness.robustness import AttackSuite, GradientStats, RobustnessAudit, audit_robustness, audit_suite


def _audit(model, source=None):
    methods = ["fgsm", "pgd", "apgd-ce", "apgd-dlr", *(["transfer"] if source is not None else [])]
    suite = audit_suite(
        [0.05, 0.1], methods, input_range=InputRange(), apgd_steps=10, restarts=1,
        pgd_steps=7, pgd_alpha=None, large_eps=0.5, transfer=source is not None,
    )
    return audit_robustness(model, [(tiny_inputs(120), None)], suite, source=source, seed=0)


@pytest.fixture(scope="module")
def smooth_audit():
    return _audit(smooth_model())


@pytest.fixture(scope="module")
def stepped_audit():
    return _audit(stepped_model(), source=twin_of(smooth_model()))


def test_a_smooth_model_raises_no_flag(smooth_audit):
    diagnosis = diagnose(smooth_audit)
    assert diagnosis.flagged == ()
    assert diagnosis.verdict == "no sign of gradient masking"
    names = [check.name for check in diagnosis.checks]
    assert "accuracy reaches zero at eps 0.5" in names and "input gradients are non-zero" in names


def test_a_hard_step_before_the_logits_is_flagged_as_masking(stepped_audit):
    diagnosis = diagnose(stepped_audit)
    flagged = {check.name: check for check in diagnosis.flagged}
    assert diagnosis.verdict == OVERESTIMATED
    assert "input gradients are non-zero" in flagged
    assert flagged["input gradients are non-zero"].samples == 120
    assert "transfer beats white-box at eps 0.1" in flagged
    assert "accuracy reaches zero at eps 0.5" in flagged
    # white-box FGSM and PGD cannot move a sample whose gradient is zero
    fgsm = next(a for a in stepped_audit.suite.attacks if a.eps == 0.1 and getattr(a, "method", "") == "fgsm")
    assert stepped_audit.outcome(fgsm).all()


def _toy_audit(clean, outcomes, attacks, effort=None, effort_check=None):
    suite = AttackSuite(tuple(attacks), effort_check=effort_check)
    return RobustnessAudit(
        suite=suite, labels="data", clean=np.array(clean), outcomes=tuple(np.array(o) for o in outcomes),
        effort=None if effort is None else np.array(effort), large_eps=None,
        gradients=GradientStats(len(clean), 0, 0.0),
    )


def test_iterative_weaker_than_fgsm_and_accuracy_rising_with_eps_are_flagged():
    small, large = Attack.fgsm(0.01), Attack.fgsm(0.03)
    pgd_small, pgd_large = Attack.pgd(0.01, steps=3), Attack.pgd(0.03, steps=3)
    # 4 samples: FGSM breaks sample 0 at eps 0.01 that PGD does not; sample 1 falls at 0.01 only
    audit = _toy_audit(
        [True, True, True, True],
        [[False, False, True, True], [True, False, True, True], [True, True, True, True], [True, True, True, True]],
        [small, pgd_small, large, pgd_large],
    )
    flagged = {check.name for check in diagnose(audit).flagged}
    assert "iterative weaker than single-step at eps 0.01" in flagged
    assert "accuracy falls from eps 0.01 to 0.03" in flagged
    assert "iterative weaker than single-step at eps 0.03" not in flagged


def test_more_effort_breaking_survivors_is_flagged_as_not_converged():
    attack = Apgd("ce", 0.03, steps=10)
    stronger = Apgd("ce", 0.03, steps=20, restarts=3)
    audit = _toy_audit([True] * 4, [[True, True, False, False]], [attack], effort=[False, True, False, False], effort_check=stronger)
    (check,) = [c for c in diagnose(audit).checks if c.name.startswith("more steps")]
    assert check.flagged and check.samples == 1
    assert audit.worst_case(0.03).tolist() == [False, True, False, False]
