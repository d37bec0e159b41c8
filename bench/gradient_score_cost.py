"""The gradient sensitivity score (`fisher`), this revision against the one before its speed-up.

Both run in one process on the same float model and calibration images, every layer at
every candidate bit-width (2..8); the earlier implementation (allocate/sensitivity.py and
the pair-saturation emulation of twin/fusion.py it calls) is read from git history at
BEFORE_REVISION, so the comparison is side by side. Prints CPU seconds of each (one torch
thread) and the largest relative difference of the two tables.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/gradient_score_cost.py efficientnet 64
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from from_history import module_at  # noqa: E402
from study_data import load_setup  # noqa: E402

BEFORE_REVISION = "4b4468c"
"""The last commit with the float64 pair sums and the out-of-place grid of the score."""


def before_implementation() -> Any:
    """allocate/sensitivity.py at BEFORE_REVISION, calling twin/fusion.py of the same revision."""
    module_at(
        BEFORE_REVISION,
        "quanos_onnx/twin/fusion.py", "before_fusion", {"from ..": "from quanos_onnx.", "from .": "from quanos_onnx.twin."}
    )
    return module_at(
        BEFORE_REVISION,
        "quanos_onnx/allocate/sensitivity.py",
        "before_sensitivity",
        {"from ..twin.fusion import": "from before_fusion import", "from ..": "from quanos_onnx."},
    )


def main() -> None:
    import numpy as np
    import torch

    from quanos_onnx.allocate import sensitivity
    from quanos_onnx.layers import find_joins, list_layers
    from quanos_onnx.model import load_model, normalize

    torch.set_num_threads(1)
    name, samples = sys.argv[1], int(sys.argv[2])
    setup = load_setup(name)
    model = normalize(load_model(setup.model_path))
    layers = list_layers(model)
    joins = find_joins(model, layers)
    batches = [np.asarray(setup.tune_x[start : min(start + 32, samples)], np.float32) for start in range(0, samples, 32)]
    labels = [np.asarray(setup.tune_y[start : min(start + 32, samples)]) for start in range(0, samples, 32)]

    def timed(module: Any) -> tuple[float, np.ndarray]:
        started = time.process_time()
        table = module.measure_gradient(model, layers, joins, batches, labels=labels)
        return time.process_time() - started, np.array(table.cost)

    before_seconds, before = timed(before_implementation())
    now_seconds, now = timed(sensitivity)
    difference = float(np.max(np.abs(now - before) / np.maximum(np.abs(before), 1e-30)))
    print(
        f"{name}, {samples} images, {len(before)} layers x 7 candidates: before {before_seconds:.1f} CPU s, "
        f"now {now_seconds:.1f} CPU s ({before_seconds / now_seconds:.2f}x); largest relative difference {difference:.1g}"
    )


if __name__ == "__main__":
    main()
