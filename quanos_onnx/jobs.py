"""The independent jobs of a command, run in this process or as Ray tasks (the `ray` option,
`--ray auto|ADDRESS`).

A job is a module-level function of (shared, item, progress): one model's evaluation
(`quanos evaluate`), one model's analysis (`quanos analyze`), one trial plan's accuracy
(compile's milp search). Without `ray` the jobs run one after another in this process, as
they always did. With `ray` each item becomes a Ray task (`ray.remote`, `ray.get`); the
shared part (models, samples) goes into Ray's object store once. A task computes with the
command's threads and device, set again in the worker, and asks Ray for that many CPUs
(and one GPU with device cuda), so Ray never runs more jobs at once than the cluster has
cores for; Ray does the scheduling. The results come back in the order of the items and
are the same numbers either way: every job seeds itself from the command's seed.

Ray is an optional extra (`pip install quanos-onnx[ray]`), imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import UsageError, arg
from .progress import ProgressFactory, no_progress

Shared = TypeVar("Shared")
Item = TypeVar("Item")
Result = TypeVar("Result")

Job = Callable[[Shared, Item, ProgressFactory], Result]
"""What one job computes: (what every job shares, this job's item, progress) -> result."""

RAY_EXTRA = "pip install quanos-onnx[ray]"


def check_ray(address: str | None) -> None:
    """Refuse `ray` in one line, before any work, when it is empty or Ray is not installed."""
    if address is None:
        return
    if not address.strip():
        raise UsageError(f"{arg('ray')} is empty", hint="give auto (a running Ray cluster) or the cluster's address")
    if importlib.util.find_spec("ray") is None:
        raise UsageError(f"{arg('ray')} {address}: Ray is not installed", hint=RAY_EXTRA)


@dataclass(frozen=True)
class Jobs:
    """Where a command's jobs run: in this process (`ray` None) or on the Ray cluster at
    `ray` (an address ray.init takes: auto, local, HOST:PORT, ray://HOST:PORT), each job with
    `threads` threads on `device`."""

    ray: str | None = None
    threads: int | None = 1
    device: str = "cpu"

    @contextmanager
    def open(self) -> Iterator[None]:
        """Keep one connection to the cluster for the block, so that the command's several
        rounds of jobs do not connect (or start a local Ray) each time."""
        if self.ray is None:
            yield
            return
        with connected(self.ray):
            yield

    def share(self, shared: Shared) -> Shared:
        """`shared` ready for several rounds of `run` (inside `open()`): on Ray put into the
        object store once, here itself."""
        if self.ray is None:
            return shared
        with connected(self.ray) as ray:
            return ray.put(shared)  # type: ignore[no-any-return]

    def run(
        self,
        job: Job[Shared, Item, Result],
        shared: Shared,
        items: Sequence[Item],
        *,
        progress: ProgressFactory = no_progress,
        label: str = "jobs",
    ) -> list[Result]:
        """`job(shared, item, progress)` for every item, in the items' order.

        In this process the job reports its own progress; on Ray a bar counts finished jobs.
        `shared` may be what `share` returned."""
        if self.ray is None:
            return [job(shared, item, progress) for item in items]
        with connected(self.ray) as ray:
            task = ray.remote(
                num_cpus=self.threads or 1, num_gpus=1 if self.device == "cuda" else 0, max_retries=0
            )(run_in_worker)
            stored = shared if isinstance(shared, ray.ObjectRef) else ray.put(shared)
            pending = [task.remote(job, self.threads, self.device, stored, item) for item in items]
            with progress(f"{label} on Ray", len(items)) as advance:
                return _gather(ray, pending, advance)

    def slots(self) -> int:
        """How many jobs run at once: 1 in this process, else the cluster's CPUs over the
        threads of a job (its GPUs with device cuda)."""
        if self.ray is None:
            return 1
        with connected(self.ray) as ray:
            resources = ray.cluster_resources()
        if self.device == "cuda":
            return max(1, int(resources.get("GPU", 1)))
        return max(1, int(resources.get("CPU", 1)) // (self.threads or 1))


def run_in_worker(
    job: Job[Shared, Item, Result], threads: int | None, device: str, shared: Shared, item: Item
) -> Result:
    """One job in a Ray worker, under the command's threads and device (context variables
    of the driver do not travel with the task)."""
    from .device import using_device
    from .threads import using_threads

    with using_threads(threads), using_device(device):
        return job(shared, item, no_progress)


def _gather(ray: Any, pending: list[Any], advance: Callable[[int], None]) -> list[Any]:
    """Every task's result in order; a failed job raises its own exception here (a
    QuanosError stays one line), and the jobs not yet done are cancelled."""
    from ray.exceptions import RayTaskError

    waiting = list(pending)
    try:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            ray.get(done)
            advance(len(done))
        return list(ray.get(pending))
    except RayTaskError as error:
        cause = error.cause if isinstance(error.cause, BaseException) else None
        if cause is not None:
            raise cause from None
        raise
    finally:
        for ref in waiting:
            ray.cancel(ref)


@contextmanager
def connected(address: str) -> Iterator[Any]:
    """The ray module, connected to the cluster at `address` for the block (a connection
    this process already has is used as it is and left open)."""
    check_ray(address)
    import ray

    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"{arg('ray')} {address}: no Ray cluster to connect to ({first_line})",
            hint="start one with `ray start --head`, or give local to start one for this command",
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()
