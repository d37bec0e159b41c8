"""Gradient-masking diagnostics: when robust accuracy is likely overestimated.

The checks follow Carlini et al. 2019 ("On evaluating adversarial robustness", section 5's
checklist) and read a RobustnessAudit (harness.robustness). Each is a paired count on the
same samples, so it needs no statistics beyond a threshold: a check is flagged when the
samples it points at are at least `MATERIAL` of all samples (and at least one).

- transfer beats white-box: a transfer attack from the float model broke samples every
  white-box attack at that eps left standing (the gradients of the model itself mislead);
- more effort helps: APGD-CE with twice the steps and more restarts broke samples the
  audit's attacks left standing (the reported figure had not converged);
- iterative weaker than single-step: FGSM broke samples that no iterative attack (PGD, APGD)
  at that eps broke (iterating on the gradient should only help);
- accuracy rises with eps: samples broken at a smaller eps but not at a larger one (any
  perturbation of the smaller ball is also in the larger one);
- large eps leaves accuracy: at a very large eps (0.5 of the input range by default) an
  attack that works breaks every sample;
- zero gradients: samples whose input gradient is all zero at the clean point, or half of
  all gradient entries zero (a hard step, a saturated activation, a quantizer without a
  straight-through estimator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .attacks import eps_text
from .robustness import RobustnessAudit, attack_name, is_iterative, is_white_box

MATERIAL = 0.01
"""A check flags when the samples it points at make up at least this share of all samples."""

ZERO_ENTRY_SHARE = 0.5
"""A gradient with at least this share of exact zeros is flagged even if no sample is all zero."""

OVERESTIMATED = "robustness likely overestimated"


@dataclass(frozen=True)
class Check:
    """One diagnostic: its name, whether it flagged, and the evidence in one sentence."""

    name: str
    flagged: bool
    evidence: str
    samples: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "flagged": self.flagged, "samples": self.samples, "evidence": self.evidence}


@dataclass(frozen=True)
class MaskingDiagnosis:
    checks: tuple[Check, ...]

    @property
    def flagged(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.flagged)

    @property
    def verdict(self) -> str:
        return OVERESTIMATED if self.flagged else "no sign of gradient masking"

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "checks": [check.to_json() for check in self.checks]}


def diagnose(audit: RobustnessAudit, material: float = MATERIAL) -> MaskingDiagnosis:
    """Every check the audit has the evidence for, in the order of the module docstring."""
    threshold = max(1, int(np.ceil(material * audit.samples)))
    checks = [
        *_transfer_checks(audit, threshold),
        *_effort_check(audit, threshold),
        *_iterative_checks(audit, threshold),
        *_eps_checks(audit, threshold),
        *_large_eps_check(audit, threshold),
        _gradient_check(audit, threshold),
    ]
    return MaskingDiagnosis(tuple(checks))


def _of(count: int, audit: RobustnessAudit) -> str:
    return f"{count} of {audit.samples} samples ({count / audit.samples:.1%})"


def _white_box_survivors(audit: RobustnessAudit, eps: float) -> np.ndarray:
    robust = audit.clean.copy()
    for attack, outcome in zip(audit.suite.attacks, audit.outcomes):
        if attack.eps == eps and is_white_box(attack):
            robust &= outcome
    return robust


def _transfer_checks(audit: RobustnessAudit, threshold: int) -> list[Check]:
    checks = []
    for attack, outcome in zip(audit.suite.attacks, audit.outcomes):
        if is_white_box(attack):
            continue
        only_transfer = int((_white_box_survivors(audit, attack.eps) & ~outcome).sum())
        checks.append(
            Check(
                f"transfer beats white-box at eps {eps_text(attack.eps)}",
                only_transfer >= threshold,
                f"the transfer attack from the float model broke {_of(only_transfer, audit)} "
                "that every white-box attack left standing",
                only_transfer,
            )
        )
    return checks


def _effort_check(audit: RobustnessAudit, threshold: int) -> list[Check]:
    check = audit.suite.effort_check
    if check is None or audit.effort is None:
        return []
    standing = audit.clean.copy()
    for attack, outcome in zip(audit.suite.attacks, audit.outcomes):
        if attack.eps == check.eps:
            standing &= outcome
    broken = int((standing & ~audit.effort).sum())
    return [
        Check(
            f"more steps and restarts at eps {eps_text(check.eps)}",
            broken >= threshold,
            f"{check.describe()} broke {_of(broken, audit)} that the audit's attacks left standing"
            + ("" if broken >= threshold else " (the audit's figure held)"),
            broken,
        )
    ]


def _iterative_checks(audit: RobustnessAudit, threshold: int) -> list[Check]:
    checks = []
    pairs = list(zip(audit.suite.attacks, audit.outcomes))
    for eps in audit.suite.eps_values():
        single = [outcome for attack, outcome in pairs if attack.eps == eps and attack_name(attack) == "fgsm"]
        iterative = [outcome for attack, outcome in pairs if attack.eps == eps and is_iterative(attack)]
        if not single or not iterative:
            continue
        iterative_survivors = np.logical_and.reduce(iterative) & audit.clean
        only_fgsm = int((iterative_survivors & ~single[0]).sum())
        checks.append(
            Check(
                f"iterative weaker than single-step at eps {eps_text(eps)}",
                only_fgsm >= threshold,
                f"FGSM broke {_of(only_fgsm, audit)} that every iterative attack left standing",
                only_fgsm,
            )
        )
    return checks


def _eps_checks(audit: RobustnessAudit, threshold: int) -> list[Check]:
    eps_values = audit.suite.eps_values()
    checks = []
    for smaller, larger in zip(eps_values, eps_values[1:]):
        rising = int((~audit.worst_case(smaller) & audit.worst_case(larger) & audit.clean).sum())
        checks.append(
            Check(
                f"accuracy falls from eps {eps_text(smaller)} to {eps_text(larger)}",
                rising >= threshold,
                f"{_of(rising, audit)} broken at eps {eps_text(smaller)} survived every attack at "
                f"eps {eps_text(larger)}",
                rising,
            )
        )
    return checks


def _large_eps_check(audit: RobustnessAudit, threshold: int) -> list[Check]:
    check = audit.suite.large_eps_check
    if check is None or audit.large_eps is None:
        return []
    left = int(audit.large_eps.sum())
    return [
        Check(
            f"accuracy reaches zero at eps {eps_text(check.eps)}",
            left >= threshold,
            f"{check.describe()} left {_of(left, audit)} classified correctly",
            left,
        )
    ]


def _gradient_check(audit: RobustnessAudit, threshold: int) -> Check:
    stats = audit.gradients
    flagged = stats.zero_samples >= threshold or (stats.samples > 0 and stats.zero_entries >= ZERO_ENTRY_SHARE)
    return Check(
        "input gradients are non-zero",
        flagged,
        f"{_of(stats.zero_samples, audit)} have an all-zero input gradient at the clean point; "
        f"{stats.zero_entries:.1%} of the gradient entries of the {stats.samples} correctly classified samples are zero",
        stats.zero_samples,
    )

