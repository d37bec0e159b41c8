"""ReLU6 in the twin: one attack gradient (batch 16 at 224x224, channels-last, 1 thread)
with a float-bound Clip as torch.clamp against hardtanh, CPU seconds, best of 3. The
figures are in docs/benchmarks.md ('ImageNet: where the time goes').

    PYTHONPATH=. python bench/imagenet_clip.py MODEL.onnx [MORE.onnx ...]
"""
import sys, time, numpy as np, torch
torch.set_num_threads(1)
from quanos_onnx.commands.options import read_model
from quanos_onnx.harness.attacks import loss_gradient
from quanos_onnx.twin import build_twin
from quanos_onnx.twin.ops import elementwise
for path in sys.argv[1:]:
    twin = build_twin(read_model(path).proto)
    x = torch.from_numpy(np.random.default_rng(0).random((16, 3, 224, 224), np.float32)).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(16, dtype=torch.int64)
    original = elementwise._float_scalar
    times = {"clamp": [], "hardtanh": []}
    loss_gradient(twin, x, y)
    for _ in range(3):
        for name in times:
            elementwise._float_scalar = (lambda bound: False) if name == "clamp" else original
            start = time.process_time(); loss_gradient(twin, x, y); times[name].append(time.process_time() - start)
    elementwise._float_scalar = original
    print(path.split("/")[-1], {k: round(min(v), 2) for k, v in times.items()})
