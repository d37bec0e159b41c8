"""The twin's parity figures over the whole export corpus, for the record.

The tests check a representative slice (tests/test_twin_exports.py); this script covers
every model x exporter x opset 17..23 and records, per export: the opset the exporter
actually wrote, twin-vs-onnxruntime max relative output difference, and the worst per-sample
cosine between the twin's and the torch module's input gradients. It adds the fake-quant
parity of each architecture compiled to mixed bits, and mnist-8 / resnet20 at batch 64
when ../shared is present.

Usage: python bench/twin_corpus.py [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import gzip
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import twin_zoo  # noqa: E402
from report_section import machine, write_section  # noqa: E402

from quanos_onnx.model import load_model  # noqa: E402
from quanos_onnx.twin import build_twin, check_parity  # noqa: E402
from quanos_onnx.twin.parity import run_onnxruntime  # noqa: E402

SECTION = "## Torch twin parity corpus (bench/twin_corpus.py)"
MIXED_BITS = (8, 4, 6, 3, 12, 5, 2, 7)
SAMPLES = 16


def worst_cosine(module: torch.nn.Module, twin: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    gradients = []
    for network in (module, twin):
        inputs = x.clone().requires_grad_()
        F.cross_entropy(network(inputs), labels, reduction="sum").backward()
        gradients.append(inputs.grad.flatten(1))
    return F.cosine_similarity(*gradients, dim=1).min().item()


def export_rows() -> list[str]:
    rows = []
    for name in twin_zoo.MODELS:
        module = twin_zoo.make_model(name)
        for dynamo in (False, True):
            for opset in range(17, 24):
                model = twin_zoo.export(module, dynamo=dynamo, opset=opset)
                written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
                generator = torch.Generator().manual_seed(opset)
                x = torch.randn(SAMPLES, *twin_zoo.IMAGE_SHAPE, generator=generator)
                labels = torch.randint(0, 10, (SAMPLES,), generator=generator)
                twin = build_twin(model)
                report = check_parity(twin, model, x.numpy())
                cosine = worst_cosine(module, twin, x, labels)
                exporter = "dynamo" if dynamo else "legacy"
                rows.append(f"| {name} | {exporter} | {opset} | {written} | {report.max_rel_diff:.2e} | {cosine:.6f} |")
                print(rows[-1], flush=True)
    return rows


def fake_quant_rows() -> list[str]:
    rows = []
    calibration = np.random.default_rng(1).standard_normal((32, *twin_zoo.IMAGE_SHAPE)).astype(np.float32)
    batch = np.random.default_rng(2).standard_normal((256, *twin_zoo.IMAGE_SHAPE)).astype(np.float32)
    for name in twin_zoo.MODELS:
        float_model = twin_zoo.export(twin_zoo.make_model(name), dynamo=False, opset=21)
        model = twin_zoo.quantize_model(float_model, calibration, MIXED_BITS)
        twin = build_twin(model)
        report = check_parity(twin, model, batch)
        x = torch.from_numpy(batch[:32]).requires_grad_()
        F.cross_entropy(twin(x), torch.arange(32) % 10).backward()
        finite = bool(torch.isfinite(x.grad).all())
        nonzero = torch.count_nonzero(x.grad).item() / x.numel()
        rows.append(
            f"| {name} | {report.argmax_agreement:.4f} | {report.max_abs_diff:.2e} | {finite} | {nonzero:.4f} |"
        )
        print(rows[-1], flush=True)
    return rows


def shared_rows(shared: Path) -> list[str]:
    with gzip.open(shared / "data/mnist/t10k-images-idx3-ubyte.gz", "rb") as stream:
        mnist = (np.frombuffer(stream.read(), np.uint8, offset=16)[: 64 * 784].reshape(64, 1, 28, 28) / 255.0).astype(np.float32)
    with np.load(shared / "data/cifar10/cifar10_test_first932.npz") as archive:
        cifar = (archive["x"][:64].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    rows = []
    for path, images in (("models/mnist/mnist-8.onnx", mnist), ("models/cifar10/resnet20_cifar10_akamaster.onnx", cifar)):
        for form, model in (("as shipped", onnx.load(str(shared / path))), ("load_model (opset 21)", load_model(shared / path))):
            twin = build_twin(model)
            report = check_parity(twin, model, images)
            rows.append(
                f"| {Path(path).name} | {form} | {report.max_abs_diff:.2e} | {report.max_rel_diff:.2e} | "
                f"{report.argmax_agreement:.4f} | {'per sample' if twin.per_sample else 'batched'} |"
            )
            print(rows[-1], flush=True)
    return rows


def compiled_rows(shared: Path) -> list[str]:
    """ResNet-20 compiled by the project's own QDQ pass (quantize.quantize) at several plans."""
    from quanos_onnx.layers import list_layers
    from quanos_onnx.quantize import quantize
    from quanos_onnx.plan import LayerPlan, Plan

    model = load_model(shared / "models/cifar10/resnet20_cifar10_akamaster.onnx")
    layers = list_layers(model)
    with np.load(shared / "data/cifar10/cifar10_test_jpeg_q75.npz") as archive:
        calibration = (archive["x"][1000:1256].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    with np.load(shared / "data/cifar10/cifar10_test_first932.npz") as archive:
        test = (archive["x"].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    cycle = (8, 4, 6, 3, 12, 5, 16, 2, 7, 10)
    plans = {"uniform 8": lambda i: 8, "uniform 4": lambda i: 4, "uniform 16": lambda i: 16, f"mixed {list(cycle)}": lambda i: cycle[i % len(cycle)]}
    rows = []
    for label, bits in plans.items():
        entries = tuple(
            LayerPlan(layer.name, None, None, keep_float=True) if layer.is_output else LayerPlan(layer.name, bits(i), bits(i))
            for i, layer in enumerate(layers)
        )
        compiled = quantize(model, Plan(entries), [calibration[i : i + 64] for i in range(0, 256, 64)]).model
        twin = build_twin(compiled)
        report = check_parity(twin, compiled, test)
        expected = run_onnxruntime(compiled, {compiled.graph.input[0].name: test})[0]
        with torch.no_grad():
            got = twin(torch.from_numpy(test)).numpy()
        scale = np.abs(expected).max()
        identical = float(np.mean(np.abs(got - expected).max(axis=1) <= 1e-5 * scale))
        rows.append(
            f"| {label} | {report.argmax_agreement:.4f} | {identical:.3f} | {report.max_abs_diff:.3g} | {report.max_rel_diff:.2e} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    lines = [
        SECTION,
        "",
        f"Machine: {machine()}; torch {torch.__version__}. Command: `python bench/twin_corpus.py`.",
        f"Random weights and inputs; {SAMPLES} samples per export. 'written' is the opset the exporter produced "
        "(dynamo falls back to 18 where it cannot convert down to 17).",
        "",
        "| model | exporter | asked | written | max rel diff vs ORT | worst input-grad cosine |",
        "|---|---|---|---|---|---|",
        *export_rows(),
        "",
        f"Fake quant: each model (legacy export, opset 21) compiled to mixed bits {list(MIXED_BITS)} in the "
        "DESIGN section 3 form; 256 samples against onnxruntime's optimized session; gradients on 32.",
        "",
        "| model | argmax agreement | max abs diff | input grad finite | input grad non-zero fraction |",
        "|---|---|---|---|---|",
        *fake_quant_rows(),
    ]
    shared = REPO.parent / "shared"
    if (shared / "MANIFEST.md").is_file():
        lines += [
            "",
            "Shared models at batch 64 (first 64 MNIST t10k / CIFAR-10 test images):",
            "",
            "| model | form | max abs diff | max rel diff | argmax agreement | batch handling |",
            "|---|---|---|---|---|---|",
            *shared_rows(shared),
            "",
            "ResNet-20 compiled by the project's QDQ pass (`quantize.quantize`, calibration on 256 JPEG images "
            "with index >= 1000), all 932 exact test images against onnxruntime's optimized session. Where "
            "logits differ, a float conv (one ORT does not fuse, e.g. with a 9..16-bit input) summed in another "
            "order put a value on the other side of a rounding tie of the next QuantizeLinear; at 2..5 bits one "
            "such step is a large share of the range, hence the max differences:",
            "",
            "| plan | argmax agreement | samples with logits equal to 1e-5 | max abs diff | max rel diff |",
            "|---|---|---|---|---|",
            *compiled_rows(shared),
        ]
    write_section(args.output, SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
