"""Regenerate examples/mnist/mnist_t10k_300.npz: the first 300 MNIST t10k images and labels.

The bundled example must be reproducible from the official files, byte for byte: the
arrays are saved with np.savez (stored, not deflated, so no zlib version can change the
bytes; numpy writes every zip entry with the fixed 1980-01-01 timestamp). Standalone
(numpy only) so it does not depend on the reader it is used to test.

    python examples/make_mnist_example.py            # rewrite the example
    python examples/make_mnist_example.py --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "mnist" / "mnist_t10k_300.npz"
COUNT = 300
# ../shared beside the checkout, or a shared/ inside it (as tests/conftest.py looks).
MNIST_DIRS = [base / "shared" / "data" / "mnist" for base in (REPO.parent, REPO)]


def read_idx_ubyte(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (type 0x08): magic 0,0,8,ndim; big-endian int32 dims; data."""
    with gzip.open(path, "rb") as handle:
        payload = handle.read()
    if payload[:3] != b"\0\0\x08":
        raise SystemExit(f"{path}: not an unsigned-byte idx file")
    ndim = payload[3]
    dims = tuple(int(d) for d in np.frombuffer(payload, ">u4", count=ndim, offset=4))
    return np.frombuffer(payload, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def example_bytes(mnist_dir: Path) -> bytes:
    if not (mnist_dir / "t10k-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"{mnist_dir}: no t10k-images-idx3-ubyte.gz; pass --mnist-dir")
    images = read_idx_ubyte(mnist_dir / "t10k-images-idx3-ubyte.gz")[:COUNT]
    labels = read_idx_ubyte(mnist_dir / "t10k-labels-idx1-ubyte.gz")[:COUNT]
    buffer = io.BytesIO()
    np.savez(buffer, x=images, y=labels)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    found = [folder for folder in MNIST_DIRS if folder.is_dir()]
    parser.add_argument("--mnist-dir", type=Path, default=(found or MNIST_DIRS)[0],
                        help="folder with t10k-{images-idx3,labels-idx1}-ubyte.gz")
    parser.add_argument("--output", type=Path, default=EXAMPLE)
    parser.add_argument("--check", action="store_true",
                        help="compare with --output instead of writing it")
    args = parser.parse_args()
    fresh = example_bytes(args.mnist_dir)
    if args.check:
        same = args.output.is_file() and args.output.read_bytes() == fresh
        print(f"{args.output}: {'identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(fresh)
    print(f"wrote {args.output} ({len(fresh)} bytes, {COUNT} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
