"""device.py: cpu by default, a one-line refusal of cuda without a GPU, providers."""

from __future__ import annotations

import pytest

from quanos_onnx.device import current_device, ort_providers, using_device
from quanos_onnx.errors import UsageError


def test_cpu_is_the_default_and_uses_the_cpu_provider() -> None:
    assert current_device() == "cpu"
    assert ort_providers() == ["CPUExecutionProvider"]
    with using_device("cpu"):
        assert current_device() == "cpu"


def test_cuda_without_a_gpu_is_refused_before_any_work() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="device cuda: torch .* sees no CUDA GPU"):
        with using_device("cuda"):
            pass
    assert current_device() == "cpu"


def test_an_unknown_device_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="device 'tpu' is not one of cpu, cuda"):
        with using_device("tpu"):
            pass
