"""Shared by the bench scripts: each owns one '## ' section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """CPU model and core count (the machine is shared, so timings are indicative)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    load = ", load average {:.1f} at start".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared{load})"


def write_section(path: Path, heading: str, section: str, after: str | None = None) -> None:
    """Replace the section under `heading` (up to the next '## ' heading), keeping the rest.

    A new section goes at the end, or, when `after` names a '## ' heading in the file, right
    after that heading's section (so related sections stay together on the first write)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start < 0 and after is not None and after in text:
        follows = text.find("\n## ", text.find(after) + len(after))
        if follows >= 0:
            text = text[: follows + 1] + heading + "\n\n" + text[follows + 1 :]
            start = follows + 1
    before = text if start < 0 else text[:start]
    end = -1 if start < 0 else text.find("\n## ", start + len(heading))
    rest = text[end + 1 :] if end >= 0 else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(before.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n" + ("\n" + rest if rest else ""))
