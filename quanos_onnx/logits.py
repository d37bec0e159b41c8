"""How far a quantized model's logits are from the float model's.

The allocator's divergence table (allocate/sensitivity.py), the per-layer tolerance probe
(harness/tolerance.py) and `--calibration probe`'s range choice (ptq.low_bits_range) all judge
a quantized model by its logits against float on the same images; one definition serves them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx


def model_logits(proto: onnx.ModelProto, output: str, batches: Sequence[np.ndarray]) -> np.ndarray:
    """The model's `output` on every batch in onnxruntime, as [samples, classes]."""
    from .model import Runner

    runner = Runner(proto, [output])
    return np.concatenate([runner.run(batch, [output])[0].reshape(len(batch), -1) for batch in batches])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (logits as [samples, classes])."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(other)) (logits as [samples, classes])."""
    log_p, log_q = log_softmax(reference), log_softmax(other)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def mean_squared_error(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean squared difference of the raw logits."""
    return float(np.mean((reference.astype(np.float64) - other) ** 2))
