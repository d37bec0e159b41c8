"""commands/options.py: typed options check and normalize their fields, the CLI's text forms
parse to the same values the API takes, and every error names the argument."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from quanos_onnx.commands.compile import CompileOptions
from quanos_onnx.commands.evaluate import EvaluateOptions
from quanos_onnx.commands.options import (
    AttackOptions,
    DataOptions,
    conform,
    data_range_from_text,
    describe,
    eps_list_from_text,
    floats_from_text,
    input_range_from_text,
    methods_from_text,
    crop_from_text,
    scale_from_text,
    shape_from_text,
)
from quanos_onnx.errors import UsageError


def test_conform_normalizes_numbers_and_sequences() -> None:
    assert conform(1, float) == 1.0 and isinstance(conform(1, float), float)
    assert conform(np.int64(3), int) == 3 and type(conform(np.int64(3), int)) is int
    assert conform([0, 255], tuple[float, float]) == (0.0, 255.0)
    assert conform([1, None], tuple[int | None, int | None]) == (1, None)
    assert conform(0.5, float | tuple[float, ...] | None) == 0.5
    assert conform([0.5, 0.25], float | tuple[float, ...] | None) == (0.5, 0.25)
    for value, annotation in [(True, int), (True, float), ("6", float), ("0,1", tuple[float, float]),
                              ((1, 2, 3), tuple[float, float]), ("cw", Literal["fgsm", "pgd"]), (1, bool)]:
        with pytest.raises(TypeError):
            conform(value, annotation)


def test_describe_says_what_an_option_takes() -> None:
    assert describe(float | None) == "a number or None"
    assert describe(tuple[float, float]) == "a tuple of 2 (a number, a number)"
    assert describe(Literal["fgsm", "pgd"]) == "one of 'fgsm', 'pgd'"


def test_options_check_types_and_ranges_naming_the_argument() -> None:
    cases = [
        (dict(bits=17), "bits 17 is outside 2..16"),
        (dict(first_last_bits=17), "first_last_bits 17 is outside 2..16"),
        (dict(first_last_bits=12, budget="avg-bits=4"), "first_last_bits 12 is outside the integer program's candidates"),
        (dict(bits=8.0), "bits 8.0 is not a whole number or None"),
        (dict(k_init=8, k_min=9), "k_min 9 must be a whole number in 2..8 (k_init)"),
        (dict(target_avg_bits=20.0), "target_avg_bits 20.0 is outside 2..16 (k_init)"),
        (dict(calibration="mean"), "calibration 'mean' is not one of 'auto', 'probe', 'minmax', 'percentile', 'entropy', 'mse'"),
        (dict(eps=2.0), "eps 2 must be in (0, 1]"),
        (dict(threads=0), "threads 0 must be at least 1"),
        (dict(data_range=(5, 5, 5)), "data_range (5, 5, 5) is not a tuple of 2"),
        (dict(std=(0.0,)), "std 0 must be positive numbers"),
    ]
    for arguments, message in cases:
        with pytest.raises(UsageError) as error:
            CompileOptions(**arguments)
        assert str(error.value).startswith(message), (arguments, str(error.value))


def test_settings_are_typed_and_leave_out_threads() -> None:
    settings = CompileOptions(input_range=[0, 255], threads=2).settings()
    assert settings["input_range"] == (0.0, 255.0) and settings["eps"] == 0.05 and "threads" not in settings


def test_the_cli_text_forms_parse_to_the_api_values() -> None:
    assert eps_list_from_text("0.05, 8/255", "eps") == (0.05, 8 / 255)
    assert input_range_from_text("-1,1") == (-1.0, 1.0)
    assert data_range_from_text("932:") == (932, None)
    assert scale_from_text("1/255") == pytest.approx(1 / 255)
    assert floats_from_text("0.5,0.25", "mean") == (0.5, 0.25)
    assert methods_from_text("FGSM, pgd") == ("fgsm", "pgd")
    with pytest.raises(UsageError, match="^attack 'cw' is not one of"):
        methods_from_text("fgsm,cw")
    with pytest.raises(UsageError, match="^pgd_alpha 'x' is not a number"):
        eps_list_from_text("x", "pgd_alpha")


def test_attack_and_evaluation_options_build_their_attacks() -> None:
    pgd = AttackOptions(attack="pgd", eps=8 / 255, pgd_steps=3, input_range=(0, 255)).ans_attack()
    assert (pgd.method, pgd.steps, pgd.input_range.high) == ("pgd", 3, 255.0)
    assert len(EvaluateOptions(eps=(0.1, 0.2)).attacks()) == 4
    with pytest.raises(UsageError, match=r"^eps is required \(or paper"):
        EvaluateOptions()
    with pytest.raises(UsageError, match="^batch_size 0 must be at least 1"):
        DataOptions(batch_size=0)


def test_image_options_parse_and_check() -> None:
    from pathlib import Path

    assert shape_from_text("1x3x224x224") == (1, 3, 224, 224)
    assert shape_from_text("3,224,224") == (3, 224, 224)
    assert crop_from_text("224") == 224 and crop_from_text("224x192") == (224, 192)
    for bad in ("3xx224", "0x224", "a"):
        with pytest.raises(UsageError, match="input_shape"):
            shape_from_text(bad)
    with pytest.raises(UsageError, match="crop"):
        crop_from_text("1x2x3")
    options = DataOptions(labels=Path("labels.csv"), input_shape=[3, 224, 224], crop=(224, 192), channel_order="bgr")
    assert options.labels == "labels.csv" and options.input_shape == (3, 224, 224)
    assert options.read_options()["crop"] == (224, 192)
    with pytest.raises(UsageError, match="channel_order"):
        DataOptions(channel_order="grb")
    with pytest.raises(UsageError, match="resize 0"):
        DataOptions(resize=0)
    with pytest.raises(UsageError, match="label_offset"):
        DataOptions(label_offset=-1)


def test_device_is_cpu_by_default_and_cuda_without_a_gpu_is_one_usage_error() -> None:
    import torch

    assert DataOptions().device == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot happen")
    with pytest.raises(UsageError) as caught:
        DataOptions(device="cuda")
    assert caught.value.arguments == ("device",)
    assert "sees no CUDA GPU" in str(caught.value) and "\n" not in caught.value.one_line()
