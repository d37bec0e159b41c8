"""How far a quantized model's logits are from the float model's.

The allocator's divergence table (allocate/sensitivity.py), the per-layer tolerance probe
(harness/tolerance.py) and the `auto` activation ranges (ptq/autorange.py) all judge a
quantized model by its logits against float on the same images; one definition serves them.
"""

from __future__ import annotations

import numpy as np


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
