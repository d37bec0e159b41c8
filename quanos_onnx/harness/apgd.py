"""APGD (Croce and Hein, ICML 2020): PGD without a step size to tune, as AutoAttack runs it.

FGSM and PGD with a fixed step under-report what an attacker can do, most of all on
quantized models whose loss surface is flat in places; APGD adapts its step per sample and
keeps the best point it has seen, which is why AutoAttack reports it. L-inf only.

The schedule, as in the paper's Algorithm 1 and AutoAttack's code:
- start at a random point of the eps-box (a uniform draw scaled so its largest coordinate is
  eps, AutoAttack's start), clipped to the input range; first step size eta = 2 * eps;
- each step: z = P(x_k + eta * sign(grad)), x_k+1 = P(x_k + a (z - x_k) + (1 - a)(x_k - x_k-1))
  with momentum a = 0.75 (a = 1 on the first step); P projects to the eps-box and the range;
- checkpoints w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22,
  p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06); at each one a sample's step halves and it
  restarts from its best point when the loss rose in fewer than rho = 0.75 of the steps since
  the last checkpoint, or when its step was not halved last time and its best loss has not
  improved since (conditions 1 and 2 of the paper);
- losses: cross-entropy, or DLR = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), which
  does not saturate when softmax does (it needs at least 3 classes).

A sample is done as soon as the model misclassifies it at any iterate (AutoAttack counts it
as broken then too), so later steps run on the samples still standing; with `restarts`, each
restart starts afresh from a new random point on the samples no earlier run broke. What a
sample gets back: the first misclassified iterate, else its highest-loss point. Deliberate
difference from AutoAttack: after a step-size cut the momentum restarts at zero from the best
point (AutoAttack carries the previous iterate's difference over; ART resets to the best
point's predecessor); the checkpoints and the halving rule are the paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError, arg
from .attacks import InputRange, LogitsModel, check_fraction

if TYPE_CHECKING:
    import torch

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75
RHO = 0.75
"""A checkpoint halves the step when the loss rose in fewer than RHO of the steps before it."""

FIRST_CHECKPOINT = 0.22
CHECKPOINT_SHRINK = 0.03
CHECKPOINT_MIN_GAP = 0.06
DLR_GUARD = 1e-12


@dataclass(frozen=True)
class Apgd:
    """One APGD configuration: loss ('ce' or 'dlr'), eps in [0,1]-input units, steps, restarts."""

    loss: str
    eps: float
    steps: int = 50
    restarts: int = 1
    input_range: InputRange = field(default_factory=InputRange)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UsageError(f"{arg('attack')} apgd-{self.loss}: the loss is not one of {', '.join(LOSSES)}")
        check_fraction(self.eps, "eps")
        for name, value in (("apgd_steps", self.steps), ("apgd_restarts", self.restarts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{arg(name)} {value!r} must be a whole number of at least 1")

    @property
    def name(self) -> str:
        return f"apgd-{self.loss}"

    def describe(self) -> str:
        restarts = f", {self.restarts} restarts" if self.restarts > 1 else ""
        return f"APGD-{self.loss.upper()} eps={self.eps:.6g} {self.steps} steps{restarts}"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "eps": self.eps,
            "steps": self.steps,
            "restarts": self.restarts,
            "input_range": [self.input_range.low, self.input_range.high],
        }


def checkpoints(steps: int) -> tuple[int, ...]:
    """The iterations after which step sizes are checked: ceil(p_j * steps), p_j <= 1."""
    fractions = [0.0, FIRST_CHECKPOINT]
    while True:
        following = fractions[-1] + max(fractions[-1] - fractions[-2] - CHECKPOINT_SHRINK, CHECKPOINT_MIN_GAP)
        if following > 1:
            break
        fractions.append(following)
    # rounded first: 0.22 + 0.19 is 0.41000000000000003 in floating point, and ceil would give 42
    return tuple(sorted({math.ceil(round(p * steps, 9)) for p in fractions}))


def apgd_perturb(
    model: LogitsModel,
    x: np.ndarray,
    labels: np.ndarray,
    attack: Apgd,
    *,
    rng: np.random.Generator,
) -> np.ndarray:
    """Adversarial inputs for one batch (float32, same shape), within eps and the input range."""
    import torch

    clean = torch.from_numpy(np.array(x, dtype=np.float32))
    targets = torch.from_numpy(np.array(labels, dtype=np.int64))
    result = clean.clone()
    best_loss = torch.full((len(clean),), -math.inf)
    standing = torch.ones(len(clean), dtype=torch.bool)
    for _ in range(attack.restarts):
        chosen = standing.nonzero().flatten()
        if len(chosen) == 0:
            break
        run = _single_run(model, clean[chosen], targets[chosen], attack, rng)
        broken = chosen[run.broken]
        result[broken] = run.adversarial[run.broken]
        standing[broken] = False
        better = ~run.broken & (run.loss > best_loss[chosen])
        result[chosen[better]] = run.adversarial[better]
        best_loss[chosen[better]] = run.loss[better]
    return result.numpy().astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Run:
    adversarial: torch.Tensor
    broken: torch.Tensor
    loss: torch.Tensor


def _single_run(
    model: LogitsModel, clean: torch.Tensor, targets: torch.Tensor, attack: Apgd, rng: np.random.Generator
) -> _Run:
    """One APGD run from a random start; see the module docstring for the schedule."""
    import torch

    width = attack.input_range.width
    eps = attack.eps * width
    low, high = attack.input_range.low, attack.input_range.high
    lower, upper = (clean - eps).clamp(low, high), (clean + eps).clamp(low, high)

    def project(point: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(point, lower[rows]), upper[rows])

    count = len(clean)
    everyone = torch.arange(count)
    draw = torch.from_numpy(rng.uniform(-1.0, 1.0, size=tuple(clean.shape)).astype(np.float32))
    peak = draw.reshape(count, -1).abs().amax(dim=1).clamp_min(1e-12)
    x_k = project(clean + eps * draw / _per_sample(peak, draw), everyone)
    loss, gradient, misclassified = _loss_and_gradient(model, x_k, targets, attack.loss)

    adversarial = x_k.clone()
    broken = misclassified.clone()
    best_x, best_gradient, best_loss = x_k.clone(), gradient.clone(), loss.clone()
    x_previous = x_k.clone()
    step = torch.full((count,), 2.0 * eps)
    rises = torch.zeros(count)
    last_loss = loss.clone()
    best_at_check = best_loss.clone()
    halved_at_check = torch.zeros(count, dtype=torch.bool)
    schedule = checkpoints(attack.steps)
    previous_check = 0
    for iteration in range(attack.steps):
        active = (~broken).nonzero().flatten()
        if len(active) == 0:
            break
        momentum = 1.0 if iteration == 0 else MOMENTUM
        here = x_k[active]
        size = _per_sample(step[active], here)
        z = project(here + size * gradient[active].sign(), active)
        moved = project(here + momentum * (z - here) + (1 - momentum) * (here - x_previous[active]), active)
        x_previous[active] = here
        x_k[active] = moved
        new_loss, new_gradient, new_miss = _loss_and_gradient(model, moved, targets[active], attack.loss)
        gradient[active] = new_gradient
        adversarial[active[new_miss]] = moved[new_miss]
        broken[active[new_miss]] = True
        rises[active] += (new_loss > last_loss[active]).float()
        last_loss[active] = new_loss
        improved = new_loss > best_loss[active]
        rows = active[improved]
        best_x[rows], best_gradient[rows], best_loss[rows] = moved[improved], new_gradient[improved], new_loss[improved]
        done = iteration + 1
        if done in schedule[1:]:
            stalled = rises < RHO * (done - previous_check)
            flat = ~halved_at_check & (best_at_check >= best_loss)
            halve = (stalled | flat) & ~broken
            step[halve] /= 2
            x_k[halve], gradient[halve], x_previous[halve] = best_x[halve], best_gradient[halve], best_x[halve]
            halved_at_check = halve
            best_at_check = best_loss.clone()
            rises.zero_()
            previous_check = done
    adversarial[~broken] = best_x[~broken]
    return _Run(adversarial, broken, best_loss)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample scalar shaped to broadcast over one sample's input."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _loss_and_gradient(
    model: LogitsModel, x: torch.Tensor, targets: torch.Tensor, loss_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample loss, its input gradient (summed over the batch) and the misclassified mask."""
    import torch

    inputs = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs).reshape(len(inputs), -1)
        losses = per_sample_loss(logits, targets, loss_name)
        (gradient,) = torch.autograd.grad(losses.sum(), inputs)
    return losses.detach(), gradient, logits.detach().argmax(dim=1) != targets


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, loss_name: str) -> torch.Tensor:
    """Cross-entropy or DLR per sample (higher is better for the attacker)."""
    import torch

    if loss_name == "ce":
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    if logits.shape[1] < 3:
        raise UsageError(
            f"{arg('attack')} apgd-dlr needs at least 3 classes; the model has {logits.shape[1]}", hint="use apgd-ce"
        )
    ordered, _ = logits.sort(dim=1, descending=True)
    true_logit = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], -math.inf).amax(dim=1)
    return -(true_logit - others) / (ordered[:, 0] - ordered[:, 2] + DLR_GUARD)
