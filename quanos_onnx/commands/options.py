"""What every command shares: the data options, reading the data, the ANS attack and
sample counts, and the report's settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from ..layers import Layer

DEFAULT_ANS_SAMPLES = 1000


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """How every command reads and slices its data (cli.data_options); keyword-only, so
    each command's own options keep their positions."""

    layout: str = "auto"
    scale: str | None = None
    mean: str | None = None
    std: str | None = None
    data_range: str | None = None
    seed: int = 0


def settings_json(options: Any, *, exclude: Sequence[str]) -> dict[str, Any]:
    """A command's options for the report: all but the paths (listed with their sha256)."""
    return {key: value for key, value in asdict(options).items() if key not in exclude}


def weights_and_biases(layers: Sequence[Layer]) -> list[str]:
    return [name for layer in layers for name in (layer.weight, layer.bias) if name]


def load_data(options: Any, model: onnx.ModelProto) -> Any:
    from ..data import load_dataset
    from ..errors import UsageError
    from ..model import input_spec, num_classes

    if options.data_path is None:
        raise UsageError("--data is required: attacks and calibration run on it")
    return load_dataset(
        options.data_path,
        input_spec(model),
        layout=options.layout,
        scale=options.scale,
        mean=options.mean,
        std=options.std,
        data_range=options.data_range,
        seed=options.seed,
        num_classes=num_classes(model),
    )


def make_attack(options: Any) -> Any:
    """The ANS attack of the options (FGSM by default, as in the paper)."""
    from ..errors import UsageError
    from ..harness.attacks import Attack, InputRange, parse_eps

    input_range = InputRange.parse(options.input_range)
    eps = parse_eps(options.eps)
    if options.attack == "fgsm":
        return Attack.fgsm(eps, input_range)
    if options.attack == "pgd":
        alpha = parse_eps(options.pgd_alpha, "--pgd-alpha") if options.pgd_alpha else None
        return Attack.pgd(eps, steps=options.pgd_steps, alpha=alpha, input_range=input_range)
    raise UsageError(f"--attack {options.attack!r} is not fgsm or pgd")


def ans_samples(options: Any, dataset: Any) -> int:
    from ..errors import DataError, UsageError

    if options.samples is None:
        return min(DEFAULT_ANS_SAMPLES, dataset.count)
    if options.samples < 1:
        raise UsageError(f"--samples {options.samples} must be at least 1")
    if options.samples > dataset.count:
        raise DataError(
            f"--samples {options.samples} is more than the {dataset.count} samples in {dataset.source}"
        )
    return options.samples


def first_samples(dataset: Any, count: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The first `count` samples of the dataset in batches."""
    taken = 0
    for x, y in dataset.batches(batch_size):
        if taken >= count:
            break
        keep = min(len(x), count - taken)
        taken += keep
        yield x[:keep], (None if y is None else y[:keep])


def eps_list(text: str, option: str, parse: Callable[[str, str], float]) -> list[float]:
    return [parse(part, option) for part in text.split(",") if part.strip()]


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


DEFAULT_AUDIT_SAMPLES = 200
"""analyze's default sample count: about a minute on ResNet-20 on the 2-core VM, and a robust
accuracy of 0 reads as [0, 1.9%] (95% Wilson); docs/benchmarks.md has the timings."""

AUDIT_METHODS_DEFAULT = "fgsm,pgd,apgd-ce,apgd-dlr,transfer"
PAPER_PGD_STEPS = 7


@dataclass(frozen=True)
class AuditSettings:
    """The robustness audit's attacks, shared by analyze and evaluate (docs/method.md#robustness-audit).

    FGSM and PGD run with the paper's settings by default (PGD: 7 steps of 2/255); APGD with
    `apgd_steps` and `apgd_restarts`; the effort check doubles the steps and adds two restarts;
    `large_eps` is the eps of the probe that should break every sample.
    """

    methods: str = AUDIT_METHODS_DEFAULT
    eps: str = "2/255,8/255"
    apgd_steps: int = 50
    apgd_restarts: int = 1
    large_eps: str = "0.5"
    input_range: str = "0,1"
    pgd_steps: int = PAPER_PGD_STEPS
    pgd_alpha: str | None = "2/255"
    eps_option: str = "--eps"
    methods_option: str = "--attack"
    """The options that gave `eps` and `methods`, named in errors (analyze's: --audit-eps, --audit-attacks)."""

    def suite(self, *, compiled: bool) -> Any:
        """The AttackSuite; transfer is left out for a float model (nothing to transfer from)."""
        from ..harness.attacks import InputRange, parse_eps
        from ..harness.robustness import audit_suite

        methods = [part.strip().lower() for part in self.methods.split(",") if part.strip()]
        return audit_suite(
            eps_list(self.eps, self.eps_option, parse_eps),
            methods,
            input_range=InputRange.parse(self.input_range),
            apgd_steps=self.apgd_steps,
            restarts=self.apgd_restarts,
            pgd_steps=self.pgd_steps,
            pgd_alpha=None if self.pgd_alpha is None else parse_eps(self.pgd_alpha, "--pgd-alpha"),
            large_eps=parse_eps(self.large_eps, "--large-eps"),
            transfer=compiled,
            option=self.methods_option,
        )


def audit_model(
    model: onnx.ModelProto,
    batches: Iterator[tuple[np.ndarray, np.ndarray | None]],
    settings: AuditSettings,
    *,
    seed: int,
    progress: Any,
) -> tuple[Any, Any]:
    """(RobustnessAudit, MaskingDiagnosis) of one model; a compiled model's transfer attacks
    are crafted on its float graph (finetune.graph.float_model_of)."""
    from ..finetune.graph import compiled_plan, float_model_of
    from ..harness.attacks import twin_of
    from ..harness.masking import diagnose
    from ..harness.robustness import audit_robustness

    compiled = compiled_plan(model) is not None
    suite = settings.suite(compiled=compiled)
    source = twin_of(float_model_of(model)) if compiled and suite.needs_source() else None
    audit = audit_robustness(model, batches, suite, source=source, seed=seed, progress=progress)
    return audit, diagnose(audit)
