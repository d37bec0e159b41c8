"""quanos-onnx: QUANOS hybrid quantization as a post-hoc ONNX compiler."""

__version__ = "0.1.0"
