"""Real-data figure for docs/finetune.md (not a test): `quanos evaluate` on ResNet-20 for
CIFAR-10 as float, uniform 8-bit, uniform k-bit and QUANOS models, on the 932 exact test
images, FGSM and PGD-7 (steps of 2/255, the paper's) at eps 2/255 and 8/255 (two of the
paper's Table IV strengths; 16 attack passes per image and model, where --paper takes 27).

QUANOS is budgeted to --target-avg-bits 5 (ANS on 1000 JPEG test images with index >= 932,
calibration on the first 512 of them) and compared with uniform 5-bit at the same average
(the paper's iso-compression baseline) and uniform 8-bit; QUANOS and uniform 5-bit are
also fine-tuned (3 epochs on the 9068 JPEG images with index >= 932, a tenth held out for
validation). Prints the commands and a Markdown table; steps whose outputs are in
bench/cache are not run again. 8.5 minutes on 16 cores (QUANOS_BENCH_THREADS=8); on one
thread expect an hour or more:
    QUANOS_BENCH_THREADS=8 PYTHONPATH=. python bench/evaluate_cifar10.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_mnist import REPO, SHARED, evaluation_table, history_table, quanos  # noqa: E402

CACHE = REPO / "bench" / "cache" / "evaluate_cifar10"
MODEL = SHARED / "models" / "cifar10" / "resnet20_cifar10_akamaster.onnx"
CALIBRATION = SHARED / "data" / "cifar10" / "cifar10_test_jpeg_q75.npz"
TEST = SHARED / "data" / "cifar10" / "cifar10_test_first932.npz"
BUDGET_BITS = 5


def compile_model(name: str, *options: object) -> Path:
    output = CACHE / name
    if not (output / "model.quanos.onnx").exists():
        quanos("compile", MODEL, "--data", CALIBRATION, "--data-range", "932:", "-o", output, *options)
    return output / "model.quanos.onnx"


def finetune(compiled: Path, name: str) -> dict:
    """Fine-tune from the float model at the compiled model's plan (see docs/finetune.md)."""
    output, record = CACHE / f"{name}.onnx", CACHE / f"{name}.json"
    if not record.exists():
        text = quanos(
            "finetune", MODEL, "--plan", compiled.with_name("plan.json"), "--data", CALIBRATION, "--data-range", "932:",
            "--val-split", "0.1", "--epochs", 3, "-o", output, "--json",
        )
        record.write_text(text)
    return json.loads(record.read_text())


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    quanos_model = compile_model("quanos", "--samples", 1000, "--target-avg-bits", BUDGET_BITS)
    achieved = json.loads((CACHE / "quanos" / "plan.json").read_text())
    uniform8 = compile_model("uniform8", "--bits", 8)
    uniform_k = compile_model(f"uniform{BUDGET_BITS}", "--bits", BUDGET_BITS)
    tuned_k = finetune(uniform_k, f"uniform{BUDGET_BITS}_finetuned")
    tuned_quanos = finetune(quanos_model, "quanos_finetuned")
    labels = {
        str(MODEL): "float",
        str(uniform8): "uniform 8-bit",
        str(uniform_k): f"uniform {BUDGET_BITS}-bit",
        str(tuned_k["output"]): f"uniform {BUDGET_BITS}-bit, fine-tuned",
        str(quanos_model): f"QUANOS (target {BUDGET_BITS} bits)",
        str(tuned_quanos["output"]): f"QUANOS (target {BUDGET_BITS} bits), fine-tuned",
    }
    record = CACHE / "evaluation.json"
    if not record.exists():
        arguments = ("--data", TEST, "--attack", "fgsm,pgd", "--eps", "2/255,8/255", "--pgd-steps", 7, "--pgd-alpha", "2/255")
        record.write_text(quanos("evaluate", *labels, *arguments, "--json", "-o", CACHE / "evaluation"))
    evaluation = json.loads(record.read_text())
    print()
    print(evaluation_table(evaluation, labels))
    for title, document in (("uniform 5-bit", tuned_k), ("QUANOS", tuned_quanos)):
        print()
        print(history_table(f"{title}, fine-tuned", document))
    print()
    bits = {entry["name"]: entry["weight_bits"] for entry in achieved["layers"]}
    print("QUANOS bits per layer:", ", ".join(f"{name} {value}" for name, value in bits.items()))
    for entry in evaluation["models"]:
        print(f"{labels[entry['path']]}: average weight bits {entry['average_weight_bits']}")


if __name__ == "__main__":
    main()
