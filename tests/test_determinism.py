"""Same inputs and seed, byte-identical outputs (DESIGN section 7).

Each command runs twice through the CLI into two different directories. The model, the
plan and the JSON documents must match byte for byte; what legitimately differs (start
time, wall time, the command line with its output path) lives in run.json only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_models import resnet_style

from quanos_onnx.cli import main

COMPARED = {
    "bits": ("model.quanos.onnx", "plan.json", "report.json"),
    "quanos": ("model.quanos.onnx", "plan.json", "report.json"),
    "milp": ("model.quanos.onnx", "plan.json", "report.json"),
    "analyze": ("analysis.json", "report.json"),
    "energy": ("energy.json", "report.json"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("determinism")
    model, data = tmp / "resnet.onnx", tmp / "data.npz"
    onnx.save(resnet_style(seed=3), model)
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.random((12, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 12))
    return tmp, model, data


def command(kind: str, model: Path, data: Path, out: Path) -> list[str]:
    attack = ["--samples", "8", "--batch-size", "4", "--seed", "5"]
    return {
        "bits": ["compile", str(model), "--data", str(data), "--bits", "5", "--calibration", "percentile"],
        "quanos": ["compile", str(model), "--data", str(data), *attack, "--method", "eqn3", "--target-avg-bits", "6",
                   "--eval-data", str(data), "--eval-samples", "4", "--max-accuracy-drop", "none"],
        "milp": ["compile", str(model), "--data", str(data), *attack, "--budget", "avg-bits=5",
                 "--sensitivity-samples", "8", "--no-eval", "--max-accuracy-drop", "none"],
        "analyze": ["analyze", str(model), "--data", str(data), *attack, "--audit-eps", "0.1", "--apgd-steps", "3"],
        "energy": ["energy", str(model), "--hw", "all"],
    }[kind] + ["-o", str(out)]


@pytest.mark.parametrize("kind", list(COMPARED))
def test_two_runs_give_byte_identical_outputs(kind: str, inputs: tuple[Path, Path, Path]) -> None:
    tmp, model, data = inputs
    first, second = tmp / f"{kind}-1", tmp / f"{kind}-2"
    for out in (first, second):
        result = CliRunner().invoke(main, command(kind, model, data, out))
        assert result.exit_code == 0, result.stderr
    for name in COMPARED[kind]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    report = (first / "report.json").read_text()
    run = json.loads((first / "run.json").read_text())
    assert str(first) not in report and run["started_at"] not in report
    assert str(first) in run["command_line"]
    assert json.loads((first / "run.json").read_text())["argv"] != json.loads((second / "run.json").read_text())["argv"]
