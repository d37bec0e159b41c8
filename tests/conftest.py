"""Shared fixtures: the ../shared data directory (optional) and tiny-model helpers."""

from __future__ import annotations

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
