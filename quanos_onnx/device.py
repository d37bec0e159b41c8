"""Where the tool computes: torch's device for the twin (attacks, ANS, fine-tuning) and
onnxruntime's execution providers, set together for the length of a command (the
`device` option, `--device`).

`cpu` is the default and needs nothing. `cuda` needs a CUDA build of torch that sees a
GPU, checked when the options are made, before any work; onnxruntime then runs on its
CUDA provider when onnxruntime-gpu is installed (with the CPU provider for the ops it does
not cover) and on the CPU otherwise. The twin's weights are moved to the device once;
batches go there and come back per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

from .errors import UsageError, arg

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda")
_DEVICE: ContextVar[str] = ContextVar("quanos_device", default="cpu")


def current_device() -> str:
    """torch's device for the twin now: 'cpu' unless a command runs with device='cuda'."""
    return _DEVICE.get()


def check_device(device: str) -> None:
    """Refuse, in one line, a device this machine cannot compute on."""
    if device not in DEVICES:
        raise UsageError(f"{arg('device')} {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UsageError(
                f"{arg('device')} cuda: torch {torch.__version__} ({build}) sees no CUDA GPU on this machine",
                hint="run on a machine with an NVIDIA GPU and a CUDA build of torch, or leave the device at cpu",
            )


@contextmanager
def using_device(device: str) -> Iterator[None]:
    """Within the block the twin computes on `device` and onnxruntime sessions ask for its
    provider; restored after."""
    check_device(device)
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def on_device(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the current device (itself on the CPU)."""
    device = current_device()
    return tensor if device == "cpu" else tensor.to(device)


def ort_providers() -> list[str]:
    """onnxruntime's providers for a session made now."""
    if current_device() == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
