"""The tool's own cost: quanos-compile time and peak RSS, compiled-model latency of a real
QUANOS plan, and graph-pass time against node count. Writes three '## ' sections of
docs/benchmarks.md (the existing sections stay).

- compile: `python -m quanos_onnx.cli compile` as a child process (wall time and the
  child's peak RSS from wait4) on mnist-8, ResNet-20 and a ResNet-56-sized model built
  here (torch, random weights: only its cost is measured, not its accuracy);
- latency: the QUANOS ResNet-20 of bench/study.py against float and quantize_static int8
  (U8S8), with bench/qdq_latency.py's interleaved median timing;
- graph passes: normalize + layer table + joins + align + quantization points + QDQ
  insertion (no calibration: fixed ranges) on synthetic residual Conv graphs.

    PYTHONPATH=. python bench/tool_cost.py [--parts compile,latency,passes]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study_data import CACHE, CIFAR_TUNE, MNIST8, RESNET20, REPO, SHARED  # noqa: E402

BENCHMARKS = REPO / "docs/benchmarks.md"


def command_line() -> str:
    return " ".join(["PYTHONPATH=. python bench/tool_cost.py", *sys.argv[1:]])


# -- ResNet-56-sized model --------------------------------------------------------------
def resnet56(target: Path) -> Path:
    """CIFAR ResNet-56 (3 stages x 9 basic blocks, 16/32/64 channels), random weights."""
    if target.exists():
        return target
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, inputs: int, outputs: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
                nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), nn.BatchNorm2d(outputs),
            )
            self.shortcut = nn.Sequential() if stride == 1 and inputs == outputs else nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.shortcut(x))

    torch.manual_seed(0)
    stages, channels = [], 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for index in range(9):
            stages.append(Block(channels, width, stride if index == 0 else 1))
            channels = width
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), *stages,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.zeros(1, 3, 32, 32),), str(target), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13, dynamo=False,
    )
    return target


def timed_child(arguments: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) and exit status of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        print(child.stderr.read().decode()[-2000:] if child.stderr else "", file=sys.stderr)
    return time.perf_counter() - started, usage.ru_maxrss / 1024, child.returncode


def compile_section(samples: int) -> str:
    with tempfile.TemporaryDirectory() as directory:
        cases = [
            ("mnist-8", MNIST8, [str(SHARED / "data/mnist/mnist_5k.csv.gz")]),
            ("ResNet-20", RESNET20, [str(CIFAR_TUNE), "--data-range", "932:"]),
            ("ResNet-56 (random weights)", resnet56(CACHE / "resnet56_random.onnx"), [str(CIFAR_TUNE), "--data-range", "932:"]),
        ]
        rows = []
        for label, model, data in cases:
            model_proto = onnx.load(str(model))
            nodes = len(model_proto.graph.node)
            for mode, extra in (("QUANOS (ANS + plan + QDQ)", ["--samples", str(samples)]), ("--bits 8 (no ANS)", ["--bits", "8"])):
                output = Path(directory) / f"{label.split()[0]}-{mode.split()[0]}"
                seconds, rss, status = timed_child([
                    sys.executable, "-m", "quanos_onnx.cli", "compile", str(model), "--data", data[0], *data[1:],
                    "-o", str(output), "-q", *extra,
                ])
                rows.append(f"| {label} | {nodes} | {mode} | {seconds:.1f} | {rss:.0f} | {'ok' if status == 0 else f'exit {status}'} |")
                print(rows[-1], flush=True)
    return f"""## quanos-compile end to end (time and peak RSS)

- command: `{command_line()}`
- machine: {machine()}, load average {os.getloadavg()[0]:.1f} at the end
- each run is a fresh `python -m quanos_onnx.cli compile` process (start-up and imports
  included); peak RSS is the child's ru_maxrss. QUANOS mode: FGSM eps 0.05 ANS on
  {samples} images, 512 calibration images (the defaults otherwise). Data: mnist_5k.csv.gz for
  mnist-8; cifar10_test_jpeg_q75.npz from index 932 for the CIFAR models.

| model | ONNX nodes | mode | wall s | peak RSS MiB | status |
|---|---:|---|---:|---:|---|
{chr(10).join(rows)}
"""


# -- latency of the real QUANOS plan -------------------------------------------------------
def latency_section(rounds: int, threads: int) -> str:
    from qdq_latency import median_latencies, ort_static, session

    quanos_path = CACHE / "resnet20/models/quanos.onnx"
    uiso_path = CACHE / "resnet20/models/uiso.onnx"
    if not quanos_path.exists():
        raise SystemExit(f"{quanos_path} is missing: run bench/study.py --setup resnet20 first")
    archive = np.load(CIFAR_TUNE)
    calibration = np.ascontiguousarray(archive["x"][932:1188].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    with tempfile.TemporaryDirectory() as directory:
        from quanos_onnx.model import load_model, save_model

        float_path = save_model(load_model(RESNET20), Path(directory) / "float.onnx")
        models = {
            "float": onnx.load(str(float_path)),
            "QUANOS plan": onnx.load(str(quanos_path)),
            **({"uniform iso-compression": onnx.load(str(uiso_path))} if uiso_path.exists() else {}),
            "quantize_static U8S8": ort_static(float_path, calibration, "QUInt8", Path(directory)),
        }
    latencies = {}
    for batch in (1, 32):
        x = calibration[:batch]
        runs = {}
        for name, model in models.items():
            run = session(model, threads)
            feed = {run.get_inputs()[0].name: x}
            runs[name] = (lambda run=run, feed=feed: run.run(None, feed))
        latencies[batch] = median_latencies(runs, rounds, 20 if batch == 1 else 2)
    lines = []
    for batch in (1, 32):
        times = latencies[batch]
        for name in models:
            lines.append(
                f"| {batch} | {name} | {times[name]['cpu'] * 1e3:.3f} | {times[name]['cpu'] / times['float']['cpu']:.2f}x | "
                f"{times[name]['cpu'] / times['quantize_static U8S8']['cpu']:.2f}x | {times[name]['wall'] * 1e3:.3f} |"
            )
    return f"""## Compiled-model latency: the real QUANOS plan (ResNet-20)

- command: `{command_line()}`
- machine: {machine()}, load average {os.getloadavg()[0]:.1f} at the end; {threads} intra-op thread(s)
- models: the QUANOS and iso-compression uniform ResNet-20 of bench/study.py (bench/cache/study/resnet20/models),
  float, and quantize_static U8S8 (QDQ, per-channel int8 weights, uint8 activations) calibrated on 256 images;
  timing as in bench/qdq_latency.py (interleaved, median of {rounds} rounds; CPU = process CPU time per call)

| batch | model | CPU ms | vs float | vs quantize_static | wall ms |
|---:|---|---:|---:|---:|---:|
{chr(10).join(lines)}
"""


# -- graph passes against node count ----------------------------------------------------------
def synthetic_graph(blocks: int) -> onnx.ModelProto:
    """A residual chain: per block Conv-Relu-Conv-Add-Relu (5 nodes), 8 channels, 8x8."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    current = "input"
    for index in range(blocks):
        for position in (0, 1):
            weight = f"w{index}_{position}"
            initializers.append(numpy_helper.from_array(rng.normal(0, 0.1, (8, 8, 3, 3)).astype(np.float32), weight))
        nodes += [
            helper.make_node("Conv", [current, f"w{index}_0"], [f"c{index}_0"], pads=[1, 1, 1, 1], name=f"conv{index}_0"),
            helper.make_node("Relu", [f"c{index}_0"], [f"r{index}_0"], name=f"relu{index}_0"),
            helper.make_node("Conv", [f"r{index}_0", f"w{index}_1"], [f"c{index}_1"], pads=[1, 1, 1, 1], name=f"conv{index}_1"),
            helper.make_node("Add", [f"c{index}_1", current], [f"a{index}"], name=f"add{index}"),
            helper.make_node("Relu", [f"a{index}"], [f"x{index}"], name=f"relu{index}_1"),
        ]
        current = f"x{index}"
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8, 8, 8])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", 8, 8, 8])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def pass_times(blocks: int) -> dict[str, float]:
    from quanos_onnx.layers import find_joins, list_layers
    from quanos_onnx.model import normalize
    from quanos_onnx.passes.align import align_plan
    from quanos_onnx.passes.calibrate import Range
    from quanos_onnx.passes.points import plan_points
    from quanos_onnx.passes.qdq import activation_quantizer, insert_qdq
    from quanos_onnx.plan import Plan

    raw = synthetic_graph(blocks)
    times: dict[str, float] = {"nodes": len(raw.graph.node)}

    def stage(name: str, function):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        value = function()
        times[name] = time.perf_counter() - started
        return value

    proto = stage("normalize", lambda: normalize(raw, "synthetic"))
    layers = stage("layers", lambda: list_layers(proto))
    joins = stage("joins", lambda: find_joins(proto, layers))
    plan = Plan.uniform(layers, 8, keep_output_float=False)
    aligned = stage("align", lambda: align_plan(plan, layers, joins))
    points = stage("points", lambda: plan_points(proto, layers, aligned))
    quantizers = {group.name: activation_quantizer(group.bits, Range(-4.0, 4.0)) for group in points.groups}
    stage("qdq", lambda: insert_qdq(proto, layers, aligned, points, quantizers))
    times["total"] = sum(value for key, value in times.items() if key not in ("nodes", "total"))
    return times


def passes_section(block_counts: list[int]) -> str:
    stages = ("normalize", "layers", "joins", "align", "points", "qdq", "total")
    rows = []
    results = []
    for blocks in block_counts:
        times = pass_times(blocks)
        results.append(times)
        rows.append(f"| {int(times['nodes'])} | " + " | ".join(f"{times[s]:.2f}" for s in stages) + " |")
        print(rows[-1], flush=True)
    first, last = results[0], results[-1]
    growth = last["nodes"] / first["nodes"]
    scaling = " ".join(
        f"{s} {last[s] / max(first[s], 1e-9):.0f}x;" for s in stages
    )
    return f"""## Graph-pass time against node count (synthetic residual graphs)

- command: `{command_line()}`
- machine: {machine()}, load average {os.getloadavg()[0]:.1f} at the end; one process
- graph: a chain of residual blocks Conv-Relu-Conv-Add-Relu (8 channels, 8x8, batch dynamic), every Conv
  quantized at 8 bits; stages as quantize.quantize runs them, with fixed activation ranges instead of
  calibration (so onnxruntime never runs). Seconds:

| nodes | normalize | layers | joins | align | points | qdq | total |
|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

From {int(first['nodes'])} to {int(last['nodes'])} nodes ({growth:.0f}x) each stage grew: {scaling}
(linear would be about {growth:.0f}x, quadratic about {growth ** 2:.0f}x).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="compile,latency,passes")
    parser.add_argument("--samples", type=int, default=500, help="ANS images in the compile runs")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", default="200,400,2000", help="residual blocks per synthetic graph (5 nodes each)")
    options = parser.parse_args()
    parts = options.parts.split(",")
    if "passes" in parts:
        section = passes_section([int(b) for b in options.blocks.split(",")])
        write_section(BENCHMARKS, "## Graph-pass time against node count", section)
        print(section)
    if "compile" in parts:
        section = compile_section(options.samples)
        write_section(BENCHMARKS, "## quanos-compile end to end", section)
        print(section)
    if "latency" in parts:
        section = latency_section(options.rounds, options.threads)
        write_section(BENCHMARKS, "## Compiled-model latency: the real QUANOS plan", section)
        print(section)


if __name__ == "__main__":
    main()
