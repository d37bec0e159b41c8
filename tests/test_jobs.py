"""jobs.py: a command's independent jobs in this process, or as Ray tasks on a local cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import RAY_ON_LOOPBACK
from quanos_onnx.errors import UsageError
from quanos_onnx.jobs import Jobs, check_ray


@contextmanager
def _counting(label: str, total: int):
    yield lambda done: None


def test_without_ray_the_jobs_run_here_in_order_with_the_callers_progress() -> None:
    labels: list[str] = []

    def job(shared: int, item: int, progress) -> int:
        with progress(f"job {item}", 1):
            labels.append(f"job {item}")
        return shared + item

    assert Jobs().run(job, 10, [3, 1, 2], progress=_counting) == [13, 11, 12]
    assert labels == ["job 3", "job 1", "job 2"] and Jobs().slots() == 1


_RAY_JOBS = """
import json
from quanos_onnx.errors import DataError
from quanos_onnx.jobs import Jobs

def threads_job(shared, item, progress):
    import torch
    from quanos_onnx.threads import session_threads
    return shared * item, torch.get_num_threads(), session_threads()

def failing_job(shared, item, progress):
    if item == 2:
        raise DataError(f"sample {item} is bad")
    return item

jobs = Jobs("local", threads=1)  # uses the Ray started before this script, as a command's jobs do
with jobs.open():
    results = jobs.run(threads_job, 3, [5, 1, 4, 2])
    slots = jobs.slots()
try:
    Jobs("local").run(failing_job, None, [1, 2, 3])
    error = None
except DataError as raised:
    error = [type(raised).__name__, str(raised)]
print(json.dumps({"results": results, "slots": slots, "error": error}))
"""


@pytest.fixture(scope="module")
def ray_jobs() -> dict:
    """What two rounds of jobs gave on a 2-CPU local Ray on 127.0.0.1, run in a child Python
    (a Ray driver in pytest's own process could end it; see conftest's ray_address)."""
    pytest.importorskip("ray")
    child = subprocess.run(
        [sys.executable, "-c", RAY_ON_LOOPBACK + "\n" + _RAY_JOBS],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300, check=False,
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_ray_tasks_return_in_item_order_and_compute_with_the_commands_threads(ray_jobs: dict) -> None:
    assert [value for value, _, _ in ray_jobs["results"]] == [15, 3, 12, 6]
    assert {(torch_threads, ort_threads) for _, torch_threads, ort_threads in ray_jobs["results"]} == {(1, 1)}
    assert ray_jobs["slots"] == 2  # 2 CPUs of the cluster, 1 thread per job


def test_a_failing_ray_job_raises_its_own_one_line_error(ray_jobs: dict) -> None:
    assert ray_jobs["error"] == ["DataError", "sample 2 is bad"]


def test_ray_asked_for_without_ray_installed_is_one_usage_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # importlib.util.find_spec then finds no ray
    with pytest.raises(UsageError) as error:
        check_ray("auto")
    assert error.value.exit_code == 2
    assert error.value.one_line() == "ray auto: Ray is not installed (hint: pip install quanos-onnx[ray])"
    with pytest.raises(UsageError, match="is empty"):
        check_ray(" ")
    check_ray(None)
