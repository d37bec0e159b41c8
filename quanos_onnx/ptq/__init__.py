"""Post-training quantization stages that choose a quantized model's weights and ranges."""
