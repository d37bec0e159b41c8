"""Progress callbacks: the stages report finished batches; the CLI draws the bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]
"""(label, total) -> a context whose value is called with each finished batch's size."""


@contextmanager
def no_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda done: None
