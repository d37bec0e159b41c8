"""Bias correction's pass, the patch-sum implementation against the probe-convolution one it replaced.

Both run on the same QDQ model (uniform B bits, the compile's PTQ without the correction
itself) and the same 128 calibration images; the earlier implementation is read from git
history (`git show PROBE_REVISION:quanos_onnx/ptq/bias.py`), so the comparison is side by side
in one process. Prints CPU seconds of each (best of two for the new one) and the largest
relative difference of the shifts.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bias_speed.py efficientnet 5
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bias_speed.py resnet20 4
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from from_history import module_at  # noqa: E402
from study_data import load_setup  # noqa: E402

PROBE_REVISION = "00191a2"
"""The last commit with two probe convolutions per layer."""


def probe_implementation() -> Any:
    return module_at(PROBE_REVISION, "quanos_onnx/ptq/bias.py", "probe_bias", {"from ..": "from quanos_onnx."})


def main() -> None:
    import numpy as np
    import torch
    from onnx import numpy_helper

    from quanos_onnx.layers import find_joins, list_layers
    from quanos_onnx.model import load_model
    from quanos_onnx.plan import Plan
    from quanos_onnx.ptq import PtqSettings, bias
    from quanos_onnx.quantize import quantize

    torch.set_num_threads(1)
    name, bits = sys.argv[1], int(sys.argv[2])
    setup = load_setup(name)
    model = load_model(setup.model_path)
    layers = list_layers(model)
    calibration = [setup.tune_x[start : start + 64] for start in range(0, 128, 64)]
    written = quantize(model, Plan.uniform(layers, bits), calibration, layers=layers, joins=find_joins(model, layers),
                       ptq=PtqSettings(bias_correction=False))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def timed(function: Any) -> tuple[float, dict[str, np.ndarray]]:
        started = time.process_time()
        shifts = function(written.model, weights, layers, written.plan, calibration)
        return time.process_time() - started, shifts

    new_seconds, new = min((timed(bias.bias_shifts) for _ in range(2)), key=lambda pair: pair[0])
    old_seconds, old = timed(probe_implementation().bias_shifts)
    difference = max(float(np.abs(new[k] - old[k]).max() / (np.abs(old[k]).max() + 1e-12)) for k in old)
    print(f"{name} uniform {bits}: {len(old)} layers corrected; probe convolutions {old_seconds:.2f} CPU s, "
          f"patch sums {new_seconds:.2f} CPU s ({old_seconds / new_seconds:.1f}x); largest relative difference {difference:.1g}")


if __name__ == "__main__":
    main()
