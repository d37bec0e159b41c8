"""Render a report.html in a real headless browser and save a screenshot PNG.

Proof that the self-contained report shows its figures in a browser, with no network and
no file beside it. Uses Debian's chromium (`apt-get install -y chromium`); installs
nothing itself. The page is shot in a tall window, the empty background below the page is
cropped off, and the PNG is reduced to a 256-colour palette (Pillow) so it stays small
enough to commit.

    python bench/screenshot_report.py out/mnist/report.html docs/img/report-mnist.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium(given: str | None) -> str:
    for name in (given,) if given else CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no chromium found: install Debian's (apt-get install -y chromium) or pass --chromium PATH")


def screenshot(chromium: str, page: Path, target: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory(prefix="quanos-chromium-") as profile:
        command = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={target}",
            page.resolve().as_uri(),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if completed.returncode != 0 or not target.is_file():
        sys.exit(f"chromium failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")


def crop_and_shrink(target: Path, max_width: int | None) -> tuple[int, int]:
    """Cut the empty background below the page; palette-compress; optionally scale down."""
    from PIL import Image, ImageChops

    with Image.open(target) as shot:
        image = shot.convert("RGB")
    background = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    box = ImageChops.difference(image, background).getbbox()
    if box is not None:
        image = image.crop((0, 0, image.width, min(image.height, box[3] + 24)))
    if max_width is not None and image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    return image.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the report.html to render")
    parser.add_argument("output", type=Path, help="the screenshot PNG to write")
    parser.add_argument("--width", type=int, default=1200, help="browser window width in CSS pixels")
    parser.add_argument("--height", type=int, default=6000, help="window height; the empty rest is cropped")
    parser.add_argument("--max-width", type=int, default=None, help="scale the screenshot down to this width")
    parser.add_argument("--chromium", default=None, help="the browser binary (default: chromium on PATH)")
    arguments = parser.parse_args()
    if not arguments.report.is_file():
        sys.exit(f"{arguments.report}: no such report")
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    screenshot(find_chromium(arguments.chromium), arguments.report, arguments.output, arguments.width, arguments.height)
    width, height = crop_and_shrink(arguments.output, arguments.max_width)
    size = arguments.output.stat().st_size
    print(f"wrote {arguments.output}: {width}x{height} px, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
