"""How many threads the tool computes with: torch's and onnxruntime's intra-op threads, set
together for the length of a command (the `threads` option, `--threads`).

On a small machine the libraries' defaults (one thread per core each, and onnxruntime's
worker threads spinning between calls) fight each other for the same cores;
docs/benchmarks.md measures it. onnxruntime sessions are made by model.make_session, which
asks `session_threads()`; torch is set here when the command uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

DEFAULT_THREADS: int | None = 1
"""Threads per command: 1, from the benchmark in docs/benchmarks.md (bench/threads.py).
None keeps torch's and onnxruntime's own defaults."""

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
