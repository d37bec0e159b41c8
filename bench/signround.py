"""SignRound's signed-gradient rounding in place of AdaRound's relaxation inside BRECQ/QDrop
(docs/benchmarks.md, MobileNetV2, "Signed-gradient rounding: tried, not kept").

SignRound (Cheng et al. 2023, Intel's auto-round) learns a bounded offset V in [-0.5, 0.5]
per weight, starts it at 0 (round-to-nearest), rounds floor(W / s) + [frac + V >= 0.5] in
every forward pass with a straight-through gradient, and moves V by a signed step that
decays linearly from travel / steps to 0, so V can travel `--travel` / 2 over the run. Built
for few steps: the loss always sees the hard rounding, so nothing is left undecided at the
end (AdaRound's 100-step runs leave 68-70% of MobileNetV2's rounding variables undecided).
This script swaps ptq/reconstruct.py's relaxation and optimizer for this process only and
runs another bench's main with the remaining arguments (units, QDrop, the per-layer keep
and everything else unchanged):

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/signround.py ptq --model mobilenetv2 --out sign.jsonl \\
        --methods "mse + output clip + brecq 100 it. + bias corr., first/last W8A8, 64 calib." --configs W4A4
    OMP_NUM_THREADS=1 python bench/signround.py reconstruct --iterations 100 --methods brecq \\
        --configs 4/4,3/3 --paper --ranges auto

Rows keep bench/ptq.py's method names: write them to their own --out file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from quanos_onnx.ptq import reconstruct  # noqa: E402

TRAVEL = float(os.environ.get("SIGNROUND_TRAVEL", "1.0"))
"""Sum of the step sizes over the run is TRAVEL / 2 (auto-round's default: lr = 1 / steps,
decayed linearly)."""


class SignedRounding:
    """scale * clip(floor + [frac + V >= 0.5]), V from 0, straight-through gradient."""

    def __init__(self, weight: reconstruct.RoundedWeight) -> None:
        import torch

        scaled = weight.weight.astype(np.float64) / weight.broadcast_scale.astype(np.float64)
        floor = np.floor(scaled)
        self.limit = 2 ** (weight.bits - 1) - 1
        self.floor = torch.from_numpy(floor).float()
        self.fraction = torch.from_numpy(np.clip(scaled - floor, 0.0, 1.0)).float()
        self.scale = torch.from_numpy(np.asarray(weight.broadcast_scale)).float()
        self.logits = torch.zeros_like(self.fraction).requires_grad_()
        """V, under the attribute name ptq/reconstruct.py's optimizer hands to Adam."""

    def soft_weight(self) -> torch.Tensor:
        import torch

        shifted = self.fraction + self.logits
        hard = (shifted >= 0.5).float()
        rounded = self.floor + shifted + (hard - shifted).detach()
        return self.scale * torch.clamp(rounded, -self.limit, self.limit)

    def integers(self) -> np.ndarray:
        rounded = self.floor + ((self.fraction + self.logits.detach()) >= 0.5).float()
        return rounded.clamp(-self.limit, self.limit).numpy().astype(np.int32)


def optimize_signed(
    twin: object,
    roundings: Sequence[SignedRounding],
    weights: Sequence[reconstruct.RoundedWeight],
    data: reconstruct.UnitData,
    iterations: int,
    generator: object,
    advance: Callable[[int], None],
) -> None:
    """Signed gradient descent on V with a linearly decaying step; no regularizer (the
    forward pass is already the hard rounding)."""
    import torch

    count = int(data.target.shape[0])
    batch = min(reconstruct.BATCH_SIZE, count)
    for step in range(iterations):
        index = torch.randperm(count, generator=generator)[:batch]
        feeds = reconstruct._feeds(data, index, generator)
        feeds.update({weight.feed: rounding.soft_weight() for weight, rounding in zip(weights, roundings)})
        outputs, _ = twin.run(feeds)
        loss = reconstruct.reconstruction_error(outputs[0], data.target[index])
        for rounding in roundings:
            rounding.logits.grad = None
        loss.backward()
        step_size = TRAVEL / iterations * (1.0 - step / iterations)
        with torch.no_grad():
            for rounding in roundings:
                rounding.logits -= step_size * torch.sign(rounding.logits.grad)
                rounding.logits.clamp_(-0.5, 0.5)
        advance(1)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("ptq", "reconstruct"):
        sys.exit("usage: signround.py ptq|reconstruct [that bench's arguments]")
    reconstruct.SoftRounding = SignedRounding
    reconstruct._optimize = optimize_signed
    bench = sys.argv.pop(1)
    sys.argv[0] = str(BENCH / f"{bench}.py")
    if bench == "ptq":
        import ptq

        ptq.main()
    else:
        import reconstruct as reconstruct_bench

        reconstruct_bench.main()


if __name__ == "__main__":
    main()
