"""How many threads the tool computes with: torch's and onnxruntime's intra-op threads, set
together for the length of a command (the `threads` option, `--threads`).

On a small machine the libraries' defaults (one thread per core each, and onnxruntime's
worker threads spinning between calls) fight each other for the same cores;
docs/benchmarks.md measures it. onnxruntime sessions are made by model.make_session, which
asks `session_threads()`; torch is set here when the command uses it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS reports one (a
    container or `taskset` may allow fewer than the machine has), else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


DEFAULT_THREADS: int | None = usable_cores()
"""Threads per command: every core the process may use. On the idle 2-core VM a default
ResNet-20 compile took 64 s wall at 2 threads against 76 s at 1 (about a fifth more CPU
in all) and the EfficientNet-Lite0 compile 547 s against 806 s (docs/benchmarks.md,
Threads; bench/threads.py); on a machine shared with other jobs `--threads 1` costs the
least CPU. None keeps torch's and onnxruntime's own defaults."""

_SESSION_THREADS: ContextVar[int | None] = ContextVar("quanos_session_threads", default=None)


def session_threads() -> int | None:
    """onnxruntime intra-op threads for sessions made now (None: onnxruntime's default)."""
    return _SESSION_THREADS.get()


@contextmanager
def using_threads(threads: int | None, *, torch: bool = True) -> Iterator[None]:
    """Within the block, onnxruntime sessions get `threads` intra-op threads and torch (when
    `torch`, or when it is already imported) runs on `threads`; both are restored after.
    None leaves both libraries at their defaults."""
    if threads is None:
        yield
        return
    token = _SESSION_THREADS.set(threads)
    torch_module = _torch() if torch or "torch" in sys.modules else None
    before = torch_module.get_num_threads() if torch_module is not None else None
    if torch_module is not None:
        torch_module.set_num_threads(threads)
    try:
        yield
    finally:
        _SESSION_THREADS.reset(token)
        if torch_module is not None and before is not None:
            torch_module.set_num_threads(before)


def _torch():  # type: ignore[no-untyped-def]
    import torch

    return torch
