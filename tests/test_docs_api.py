"""docs/api.md: every Python example on the page runs, in order, as one script from the
repository root on the bundled example (examples/mnist/)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_every_example_of_the_api_page_runs(tmp_path: Path) -> None:
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) >= 8
    script = tmp_path / "api_examples.py"
    script.write_text("\n\n".join(blocks))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[:2] == ["ModelProto", "quanos-onnx"]
    assert "input_range 1,0: LO must be below HI, e.g. 0,1 or 0,255" in lines
    assert "('input_range',)" in lines
    assert "['model.quanos.onnx', 'plan.json', 'report.html', 'report.json', 'report.md', 'run.json']" in lines
    assert "('mnist-8', 'model2')" in lines
    assert lines[-1] == "True"  # evaluate on a local Ray gives the document of one process
