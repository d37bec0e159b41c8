"""A module as it was at an earlier commit, importable beside today's, for side-by-side benchmarks.

`git show REVISION:PATH`, with `replacements` applied to its source (relative imports made
absolute, or pointed at another module loaded this way), written to a temporary file and
imported under `name` (registered in sys.modules, so a later module can import it by name).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def module_at(revision: str, path: str, name: str, replacements: dict[str, str]) -> Any:
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    for old, new in replacements.items():
        source = source.replace(old, new)
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
