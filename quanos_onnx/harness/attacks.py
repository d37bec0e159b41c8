"""White-box FGSM and PGD on a differentiable model (DESIGN section 2, paper Eqn 1).

eps and the PGD step are given in units of a [0,1]-scaled input and multiplied by the
width of the model's declared input range, so "eps 0.05" means the same perturbation for
a model that takes [0,1] pixels and one that takes 0..255. FGSM is PGD with one step of
size eps from the clean input and no random start; both share one loop.

The model is anything mapping an input batch to logits: the torch twin of an ONNX graph
(plain or fake-quant) or a user's nn.Module. Gradients are taken with respect to the input
only, so the twin's weights never need gradients.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..device import current_device, on_device
from ..errors import DataError, UsageError, arg

if TYPE_CHECKING:
    import onnx
    import torch

LogitsModel = Callable[["torch.Tensor"], "torch.Tensor"]
"""An input batch (float32, model layout) -> logits [N, classes]; the twin is one."""

METHODS = ("fgsm", "pgd")

GRADIENT_CHUNK_ELEMENTS = 16 * 3 * 224 * 224
"""Input elements per forward/backward of an attack gradient (16 ImageNet images; a whole
batch of 64 CIFAR images). Larger activations than glibc keeps in its heap (32 MB) are
mapped fresh for every op and page-faulted in: a batch of 64 at 224x224 spent more system
time than compute: 2.3x the CPU of 16 at a time for the same gradients on a uniform
8-bit EfficientNet-Lite0 twin (docs/benchmarks.md, "Attack gradients in chunks")."""

PGD_STEP_FACTOR = 2.5
"""Default PGD step = 2.5 * eps / steps (Madry et al.): the walk can cross the ball and back."""

_FRACTION = re.compile(r"\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*")


@dataclass(frozen=True)
class InputRange:
    """The values a model's input can take (``--input-range LO,HI``); eps scales by its width."""

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise UsageError(f"{arg('input_range')} {self}: both ends must be finite numbers")
        if self.low >= self.high:
            raise UsageError(f"{arg('input_range')} {self}: LO must be below HI, e.g. 0,1 or 0,255")

    @classmethod
    def parse(cls, text: str) -> InputRange:
        """'0,1', '0,255' or '-1,1'."""
        parts = str(text).split(",")
        try:
            low, high = (float(part) for part in parts)
        except ValueError:
            raise UsageError(
                f"{arg('input_range')} {text!r} is not LO,HI", hint="e.g. 0,1 or 0,255"
            ) from None
        return cls(low, high)

    @property
    def width(self) -> float:
        return self.high - self.low

    def __str__(self) -> str:
        return f"{self.low:g},{self.high:g}"


def parse_eps(text: str | float, option: str = "eps") -> float:
    """An eps (or PGD step) in [0,1] input units: '0.05', '8/255'; checked 0 < eps <= 1."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return check_fraction(float(text), option)
    fraction = _FRACTION.fullmatch(str(text))
    try:
        if fraction:
            value = float(fraction.group(1)) / float(fraction.group(2))
        else:
            value = float(str(text))
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{arg(option)} {text!r} is not a number (e.g. 0.05 or 8/255)") from None
    return check_fraction(value, option)


def eps_text(eps: float) -> str:
    """0.05 stays 0.05; multiples of 1/255 read as n/255, as the paper writes PGD strengths."""
    steps = eps * 255
    if abs(steps - round(steps)) < 1e-6 and abs(eps * 20 - round(eps * 20)) > 1e-6:
        return f"{round(steps)}/255"
    return f"{eps:g}"


def check_fraction(value: float, option: str) -> float:
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise UsageError(
            f"{arg(option)} {value:g} must be in (0, 1]: it is a fraction of the input range",
            hint="8/255 on a 0..255 model is written 8/255, not 8",
        )
    return value


@dataclass(frozen=True)
class Attack:
    """One attack configuration. Build with Attack.fgsm / Attack.pgd.

    `alpha` is the PGD step in [0,1] input units (None: 2.5 * eps / steps). `eps` and
    `alpha` are multiplied by `input_range.width` when the attack runs.
    """

    method: str
    eps: float
    steps: int = 1
    alpha: float | None = None
    random_start: bool = False
    input_range: InputRange = field(default_factory=InputRange)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"{arg('attack')} {self.method!r} is not one of {', '.join(METHODS)}")
        check_fraction(self.eps, "eps")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"{arg('pgd_steps')} {self.steps!r} must be a whole number of at least 1")
        if self.method == "fgsm" and (self.steps != 1 or self.alpha is not None or self.random_start):
            raise UsageError(f"{arg('attack')} fgsm takes one step of size eps: no {arg('pgd_steps')}, {arg('pgd_alpha')} or random start")
        if self.alpha is not None:
            check_fraction(self.alpha, "pgd_alpha")

    @classmethod
    def fgsm(cls, eps: float, input_range: InputRange | None = None) -> Attack:
        return cls("fgsm", eps, input_range=input_range or InputRange())

    @classmethod
    def pgd(
        cls,
        eps: float,
        *,
        steps: int = 10,
        alpha: float | None = None,
        random_start: bool = False,
        input_range: InputRange | None = None,
    ) -> Attack:
        return cls("pgd", eps, steps, alpha, random_start, input_range or InputRange())

    @property
    def step_size(self) -> float:
        """The step in [0,1] input units."""
        if self.method == "fgsm":
            return self.eps
        return self.alpha if self.alpha is not None else PGD_STEP_FACTOR * self.eps / self.steps

    def describe(self) -> str:
        if self.method == "fgsm":
            return f"FGSM eps={self.eps:.6g}"
        start = ", random start" if self.random_start else ""
        return f"PGD-{self.steps} eps={self.eps:.6g} alpha={self.step_size:.6g}{start}"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "eps": self.eps,
            "steps": self.steps,
            "alpha": self.step_size,
            "random_start": self.random_start,
            "input_range": [self.input_range.low, self.input_range.high],
        }


def perturb(
    model: LogitsModel,
    x: np.ndarray,
    labels: np.ndarray,
    attack: Attack,
    *,
    rng: np.random.Generator | None = None,
    clean_gradient: torch.Tensor | None = None,
    until_fooled: bool = False,
) -> np.ndarray:
    """Adversarial inputs for one batch: float32, same shape, within eps and the input range.

    `rng` draws the PGD random start (required then); everything else is deterministic.
    `clean_gradient` is loss_gradient at `x` when the caller already has it (an audit runs
    FGSM and PGD at several eps from the same clean point): the first step then reuses it.
    `until_fooled` keeps each sample at the first iterate its model misclassifies, as APGD
    does, and takes no more steps for it: a verification needs to know whether a sample
    falls, not how far, and on a model that falls in a step or two this skips most of
    PGD's gradients (docs/method.md, "Verification attacks").
    """
    import torch

    from ..twin.tensors import channels_last

    width = attack.input_range.width
    eps, step = attack.eps * width, attack.step_size * width
    low, high = attack.input_range.low, attack.input_range.high
    # copies: batches are read-only views of the dataset, which torch warns about on stderr
    clean = on_device(channels_last(torch.from_numpy(np.array(x, dtype=np.float32))))
    targets = on_device(torch.from_numpy(np.array(labels, dtype=np.int64)))
    adversarial = clean
    if attack.random_start:
        if rng is None:
            raise ValueError("a PGD random start needs an rng")
        noise = rng.uniform(-eps, eps, size=clean.shape).astype(np.float32)
        adversarial = (clean + on_device(torch.from_numpy(noise))).clamp(low, high)
    active = torch.arange(len(clean), device=clean.device)

    def stepped(point: torch.Tensor, gradient: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        point = point + step * gradient.sign()
        return torch.minimum(torch.maximum(point, origin - eps), origin + eps).clamp(low, high)

    for step_index in range(attack.steps):
        reuse = step_index == 0 and clean_gradient is not None and not attack.random_start
        if reuse:
            gradient = on_device(clean_gradient)
        elif until_fooled:
            gradient, logits = _gradient_and_logits(model, channels_last(adversarial[active]), targets[active])
            missed = logits.argmax(dim=1) != targets[active]
            active, gradient = active[~missed], gradient[~missed]
        else:
            gradient = loss_gradient(model, adversarial, targets)
        if len(active) == 0:
            break
        with torch.no_grad():
            if len(active) == len(clean):
                adversarial = stepped(adversarial, gradient, clean)
            else:
                adversarial = adversarial.clone()
                adversarial[active] = stepped(adversarial[active], gradient, clean[active])
    return np.ascontiguousarray(adversarial.detach().cpu().numpy(), dtype=np.float32)


def loss_gradient(model: LogitsModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), targets) / dx, summed over the batch so no sample's gradient is scaled."""
    return _gradient_and_logits(model, x, targets)[0]


def _gradient_and_logits(
    model: LogitsModel, x: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_gradient and the logits of the same forward pass (an attack that stops fooled
    samples reads them, so stopping early costs no extra pass), GRADIENT_CHUNK_ELEMENTS
    input elements at a time: each sample's gradient is its own (the loss is a sum)."""
    import torch

    size = max(1, GRADIENT_CHUNK_ELEMENTS // max(1, x[0].numel())) if len(x) else 1
    if len(x) <= size:
        return _one_pass(model, x, targets)
    parts = [_one_pass(model, x[start : start + size], targets[start : start + size]) for start in range(0, len(x), size)]
    return torch.cat([gradient for gradient, _ in parts]), torch.cat([logits for _, logits in parts])


def _one_pass(model: LogitsModel, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    inputs = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs)
        logits = logits.reshape(len(inputs), -1)
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, inputs)
    return gradient, logits.detach()


def clean_gradient_of(model: LogitsModel, x: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """loss_gradient at the clean points, detached: the first step of FGSM and of PGD without
    a random start, so a caller running both takes it once (perturb's `clean_gradient`).
    Channels-last as perturb's own steps: on a fake-quant twin a last-bit difference of
    the convolution can move a value across a rounding step and flip gradient signs."""
    import torch

    from ..twin.tensors import channels_last

    inputs = on_device(channels_last(torch.from_numpy(np.array(x, dtype=np.float32))))
    targets = on_device(torch.from_numpy(np.array(labels, dtype=np.int64)))
    return loss_gradient(model, inputs, targets).detach()


def attack_labels(y: np.ndarray | None, clean_logits: np.ndarray) -> np.ndarray:
    """The labels an attack pushes away from: the data's, else the model's clean predictions."""
    classes = clean_logits.reshape(len(clean_logits), -1).shape[1]
    if y is None:
        return predictions(clean_logits)
    return check_labels(y, classes, len(clean_logits))


def predictions(logits: np.ndarray) -> np.ndarray:
    return logits.reshape(len(logits), -1).argmax(axis=1).astype(np.int64)


def check_labels(y: np.ndarray, classes: int, count: int) -> np.ndarray:
    labels = np.asarray(y)
    if labels.shape != (count,):
        raise DataError(f"labels: expected shape ({count},) for a batch of {count}, got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"labels: expected integer class indices, got {labels.dtype}")
    if count and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(
            f"labels: class {bad} is outside the model's {classes} outputs (0..{classes - 1})"
        )
    return labels.astype(np.int64, copy=False)


def twin_of(proto: onnx.ModelProto) -> LogitsModel:
    """The torch twin that gives the attack its gradients (fake-quant for a QDQ model)."""
    from ..twin import build_twin

    return build_twin(proto, trainable=False).to(current_device())
