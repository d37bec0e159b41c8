"""Clean and adversarial accuracy of the deployed model (paper Section IV).

Adversarial inputs are crafted on the torch twin (white-box; the fake-quant twin for a QDQ
model) and classified by onnxruntime on the ONNX model itself. Adversarial loss is clean
accuracy minus adversarial accuracy, as the paper reports it. Streamed over batches: the
attacks keep correct-counts, the clean pass one outcome per sample (a byte each), which the
compile's verification pairs with float's to bound its accuracy drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import DataError, UsageError, arg
from ..model import Runner, output_names
from .ans import Batches, Progress
from .attacks import Attack, InputRange, LogitsModel, attack_labels, clean_gradient_of, perturb, predictions, twin_of


@dataclass(frozen=True)
class AttackAccuracy:
    attack: Attack
    accuracy: float
    loss: float

    def to_json(self) -> dict[str, Any]:
        return {**self.attack.to_json(), "accuracy": self.accuracy, "adversarial_loss": self.loss}


@dataclass(frozen=True)
class Evaluation:
    """Accuracies over `samples` inputs; `labels` is 'data' or 'model' (own predictions)."""

    samples: int
    labels: str
    clean_accuracy: float
    attacks: tuple[AttackAccuracy, ...]
    clean_outcomes: np.ndarray = field(compare=False, repr=False)
    """Whether each sample, in the batches' order, was classified correctly."""

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "labels": self.labels,
            "clean_accuracy": self.clean_accuracy,
            "attacks": [result.to_json() for result in self.attacks],
        }


def attack_grid(
    methods: Sequence[str],
    eps_values: Sequence[float],
    *,
    steps: int = 10,
    alpha: float | None = None,
    random_start: bool = False,
    input_range: InputRange | None = None,
) -> tuple[Attack, ...]:
    """Every method at every eps (`--attack fgsm,pgd --eps ...`), in that order."""
    if not methods or not eps_values:
        raise UsageError(f"{arg('attack')} and {arg('eps')} need at least one value each")
    input_range = input_range or InputRange()
    attacks = []
    for method in methods:
        for eps in eps_values:
            if method == "pgd":
                attacks.append(
                    Attack.pgd(eps, steps=steps, alpha=alpha, random_start=random_start, input_range=input_range)
                )
            else:
                attacks.append(Attack(method, eps, input_range=input_range))
    return tuple(attacks)


def evaluate(
    proto: onnx.ModelProto,
    batches: Batches,
    attacks: Sequence[Attack],
    *,
    twin: LogitsModel | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    until_fooled: bool = False,
) -> Evaluation:
    """Clean accuracy and accuracy under each attack, one pass over the batches.

    `twin` defaults to build_twin(proto); `seed` seeds PGD random starts per batch and attack.
    `until_fooled` is the compile verification's cheaper count: only samples onnxruntime
    classifies correctly are attacked (a clean miss counts as broken, as in the audit), the
    clean gradient is taken once per batch for every attack's first step, and each sample
    stops at the first iterate that fools the twin (attacks.perturb).
    """
    runner = Runner(proto)
    logits_name = output_names(proto)[0]
    model = twin
    if model is None and attacks:
        model = twin_of(proto)
    samples = clean_correct = 0
    attacked_correct = [0 for _ in attacks]
    outcomes: list[np.ndarray] = []
    labels_source = "data"
    for index, (x, y) in enumerate(batches):
        (logits,) = runner.run(x, [logits_name])
        labels = attack_labels(y, logits)
        if y is None:
            labels_source = "model"
        correct = predictions(logits) == labels
        clean_correct += int(correct.sum())
        outcomes.append(correct)
        rows = np.flatnonzero(correct) if until_fooled else np.arange(len(x))
        clean_gradient = clean_gradient_of(model, x[rows], labels[rows]) if until_fooled and attacks and len(rows) else None
        for position, attack in enumerate(attacks):
            if len(rows) == 0:
                break
            rng = np.random.default_rng([seed, index, position])
            x_adv = perturb(
                model, x[rows], labels[rows], attack, rng=rng, clean_gradient=clean_gradient, until_fooled=until_fooled
            )
            (adversarial_logits,) = runner.run(x_adv, [logits_name])
            attacked_correct[position] += int((predictions(adversarial_logits) == labels[rows]).sum())
        samples += len(x)
        if progress is not None:
            progress(len(x))
    if samples == 0:
        raise DataError("no samples to evaluate on (the data is empty)")
    clean_accuracy = clean_correct / samples
    results = tuple(
        AttackAccuracy(attack, correct / samples, clean_accuracy - correct / samples)
        for attack, correct in zip(attacks, attacked_correct)
    )
    return Evaluation(samples, labels_source, clean_accuracy, results, np.concatenate(outcomes))
