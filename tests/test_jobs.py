"""jobs.py: a command's independent jobs in this process, or as Ray tasks on a local cluster."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest

from quanos_onnx.errors import DataError, UsageError
from quanos_onnx.jobs import Jobs, check_ray


def _threads_job(shared: int, item: int, progress: object) -> tuple[int, int, int | None]:
    """The item scaled by `shared`, with the torch and onnxruntime threads the job ran under."""
    import torch

    from quanos_onnx.threads import session_threads

    return shared * item, torch.get_num_threads(), session_threads()


def _failing_job(shared: object, item: int, progress: object) -> int:
    if item == 2:
        raise DataError(f"sample {item} is bad")
    return item


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


def test_ray_tasks_return_in_item_order_and_compute_with_the_commands_threads(ray_address: str) -> None:
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test module is not importable in workers
    jobs = Jobs(ray_address, threads=1)
    with jobs.open():
        results = jobs.run(_threads_job, 3, [5, 1, 4, 2])
        assert jobs.slots() == 2  # 2 CPUs of the cluster, 1 thread per job
    assert [value for value, _, _ in results] == [15, 3, 12, 6]
    assert {(torch_threads, ort_threads) for _, torch_threads, ort_threads in results} == {(1, 1)}


def test_a_failing_ray_job_raises_its_own_one_line_error(ray_address: str) -> None:
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.raises(DataError, match=r"^sample 2 is bad$"):
        Jobs(ray_address).run(_failing_job, None, [1, 2, 3])


def test_ray_asked_for_without_ray_installed_is_one_usage_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # importlib.util.find_spec then finds no ray
    with pytest.raises(UsageError) as error:
        check_ray("auto")
    assert error.value.exit_code == 2
    assert error.value.one_line() == "ray auto: Ray is not installed (hint: pip install quanos-onnx[ray])"
    with pytest.raises(UsageError, match="is empty"):
        check_ray(" ")
    check_ray(None)
