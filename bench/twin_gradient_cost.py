"""CPU seconds of one attack gradient through the twin of a written QDQ model, per uniform bit-width.

An attack step is one `harness.attacks.loss_gradient` on the model's twin (`twin_of`); for a
QDQ model the twin runs onnxruntime's integer arithmetic, and for 8-bit weights on a CPU whose
u8 x s8 kernels saturate pairs of products (docs/quantization.md) it also emulates that
saturation. Batch 16 of the first tune images, channels-last as the attacks run it, best of 3
after a warm-up, 1 thread; the float model's twin beside them.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/twin_gradient_cost.py efficientnet 5 8
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_data import load_setup  # noqa: E402

BATCH = 16


def main() -> None:
    import numpy as np
    import torch

    from quanos_onnx.harness.attacks import loss_gradient, twin_of
    from quanos_onnx.twin.tensors import channels_last
    from quanos_onnx.layers import find_joins, list_layers
    from quanos_onnx.model import load_model
    from quanos_onnx.plan import Plan
    from quanos_onnx.ptq import PtqSettings
    from quanos_onnx.quantize import quantize

    torch.set_num_threads(1)
    name, *bit_widths = sys.argv[1:]
    setup = load_setup(name)
    model = load_model(setup.model_path)
    layers = list_layers(model)
    calibration = [setup.tune_x[:32]]
    x = channels_last(torch.from_numpy(np.array(setup.tune_x[:BATCH])))
    y = torch.from_numpy(np.array(setup.tune_y[:BATCH]))
    models = {"float": model}
    for bits in bit_widths:
        models[f"uniform {bits}"] = quantize(
            model, Plan.uniform(layers, int(bits)), calibration, layers=layers, joins=find_joins(model, layers),
            ptq=PtqSettings(bias_correction=False),
        ).model
    for label, proto in models.items():
        twin = twin_of(proto)
        loss_gradient(twin, x, y)
        seconds = []
        for _ in range(3):
            started = time.process_time()
            loss_gradient(twin, x, y)
            seconds.append(time.process_time() - started)
        print(f"{name} {label}: {min(seconds):.2f} CPU s per gradient at batch {BATCH}", flush=True)


if __name__ == "__main__":
    main()
