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
