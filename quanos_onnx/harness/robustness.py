"""Robust accuracy as a worst case over attacks, per sample, with the evidence masking checks need.

A quantized model can look robust only because its gradients are useless (Bernhard et al.
2019; Carlini et al. 2019). So an audit runs several attacks at each eps (FGSM and PGD with
the paper's settings, APGD-CE, APGD-DLR, and a transfer attack crafted on the compiled
model's float graph), counts every accuracy in onnxruntime on the attacked inputs, and calls
a sample robust at an eps only if every attack at that eps left it correctly classified (as
AutoAttack reports). The same pass gathers what harness.masking judges: the share of zero
input gradients at the clean points, a stronger APGD run on the samples still standing
(does more effort break more?), and an attack at a very large eps (it should break all).

Per-sample outcomes are kept (one bool per sample and attack), so paired comparisons are
exact: "transfer broke 12 samples that every white-box attack left standing". Only samples
the model classifies correctly are attacked; the others count as not robust.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import onnx

from ..errors import DataError, UsageError, arg
from ..model import Runner, output_names
from .ans import Batches, Progress
from .apgd import Apgd, apgd_perturb
from .attacks import Attack, LogitsModel, attack_labels, clean_gradient_of, perturb, predictions, twin_of
from .evaluate import AttackAccuracy, Evaluation

AUDIT_METHODS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "transfer")

CONFIDENCE = 0.95
"""Wilson intervals are 95% intervals."""


@dataclass(frozen=True)
class Transfer:
    """An attack crafted on another model (the float graph of a compiled one), applied to the target."""

    crafted_with: Attack | Apgd

    @property
    def eps(self) -> float:
        return self.crafted_with.eps

    @property
    def name(self) -> str:
        return "transfer"

    def describe(self) -> str:
        return f"transfer of {self.crafted_with.describe()} from the float model"

    def to_json(self) -> dict[str, Any]:
        return {"method": "transfer", "eps": self.eps, "crafted_with": self.crafted_with.to_json()}


AnyAttack = Union[Attack, Apgd, Transfer]


def attack_name(attack: AnyAttack) -> str:
    """fgsm, pgd-7, apgd-ce, apgd-dlr, transfer: the row label in tables."""
    if isinstance(attack, Attack):
        return "fgsm" if attack.method == "fgsm" else f"pgd-{attack.steps}"
    return attack.name


def is_white_box(attack: AnyAttack) -> bool:
    return not isinstance(attack, Transfer)


def is_iterative(attack: AnyAttack) -> bool:
    return isinstance(attack, Apgd) or (isinstance(attack, Attack) and attack.method == "pgd")


@dataclass(frozen=True)
class AttackSuite:
    """What an audit runs: the attack grid, plus the two masking probes (None: skipped).

    `effort_check` runs at its eps on the samples every grid attack at that eps left
    standing; `large_eps_check` runs on every correctly classified sample.
    """

    attacks: tuple[AnyAttack, ...]
    effort_check: Apgd | None = None
    large_eps_check: Apgd | None = None

    def __post_init__(self) -> None:
        if not self.attacks:
            raise UsageError(f"{arg('attack')}: the audit needs at least one attack")
        if self.effort_check is not None and self.effort_check.eps not in self.eps_values():
            raise UsageError(f"the effort check's eps {self.effort_check.eps:g} is not in the attack grid of {arg('eps')}")

    def eps_values(self) -> tuple[float, ...]:
        return tuple(sorted({attack.eps for attack in self.attacks}))

    def needs_source(self) -> bool:
        return any(isinstance(attack, Transfer) for attack in self.attacks)

    def to_json(self) -> dict[str, Any]:
        return {
            "attacks": [attack.to_json() for attack in self.attacks],
            "effort_check": None if self.effort_check is None else self.effort_check.to_json(),
            "large_eps_check": None if self.large_eps_check is None else self.large_eps_check.to_json(),
        }


@dataclass(frozen=True)
class Interval:
    """A share k/n with its Wilson score interval."""

    correct: int
    samples: int
    low: float
    high: float

    @property
    def share(self) -> float:
        return self.correct / self.samples

    def to_json(self) -> dict[str, Any]:
        return {"correct": self.correct, "samples": self.samples, "accuracy": self.share, "ci95": [self.low, self.high]}

    def __str__(self) -> str:
        return f"{self.share:.1%} [{self.low:.1%}, {self.high:.1%}]"


def wilson(correct: int, samples: int) -> Interval:
    """k of n with its 95% Wilson interval (good at shares near 0 and 1, unlike the normal one)."""
    from scipy.stats import binomtest

    if samples < 1:
        raise DataError("no samples: an accuracy needs at least one")
    interval = binomtest(correct, samples).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Interval(correct, samples, float(interval.low), float(interval.high))


@dataclass(frozen=True)
class GradientStats:
    """Input gradients of the cross-entropy at the clean, correctly classified samples."""

    samples: int
    zero_samples: int
    zero_entries: float

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "all_zero_samples": self.zero_samples, "zero_entry_share": self.zero_entries}


@dataclass(frozen=True)
class RobustnessAudit:
    """Per-sample outcomes of one model under a suite (True: still classified correctly).

    `outcomes` follow `suite.attacks`; `effort` and `large_eps` are the two probes (None when
    not run). `twin_disagreements` counts white-box adversarial inputs that fooled the twin but
    not onnxruntime: onnxruntime decides, so those samples count as robust.
    """

    suite: AttackSuite
    labels: str
    clean: np.ndarray
    outcomes: tuple[np.ndarray, ...]
    effort: np.ndarray | None
    large_eps: np.ndarray | None
    gradients: GradientStats
    twin_disagreements: int = 0

    @property
    def samples(self) -> int:
        return len(self.clean)

    def worst_case(self, eps: float) -> np.ndarray:
        """Robust at eps: correct under every grid attack at that eps (the effort check included)."""
        robust = self.clean.copy()
        for attack, outcome in zip(self.suite.attacks, self.outcomes):
            if attack.eps == eps:
                robust &= outcome
        if self.effort is not None and self.suite.effort_check is not None and self.suite.effort_check.eps == eps:
            robust &= self.effort
        return robust

    def outcome(self, attack: AnyAttack) -> np.ndarray:
        return self.outcomes[self.suite.attacks.index(attack)]

    def evaluation(self) -> Evaluation:
        """The FGSM/PGD rows as harness.evaluate's Evaluation (the documents' `evaluation`).

        Unlike evaluate(), a sample misclassified clean is never attacked, so it counts as
        broken even where an attack would have pushed it onto its label.
        """
        clean = float(self.clean.mean())
        rows = tuple(
            AttackAccuracy(attack, float(outcome.mean()), clean - float(outcome.mean()))
            for attack, outcome in zip(self.suite.attacks, self.outcomes)
            if isinstance(attack, Attack)
        )
        return Evaluation(self.samples, self.labels, clean, rows, np.asarray(self.clean, bool))

    def to_json(self) -> dict[str, Any]:
        def share(robust: np.ndarray) -> dict[str, Any]:
            return wilson(int(robust.sum()), self.samples).to_json()

        return {
            "samples": self.samples,
            "labels": self.labels,
            "clean": share(self.clean),
            "attacks": [
                {**attack.to_json(), "name": attack_name(attack), **share(outcome)}
                for attack, outcome in zip(self.suite.attacks, self.outcomes)
            ],
            "worst_case": [{"eps": eps, **share(self.worst_case(eps))} for eps in self.suite.eps_values()],
            "effort_check": None
            if self.effort is None or self.suite.effort_check is None
            else {**self.suite.effort_check.to_json(), **share(self.effort)},
            "large_eps_check": None
            if self.large_eps is None or self.suite.large_eps_check is None
            else {**self.suite.large_eps_check.to_json(), **share(self.large_eps)},
            "gradients": self.gradients.to_json(),
            "twin_disagreements": self.twin_disagreements,
        }


def audit_robustness(
    proto: onnx.ModelProto,
    batches: Batches,
    suite: AttackSuite,
    *,
    twin: LogitsModel | None = None,
    source: LogitsModel | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> RobustnessAudit:
    """Run the suite on every batch; accuracies from onnxruntime on `proto`, gradients from twins.

    `twin` defaults to build_twin(proto); `source` is the model transfer attacks are crafted
    on (required when the suite has one). Random starts draw from rng([seed, batch, attack]).
    """
    if suite.needs_source() and source is None:
        raise UsageError("a transfer attack needs a source model (the float model of a compiled one)")
    runner = Runner(proto)
    logits_name = output_names(proto)[0]
    model = twin if twin is not None else twin_of(proto)
    clean_parts: list[np.ndarray] = []
    outcome_parts: list[list[np.ndarray]] = [[] for _ in suite.attacks]
    effort_parts: list[np.ndarray] = []
    large_parts: list[np.ndarray] = []
    zero_samples = attacked = 0
    zero_entries = entries = 0
    disagreements = 0
    labels_source = "data"
    for index, (x, y) in enumerate(batches):
        (logits,) = runner.run(x, [logits_name])
        labels = attack_labels(y, logits)
        if y is None:
            labels_source = "model"
        correct = predictions(logits) == labels
        clean_parts.append(correct)
        rows = np.flatnonzero(correct)
        x_in, y_in = x[rows], labels[rows]

        def survives(x_adv: np.ndarray) -> np.ndarray:
            kept = correct.copy()
            if len(rows):
                (adv_logits,) = runner.run(x_adv, [logits_name])
                kept[rows] = predictions(adv_logits) == y_in
            return kept

        clean_gradient = None
        if len(rows):
            clean_gradient = clean_gradient_of(model, x_in, y_in).cpu()
            all_zero, zeros, size = _zero_gradients(clean_gradient)
            zero_samples, zero_entries, entries = zero_samples + all_zero, zero_entries + zeros, entries + size
            attacked += len(rows)
        for position, attack in enumerate(suite.attacks):
            rng = np.random.default_rng([seed, index, position])
            x_adv = _craft(attack, model, source, x_in, y_in, rng, clean_gradient) if len(rows) else x_in
            kept = survives(x_adv)
            if is_white_box(attack):
                standing = kept[rows]  # only where onnxruntime says robust can the twin disagree
                disagreements += int(_twin_misclassifies(model, x_adv[standing], y_in[standing]).sum())
            outcome_parts[position].append(kept)
        if suite.effort_check is not None:
            standing = correct.copy()
            for attack, parts in zip(suite.attacks, outcome_parts):
                if attack.eps == suite.effort_check.eps:
                    standing &= parts[-1]
            rng = np.random.default_rng([seed, index, len(suite.attacks)])
            effort_parts.append(_effort_outcome(suite.effort_check, model, runner, logits_name, x, labels, standing, rng))
        if suite.large_eps_check is not None:
            rng = np.random.default_rng([seed, index, len(suite.attacks) + 1])
            x_adv = apgd_perturb(model, x_in, y_in, suite.large_eps_check, rng=rng) if len(rows) else x_in
            large_parts.append(survives(x_adv))
        if progress is not None:
            progress(len(x))
    if not clean_parts:
        raise DataError("no samples to audit (the data is empty)")
    return RobustnessAudit(
        suite=suite,
        labels=labels_source,
        clean=np.concatenate(clean_parts),
        outcomes=tuple(np.concatenate(parts) for parts in outcome_parts),
        effort=np.concatenate(effort_parts) if effort_parts else None,
        large_eps=np.concatenate(large_parts) if large_parts else None,
        gradients=GradientStats(attacked, zero_samples, zero_entries / entries if entries else 0.0),
        twin_disagreements=disagreements,
    )


def _craft(
    attack: AnyAttack,
    model: LogitsModel,
    source: LogitsModel | None,
    x: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    clean_gradient: Any = None,
) -> np.ndarray:
    """The attack's adversarial inputs; `clean_gradient` (the target's own, at `x`) seeds the
    first step of FGSM and PGD, so the audit computes it once per batch, not once per attack."""
    if isinstance(attack, Transfer):
        assert source is not None
        return _craft(attack.crafted_with, source, None, x, labels, rng)
    if isinstance(attack, Apgd):
        return apgd_perturb(model, x, labels, attack, rng=rng)
    return perturb(model, x, labels, attack, rng=rng, clean_gradient=clean_gradient)


def _zero_gradients(gradient: Any) -> tuple[int, int, int]:
    """(samples whose d CE / dx is all zero, zero entries, entries) at the clean points."""
    magnitude = gradient.abs().reshape(len(gradient), -1).numpy()
    return int((magnitude.max(axis=1) == 0).sum()), int((magnitude == 0).sum()), magnitude.size


def _effort_outcome(
    check: Apgd,
    model: LogitsModel,
    runner: Runner,
    logits_name: str,
    x: np.ndarray,
    labels: np.ndarray,
    standing: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Which of the `standing` samples also survive the stronger APGD run (others: False)."""
    kept = standing.copy()
    chosen = np.flatnonzero(standing)
    if len(chosen):
        x_adv = apgd_perturb(model, x[chosen], labels[chosen], check, rng=rng)
        (adv_logits,) = runner.run(x_adv, [logits_name])
        kept[chosen] = predictions(adv_logits) == labels[chosen]
    return kept


def _twin_misclassifies(model: LogitsModel, x_adv: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Which attacked samples the twin misclassifies: where onnxruntime still says correct,
    the attack found a point the deployed model does not agree with (a twin/ORT gap)."""
    import torch

    if len(x_adv) == 0:
        return np.zeros(0, dtype=bool)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.array(x_adv, dtype=np.float32))).reshape(len(x_adv), -1)
    return logits.argmax(dim=1).numpy() != labels


def audit_suite(
    eps_values: Sequence[float],
    methods: Sequence[str],
    *,
    input_range: Any,
    apgd_steps: int,
    restarts: int,
    pgd_steps: int,
    pgd_alpha: float | None,
    large_eps: float | None,
    transfer: bool,
    option: str = "attack",
) -> AttackSuite:
    """The suite of `methods` (fgsm, pgd, apgd-ce, apgd-dlr, transfer) at every eps.

    The effort check is APGD-CE with twice the steps and two more restarts at the largest
    eps; transfer is APGD-CE crafted on the float model. `transfer` False drops it (a float
    model has no other model to transfer from). `option` names the option in errors.
    """
    attacks: list[AnyAttack] = []
    for eps in eps_values:
        for method in methods:
            if method == "fgsm":
                attacks.append(Attack.fgsm(eps, input_range))
            elif method == "pgd":
                attacks.append(Attack.pgd(eps, steps=pgd_steps, alpha=pgd_alpha, input_range=input_range))
            elif method in ("apgd-ce", "apgd-dlr"):
                attacks.append(Apgd(method[5:], eps, apgd_steps, restarts, input_range))
            elif method == "transfer":
                if transfer:
                    attacks.append(Transfer(Apgd("ce", eps, apgd_steps, restarts, input_range)))
            else:
                raise UsageError(f"{arg(option)} {method!r} is not one of {', '.join(AUDIT_METHODS)}")
    if not attacks:
        raise UsageError(f"{arg(option)}: nothing to run", hint="transfer needs a compiled model; add fgsm, pgd or apgd-ce")
    effort = Apgd("ce", max(eps_values), 2 * apgd_steps, restarts + 2, input_range)
    large = None if large_eps is None else Apgd("ce", large_eps, apgd_steps, 1, input_range)
    return AttackSuite(tuple(attacks), effort, large)

