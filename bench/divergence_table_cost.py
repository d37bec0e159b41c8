"""The divergence sensitivity table (`kl`), written and run one model after the other (the
implementation of BEFORE_REVISION, read from git history) against this revision's, which
writes the next model while onnxruntime runs the one before. Both in one process, on the
same model, calibration statistics and images, as a default compile measures it (the
compile's PTQ grids, 7-bit background, 2..8 bits); at each thread count, wall and CPU
seconds of each and whether the tables are equal.

    PYTHONPATH=. python bench/divergence_table_cost.py resnet20 256 --threads 1 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from from_history import module_at  # noqa: E402
from study_data import load_setup  # noqa: E402

BEFORE_REVISION = "4b4468c"
"""The last commit whose divergence table wrote and ran its models one after the other."""


def main() -> None:
    import numpy as np

    from quanos_onnx.allocate import sensitivity
    from quanos_onnx.layers import find_joins, list_layers
    from quanos_onnx.model import load_model, normalize
    from quanos_onnx.ptq import PtqSettings
    from quanos_onnx.ptq.statistics import CalibrationStatistics
    from quanos_onnx.threads import using_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("samples", type=int)
    parser.add_argument("--threads", type=int, action="append")
    options = parser.parse_args()
    setup = load_setup(options.model)
    model = normalize(load_model(setup.model_path))
    layers = list_layers(model)
    joins = find_joins(model, layers)
    batches = [np.asarray(setup.tune_x[start : min(start + 64, options.samples)], np.float32) for start in range(0, options.samples, 64)]
    statistics = CalibrationStatistics(model, batches)
    before = module_at(BEFORE_REVISION, "quanos_onnx/allocate/sensitivity.py", "before_sensitivity", {"from ..": "from quanos_onnx."})

    def timed(module: Any) -> tuple[float, float, np.ndarray]:
        wall, cpu = time.perf_counter(), time.process_time()
        table = module.measure_divergence(model, layers, joins, batches, ptq=PtqSettings(rounding="nearest"), statistics=statistics)
        return time.perf_counter() - wall, time.process_time() - cpu, np.array(table.cost)

    timed(sensitivity)  # fills the statistics' histograms and grids, which both then share
    for threads in options.threads or [1]:
        with using_threads(threads):
            one_by_one = timed(before)
            overlapped = timed(sensitivity)
        print(
            f"{options.model}, {options.samples} images, threads {threads}: one after the other {one_by_one[0]:.1f} s wall "
            f"({one_by_one[1]:.1f} CPU s), overlapped {overlapped[0]:.1f} s wall ({overlapped[1]:.1f} CPU s), "
            f"{one_by_one[0] / overlapped[0]:.2f}x; tables equal: {bool(np.array_equal(one_by_one[2], overlapped[2]))}",
            flush=True,
        )


if __name__ == "__main__":
    main()
