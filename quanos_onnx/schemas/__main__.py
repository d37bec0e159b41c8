"""`python -m quanos_onnx.schemas docs/json.md`: rewrite the shipped schemas from the page."""

import sys
from pathlib import Path

from . import write_from_page

for path in write_from_page(Path(sys.argv[1]), Path(__file__).resolve().parent):
    print(f"wrote {path}")
