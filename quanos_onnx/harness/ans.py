"""Adversarial Noise Sensitivity per layer (paper Eqn 2), streamed over batches.

For each sample, ANS_l = ||a_adv^l - a^l||_2 / ||a^l||_2, with a^l the output of layer l's
block (layers.Layer.block_output) flattened per sample. The attack runs on the torch twin;
both activations come from onnxruntime with the block outputs added as graph outputs, so
the numbers describe the model that is deployed. Only a running count, mean and sum of
squared deviations per layer are kept, so memory does not grow with the sample count.

The same code measures a quantized (QDQ) model: its layers keep their float model's
tensor names, so the float model's layer table names the activations, and the attack runs
through the fake-quant twin of the QDQ model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..errors import DataError, ModelError
from ..layers import Layer
from ..model import ACTIVATION_CHUNK, Runner, output_names
from .attacks import Attack, LogitsModel, attack_labels, perturb, predictions, twin_of

log = logging.getLogger(__name__)

Batches = Iterable[tuple[np.ndarray, "np.ndarray | None"]]
"""(inputs in the model's layout, int labels or None) per batch, as data.Dataset.batches gives."""

Progress = Callable[[int], None]
"""Called with the number of samples each finished batch held (for a progress bar)."""


@dataclass(frozen=True)
class AnsResult:
    """One layer's ANS over the samples where ||a^l|| > 0 (`count` of them)."""

    layer: str
    tensor: str
    mean: float
    std: float
    count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "tensor": self.tensor,
            "ans_mean": self.mean,
            "ans_std": self.std,
            "count": self.count,
        }


@dataclass(frozen=True)
class AnsMeasurement:
    """ANS for every layer in layer order, plus what the measurement's attack did.

    `labels` says where the attacked labels came from ('data' or 'model': the model's own
    clean predictions, in which case clean accuracy is 1 and adversarial accuracy is the
    share of predictions the attack did not change). `unperturbed` counts samples the
    attack left exactly as they were: their input gradient was zero (a heavily quantized
    model can mask it), so they add a ratio of 0 to every layer.
    """

    layers: tuple[AnsResult, ...]
    attack: Attack
    samples: int
    labels: str
    clean_accuracy: float
    adversarial_accuracy: float
    unperturbed: int

    def by_layer(self) -> dict[str, AnsResult]:
        return {result.layer: result for result in self.layers}

    def to_json(self) -> dict[str, Any]:
        return {
            "attack": self.attack.to_json(),
            "samples": self.samples,
            "labels": self.labels,
            "clean_accuracy": self.clean_accuracy,
            "adversarial_accuracy": self.adversarial_accuracy,
            "unperturbed": self.unperturbed,
            "layers": [result.to_json() for result in self.layers],
        }


class RunningMoments:
    """Count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.squares = 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        batch_count = values.size
        batch_mean = float(values.mean())
        batch_squares = float(((values - batch_mean) ** 2).sum())
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.squares += batch_squares + delta * delta * self.count * batch_count / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (0 for fewer than two values)."""
        return math.sqrt(self.squares / self.count) if self.count > 1 else 0.0


def noise_ratios(clean: np.ndarray, adversarial: np.ndarray) -> np.ndarray:
    """Per-sample ||adv - clean|| / ||clean||, NaN where ||clean|| is 0 (ratio undefined)."""
    count = len(clean)
    clean_flat = clean.reshape(count, -1).astype(np.float64)
    change = adversarial.reshape(count, -1).astype(np.float64) - clean_flat
    numerator = np.linalg.norm(change, axis=1)
    denominator = np.linalg.norm(clean_flat, axis=1)
    ratios = np.full(count, np.nan)
    np.divide(numerator, denominator, out=ratios, where=denominator > 0)
    return ratios


def measure_ans(
    proto: onnx.ModelProto,
    layers: Sequence[Layer],
    batches: Batches,
    attack: Attack,
    *,
    twin: LogitsModel | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> AnsMeasurement:
    """Stream the batches once: attack each on the twin, compare activations in onnxruntime.

    `proto` is the model that is measured (float, or the QDQ model for iterative QUANOS);
    `layers` is the float model's layer table (its block outputs name the activations).
    `twin` defaults to build_twin(proto). `seed` only matters for a PGD random start.
    """
    tensors = _activation_tensors(proto, layers)
    logits_name = output_names(proto)[0]
    runner = Runner(proto, tensors)
    fetch = [logits_name, *[t for t in tensors if t != logits_name]]
    model = twin if twin is not None else twin_of(proto)
    moments = [RunningMoments() for _ in layers]
    undefined = [0 for _ in layers]
    samples = clean_correct = adversarial_correct = unperturbed = 0
    labels_source = "data"
    for index, (x, y) in enumerate(batches):
        # every layer's clean and attacked activations of a chunk at a time (model.ACTIVATION_CHUNK);
        # the attack still runs on the whole batch
        chunks = [slice(start, start + ACTIVATION_CHUNK) for start in range(0, len(x), ACTIVATION_CHUNK)]
        clean_logits = np.concatenate([runner.run(x[chunk], [logits_name])[0] for chunk in chunks])
        labels = attack_labels(y, clean_logits)
        if y is None:
            labels_source = "model"
        rng = np.random.default_rng([seed, index])
        x_adv = perturb(model, x, labels, attack, rng=rng)
        unperturbed += int(np.all((x_adv == x).reshape(len(x), -1), axis=1).sum())
        ratios: list[list[np.ndarray]] = [[] for _ in tensors]
        adversarial_logits = []
        for chunk in chunks:
            clean = dict(zip(fetch, runner.run(x[chunk], fetch)))
            adversarial = dict(zip(fetch, runner.run(x_adv[chunk], fetch)))
            for position, tensor in enumerate(tensors):
                ratios[position].append(noise_ratios(clean[tensor], adversarial[tensor]))
            adversarial_logits.append(adversarial[logits_name])
            del clean, adversarial
        for position, parts in enumerate(ratios):
            batch_ratios = np.concatenate(parts)
            defined = batch_ratios[~np.isnan(batch_ratios)]
            undefined[position] += len(batch_ratios) - len(defined)
            moments[position].add(defined)
        samples += len(x)
        clean_correct += int((predictions(clean_logits) == labels).sum())
        adversarial_correct += int((predictions(np.concatenate(adversarial_logits)) == labels).sum())
        if progress is not None:
            progress(len(x))
    if samples == 0:
        raise DataError("no samples to measure ANS on (the data is empty)")
    if unperturbed:
        log.warning(
            "the attack left %d of %d samples unchanged (zero input gradient); they count as ANS 0",
            unperturbed, samples,
        )
    for layer, skipped in zip(layers, undefined):
        if skipped:
            log.warning(
                "layer %s: activation is all zero for %d of %d samples; ANS averages the rest",
                layer.name, skipped, samples,
            )
    results = tuple(
        AnsResult(layer.name, tensor, m.mean, m.std, m.count)
        for layer, tensor, m in zip(layers, tensors, moments)
    )
    return AnsMeasurement(
        layers=results,
        attack=attack,
        samples=samples,
        labels=labels_source,
        clean_accuracy=clean_correct / samples,
        adversarial_accuracy=adversarial_correct / samples,
        unperturbed=unperturbed,
    )


def _activation_tensors(proto: onnx.ModelProto, layers: Sequence[Layer]) -> list[str]:
    """Each layer's block output, checked to exist in `proto` (a QDQ model keeps the names)."""
    produced = {name for node in proto.graph.node for name in node.output}
    tensors = []
    for layer in layers:
        if layer.block_output not in produced:
            raise ModelError(
                f"layer '{layer.name}': tensor '{layer.block_output}' is not in the model "
                "being measured",
                hint="measure a model quantized from the model the layer table came from",
            )
        tensors.append(layer.block_output)
    return tensors
