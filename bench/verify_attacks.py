"""The compile verification's attacks: every step on every sample against `until_fooled`.

The verification (quanos_onnx/verify.py) attacks the first 64 evaluation samples of each
model with FGSM and PGD-7 at the ANS eps (default 0.05) through the model's twin and counts with
onnxruntime. Since this change it attacks only the samples onnxruntime classifies
correctly, takes the clean gradient once for both attacks' first step, and stops each sample
at the first PGD iterate that fools the twin (harness.evaluate's `until_fooled`). This
script runs both counts side by side in one process on the same models and samples and
reports robust accuracy and the CPU seconds of each:

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/verify_attacks.py --model resnet20 --model efficientnet [--write]

Models: float and uniform B-bit QDQ models written by `qn.compile(..., bits=B,
evaluate=False)` (the compile's default PTQ) on bench/study_data.py's tune images; samples:
the first 64 test images of the setup. Every model is a JSON cell under
bench/cache/verify-attacks/, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study_data import cached, load_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench/cache/verify-attacks"
HEADING = "## Verification attacks: every step against until-fooled (bench/verify_attacks.py)"
BITS = {"resnet20": (4, 6, 8), "fashion": (4, 8), "efficientnet": (5, 8)}
EPS = {"resnet20": (0.05, 1 / 255), "fashion": (0.05, 2 / 255), "efficientnet": (0.05,)}
"""0.05: the verification's default (the ANS eps); the small eps leave PGD-7 something to
find, where stopping at the first fooling iterate could differ from the full walk."""
SAMPLES = 64


def measure(model_name: str, bits: int | None, eps: float) -> dict[str, Any]:
    """Both counts on one model (None: float) at one eps, in this process, one thread."""
    import onnx
    import torch

    torch.set_num_threads(1)
    import quanos_onnx as qn
    from quanos_onnx.harness.evaluate import evaluate
    from quanos_onnx.verify import evaluation_attacks

    setup = load_setup(model_name)
    if bits is None:
        model = onnx.load(str(setup.model_path))
    else:
        model = qn.compile(str(setup.model_path), (setup.tune_x, setup.tune_y), bits=bits, evaluate=False).model
    attacks = evaluation_attacks("fgsm,pgd", eps)
    x, y = setup.test_x[:SAMPLES], setup.test_y[:SAMPLES]
    cell: dict[str, Any] = {"machine": machine()}
    for mode, until_fooled in (("every step", False), ("until fooled", True)):
        started = time.process_time()
        result = evaluate(model, [(x, y)], attacks, until_fooled=until_fooled)
        cell[mode] = {
            "cpu_s": time.process_time() - started,
            "clean": result.clean_accuracy,
            **{attack.attack.method: attack.accuracy for attack in result.attacks},
        }
    return cell


def render(models: list[str]) -> str:
    from quanos_onnx.harness.attacks import eps_text

    flags = " ".join(f"--model {model}" for model in models)
    lines = [
        HEADING,
        "",
        f"`OMP_NUM_THREADS=1 PYTHONPATH=. python bench/verify_attacks.py {flags} --write`: the verification's "
        f"attacks (FGSM and PGD-7 through the twin, at the default eps 0.05 and at a small one, counted by onnxruntime) on the first {SAMPLES} test "
        "images of each setup (bench/study_data.py), float and uniform B-bit models written with the compile's "
        "default PTQ. *Every step*: every sample attacked for every step (the verification before this change, "
        "and `quanos evaluate`); *until fooled*: only samples classified correctly are attacked, the clean "
        "gradient is shared by both attacks' first step, and a sample stops at its first PGD iterate that fools "
        "the twin. Both in one process, one thread, side by side.",
        "",
        "| model | bits | eps | clean % | FGSM %: every step / until fooled | PGD-7 %: every step / until fooled | CPU s: every step / until fooled | ratio | machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    moved: list[str] = []
    for model in models:
        for eps in EPS[model]:
            for bits in (None, *BITS[model]):
                name = "float" if bits is None else f"uniform{bits}"
                suffix = "" if eps == 0.05 else f"-eps{eps_text(eps).replace('/', 'of')}"
                cell = cached(CACHE / model / f"{name}{suffix}.json", lambda: measure(model, bits, eps))
                old, new = cell["every step"], cell["until fooled"]
                for attack in ("fgsm", "pgd"):
                    if new[attack] != old[attack]:
                        moved.append(
                            f"{model} {'float' if bits is None else f'uniform {bits}'} {attack.upper()} at {eps_text(eps)}: "
                            f"{100 * old[attack]:.1f}% -> {100 * new[attack]:.1f}%"
                        )
                lines.append(
                    f"| {model} | {'float' if bits is None else bits} | {eps_text(eps)} | {100 * old['clean']:.1f} | "
                    f"{100 * old['fgsm']:.1f} / {100 * new['fgsm']:.1f} | {100 * old['pgd']:.1f} / {100 * new['pgd']:.1f} | "
                    f"{old['cpu_s']:.1f} / {new['cpu_s']:.1f} | {old['cpu_s'] / new['cpu_s']:.1f}x | {cell['machine']} |"
                )
    summary = (
        "Robust accuracy differs between the two counts in "
        + (f"{len(moved)} cell(s): {'; '.join(moved)}." if moved else "no cell.")
        + " Until fooled keeps any iterate that fools the twin and counts a clean miss as broken, so where it"
        " is lower the full walk had passed through a fooling point and left it, or had pushed a sample"
        " misclassified clean onto its label (docs/method.md, \"Verification attacks\")."
    )
    return "\n".join([*lines, "", summary, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=tuple(BITS))
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    options = parser.parse_args()
    section = render(options.model or ["resnet20"])
    print(section)
    if options.write:
        write_section(
            REPO / "docs/benchmarks.md", HEADING, section,
            after="## Compile verification: cost and agreement (bench/verify_cost.py)",
        )


if __name__ == "__main__":
    main()
