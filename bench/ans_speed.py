"""ANS wall time and peak memory on ResNet-20 (issue 4), written into docs/benchmarks.md.

Speed: the tool's measure_ans (FGSM on the torch twin, activations from onnxruntime)
against a plain torch implementation of the same computation on the same model (the twin
does the attack and also the clean and adversarial forwards, capturing the block outputs
in the same pass), side by side in one process, same data, same threads.

Memory: peak RSS (ru_maxrss) of measure_ans over 1000 and over 4000 samples, each in a
fresh subprocess. Batches are converted from the uint8 archive one at a time, so the input
data in float32 does not grow with the sample count and the figure is the harness's own.

    PYTHONPATH=. python bench/ans_speed.py            # from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models/cifar10/resnet20_cifar10_akamaster.onnx"
DATA = SHARED / "data/cifar10/cifar10_test_jpeg_q75.npz"
FIRST_CALIBRATION_INDEX = 932
"""Images before this index are the exact test images; calibration uses the rest."""
EPS = 0.05
BATCH = 100
SECTION = "ans_speed"


def batches(samples: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    archive = np.load(DATA)
    images, labels = archive["x"], archive["y"].astype(np.int64)
    stop = FIRST_CALIBRATION_INDEX + samples
    for start in range(FIRST_CALIBRATION_INDEX, stop, BATCH):
        end = min(start + BATCH, stop)
        x = images[start:end].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        yield np.ascontiguousarray(x), labels[start:end]


def tool_ans(proto, layers, twin, samples: int) -> list[float]:
    from quanos_onnx.harness.ans import measure_ans
    from quanos_onnx.harness.attacks import Attack

    result = measure_ans(proto, layers, batches(samples), Attack.fgsm(EPS), twin=twin)
    return [entry.mean for entry in result.layers]


def torch_ans(twin, layers, samples: int) -> list[float]:
    """What one would write in plain torch: the same FGSM and ratios, all on the twin.

    The clean activations are captured in the attack's own forward pass, so torch does one
    forward+backward and one forward per batch, as the tool does (plus its two onnxruntime
    forwards).
    """
    import torch

    tensors = [layer.block_output for layer in layers]
    input_name = twin.input_names[0]
    sums = torch.zeros(len(tensors), dtype=torch.float64)
    count = 0
    for x_numpy, y_numpy in batches(samples):
        x, y = torch.from_numpy(x_numpy), torch.from_numpy(y_numpy)
        x_grad = x.clone().requires_grad_(True)
        (logits,), clean = twin.run({input_name: x_grad}, capture=tensors)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x_grad)
        with torch.no_grad():
            x_adv = (x + EPS * gradient.sign()).clamp(0.0, 1.0)
            _, adversarial = twin.run({input_name: x_adv}, capture=tensors)
            for index, name in enumerate(tensors):
                a = clean[name].detach().reshape(len(x), -1).double()
                a_adv = adversarial[name].reshape(len(x), -1).double()
                sums[index] += (torch.linalg.norm(a_adv - a, dim=1) / torch.linalg.norm(a, dim=1)).sum()
        count += len(x)
    return (sums / count).tolist()


def load():
    from quanos_onnx.harness.attacks import twin_of
    from quanos_onnx.layers import list_layers
    from quanos_onnx.model import load_model

    proto = load_model(MODEL)
    return proto, list_layers(proto), twin_of(proto)


def alternating(functions, repeats: int) -> list[tuple[float, list[float]]]:
    """Median wall time and last result of each function, run in turn so both see the same load."""
    times: list[list[float]] = [[] for _ in functions]
    results: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            results[index] = function()
            times[index].append(time.perf_counter() - start)
    return [(statistics.median(spent), result) for spent, result in zip(times, results)]


def rss_child(samples: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    proto, layers, twin = load()
    tool_ans(proto, layers, twin, samples)
    print(json.dumps({"samples": samples, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_rss(samples: int, threads: int) -> int:
    command = [sys.executable, __file__, "--rss-child", str(samples), "--threads", str(threads)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])["max_rss_kib"]


def machine() -> str:
    import onnxruntime
    import torch

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.machine()}; "
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}, numpy {np.__version__}"
    )


def write_section(text: str, path: Path) -> None:
    start, end = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    current = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        updated = before + block + ("\n" + after if after else "")
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--rss-samples", type=int, nargs=2, default=(1000, 4000))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "docs/benchmarks.md")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.rss_child:
        rss_child(options.rss_child, options.threads)
        return

    import torch

    torch.set_num_threads(options.threads)
    load_before = os.getloadavg()[0]
    proto, layers, twin = load()
    tool_ans(proto, layers, twin, BATCH)  # warm up both paths once
    torch_ans(twin, layers, BATCH)
    (tool_seconds, tool_means), (torch_seconds, torch_means) = alternating(
        [lambda: tool_ans(proto, layers, twin, options.samples), lambda: torch_ans(twin, layers, options.samples)],
        options.repeats,
    )
    largest_difference = max(abs(a - b) for a, b in zip(tool_means, torch_means))
    rss = {samples: peak_rss(samples, options.threads) for samples in options.rss_samples}
    load_after = os.getloadavg()[0]

    small, large = options.rss_samples
    text = f"""## ANS: wall time and peak memory (bench/ans_speed.py)

ResNet-20 ({MODEL.name}), {options.samples} images of {DATA.name} from index
{FIRST_CALIBRATION_INDEX}, FGSM eps {EPS}, batch {BATCH}, all {len(layers)} layers' block outputs.

- Machine: {machine()}
- Command: `PYTHONPATH=. python bench/ans_speed.py --threads {options.threads}` (median of {options.repeats} runs)
- 1-minute load average {load_before:.1f} before and {load_after:.1f} after the run: absolute
  times on a shared machine vary with it; the two implementations run in turn, so they share it.

| implementation | wall time | per sample | ratio |
|---|---:|---:|---:|
| quanos measure_ans (attack on twin, activations in onnxruntime) | {tool_seconds:.2f} s | {1000 * tool_seconds / options.samples:.2f} ms | {tool_seconds / torch_seconds:.2f}x |
| plain torch on the twin (attack and activations in torch) | {torch_seconds:.2f} s | {1000 * torch_seconds / options.samples:.2f} ms | 1.00x |

Both give the same ANS: the largest per-layer difference of the means is {largest_difference:.2e}
(onnxruntime and torch forwards differ in float rounding only).

| samples | peak RSS of a fresh process running measure_ans |
|---:|---:|
| {small} | {rss[small] / 1024:.0f} MiB |
| {large} | {rss[large] / 1024:.0f} MiB |

Peak RSS at {large} samples is {rss[large] / rss[small]:.3f}x that at {small}: ANS keeps only a
running count, mean and sum of squares per layer.
"""
    write_section(text, options.output)
    print(text)


if __name__ == "__main__":
    main()
