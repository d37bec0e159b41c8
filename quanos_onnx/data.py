"""Input data for calibration, attacks and evaluation: a user's files, fitted to the model.

Every source ends up as one float32 array in the model's input layout and per-sample shape,
plus optional int64 labels, so no stage downstream sees file formats, layouts or pixel
scales. A user's data is checked here once; anything wrong with it is a one-line DataError
naming the file and array, never a traceback from deep inside onnxruntime or torch.

Sources (``--data``):

- ``.npz``: inputs in array ``x``, optional labels in ``y``. Without ``x``, exactly one of
  ``X``, ``images``, ``inputs``, ``data`` (or the archive's only array) is the input; without
  ``y``, exactly one of ``Y``, ``labels``, ``targets`` is the labels. Other arrays are ignored.
- ``.npy``: inputs only, memory-mapped (float32 data already in the model's layout is used
  without a copy).
- MNIST idx files: pass the images file (``*-images-idx3-ubyte`` or ``.gz``); the labels file
  beside it (``*-labels-idx1-ubyte[.gz]``) is read when present.
- ``.csv`` / ``.csv.gz``: one sample per row, its values (row-major in the model's input
  shape) then its integer label as the last column, e.g. MNIST's 784 pixels 0..255 then the
  digit. A first row that is not all numbers is a header and skipped; a header whose first
  field is ``label`` means the label is the first column (Kaggle's MNIST CSVs). Values that
  are all whole numbers 0..255 are read as 8-bit pixels (so divided by 255 by default).
- A folder of images (read with Pillow) with one subfolder per class; the class index is
  the subfolder's position in sorted name order. With ``labels`` (a CSV of ``file,label``
  rows, spaces after the comma allowed, an optional header; files relative to the folder,
  as ImageNet's validation labels come) exactly the listed images are read, in its order.
  A folder with images, no subfolders and no labels file is read unlabeled. ``resize``
  scales each image's shorter side to that many pixels (bilinear, as torchvision's
  Resize), ``crop`` then cuts the centre (one size or (height, width)), and
  ``channel_order="bgr"`` reverses the colour channels (Caffe-style models). After them
  all images must have one size (checked from the headers before any work). The pixels
  are decoded per batch (``LazyImages``), so a folder larger than memory streams.

Preprocessing, in this order:

1. Shape: images may be stored NCHW or NHWC (``layout``; ``auto`` picks the one that fits
   the model's input shape, and where dynamic dims leave both possible, takes the axis of
   size 1, 3 or 4 as the channels). Grayscale [N,H,W] gets a channel axis; flat rows are
   reshaped when the model's per-sample shape is fully known.
2. Scale: ``scale`` multiplies the values ("1/255" divides by 255). Default: uint8 data is
   divided by 255 (images on disk are 0..255, models expect [0,1]); anything else, int64
   included, is left as is. Pass ``scale=1`` for a model that takes raw 0..255 pixels.
3. ``mean`` / ``std`` per channel (or one value for all): ``(x - mean) / std``.

Labels: ``label_offset`` is added to every label (1 for a 1001-class model whose class 0 is
background, as TensorFlow's MobileNets: ImageNet label k is its class k+1).

Subsetting: ``data_range`` ("START:STOP", either end optional, e.g. "932:") picks a slice of
the source; within it ``samples`` takes the first N, or with ``shuffle`` a seeded random N
(in shuffled order). Option errors (``samples`` <= 0, a range that does not parse) are
UsageError; asking for more samples than the data holds is a DataError.

Held-out split (``split_held_out``): compile checks its artifact on samples that nothing
else saw. A seeded random ``DEFAULT_EVAL_FRACTION`` (20%) of the data, at least
``MIN_EVAL_SAMPLES`` (100) or half the data when it has fewer than 200, becomes the
evaluation part; the rest, in its original order, is the calibration part that calibration,
ANS and any search use. The two never share a sample, and the same data and seed give the
same split.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import math
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quanos_onnx.errors import DataError, ModelError, UsageError, arg
from quanos_onnx.inputs import check_regular_file

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")
FLOAT_INPUT_TYPES = ("float16", "float32", "float64", "bfloat16")

_X_ALTERNATES = ("X", "images", "inputs", "data")
_Y_ALTERNATES = ("Y", "labels", "targets")
_IDX_NAME = re.compile(r"idx\d")
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"
)
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Batch-axis permutations between the two image layouts.
_PERMUTATIONS = {("nhwc", "nchw"): (0, 3, 1, 2), ("nchw", "nhwc"): (0, 2, 3, 1)}
MAX_SEED = 2**32 - 1
"""Largest --seed: numpy and torch generators are seeded with it (torch takes 64 bits,
numpy's legacy API 32), so one range serves every command."""
MAX_ARRAY_BYTES = 4 << 30
"""Largest array an .npz may declare (4 GiB uncompressed; the archive is read into memory,
so a small zip declaring more is refused before loading). Larger data: an .npy file
(memory-mapped) or an image folder."""
MAX_IMAGE_PIXELS = 89_478_485
"""Largest image read from an image folder (Pillow's decompression-bomb limit)."""
# Samples per step when scanning for NaN/inf: bounded memory on memory-mapped inputs.
_SCAN_CHUNK = 1024
# Images decoded at once when a whole image folder is scanned (its range): bounded memory.
_LAZY_CHUNK = 64


@dataclass(frozen=True)
class InputSpec:
    """The model input that data must fit; model.py builds it from the ONNX graph.

    Dynamic dims (a dim_param name, or no value) become None and match any size. The batch
    dim is the runner's business (mnist-8 fixes it at 1), so only the sample dims are fitted.
    ``dtype`` is numpy's name for the element type; data always comes out float32, and a
    float16/float64 model's runner casts.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        dims = tuple(
            int(dim) if isinstance(dim, (int, np.integer)) and dim > 0 else None
            for dim in self.shape
        )
        object.__setattr__(self, "shape", dims)

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        return self.shape[1:]

    def __str__(self) -> str:
        dims = ",".join("?" if dim is None else str(dim) for dim in self.sample_shape)
        return f"'{self.name}' [N,{dims}]"


@dataclass(frozen=True)
class IndexRange:
    """A START:STOP slice of a source's samples, as in ``--data-range 932:``.

    Either end may be left out; negative ends count from the end, as in Python. Unlike a
    Python slice, a range reaching past the data is an error, not silently shortened.
    """

    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str) -> IndexRange:
        match = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", text)
        if match is None:
            raise UsageError(
                f"{arg('data_range')} {text!r} is not START:STOP", hint="e.g. 932: or 0:1000"
            )
        start, stop = (None if group is None else int(group) for group in match.groups())
        return cls(start, stop)

    def resolve(self, count: int, culprit: str) -> range:
        start = _absolute_index(self.start, count, default=0)
        stop = _absolute_index(self.stop, count, default=count)
        if not (0 <= start <= count and 0 <= stop <= count):
            raise DataError(f"{arg('data_range')} {self} reaches outside the {count} samples of {culprit}")
        if start >= stop:
            raise DataError(f"{arg('data_range')} {self} selects none of the {count} samples of {culprit}")
        return range(start, stop)

    def __str__(self) -> str:
        start = "" if self.start is None else self.start
        stop = "" if self.stop is None else self.stop
        return f"{start}:{stop}"


def _absolute_index(index: int | None, count: int, *, default: int) -> int:
    if index is None:
        return default
    return index + count if index < 0 else index


@dataclass(frozen=True)
class DataSpec:
    """How to read and subset data: the ``--data`` options, parsed and checked once."""

    layout: str = "auto"
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    samples: int | None = None
    data_range: IndexRange | None = None
    seed: int = 0
    shuffle: bool = False
    labels: Path | None = None
    label_offset: int = 0
    resize: int | None = None
    crop: tuple[int, int] | None = None
    channel_order: str = "rgb"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise UsageError(f"{arg('layout')} {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise UsageError(f"{arg('scale')} {self.scale} must be a positive number, e.g. 1/255")
        if self.mean is not None and not all(math.isfinite(value) for value in self.mean):
            raise UsageError(f"{arg('mean')} {_join(self.mean)} must be finite numbers")
        if self.std is not None and not all(math.isfinite(v) and v > 0 for v in self.std):
            raise UsageError(f"{arg('std')} {_join(self.std)} must be positive numbers")
        if self.samples is not None and (
            not isinstance(self.samples, (int, np.integer)) or self.samples < 1
        ):
            raise UsageError(f"{arg('samples')} {self.samples} must be a whole number of at least 1")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"{arg('seed')} {self.seed} must be a whole number in 0..{MAX_SEED}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise UsageError(
                f"{arg('channel_order')} {self.channel_order!r} is not one of {', '.join(CHANNEL_ORDERS)}"
            )
        if not isinstance(self.label_offset, (int, np.integer)) or self.label_offset < 0:
            raise UsageError(f"{arg('label_offset')} {self.label_offset} must be a whole number of at least 0")
        if self.resize is not None and (not isinstance(self.resize, (int, np.integer)) or self.resize < 1):
            raise UsageError(f"{arg('resize')} {self.resize} must be a whole number of pixels, at least 1")
        if self.crop is not None and not all(isinstance(d, (int, np.integer)) and d >= 1 for d in self.crop):
            raise UsageError(f"{arg('crop')} {_dims(self.crop)} must be whole numbers of pixels, at least 1")

    @property
    def reshapes_images(self) -> bool:
        """Whether options that only an image folder can follow are set."""
        return self.labels is not None or self.resize is not None or self.crop is not None or self.channel_order != "rgb"

    @classmethod
    def from_options(
        cls,
        *,
        layout: str = "auto",
        scale: float | str | None = None,
        mean: float | str | Sequence[float] | None = None,
        std: float | str | Sequence[float] | None = None,
        samples: int | None = None,
        data_range: IndexRange | slice | str | None = None,
        seed: int = 0,
        shuffle: bool = False,
        labels: str | os.PathLike[str] | None = None,
        label_offset: int = 0,
        resize: int | None = None,
        crop: int | Sequence[int] | None = None,
        channel_order: str = "rgb",
    ) -> DataSpec:
        """Accepts the command line's strings ("1/255", "0.5,0.5,0.5", "932:") or Python values."""
        return cls(
            labels=None if labels is None else Path(labels),
            label_offset=label_offset,
            resize=resize,
            crop=_parse_crop(crop),
            channel_order=str(channel_order).lower(),
            layout=str(layout).lower(),
            scale=_parse_scale(scale),
            mean=_parse_floats(mean, "mean"),
            std=_parse_floats(std, "std"),
            samples=samples,
            data_range=_parse_range(data_range),
            seed=seed,
            shuffle=shuffle,
        )


def _parse_crop(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    """224 (square) or (height, width)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    crop = tuple(value)
    if len(crop) != 2:
        raise UsageError(f"{arg('crop')} {value!r} is not one size or (height, width)")
    return crop  # type: ignore[return-value]


def _parse_scale(value: float | str | None) -> float | None:
    if value is None or isinstance(value, (int, float, np.number)):
        return None if value is None else float(value)
    numerator, _, denominator = str(value).partition("/")
    try:
        return float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{arg('scale')} {value!r} is not a number or a fraction like 1/255") from None


def _parse_floats(
    value: float | str | Sequence[float] | None, option: str
) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = str(value).split(",") if isinstance(value, str) else np.ravel(value).tolist()
    try:
        parsed = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise UsageError(f"{arg(option)} {value!r} is not a number or a comma-separated list") from None
    if not parsed:
        raise UsageError(f"{arg(option)} is empty; give one value or one per channel")
    return parsed


def _parse_range(value: IndexRange | slice | str | None) -> IndexRange | None:
    if value is None or isinstance(value, IndexRange):
        return value
    if isinstance(value, slice):
        if value.step not in (None, 1):
            raise UsageError(f"{arg('data_range')} {value} has a step; only START:STOP is supported")
        return IndexRange(value.start, value.stop)
    return IndexRange.parse(str(value))


def _join(values: Sequence[float]) -> str:
    return ",".join(f"{value:g}" for value in values)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Inputs ready for the model (float32, its layout and per-sample shape) and int64 labels.

    ``x`` is read-only; it may be a memory-mapped .npy or share memory with the caller's
    array when no conversion was needed, so batches never copy the whole set. For an image
    folder it is a LazyImages: images are decoded per batch, so a folder larger than memory
    streams (``np.asarray`` of a slice reads that slice).
    """

    x: np.ndarray | LazyImages
    y: np.ndarray | None
    source: str
    selection: str = "all"

    @property
    def count(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Consecutive (x, y) batches as views, the last maybe shorter; y is None without labels."""
        if batch_size < 1:
            raise UsageError(f"{arg('batch_size')} {batch_size} must be at least 1")
        return (
            (np.asarray(self.x[start : start + batch_size]),
             None if self.y is None else self.y[start : start + batch_size])
            for start in range(0, self.count, batch_size)
        )


DEFAULT_EVAL_FRACTION = 0.2
"""The share of --data held out for evaluating the compiled model (``--eval-fraction``)."""
MIN_EVAL_SAMPLES = 100
"""The fewest samples held out (half the data when it has fewer than twice this)."""


@dataclass(frozen=True, eq=False)
class HeldOutSplit:
    """--data cut in two: what the compiler may look at, and what only checks its output."""

    calibration: Dataset
    evaluation: Dataset


def held_out_count(count: int, fraction: float = DEFAULT_EVAL_FRACTION, minimum: int = MIN_EVAL_SAMPLES) -> int:
    """How many of `count` samples the evaluation part gets: the fraction (rounded up), at
    least `minimum`, but no more of the minimum than half the data."""
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
        raise UsageError(f"{arg('eval_fraction')} {fraction} must be a fraction between 0 and 1, e.g. 0.2")
    return max(math.ceil(fraction * count), min(minimum, count // 2))


def split_held_out(
    dataset: Dataset,
    fraction: float = DEFAULT_EVAL_FRACTION,
    *,
    seed: int = 0,
    minimum: int = MIN_EVAL_SAMPLES,
) -> HeldOutSplit:
    """A deterministic, seeded split into a calibration part and an evaluation part.

    The evaluation samples are a seeded random choice (so a file sorted by class gives
    every class to both parts); each part keeps the source's order.
    """
    count = dataset.count
    held = held_out_count(count, fraction, minimum)
    if held < 1 or held >= count:
        raise DataError(
            f"{dataset.source}: {count} sample{'s' if count != 1 else ''} cannot be split into a "
            "calibration part and an evaluation part",
            hint=f"give more data, separate {arg('eval_data')}, or turn evaluation off (--no-eval, evaluate=False)",
        )
    chosen = np.zeros(count, bool)
    chosen[np.random.default_rng(seed).permutation(count)[:held]] = True
    evaluation, calibration = np.flatnonzero(chosen), np.flatnonzero(~chosen)
    kept = count - held
    return HeldOutSplit(
        calibration=_subset(dataset, calibration, f"{dataset.selection}; calibration part, {kept} of {count} (seed {seed})"),
        evaluation=_subset(dataset, evaluation, f"{dataset.selection}; evaluation part, {held} of {count} held out (seed {seed})"),
    )


def _subset(dataset: Dataset, indices: np.ndarray, selection: str) -> Dataset:
    if isinstance(dataset.x, LazyImages):  # an image folder stays lazy: its parts are file lists
        x: Any = dataset.x.select(indices)
    else:
        x = dataset.x[indices]
        x.flags.writeable = False
    return Dataset(x, None if dataset.y is None else dataset.y[indices], dataset.source, selection)


@dataclass(frozen=True, eq=False)
class _RawData:
    """A source's arrays as stored, with the names error messages use for them."""

    x: np.ndarray
    y: np.ndarray | None
    x_name: str
    y_name: str
    source: str
    layout: str | None = None  # the storage layout when the format fixes it (image files: HWC)


def load_dataset(
    path: str | Path,
    input_spec: InputSpec,
    *,
    layout: str = "auto",
    scale: float | str | None = None,
    mean: float | str | Sequence[float] | None = None,
    std: float | str | Sequence[float] | None = None,
    samples: int | None = None,
    data_range: IndexRange | slice | str | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    shuffle: bool = False,
    labels: str | os.PathLike[str] | None = None,
    label_offset: int = 0,
    resize: int | None = None,
    crop: int | Sequence[int] | None = None,
    channel_order: str = "rgb",
) -> Dataset:
    """Read ``--data`` (any source in the module docstring) and fit it to ``input_spec``.

    ``num_classes`` (the model's output count, when known) bounds the labels.
    """
    spec = DataSpec.from_options(
        layout=layout, scale=scale, mean=mean, std=std, samples=samples,
        data_range=data_range, seed=seed, shuffle=shuffle, labels=labels,
        label_offset=label_offset, resize=resize, crop=crop, channel_order=channel_order,
    )
    _check_model_input(input_spec)
    path = Path(path)
    if path.is_dir():
        return _image_dataset(path, input_spec, spec, num_classes)
    _refuse_image_options(spec, str(path))
    raw = _read_source(path, input_spec)
    return _prepare(raw, input_spec, spec, num_classes)


def _refuse_image_options(spec: DataSpec, source: str) -> None:
    """labels, resize, crop and channel_order describe image files; other data has none."""
    if spec.reshapes_images:
        given = [name for name, value in (
            ("labels", spec.labels), ("resize", spec.resize), ("crop", spec.crop),
            ("channel_order", None if spec.channel_order == "rgb" else spec.channel_order),
        ) if value is not None]
        raise UsageError(
            f"{arg(given[0])} applies to an image folder; {source} is not one",
            hint="resize/crop arrays before passing them, and give their labels as y",
        )


def dataset_from_arrays(
    x: Any,
    y: Any,
    input_spec: InputSpec,
    *,
    num_classes: int | None = None,
    **options: Any,
) -> Dataset:
    """In-memory inputs (anything numpy can view as an array: ndarray, torch CPU tensor).

    ``y`` is labels or None. ``options`` are load_dataset's (layout, scale, mean, std,
    samples, data_range, seed, shuffle).
    """
    spec = DataSpec.from_options(**options)
    _check_model_input(input_spec)
    _refuse_image_options(spec, "<arrays>")
    raw = _RawData(
        _as_array(x, "x (array)"),
        None if y is None else _as_array(y, "y (array)"),
        x_name="x (array)",
        y_name="y (array)",
        source="<arrays>",
    )
    return _prepare(raw, input_spec, spec, num_classes)


def dataset_from_batches(
    batches: Iterable[Sequence[Any]],
    input_spec: InputSpec,
    *,
    num_classes: int | None = None,
    **options: Any,
) -> Dataset:
    """An iterable of (x, y) batches (e.g. a torch DataLoader); y may be None throughout.

    Without ``shuffle``, reading stops once the requested samples are in, so a large or
    endless loader is not drained. ``options`` are load_dataset's.
    """
    spec = DataSpec.from_options(**options)
    _check_model_input(input_spec)
    _refuse_image_options(spec, "<batches>")
    raw = _collect_batches(batches, _samples_needed(spec))
    return _prepare(raw, input_spec, spec, num_classes)


def dataset_from(
    data: Any,
    input_spec: InputSpec,
    *,
    num_classes: int | None = None,
    argument: str = "data",
    **options: Any,
) -> Dataset:
    """Any data the Python API takes, fitted to the model: a path (load_dataset), numpy
    arrays `(x, y)` or `x` alone (dataset_from_arrays), an onnxruntime.quantization
    CalibrationDataReader (unlabeled; its dicts give the model's input), or an iterable of
    `(x, y)` batches such as a torch DataLoader (dataset_from_batches).

    ``options`` are load_dataset's; ``argument`` names the data in errors.
    """
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data, input_spec, num_classes=num_classes, **options)
    if _is_array(data):
        return dataset_from_arrays(data, None, input_spec, num_classes=num_classes, **options)
    if isinstance(data, (tuple, list)) and len(data) == 2 and _is_array(data[0]) and (data[1] is None or _is_array(data[1])):
        return dataset_from_arrays(data[0], data[1], input_spec, num_classes=num_classes, **options)
    if callable(getattr(data, "get_next", None)):
        return dataset_from_batches(_reader_batches(data, input_spec), input_spec, num_classes=num_classes, **options)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        return dataset_from_batches(data, input_spec, num_classes=num_classes, **options)
    raise UsageError(
        f"{arg(argument)}: a {type(data).__name__} is not data",
        hint="give a path, numpy arrays (x, y) or x, an iterable of (x, y) batches or a CalibrationDataReader",
    )


def describe_source(data: Any) -> str:
    """What in-memory data was, for reports: '<arrays>', or the class of the batches or
    reader given ('<DataLoader>', '<list>', the CalibrationDataReader's class)."""
    if _is_array(data) or (isinstance(data, (tuple, list)) and data and _is_array(data[0])):
        return "<arrays>"
    return f"<{type(data).__name__}>"


def _is_array(value: Any) -> bool:
    """A numpy array or anything numpy views as one without iterating it (a torch tensor)."""
    return isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "shape"))


def _reader_batches(reader: Any, input_spec: InputSpec) -> Iterator[tuple[Any, None]]:
    """(x, None) batches from a CalibrationDataReader's {input name: array} dicts."""
    for number, feed in enumerate(iter(reader.get_next, None)):
        if not isinstance(feed, Mapping) or not feed:
            raise DataError(f"CalibrationDataReader batch {number}: not a dict of input name -> array")
        if input_spec.name in feed:
            yield feed[input_spec.name], None
        elif len(feed) == 1:
            yield next(iter(feed.values())), None
        else:
            raise DataError(
                f"CalibrationDataReader batch {number}: no array for model input '{input_spec.name}' "
                f"(it has {', '.join(map(str, feed))})"
            )


def _samples_needed(spec: DataSpec) -> int | None:
    """How many leading samples a selection reads, or None when it needs them all."""
    if spec.shuffle or spec.samples is None:
        return None
    start = 0 if spec.data_range is None else spec.data_range.start or 0
    stop = None if spec.data_range is None else spec.data_range.stop
    if start < 0 or (stop is not None and stop < 0):
        return None
    return start + spec.samples if stop is None else min(stop, start + spec.samples)


def _check_model_input(spec: InputSpec) -> None:
    if spec.dtype not in FLOAT_INPUT_TYPES:
        raise ModelError(
            f"model input '{spec.name}' is {spec.dtype}; quanos feeds float inputs only"
        )
    if len(spec.shape) < 2:
        raise ModelError(
            f"model input '{spec.name}' has rank {len(spec.shape)}; "
            "expected a batch dim and sample dims"
        )


def _as_array(value: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise DataError(f"{name}: cannot be read as an array ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Sources ------------------------------------------------------------------------------------


def _read_source(path: Path, input_spec: InputSpec) -> _RawData:
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    check_regular_file(path, DataError, "data file")
    name = path.name.lower()
    if name.endswith((".npz", ".npy")):
        return _read_numpy(path)
    if name.endswith((".csv", ".csv.gz")):
        return _read_csv(path)
    if _IDX_NAME.search(name):
        return _read_idx_pair(path)
    raise DataError(
        f"{path}: unknown data format",
        hint="use .npz (x, y), .npy, .csv[.gz] (values..., label), an MNIST idx images file "
        "or a folder with one subfolder of images per class",
    )


def _read_numpy(path: Path) -> _RawData:
    """.npz or .npy, told apart by content: np.load does, and a misnamed file still reads."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
        if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
            # np.load would try pickle next and advise allow_pickle: no advice for data.
            raise DataError(f"{path}: not a NumPy .npz or .npy file")
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return _RawData(loaded, None, x_name=str(path), y_name="", source=str(path))
        with loaded as archive:
            x_key = _pick_inputs(archive.files, path)
            y_key = _pick_array(archive.files, "y", _Y_ALTERNATES, path, "the labels")
            _check_member_sizes(archive.zip, [key for key in (x_key, y_key) if key is not None], path)
            x = archive[x_key]
            y = None if y_key is None else archive[y_key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path}: cannot be read as .npz/.npy ({_first_line(err)})") from err
    return _RawData(
        x, y, x_name=f"'{x_key}' in {path}", y_name=f"'{y_key}' in {path}", source=str(path)
    )


def _check_member_sizes(archive: zipfile.ZipFile, keys: list[str], path: Path) -> None:
    """Refuse, before reading, an array whose declared uncompressed size is over the limit
    (zipfile never inflates a member past its declared size, so the check bounds memory)."""
    for key in keys:
        info = archive.getinfo(f"{key}.npy")
        if info.file_size > MAX_ARRAY_BYTES:
            raise DataError(
                f"'{key}' in {path}: declares {info.file_size} bytes, over the "
                f"{MAX_ARRAY_BYTES >> 30} GiB limit for an .npz array",
                hint="save large data as an .npy file (memory-mapped) or an image folder",
            )


def _pick_inputs(names: list[str], path: Path) -> str:
    key = _pick_array(names, "x", _X_ALTERNATES, path, "the inputs")
    if key is not None:
        return key
    unlabeled = [name for name in names if name not in ("y", *_Y_ALTERNATES)]
    if len(names) == 1 and unlabeled:
        return names[0]
    raise DataError(
        f"{path}: no array 'x' (arrays: {', '.join(names) or 'none'})",
        hint="save inputs as x and labels as y: np.savez(path, x=inputs, y=labels)",
    )


def _pick_array(
    names: list[str], preferred: str, alternates: tuple[str, ...], path: Path, role: str
) -> str | None:
    if preferred in names:
        return preferred
    found = [name for name in alternates if name in names]
    if len(found) > 1:
        raise DataError(
            f"{path}: arrays {', '.join(found)} could each be {role}; "
            f"name the one to use '{preferred}'"
        )
    return found[0] if found else None


def _read_csv(path: Path) -> _RawData:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            first = handle.readline()
            header = None if _is_numeric_row(first) else first.split(",")
            rows = handle if header is not None else itertools.chain([first], handle)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # empty file: reported below
                table = np.loadtxt(rows, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read ({_first_line(err)})") from err
    except ValueError as err:
        reason = _first_line(err).split(";")[0]  # drop numpy's advice to use usecols
        raise DataError(f"{path}: not a CSV of numbers, values then label ({reason})") from err
    if len(table) == 0:
        raise DataError(f"{path}: empty (no data rows)")
    if table.shape[1] < 2:
        raise DataError(f"{path}: rows need values and a label, found {table.shape[1]} column(s)")
    label_first = header is not None and header[0].strip().strip('"').lower() == "label"
    labels, values = (table[:, 0], table[:, 1:]) if label_first else (table[:, -1], table[:, :-1])
    column = "first" if label_first else "last"
    return _RawData(
        _as_uint8_if_pixels(values),
        labels,
        x_name=f"values in {path}",
        y_name=f"labels ({column} column) in {path}",
        source=str(path),
    )


def _is_numeric_row(line: str) -> bool:
    try:
        [float(field) for field in line.split(",")]
    except ValueError:
        return False
    return True


def _as_uint8_if_pixels(values: np.ndarray) -> np.ndarray:
    """Whole numbers 0..255 in a text file are 8-bit pixels, so the default /255 applies to them."""
    if np.all((values >= 0) & (values <= 255) & (values == np.round(values))):
        return values.astype(np.uint8)
    return values


def _read_idx_pair(path: Path) -> _RawData:
    images = _read_idx(path)
    if images.ndim == 1:
        raise DataError(
            f"{path}: an idx labels file; pass the images file (*-images-idx3-ubyte), "
            "its labels are found beside it"
        )
    labels_path = _idx_labels_beside(path)
    if labels_path is None:
        logger.warning("no idx labels file beside %s; reading its images without labels", path)
    labels = None if labels_path is None else _read_idx(labels_path)
    return _RawData(images, labels, x_name=str(path), y_name=str(labels_path), source=str(path))


def _idx_labels_beside(images_path: Path) -> Path | None:
    spellings = (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1"))
    for images_part, labels_part in spellings:
        if images_part in images_path.name:
            base = images_path.name.replace(images_part, labels_part).removesuffix(".gz")
            for name in (base, base + ".gz"):
                if (images_path.parent / name).is_file():
                    return images_path.parent / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    """The idx format (yann.lecun.com/exdb/mnist): magic 0,0,type,ndim; big-endian int32 dims; data.

    Uncompressed files are memory-mapped; .gz files are read whole (MNIST's are 8 MB).
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES:
                raise DataError(f"{path}: not an idx file (bad magic number)")
            dtype = np.dtype(_IDX_TYPES[magic[2]])
            dims_bytes = handle.read(4 * magic[3])
            if len(dims_bytes) < 4 * magic[3]:
                raise DataError(f"{path}: truncated idx header")
            dims = tuple(int(dim) for dim in np.frombuffer(dims_bytes, ">u4"))
            offset = 4 + len(dims_bytes)
            expected = math.prod(dims) * dtype.itemsize
            if compressed and expected > MAX_ARRAY_BYTES:
                raise DataError(
                    f"{path}: declares {expected} bytes, over the {MAX_ARRAY_BYTES >> 30} GiB "
                    "limit for compressed data",
                    hint="decompress it first (uncompressed idx files are memory-mapped)",
                )
            if compressed:
                payload = handle.read(expected + 1)
                found = len(payload)
            else:
                found = path.stat().st_size - offset
        if found != expected:
            raise DataError(f"{path}: idx header promises {expected} data bytes, file has {found}")
        if compressed:
            return np.frombuffer(payload, dtype).reshape(dims)
        return np.memmap(path, dtype, mode="r", offset=offset, shape=dims)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read as idx ({_first_line(err)})") from err



# Image folders: read lazily ------------------------------------------------------------------


@dataclass(frozen=True)
class ImageDecoder:
    """How one image file becomes model-ready pixels: Pillow decodes it in ``mode``, resizes
    its shorter side to ``resize`` (bilinear, the other side keeping the aspect ratio, as
    torchvision's Resize), crops the centre ``crop`` (height, width) and flips RGB to BGR."""

    mode: str | None
    resize: int | None
    crop: tuple[int, int] | None
    bgr: bool

    def size(self, width: int, height: int, file: Path) -> tuple[int, int]:
        """(height, width) of the pixels this decoder makes from a width x height image."""
        if self.resize is not None:
            width, height = _resized(width, height, self.resize)
        if self.crop is not None:
            crop_height, crop_width = self.crop
            if crop_height > height or crop_width > width:
                raise DataError(
                    f"{file}: {width}x{height} pixels{' after resize' if self.resize else ''} "
                    f"are smaller than {arg('crop')} {crop_width}x{crop_height} (width x height)",
                    hint="resize the shorter side to at least the crop, e.g. --resize 256 --crop 224",
                )
            return crop_height, crop_width
        return height, width

    def decode(self, file: Path) -> np.ndarray:
        """HxW (grey) or HxWxC uint8 pixels of one image."""
        from PIL import Image

        try:
            with Image.open(file) as image:
                _check_pixels(image.width, image.height, file)
                mode = self.mode or _natural_mode(image.mode)
                image = image.convert(mode)
                if self.resize is not None:
                    image = image.resize(_resized(image.width, image.height, self.resize), Image.BILINEAR)
                if self.crop is not None:
                    height, width = self.crop
                    top = int(round((image.height - height) / 2.0))
                    left = int(round((image.width - width) / 2.0))
                    image = image.crop((left, top, left + width, top + height))
                pixels = np.asarray(image)
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"{file}: cannot be read as an image ({_first_line(err)})") from err
        if self.bgr and pixels.ndim == 3:
            pixels = pixels[..., ::-1]
        return pixels


def _resized(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``shorter``, as torchvision's Resize(int)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _natural_mode(mode: str) -> str:
    return "L" if mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"


def _check_pixels(width: int, height: int, file: Path) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{file}: {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS} (a decompression bomb?)",
            hint="resize the images to the model's input size first",
        )


class LazyImages:
    """The inputs of an image folder, decoded and fitted to the model per slice.

    It answers ``len``, ``shape`` and ``dtype`` like an array; slicing gives another
    LazyImages (nothing decoded), and ``np.asarray`` (or indexing with integers or index
    arrays) decodes the images it covers into a read-only float32 array. So
    ``Dataset.batches`` holds one batch of images at a time.
    """

    dtype = np.dtype(np.float32)

    def __init__(
        self,
        files: Sequence[Path],
        decoder: ImageDecoder,
        fit: Any,
        sample_shape: tuple[int, ...],
    ) -> None:
        self.files = tuple(files)
        self.decoder = decoder
        self.fit = fit  # uint8 [N,H,W(,C)] -> float32 in the model's layout
        self.sample_shape = sample_shape

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return LazyImages(self.files[key], self.decoder, self.fit, self.sample_shape)
        if isinstance(key, (int, np.integer)):
            return self._decoded([self.files[key]])[0]
        if isinstance(key, (np.ndarray, list, range)) and np.asarray(key).dtype.kind in "iu":
            return self._decoded([self.files[int(index)] for index in np.asarray(key)])
        return np.asarray(self)[key]

    def select(self, indices: np.ndarray) -> LazyImages:
        """The images at `indices`, still undecoded."""
        return LazyImages([self.files[int(index)] for index in indices], self.decoder, self.fit, self.sample_shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self._decoded(self.files)
        return array if dtype is None else array.astype(dtype)

    def _decoded(self, files: Sequence[Path]) -> np.ndarray:
        if not files:
            return np.empty((0, *self.sample_shape), np.float32)
        array = self.fit(np.stack([self.decoder.decode(file) for file in files]))
        array.flags.writeable = False
        return array


def _image_dataset(folder: Path, input_spec: InputSpec, spec: DataSpec, num_classes: int | None) -> Dataset:
    """An image folder (class subfolders, or a labels file, or unlabeled) as a lazy Dataset.

    Every image's header is read here, so a file that is not an image, over the pixel
    limit, or of another size than the rest is named before any work starts; the pixels
    are decoded per batch.
    """
    try:
        import PIL  # noqa: F401
    except ImportError as err:
        raise DataError(f"{folder}: reading an image folder needs Pillow", hint="pip install pillow") from err
    files, labels, y_name = _listed_images(folder, spec.labels)
    channels = _channels(input_spec)
    decoder = ImageDecoder(
        _PIL_MODES.get(channels) if channels is not None else None, spec.resize, spec.crop, spec.channel_order == "bgr"
    )
    picked, selection = _select(len(files), spec, f"images in {folder}")
    files = [files[int(index)] for index in np.arange(len(files))[_as_slice_or_array(picked)]]
    y = None if labels is None else _checked_labels(_take(labels, picked), y_name, picked, num_classes, spec.label_offset)
    _check_one_size(files, decoder)
    x_name = f"images in {folder}"
    layout = _storage_layout(_RawData(np.empty(0), None, x_name, y_name, str(folder), "nhwc"), spec)

    def fit(pixels: np.ndarray) -> np.ndarray:
        return _to_float32(_fit_shape(pixels, input_spec, layout, x_name), spec, input_spec)

    first = fit(decoder.decode(files[0])[None])
    lazy = LazyImages(files, decoder, fit, first.shape[1:])
    if labels is not None and spec.labels is None:
        classes = sorted({file.parent.name for file in files})
        logger.info("classes in %s: %s", folder, ", ".join(f"{i}={name}" for i, name in enumerate(classes)))
    logger.info(
        "data %s (%s): %d images as %s float32, read per batch, %s",
        folder, selection, len(lazy), _dims(lazy.sample_shape), "unlabeled" if y is None else "labeled",
    )
    return Dataset(lazy, y, str(folder), selection)


def _as_slice_or_array(picked: range | np.ndarray) -> slice | np.ndarray:
    return slice(picked.start, picked.stop) if isinstance(picked, range) else picked


def _listed_images(folder: Path, labels_file: Path | None) -> tuple[list[Path], np.ndarray | None, str]:
    """The images and their labels: from a labels file, class subfolders, or none."""
    if labels_file is not None:
        files, labels = _read_labels_file(labels_file, folder)
        return files, labels, str(labels_file)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        pairs = [(file, label) for label, d in enumerate(class_dirs) for file in _image_files(d)]
    else:
        pairs = [(file, -1) for file in _image_files(folder)]
    if not pairs:
        raise DataError(f"{folder}: no images ({' '.join(_IMAGE_SUFFIXES)}) in it or its class subfolders")
    labels = np.array([label for _, label in pairs], np.int64) if class_dirs else None
    return [file for file, _ in pairs], labels, f"class subfolders of {folder}"


def _read_labels_file(labels_file: Path, folder: Path) -> tuple[list[Path], np.ndarray]:
    """A CSV of ``file,label`` rows (spaces after the comma allowed; a first row whose
    label is not a whole number is a header); files are relative to the image folder."""
    import csv

    check_regular_file(labels_file, DataError, "labels file")
    try:
        with open(labels_file, encoding="utf-8-sig", newline="") as handle:
            rows = [row for row in csv.reader(handle, skipinitialspace=True) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{labels_file}: cannot be read ({_first_line(err)})") from err
    if rows and (len(rows[0]) != 2 or not rows[0][1].strip().lstrip("-").isdigit()):
        rows = rows[1:]  # a header
    if not rows:
        raise DataError(f"{labels_file}: no rows of file,label")
    files, labels = [], []
    for number, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[1].strip().lstrip("-").isdigit():
            raise DataError(f"{labels_file}: row {number} {','.join(row)!r} is not file,label (a whole number)")
        file = folder / row[0].strip()
        if not file.is_file():
            raise DataError(f"{labels_file}: row {number} names {row[0].strip()!r}, which is not a file in {folder}")
        files.append(file)
        labels.append(int(row[1]))
    return files, np.array(labels, np.int64)


def _check_one_size(files: Sequence[Path], decoder: ImageDecoder) -> None:
    """Every image opens (header only) and gives pixels of one size after resize/crop."""
    from PIL import Image

    first_size = None
    for file in files:
        try:
            with Image.open(file) as image:
                _check_pixels(image.width, image.height, file)
                size = decoder.size(image.width, image.height, file)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{file}: cannot be read as an image ({_first_line(err)})") from err
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise DataError(
                f"{file}: image is {_dims(size)} but {files[0]} is {_dims(first_size)}",
                hint="images in one folder must share one size; pass --resize and --crop to fit them",
            )

def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )


def _collect_batches(batches: Iterable[Sequence[Any]], needed: int | None) -> _RawData:
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    labeled: bool | None = None  # set by the first batch; the rest must agree
    collected = 0
    for number, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(
                f"batch {number}: not an (x, y) pair", hint="yield (x, None) without labels"
            )
        x = _as_array(batch[0], f"x of batch {number}")
        if x.ndim == 0:
            raise DataError(f"x of batch {number}: a scalar, not a batch of samples")
        if inputs and x.shape[1:] != inputs[0].shape[1:]:
            raise DataError(
                f"x of batch {number}: samples of shape {_dims(x.shape[1:])}, "
                f"batch 0 has {_dims(inputs[0].shape[1:])}"
            )
        labeled = (batch[1] is not None) if labeled is None else labeled
        if (batch[1] is not None) != labeled:
            raise DataError(f"batch {number}: labels given in some batches and not in others")
        if batch[1] is not None:
            y = _as_array(batch[1], f"y of batch {number}").reshape(-1)
            if len(y) != len(x):
                raise DataError(f"batch {number}: {len(y)} labels for {len(x)} inputs")
            labels.append(y)
        inputs.append(x)
        collected += len(x)
        if needed is not None and collected >= needed:
            break
    if not inputs:
        raise DataError("batches: the iterable yielded no batches")
    return _RawData(
        np.concatenate(inputs),
        np.concatenate(labels) if labels else None,
        x_name="x (batches)",
        y_name="y (batches)",
        source="<batches>",
    )


# Fitting to the model ---------------------------------------------------------------------


def _prepare(
    raw: _RawData, input_spec: InputSpec, spec: DataSpec, num_classes: int | None
) -> Dataset:
    x = _checked_inputs(raw)
    y = _checked_label_shape(raw, len(x))
    picked, selection = _select(len(x), spec, raw.x_name)
    x = _take(x, picked)
    if y is not None:
        y = _checked_labels(_take(y, picked), raw.y_name, picked, num_classes, spec.label_offset)
    x = _fit_shape(x, input_spec, _storage_layout(raw, spec), raw.x_name)
    x = _to_float32(x, spec, input_spec)
    _check_finite(x, raw.x_name, picked)
    x.flags.writeable = False
    logger.info(
        "data %s (%s): %d samples as %s float32, %s",
        raw.source, selection, len(x), _dims(x.shape[1:]), "unlabeled" if y is None else "labeled",
    )
    return Dataset(x, y, raw.source, selection)


def _checked_inputs(raw: _RawData) -> np.ndarray:
    x = raw.x
    if x.ndim == 0:
        raise DataError(f"{raw.x_name}: a scalar, not an array of samples")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{raw.x_name}: dtype {x.dtype} is not numeric")
    if len(x) == 0:
        raise DataError(f"{raw.x_name}: empty (0 samples)")
    return x


def _checked_label_shape(raw: _RawData, count: int) -> np.ndarray | None:
    y = raw.y
    if y is None:
        return None
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{raw.y_name}: shape {_dims(y.shape)}; expected one class index per sample"
        )
    if len(y) != count:
        raise DataError(f"{raw.y_name}: {len(y)} labels for the {count} samples of {raw.x_name}")
    return y


def _select(count: int, spec: DataSpec, culprit: str) -> tuple[range | np.ndarray, str]:
    """The source indices to use, in order: a range when contiguous, so memory maps stay maps."""
    window = range(count) if spec.data_range is None else spec.data_range.resolve(count, culprit)
    where = culprit if spec.data_range is None else f"{culprit} [{spec.data_range}]"
    if spec.samples is not None and spec.samples > len(window):
        raise DataError(
            f"{arg('samples')} {spec.samples} is more than the {len(window)} samples of {where}"
        )
    taken = len(window) if spec.samples is None else spec.samples
    described = [] if spec.data_range is None else [f"[{spec.data_range}]"]
    if spec.shuffle:
        order = np.random.default_rng(spec.seed).permutation(len(window))[:taken]
        described.append(f"{taken} of {len(window)} shuffled with seed {spec.seed}")
        return window.start + order, " ".join(described)
    if spec.samples is not None:
        described.append(f"first {taken}")
    return window[:taken], " ".join(described) or "all"


def _take(array: np.ndarray, picked: range | np.ndarray) -> np.ndarray:
    if isinstance(picked, range):
        return array[picked.start : picked.stop]
    return array[picked]


def _checked_labels(
    y: np.ndarray, culprit: str, picked: range | np.ndarray, num_classes: int | None, offset: int = 0
) -> np.ndarray:
    """int64 class indices, shifted by ``offset`` (label_offset: a 1001-class model with a
    background class 0 takes ImageNet label k as class k+1), within the model's classes."""
    if np.issubdtype(y.dtype, np.floating):
        fractional = ~(np.isfinite(y) & (y == np.round(y)))
        if fractional.any():
            first = int(np.argmax(fractional))
            raise DataError(
                f"{culprit}: label {y[first]} at sample {picked[first]} is not a whole class index"
            )
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{culprit}: dtype {y.dtype} is not integer class labels")
    labels = y.astype(np.int64) + offset
    if offset:
        culprit = f"{culprit} (+{arg('label_offset')} {offset})"
    if (labels < 0).any():
        first = int(np.argmax(labels < 0))
        raise DataError(f"{culprit}: negative label {labels[first]} at sample {picked[first]}")
    if num_classes is not None:
        classes = len(np.unique(labels))
        if classes > num_classes:
            raise DataError(
                f"{culprit}: {classes} classes in the labels but the model outputs {num_classes}"
            )
        if labels.max() >= num_classes:
            first = int(np.argmax(labels >= num_classes))
            raise DataError(
                f"{culprit}: label {labels[first]} at sample {picked[first]} is out of range "
                f"for a model with {num_classes} outputs (0..{num_classes - 1})"
            )
    return labels


def _storage_layout(raw: _RawData, spec: DataSpec) -> str:
    if raw.layout is None:
        return spec.layout
    if spec.layout not in ("auto", raw.layout):
        raise UsageError(
            f"{arg('layout')} {spec.layout} does not apply to {raw.x_name}: "
            f"they are read as {raw.layout.upper()}"
        )
    return raw.layout


def _model_layout(spec: InputSpec) -> str:
    """NCHW, as ONNX image models are, unless the last dim looks like channels and the first not."""
    first, _, last = spec.sample_shape
    if last is not None and last <= 4 and (first is None or first > 4):
        return "nhwc"
    return "nchw"


def _channel_axis(spec: InputSpec) -> int | None:
    """The channel axis of a batch for an image input; None for other inputs."""
    if len(spec.sample_shape) != 3:
        return None
    return 1 if _model_layout(spec) == "nchw" else 3


def _channels(spec: InputSpec) -> int | None:
    axis = _channel_axis(spec)
    return None if axis is None else spec.shape[axis]


def _fits(sample: tuple[int, ...], target: tuple[int | None, ...]) -> bool:
    return len(sample) == len(target) and all(t is None or t == s for s, t in zip(sample, target))


def _permuted(sample: tuple[int, ...], source: str, destination: str) -> tuple[int, ...]:
    batch_axes = _PERMUTATIONS[(source, destination)]
    return tuple(sample[axis - 1] for axis in batch_axes[1:])


def _fit_shape(x: np.ndarray, spec: InputSpec, layout: str, culprit: str) -> np.ndarray:
    """A view of x in the model's layout and per-sample shape, or a DataError saying why not."""
    target = spec.sample_shape
    stored = x.shape[1:]
    if len(target) != 3:
        if layout != "auto":
            raise UsageError(
                f"{arg('layout')} {layout} applies to image inputs; model input {spec} is not one"
            )
        return _fit_non_image(x, spec, culprit)
    model = _model_layout(spec)
    data_layout = model if layout == "auto" else layout
    if x.ndim == 2:  # flat rows, stored in data_layout's order
        if None in target or math.prod(target) != stored[0]:
            why = "flat rows need a fully known input shape of the same size"
            raise _mismatch(culprit, stored, spec, why)
        in_storage_order = target if data_layout == model else _permuted(target, model, data_layout)
        x = x.reshape(len(x), *in_storage_order)
    elif x.ndim == 3:  # grayscale H,W
        x = np.expand_dims(x, 1 if model == "nchw" else 3)
        if not _fits(x.shape[1:], target):
            raise _mismatch(culprit, stored, spec, "grayscale gives one channel")
        return x
    elif x.ndim != 4:
        raise _mismatch(culprit, stored, spec, f"rank {len(stored)} is not an image")
    elif layout == "auto":
        data_layout = _guess_layout(x.shape[1:], target, model, culprit, spec)
    if data_layout != model:
        x = x.transpose(_PERMUTATIONS[(data_layout, model)])
    if not _fits(x.shape[1:], target):
        raise _mismatch(culprit, stored, spec, f"read as {data_layout.upper()}")
    return x


def _guess_layout(
    sample: tuple[int, ...],
    target: tuple[int | None, ...],
    model: str,
    culprit: str,
    spec: InputSpec,
) -> str:
    other = "nhwc" if model == "nchw" else "nchw"
    as_model = _fits(sample, target)
    as_other = _fits(_permuted(sample, other, model), target)
    if as_model != as_other:
        return model if as_model else other
    if not as_model:
        raise _mismatch(culprit, sample, spec, "neither as NCHW nor as NHWC")
    # Both fit because the model leaves those dims dynamic: the small axis holds the channels.
    if sample[-1] <= 4 < sample[0]:
        return "nhwc"
    if sample[0] <= 4 < sample[-1]:
        return "nchw"
    return model


def _fit_non_image(x: np.ndarray, spec: InputSpec, culprit: str) -> np.ndarray:
    target = spec.sample_shape
    stored = x.shape[1:]
    if _fits(stored, target):
        return x
    flat_either_side = len(stored) == 1 or len(target) == 1
    if flat_either_side and None not in target and math.prod(stored) == math.prod(target):
        return x.reshape(len(x), *target)
    raise _mismatch(culprit, stored, spec, "cannot be reshaped to it")


def _mismatch(culprit: str, sample: tuple[int, ...], spec: InputSpec, why: str) -> DataError:
    return DataError(
        f"{culprit}: samples of shape {_dims(sample)} do not fit model input {spec} ({why})"
    )


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(dim) for dim in shape) or "scalar"


def _to_float32(x: np.ndarray, spec: DataSpec, input_spec: InputSpec) -> np.ndarray:
    scale = spec.scale if spec.scale is not None else (1 / 255 if x.dtype == np.uint8 else None)
    unchanged = scale is None and spec.mean is None and spec.std is None
    if unchanged and x.dtype == np.float32 and x.dtype.isnative and x.flags.c_contiguous:
        return x
    out = np.empty(x.shape, np.float32)
    out[...] = x
    if scale is not None:
        divisor = 1 / scale
        # x / 255 in float32 is bit for bit what torchvision's ToTensor gives; x * (1/255) is not.
        if divisor.is_integer():
            out /= np.float32(divisor)
        else:
            out *= np.float32(scale)
    if spec.mean is not None:
        out -= _per_channel(spec.mean, "mean", out, input_spec)
    if spec.std is not None:
        out /= _per_channel(spec.std, "std", out, input_spec)
    return out


def _per_channel(
    values: tuple[float, ...], option: str, x: np.ndarray, spec: InputSpec
) -> np.ndarray:
    if len(values) == 1:
        return np.float32(values[0])
    axis = _channel_axis(spec)
    if axis is None:
        raise UsageError(
            f"{arg(option)} {_join(values)}: one value per channel needs an image input; "
            f"model input {spec} is not one"
        )
    if len(values) != x.shape[axis]:
        raise UsageError(
            f"{arg(option)} {_join(values)}: {len(values)} values, "
            f"but model input {spec} has {x.shape[axis]} channel{'s' if x.shape[axis] > 1 else ''}"
        )
    shape = [1] * x.ndim
    shape[axis] = len(values)
    return np.asarray(values, np.float32).reshape(shape)


def check_input_range(dataset: Dataset, low: float, high: float, *, attacked: bool) -> None:
    """Refuse data outside the model's declared input range (--input-range) when it will
    be attacked, warn otherwise.

    Float pixels stored 0..255 fed to a [0,1] model run without any error and give
    near-chance accuracy, so the mismatch is named here. Attacks clip every input into
    the range, so under attack such data would be changed before the model sees it: that
    is refused. Without an attack (compile --bits/--plan) the range is not used, so the
    mismatch is only a warning. Values within 1% of the range's width outside it pass
    (rounding of normalized data).
    """
    lowest, highest = _extremes(dataset.x)
    slack = 0.01 * (high - low)
    if low - slack <= lowest and highest <= high + slack:
        return
    message = (
        f"{dataset.source}: inputs span {lowest:g}..{highest:g} after preprocessing, "
        f"outside --input-range {low:g},{high:g}"
    )
    hint = (
        "pixels stored 0..255 as floats need --scale 1/255; "
        "for a model that takes another range pass --input-range LO,HI"
    )
    if attacked:
        raise DataError(f"{message}; attacks clip every input into that range", hint=hint)
    logger.warning("%s (hint: %s)", message, hint)


def _extremes(x: np.ndarray | LazyImages) -> tuple[float, float]:
    """Smallest and largest value, in chunks (bounded memory on memory-mapped inputs)."""
    lowest, highest = math.inf, -math.inf
    step = _LAZY_CHUNK if isinstance(x, LazyImages) else _SCAN_CHUNK
    for start in range(0, len(x), step):
        chunk = np.asarray(x[start : start + step])
        lowest, highest = min(lowest, float(chunk.min())), max(highest, float(chunk.max()))
    return lowest, highest


def _check_finite(x: np.ndarray, culprit: str, picked: range | np.ndarray) -> None:
    """Counts NaN/inf in chunks, so a memory-mapped set is scanned without a full-size mask."""
    bad_values = 0
    first_bad = None
    for start in range(0, len(x), _SCAN_CHUNK):
        bad = ~np.isfinite(x[start : start + _SCAN_CHUNK])
        count = int(bad.sum())
        if count and first_bad is None:
            first_bad = start + int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))
        bad_values += count
    if first_bad is not None:
        raise DataError(
            f"{culprit}: {bad_values} NaN/inf value{'s' if bad_values > 1 else ''} "
            f"(first in sample {picked[first_bad]})"
        )
