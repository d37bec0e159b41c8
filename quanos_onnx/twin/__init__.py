"""The torch twin: a differentiable executor of ONNX graphs, checked against onnxruntime.

build_twin(model) gives an nn.Module with input and weight gradients, straight-through
fake quantization for Q/DQ nodes and capture of any named tensor; check_parity(twin,
model, batch) is the gate that proves it reproduces onnxruntime before it is used.
See docs/twin.md.
"""

from .module import OnnxTwin, build_twin
from .parity import ParityReport, check_parity
from .registry import register, supported_ops

__all__ = ["OnnxTwin", "ParityReport", "build_twin", "check_parity", "register", "supported_ops"]
