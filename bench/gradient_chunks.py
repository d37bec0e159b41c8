"""Attack gradients in chunks of 16 ImageNet images against whole batches of 64, side by side.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/gradient_chunks.py [--write]

The compile verification's attacks (FGSM and PGD-7 at 0.05, until fooled, harness.evaluate)
on the first 64 EfficientNet-Lite0 test images of bench/study_data.py, float and uniform
8-bit (the compile's default PTQ), once with `attacks.GRADIENT_CHUNK_ELEMENTS` large enough
for the whole batch and once at its default; user and system CPU seconds and minor page
faults of this process (getrusage) around each, and the accuracies, which must agree.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study_data import load_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Attack gradients in chunks (bench/gradient_chunks.py)"


def _usage() -> tuple[float, float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    options = parser.parse_args()
    import onnx
    import torch

    torch.set_num_threads(1)
    import quanos_onnx as qn
    import quanos_onnx.harness.attacks as attacks
    from quanos_onnx.harness.evaluate import evaluate
    from quanos_onnx.verify import evaluation_attacks

    setup = load_setup("efficientnet")
    where = machine()
    models = {
        "float": onnx.load(str(setup.model_path)),
        "uniform 8": qn.compile(str(setup.model_path), (setup.tune_x, setup.tune_y), bits=8, evaluate=False).model,
    }
    x, y = setup.test_x[:64], setup.test_y[:64]
    default = attacks.GRADIENT_CHUNK_ELEMENTS
    lines = [
        HEADING,
        "",
        "`OMP_NUM_THREADS=1 PYTHONPATH=. python bench/gradient_chunks.py --write`: " + " ".join(__doc__.split("\n\n")[2].split()),
        f"Machine: {where}.",
        "",
        "| model | gradients | user CPU s | system CPU s | minor page faults | FGSM % | PGD-7 % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, model in models.items():
        twin = attacks.twin_of(model)
        for label, elements in (("whole batch of 64", 10**12), ("16 images at a time", default)):
            attacks.GRADIENT_CHUNK_ELEMENTS = elements
            user, system, faults = _usage()
            result = evaluate(model, [(x, y)], evaluation_attacks("fgsm,pgd", 0.05), twin=twin, until_fooled=True)
            user_after, system_after, faults_after = _usage()
            accuracies = " | ".join(f"{100 * row.accuracy:.1f}" for row in result.attacks)
            lines.append(
                f"| {name} | {label} | {user_after - user:.1f} | {system_after - system:.1f} | {faults_after - faults} | {accuracies} |"
            )
            print(lines[-1], flush=True)
    attacks.GRADIENT_CHUNK_ELEMENTS = default
    section = "\n".join([*lines, ""])
    print(section)
    if options.write:
        write_section(REPO / "docs/benchmarks.md", HEADING, section, after="## Verification attacks: every step against until-fooled (bench/verify_attacks.py)")


if __name__ == "__main__":
    main()
