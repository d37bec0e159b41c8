"""Real-data figures for docs/finetune.md (not a test): fine-tuning mnist-8 after post-hoc
low-bit quantization, plain and adversarial, measured with `quanos evaluate`.

Runs the CLI as a user would, on ../shared: mnist_5k.csv.gz to train (written once as a
seeded shuffle to bench/cache, since the file is sorted by class and quanos-compile
calibrates on the first samples of --data), t10k to test. Prints the commands and the
Markdown tables. Steps whose outputs are in bench/cache are not run again. One thread: on
a busy two-core machine two OpenMP threads spend most of their time waiting for each other
on a model this small. About 8 minutes on a shared core:
    PYTHONPATH=. python bench/finetune_mnist.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from quanos_onnx.commands.evaluate import eps_label

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CACHE = REPO / "bench" / "cache" / "finetune_mnist"
MODEL = SHARED / "models" / "mnist" / "mnist-8.onnx"
TRAIN_CSV = SHARED / "data" / "mnist" / "mnist_5k.csv.gz"
TEST = SHARED / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
THREADS = os.environ.get("QUANOS_BENCH_THREADS", "1")
"""Threads per quanos process; set QUANOS_BENCH_THREADS on a machine with idle cores."""


def quanos(*arguments: object) -> str:
    command = ["quanos", *map(str, arguments)]
    print("$ " + " ".join(_shown(part) for part in command), flush=True)
    started = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "OMP_NUM_THREADS": THREADS, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "quanos_onnx.cli", *command[1:]], env=environment, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {done.stderr.strip()}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return done.stdout


def _shown(part: object) -> str:
    """Paths as a user in the repository would type them."""
    return str(part).replace(str(REPO) + "/", "").replace(str(SHARED), "../shared")


def shuffled_training_data() -> Path:
    target = CACHE / "mnist_5k_shuffled.npz"
    if not target.exists():
        rows = np.loadtxt(TRAIN_CSV, delimiter=",", dtype=np.uint8)
        order = np.random.default_rng(0).permutation(len(rows))
        np.savez_compressed(target, x=rows[order, :784].reshape(-1, 28, 28), y=rows[order, 784].astype(np.int64))
    return target


def finetune(source: Path, name: str, train: Path, *extra: object) -> dict:
    output, record = CACHE / f"{name}.onnx", CACHE / f"{name}.json"
    if not record.exists():
        text = quanos("finetune", source, "--data", train, "--val-split", "0.1", "--epochs", 3, "-o", output, "--json", *extra)
        record.write_text(text)
    return json.loads(record.read_text())


def compile_model(name: str, train: Path, *options: object) -> Path:
    output = CACHE / name
    if not (output / "model.quanos.onnx").exists():
        quanos("compile", MODEL, "--data", train, "-o", output, *options)
    return output / "model.quanos.onnx"


def history_table(title: str, document: dict) -> str:
    lines = [f"{title} (kept epoch {document['best_epoch']}, {document['selected_by']}; round trip: "
             f"{document['round_trip']['prediction_agreement']:.2%} same predictions, max |diff| "
             f"{document['round_trip']['max_abs_diff']:.2g})", "",
             "| epoch | train loss | train acc | train adv acc | val acc | val adv acc | s |", "|---|---|---|---|---|---|---|"]
    for record in document["history"]:
        cells = [record["epoch"], record["train_loss"], record["train_accuracy"], record["train_adversarial_accuracy"],
                 record["val_accuracy"], record["val_adversarial_accuracy"], record["seconds"]]
        lines.append("| " + " | ".join("-" if c is None else f"{c:.4f}" if isinstance(c, float) and c < 10 else f"{c:.0f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def evaluation_table(document: dict, labels: dict[str, str]) -> str:
    attacks = document["models"][0]["evaluation"]["attacks"]
    headers = ["model", "clean"] + [
        f"{a['method'].upper()}{'-' + str(a['steps']) if a['method'] == 'pgd' else ''} {eps_label(a['eps'])}" for a in attacks
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for entry in document["models"]:
        evaluation = entry["evaluation"]
        cells = [labels[entry["path"]], f"{100 * evaluation['clean_accuracy']:.2f}"]
        cells += [f"{100 * a['accuracy']:.2f}" for a in evaluation["attacks"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    train = shuffled_training_data()
    compiled3 = compile_model("uniform3", train, "--bits", 3, "--quantize-output")
    compiled2 = compile_model("uniform2", train, "--bits", 2)
    plan3, plan2 = compiled3.with_name("plan.json"), compiled2.with_name("plan.json")
    plain3 = finetune(MODEL, "uniform3_finetuned", train, "--plan", plan3)
    adversarial3 = finetune(
        MODEL, "uniform3_pgd", train, "--plan", plan3, "--adv-train", "pgd", "--adv-eps", "0.1", "--adv-steps", 7
    )
    plain2 = finetune(MODEL, "uniform2_finetuned", train, "--plan", plan2)
    from_compiled2 = finetune(compiled2, "uniform2_from_compiled", train)
    labels = {
        str(MODEL): "float (mnist-8)",
        str(compiled3): "uniform 3-bit, post hoc",
        plain3["output"]: "uniform 3-bit, fine-tuned",
        adversarial3["output"]: "uniform 3-bit, PGD fine-tuned",
        str(compiled2): "uniform 2-bit (output float), post hoc",
        plain2["output"]: "uniform 2-bit (output float), fine-tuned",
        from_compiled2["output"]: "uniform 2-bit (output float), fine-tuned from the compiled model",
    }
    record = CACHE / "evaluation.json"
    if not record.exists():
        arguments = ("--data", TEST, "--attack", "fgsm,pgd", "--eps", "0.1,0.2", "--pgd-steps", 7, "--json")
        record.write_text(quanos("evaluate", *labels, *arguments))
    evaluation = json.loads(record.read_text())
    print()
    print(evaluation_table(evaluation, labels))
    histories = (
        ("3-bit, plain", plain3),
        ("3-bit, PGD eps 0.1", adversarial3),
        ("2-bit, plain", plain2),
        ("2-bit, plain, from the compiled model", from_compiled2),
    )
    for title, document in histories:
        print()
        print(history_table(title, document))


if __name__ == "__main__":
    main()
