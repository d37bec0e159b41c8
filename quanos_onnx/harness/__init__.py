"""The attack harness: FGSM/PGD through the torch twin, streaming ANS, adversarial accuracy.

Gradients come from a differentiable twin of the ONNX graph; every activation and
accuracy is measured by onnxruntime on the ONNX model itself, so the numbers describe the
deployed artifact. Torch is imported inside the functions that need it, so importing
this package (as the CLI does at startup) stays cheap.
"""
