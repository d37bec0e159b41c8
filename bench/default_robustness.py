"""The default compile against uniform of its size under the robustness audit.

Issue 16's robust target (the mixed plan at least as robust as uniform at the same size),
asked of what a user gets with no options: `qn.compile(model, (tune_x, tune_y),
eval_data=(test_x, test_y))` and the same call with `bits=B`, B the default plan's average
weight bits rounded, on bench/study_data.py's setups. Both written models go through
bench/allocate_ptq.py's audit (`quanos analyze`'s default suite at that bench's two eps:
worst case per sample over FGSM, PGD-7, APGD-CE, APGD-DLR and the transfer attack from the
float graph, counted in onnxruntime, on its first test images), compared per sample with a
two-sided sign test.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/default_robustness.py resnet20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocate_ptq import Bench  # noqa: E402


def compiled(bench: Bench, **options: Any) -> Any:
    import quanos_onnx as qn

    setup = bench.setup
    return qn.compile(str(setup.model_path), (setup.tune_x, setup.tune_y), eval_data=(setup.test_x, setup.test_y), threads=1, **options)


def flags(text: str) -> np.ndarray:
    return np.array([character == "1" for character in text])


def main() -> None:
    from scipy.stats import binomtest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("resnet20", "fashion"))
    bench = Bench(parser.parse_args().model)
    default = compiled(bench)
    average = default.plan.average_weight_bits({layer.name: layer.params for layer in default.layers})
    bits = round(average)
    uniform = compiled(bench, bits=bits)
    audits = {name: bench.audited(result.model) for name, result in (("default", default), ("uniform", uniform))}
    for index, eps in enumerate(audits["default"]["per_sample"]["eps"]):
        mixed, even = (flags(audits[name]["per_sample"]["worst_case"][index]) for name in ("default", "uniform"))
        only_mixed, only_uniform = int((mixed & ~even).sum()), int((even & ~mixed).sum())
        p = binomtest(only_mixed, only_mixed + only_uniform).pvalue if only_mixed + only_uniform else 1.0
        print(
            f"{bench.name}, eps {255 * eps:.0f}/255, {len(mixed)} test images: default ({average:.2f} bits) robust "
            f"{100 * mixed.mean():.1f}%, uniform {bits} {100 * even.mean():.1f}%; robust under the default only "
            f"{only_mixed}, under uniform only {only_uniform}, sign test p = {p:.2g}"
        )
    for name, audit in audits.items():
        clean = flags(audit["per_sample"]["clean"]).mean()
        print(f"{name}: clean {100 * clean:.1f}% on the audited images, audit {audit['cpu_seconds']:.0f} CPU s")


if __name__ == "__main__":
    main()
