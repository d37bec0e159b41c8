"""What onnxruntime's QDQ fusion changes, so the fake-quant twin can do the same.

ORT runs DQ -> Conv/Gemm -> Q as one integer kernel (QLinearConv, QGemm). A float bias
cannot be added to an int32 accumulator, so ORT first quantizes it to int32 with scale
input_scale * weight_scale, i.e. the bias the deployed model adds is
round(bias / (s_x * s_w)) * (s_x * s_w), not the bias in the graph. That moves about 1% of
the following layer's quantized values by one step (more at low bit widths), enough to
flip argmaxes. Plain graph semantics (and ORT with optimizations off) keep the float bias.

At high bit widths (16-bit activations and weights) round(bias / (s_x * s_w)) can exceed
int32; ORT then stores INT_MIN. The twin keeps the true bias and warns, so the parity gate
reports the broken layer instead of hiding it.

Which nodes ORT fuses depends on its optimizer rules (Relu/Clip absorbed into Q, type and
consumer checks), so the twin does not guess: it asks onnxruntime for its optimized graph
and reads which nodes received a quantized bias (ORT names it "<node>_bias_int32").
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..model import make_session
from .fakequant import round_straight_through
from .registry import OpFunction

log = logging.getLogger(__name__)

BIAS_INITIALIZER_SUFFIX = "_bias_int32"

_BIASED_OPS = {"Conv": 2, "Gemm": 2}
"""Op type -> index of its bias input."""


def integer_bias_nodes(model: onnx.ModelProto) -> frozenset[str]:
    """Names of the Conv/Gemm nodes whose float bias onnxruntime rounds to the int32 grid."""
    candidates = {
        node.name
        for node in model.graph.node
        if node.op_type in _BIASED_OPS and len(node.input) > _BIASED_OPS[node.op_type] and node.input[_BIASED_OPS[node.op_type]]
    }
    if not candidates or not any(node.op_type == "DequantizeLinear" for node in model.graph.node):
        return frozenset()
    with tempfile.TemporaryDirectory(prefix="quanos-twin-") as directory:
        path = Path(directory) / "optimized.onnx"
        make_session(model, optimized_model_path=str(path))
        optimized = onnx.load(str(path), load_external_data=False)
    quantized = {
        t.name[: -len(BIAS_INITIALIZER_SUFFIX)]: t for t in optimized.graph.initializer if t.name.endswith(BIAS_INITIALIZER_SUFFIX)
    }
    fused = frozenset(candidates & set(quantized))
    for name in sorted(fused):
        if np.any(onnx.numpy_helper.to_array(quantized[name]) == np.iinfo(np.int32).min):
            log.warning(
                "onnxruntime's int32 bias of node '%s' overflows (|bias| / (input scale * weight scale) > 2^31) "
                "and becomes INT_MIN: the deployed model adds a wrong bias there; the twin keeps the true one",
                name,
            )
    log.debug("onnxruntime quantizes the bias of %d node(s): %s", len(fused), sorted(fused))
    return fused


def with_integer_bias(function: OpFunction) -> OpFunction:
    """Wrap a Conv/Gemm implementation so its bias is first rounded to the int32 grid.

    The step receives the bias scale (s_x * s_w) as an extra last input. Rounding is
    straight-through, so a trainable bias still gets its gradient.
    """

    def run(attrs: Mapping[str, Any], inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        *operands, bias_scale = inputs
        bias = operands[2]
        operands[2] = round_straight_through(bias / bias_scale) * bias_scale
        return function(attrs, operands)

    return run
