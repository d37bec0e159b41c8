"""Shared fixtures: the ../shared data directory (optional) and tiny-model helpers."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A local Ray cluster for the --ray tests, started once in this process (node address
    127.0.0.1, which Ray itself resolves to this machine's own address; 2 CPUs, no
    dashboard, a small object store) and shut down at the end of the session. Yields the
    address --ray takes; the commands run here use this connection as it is."""
    ray = pytest.importorskip("ray")
    context = ray.init(
        address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
        log_to_driver=False, object_store_memory=200 * 1024**2,
    )
    try:
        yield str(context.address_info["address"])
    finally:
        ray.shutdown()
