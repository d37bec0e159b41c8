"""Shared fixtures: the ../shared data directory (optional) and tiny-model helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path | None:
    for candidate in (REPO.parent / "shared", REPO / "shared"):
        if (candidate / "MANIFEST.md").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests that need it skip cleanly without it."""
    found = _find_shared()
    if found is None:
        pytest.skip("../shared is not available on this machine")
    return found


RAY_ON_LOOPBACK = (
    "import ray; ray.init(address='local', num_cpus=2, include_dashboard=False, _node_ip_address='127.0.0.1', "
    "log_to_driver=False, object_store_memory=200 * 1024**2)"
)
"""A local Ray instance on 127.0.0.1 with 2 CPUs, no dashboard and a small object store,
started by a child process for itself; the commands it then runs use that connection."""


@pytest.fixture
def ray_address() -> str:
    """The --ray address of the Ray tests. Run such a command with
    `quanos_in_child(..., ray=True)`, never in pytest's own process: a Ray driver whose
    raylet dies ends its whole process at once with status 1 and no word (that ended a CI
    run half way), and a cluster kept for the session would live through minutes of other
    tests. The child starts its Ray first (RAY_ON_LOOPBACK); the command uses it as it is."""
    pytest.importorskip("ray")
    return "local"


@pytest.fixture
def quanos_in_child() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `quanos ARGUMENTS...` (or `quanos-compile` with entry="compile_main") in a child
    Python in `cwd`, its output captured as text, after starting a local Ray with ray=True.
    The child imports the package from this checkout, as the tests here do, whatever an
    editable install points at."""

    def run(*arguments: object, cwd: Path, entry: str = "main", ray: bool = False) -> subprocess.CompletedProcess[str]:
        code = f"{RAY_ON_LOOPBACK + '; ' if ray else ''}from quanos_onnx.cli import {entry}; {entry}()"
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return subprocess.run(
            [sys.executable, "-c", code, *map(str, arguments)],
            cwd=cwd, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=300, check=False,
        )

    return run
