"""Does the twin's float-bound Clip fix (hardtanh -> torch.clamp, commit "twin: float-bound
Clip as a clamp ...") change training through `quanos_onnx.finetune`, or only attacks?

Trains bench/algorithm1.py's CNN from its seed-0 random init at uniform 14 bits (its
"uniform iso" arm: every activation grid is a 14-bit grid in an int16 container, behind a
float Clip to the 14-bit range; at 16 bits there is no such Clip) for one epoch twice, with
the same seed: once with the twin's Clip as it is now, once with the old
hardtanh put back in the twin's op registry for this process only; then compares the
trained weights and the input gradients of the trained model. Training only needs weight
gradients, and a Clip input on its lower bound is an exact 0 (the input's black pixels,
ReLU zeros) where the layers below pass no gradient to any weight either; an input on the
upper bound (a calibration image's maximum, right after the per-epoch re-calibration) does
pass one with the clamp only. So the weights mostly come out bit-identical while the input
gradient differs; with SEED ARM, one arm of bench/algorithm1.py's run is retrained with
hardtanh in full (7 epochs) and compared with the cached one, where the upper bound did
make a difference (seed 1's 14-bit arms).

    PYTHONPATH=. python bench/clip_training_check.py
    PYTHONPATH=. python bench/clip_training_check.py 1 uniform   # one arm of bench/algorithm1.py's run
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from algorithm1 import export_random_init, load_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INIT = REPO / "bench/cache/clip-check/init.onnx"
BITS = 14


def use_clip(old: bool) -> None:
    """Register the twin's Clip (old: the hardtanh it used before the fix) for this process."""
    import torch

    from quanos_onnx.twin.ops import elementwise
    from quanos_onnx.twin.registry import register

    def hardtanh_clip(attrs: Any, inputs: Any) -> list[torch.Tensor]:
        low = inputs[1] if len(inputs) > 1 else None
        high = inputs[2] if len(inputs) > 2 else None
        if elementwise._float_scalar(low) and elementwise._float_scalar(high):
            return [torch.nn.functional.hardtanh(inputs[0], float(low), float(high))]
        return elementwise.clip(attrs, inputs)

    register("Clip", since=11)(hardtanh_clip if old else elementwise.clip)


def algorithm1_arm(seed: int, arm: str) -> None:
    """Retrain one arm of bench/algorithm1.py's default run (its cached init, ANS and plans)
    with the old hardtanh Clip and compare with the arm that run trained with the clamp."""
    import argparse
    import shutil

    import onnx
    from onnx import numpy_helper

    from algorithm1 import CACHE, Seed, config_name

    options = argparse.Namespace(
        train_samples=10000, val_samples=5000, epochs1=1, epochs2=6, lr=1e-3, batch_size=64,
        calibration_samples=512, ans_samples=1000, budget_bits=4, grid_samples=1000, audit_samples=250, apgd_steps=25,
    )
    source = CACHE / config_name(options) / f"seed{seed}"
    folder = REPO / f"bench/cache/clip-check/algorithm1-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("init.onnx", "ans1000.json", "plans1000.json", "plan_budget4_1000.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    use_clip(True)
    old = Seed(seed, load_data(options.train_samples, options.val_samples), options, folder)
    new = Seed(seed, old.data, options, source)

    def weights(path: Path) -> dict[str, np.ndarray]:
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}

    old.final(arm)
    trained_old, trained_new = weights(folder / f"{arm}.final.float.onnx"), weights(source / f"{arm}.final.float.onnx")
    identical = all(np.array_equal(trained_old[n], trained_new[n]) for n in trained_new)
    print(f"algorithm1 seed {seed} {arm}: weights bit-identical with hardtanh and clamp: {identical}; "
          f"kept epoch {old.history(f'{arm}.final')['best_epoch']} (hardtanh) vs {new.history(f'{arm}.final')['best_epoch']} (clamp); "
          f"clean {100 * old.clean(arm)['accuracy']:.2f}% (hardtanh) vs {100 * new.clean(arm)['accuracy']:.2f}% (clamp)")


def train_once(old_clip: bool, samples: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(trained weights, input gradient of the trained twin on 100 test images)."""
    import torch

    from quanos_onnx.data import dataset_from_arrays
    from quanos_onnx.finetune import FinetuneSettings, finetune
    from quanos_onnx.layers import list_layers
    from quanos_onnx.model import input_spec, load_model
    from quanos_onnx.plan import Plan

    use_clip(old_clip)
    torch.set_num_threads(1)
    data = load_data(samples, 1000)
    model = load_model(INIT)
    layers = list_layers(model)
    train = dataset_from_arrays(data.train_x, data.train_y, input_spec(model))
    settings = FinetuneSettings(epochs=1, learning_rate=1e-3, batch_size=64, seed=0, calibration_samples=512)
    result = finetune(model, Plan.uniform(layers, BITS), train, settings)
    weights = {name: p.detach().numpy().copy() for name, p in result.twin.parameters_by_name().items()}
    x = torch.from_numpy(data.test_x[:100]).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(result.twin(x).reshape(100, -1), torch.from_numpy(data.test_y[:100]))
    loss.backward()
    return weights, x.grad.numpy()


def main() -> None:
    if len(sys.argv) == 3:  # SEED ARM: one arm of bench/algorithm1.py's run
        algorithm1_arm(int(sys.argv[1]), sys.argv[2])
        return
    if not INIT.exists():
        export_random_init(0, INIT)
    samples = 10000
    new_weights, new_gradient = train_once(False, samples)
    old_weights, old_gradient = train_once(True, samples)
    largest = max(float(np.abs(new_weights[n] - old_weights[n]).max()) for n in new_weights)
    identical = all(np.array_equal(new_weights[n], old_weights[n]) for n in new_weights)
    print(f"uniform {BITS} bits, 1 epoch, {samples} images, seed 0): weights bit-identical: {identical}, "
          f"largest |difference| {largest:.3g}")
    print(f"input gradient of the trained twin, 100 test images: zero entries {100 * np.mean(new_gradient == 0):.1f}% "
          f"with clamp, {100 * np.mean(old_gradient == 0):.1f}% with hardtanh")


if __name__ == "__main__":
    main()
