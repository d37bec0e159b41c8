"""What verification costs and whether its numbers are right, on ResNet-20 (docs/benchmarks.md).

- time: the default compile (Eqn 3 QUANOS, ANS on 1000 calibration images) as a fresh
  `python -m quanos_onnx.cli compile` process, with the default verification and with
  `--no-eval`, run in turn; the added time is the difference;
- exit codes: the default compile breaks the accuracy guard (exit 3, one error line) and a
  `--bits 8` compile keeps it (exit 0);
- accuracy: the compiled model's clean accuracy in report.json against a plain
  onnxruntime.InferenceSession on the same evaluation images, for the held-out split of the
  default compile (its indices recomputed here from the documented rule) and for a compile
  with --eval-data on the exact-pixel first 932 test images.

    PYTHONPATH=. python bench/verify_cost.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET20 = SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx"
JPEG = SHARED / "data/cifar10/cifar10_test_jpeg_q75.npz"
EXACT = SHARED / "data/cifar10/cifar10_test_first932.npz"
HEADING = "## Compile verification: cost and agreement (bench/verify_cost.py)"


def compile_run(output: Path, *extra: str, threads: int) -> tuple[float, int, str]:
    """(wall seconds, exit code, stderr) of one compile in a fresh process."""
    command = [
        sys.executable, "-m", "quanos_onnx.cli", "compile", str(RESNET20), "--data", str(JPEG),
        "--data-range", "932:", "-o", str(output), *extra,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=1800)
    return time.perf_counter() - started, done.returncode, done.stderr


def ort_accuracy(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), 256):
        (logits,) = session.run(None, {name: x[start : start + 256]})
        correct += int((logits.argmax(axis=1) == y[start : start + 256]).sum())
    return correct / len(x)


def images(x: np.ndarray) -> np.ndarray:
    return (x.transpose(0, 3, 1, 2) / np.float32(255)).astype(np.float32)


def held_out_indices(count: int, seed: int = 0, fraction: float = 0.2, minimum: int = 100) -> np.ndarray:
    """docs/cli.md's rule, written out again: a seeded permutation's first part, in order."""
    held = max(math.ceil(fraction * count), min(minimum, count // 2))
    return np.sort(np.random.default_rng(seed).permutation(count)[:held])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the compile processes")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    arguments = parser.parse_args()
    where = machine()
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        timings = {}
        for label, extra in (("default, --no-eval", ["--no-eval"]), ("default (verification on)", [])):
            seconds, code, stderr = compile_run(out / ("noeval" if extra else "eval"), *extra, threads=arguments.threads)
            timings[label] = seconds
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            rows.append((label, seconds, code, errors[0] if errors else ""))
            print(rows[-1], flush=True)
        for folder, label, extra in (
            ("bits8", "--bits 8 (verification on)", ["--bits", "8"]),
            ("exact", f"default, --eval-data {EXACT.name}", ["--eval-data", str(EXACT)]),
        ):
            seconds, code, stderr = compile_run(out / folder, *extra, threads=arguments.threads)
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            rows.append((label, seconds, code, errors[0] if errors else ""))
            print(rows[-1], flush=True)

        jpeg = np.load(JPEG)
        x_all, y_all = jpeg["x"][932:], jpeg["y"][932:].astype(np.int64)
        picked = held_out_indices(len(x_all))
        exact = np.load(EXACT)
        cases = (
            ("eval", "held-out split of --data (1814 JPEG images)", images(x_all[picked]), y_all[picked]),
            ("exact", f"--eval-data {EXACT.name} (932 exact images)", images(exact["x"]), exact["y"].astype(np.int64)),
        )
        for folder, label, x, y in cases:
            report = json.loads((out / folder / "report.json").read_text())
            verification = report["verification"]
            assert verification["data"]["samples"] == len(x), (verification["data"], len(x))
            reported = {m["name"]: m["clean_accuracy"] for m in verification["models"]}
            measured = {"compiled": ort_accuracy(out / folder / "model.quanos.onnx", x, y), "float": ort_accuracy(RESNET20, x, y)}
            for name, value in measured.items():
                checks.append((label, name, reported[name], value))
                print(checks[-1], flush=True)
        bits8 = json.loads((out / "bits8" / "report.json").read_text())["verification"]
        headline_8 = ", ".join(f"{m['name']} {100 * m['clean_accuracy']:.1f}%" for m in bits8["models"])
        default = json.loads((out / "eval" / "report.json").read_text())["verification"]
        headline = ", ".join(f"{m['name']} {100 * m['clean_accuracy']:.1f}%" for m in default["models"])

    without, with_eval = timings["default, --no-eval"], timings["default (verification on)"]
    lines = [
        HEADING,
        "",
        f"- command: `PYTHONPATH=. python bench/verify_cost.py --threads {arguments.threads}`",
        f"- machine: {where}; each compile a fresh process with OMP_NUM_THREADS={arguments.threads}, run in turn",
        "- model and data: ResNet-20 (resnet20_cifar10_akamaster.onnx), `--data cifar10_test_jpeg_q75.npz "
        "--data-range 932:` (9068 images: 7254 calibration part, 1814 held out); defaults otherwise "
        "(Eqn 3 from 16 bits, FGSM 0.05 ANS on 1000 images, 512 calibration images; verification: four models, "
        "clean on all 1814, FGSM and PGD-7 at 0.05 on 64)",
        "",
        "| compile | wall s | exit | error line |",
        "|---|---:|---:|---|",
        *(f"| {label} | {seconds:.1f} | {code} | {error[:160] + ('...' if len(error) > 160 else '')} |" for label, seconds, code, error in rows),
        "",
        f"Verification adds {with_eval - without:.1f} s to the {without:.1f} s compile: "
        f"{(with_eval - without) / without:.2f}x (target: at most 1.0x).",
        "",
        f"Default compile, clean accuracy on the held-out part: {headline}. `--bits 8`: {headline_8}.",
        "",
        "| evaluation images | model | report.json | onnxruntime here | difference, points |",
        "|---|---|---:|---:|---:|",
        *(f"| {label} | {name} | {100 * reported:.2f}% | {100 * measured:.2f}% | {100 * (reported - measured):+.2f} |"
          for label, name, reported, measured in checks),
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if arguments.write:
        write_section(REPO / "docs/benchmarks.md", HEADING, section)


if __name__ == "__main__":
    main()
