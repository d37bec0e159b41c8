"""data.py: every --data source, fitting to the model input, subsetting, one-line errors."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quanos_onnx.data import (
    MIN_EVAL_SAMPLES,
    Dataset,
    DataSpec,
    IndexRange,
    InputSpec,
    dataset_from,
    check_input_range,
    dataset_from_arrays,
    dataset_from_batches,
    held_out_count,
    describe_source,
    load_dataset,
    split_held_out,
)
from quanos_onnx.errors import DataError, ModelError, QuanosError, UsageError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_NPZ = REPO / "examples" / "mnist" / "mnist_t10k_300.npz"
EXAMPLE_MODEL = REPO / "examples" / "mnist" / "mnist-8.onnx"
MNIST = InputSpec("Input3", (1, 1, 28, 28))  # mnist-8: batch fixed at 1
CIFAR = InputSpec("input", ("N", 3, 32, 32))  # resnet20: dynamic batch


def pixels(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def error_message(error_type: type[QuanosError], call, *culprits: str) -> str:
    """The error's one-line message, checked to name every culprit."""
    with pytest.raises(error_type) as caught:
        call()
    message = caught.value.one_line()
    assert "\n" not in str(caught.value)
    for culprit in culprits:
        assert culprit in message, message
    return message


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())
    return path


def write_csv(path: Path, values: np.ndarray, labels) -> Path:
    rows = [",".join(str(v) for v in [*row, label]) for row, label in zip(values, labels)]
    text = "\n".join(rows) + "\n"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as handle:
        handle.write(text)
    return path


# Model input spec ---------------------------------------------------------------------------


def test_input_spec_makes_named_and_missing_dims_dynamic():
    spec = InputSpec("x", ("N", np.int64(3), 0, 32))
    assert spec.shape == (None, 3, None, 32)
    assert spec.sample_shape == (3, None, 32)
    assert str(spec) == "'x' [N,3,?,32]"


def test_non_float_model_input_is_a_model_error():
    spec = InputSpec("tokens", ("N", 16), dtype="int64")
    call = lambda: dataset_from_arrays(np.zeros((2, 16)), None, spec)
    error_message(ModelError, call, "'tokens'", "int64")


# Sources ------------------------------------------------------------------------------------


def test_npz_inputs_and_labels_are_read(tmp_path):
    x, y = pixels(6, 1, 28, 28), np.arange(6) % 3
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=y, extra=np.zeros(2))
    data = load_dataset(path, MNIST)
    np.testing.assert_array_equal(data.x, x.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(data.y, y)
    assert data.y.dtype == np.int64 and data.source == str(path) and data.count == 6


@pytest.mark.parametrize(
    "arrays, labeled",
    [
        ({"images": 0, "labels": 1}, True),
        ({"inputs": 0, "targets": 1}, True),
        ({"arr_0": 0}, False),
    ],
)
def test_npz_common_alternate_names(tmp_path, arrays, labeled):
    x, y = pixels(4, 28, 28), np.array([0, 1, 2, 3])
    path = tmp_path / "alt.npz"
    np.savez(path, **{name: (x, y)[which] for name, which in arrays.items()})
    data = load_dataset(path, MNIST)
    assert data.x.shape == (4, 1, 28, 28)
    assert (data.y is not None) == labeled


@pytest.mark.parametrize(
    "names, culprits",
    [(("images", "inputs"), ("images", "inputs")), (("a", "b"), ("no array 'x'", "a, b"))],
)
def test_npz_without_a_clear_input_array(tmp_path, names, culprits):
    path = tmp_path / "unclear.npz"
    np.savez(path, **{name: pixels(2, 28, 28) for name in names})
    error_message(DataError, lambda: load_dataset(path, MNIST), "unclear.npz", *culprits)


def test_npy_float32_in_model_layout_is_memory_mapped(tmp_path):
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    data = load_dataset(path, CIFAR)
    assert isinstance(data.x, np.memmap)  # no copy of the whole set
    np.testing.assert_array_equal(data.x, x)
    assert data.y is None


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_images_with_labels_beside(tmp_path, suffix):
    x, y = pixels(7, 28, 28), np.arange(7)
    images = write_idx(tmp_path / f"t-images-idx3-ubyte{suffix}", x)
    write_idx(tmp_path / f"t-labels-idx1-ubyte{suffix}", y)
    data = load_dataset(images, MNIST)
    np.testing.assert_array_equal(data.x[:, 0], x / np.float32(255))
    np.testing.assert_array_equal(data.y, y)


def test_idx_images_without_labels_file(tmp_path):
    images = write_idx(tmp_path / "t-images-idx3-ubyte.gz", pixels(3, 28, 28))
    assert load_dataset(images, MNIST).y is None


def test_idx_labels_file_given_instead_of_images(tmp_path):
    labels = write_idx(tmp_path / "t-labels-idx1-ubyte", np.arange(3))
    call = lambda: load_dataset(labels, MNIST)
    error_message(DataError, call, "t-labels-idx1-ubyte", "images file")


@pytest.mark.parametrize("damage", ["truncated", "bad magic"])
def test_damaged_idx_file(tmp_path, damage):
    images = write_idx(tmp_path / "t-images-idx3-ubyte", pixels(3, 28, 28))
    content = images.read_bytes()
    images.write_bytes(content[:-10] if damage == "truncated" else b"\x01\x02" + content[2:])
    error_message(DataError, lambda: load_dataset(images, MNIST), "t-images-idx3-ubyte")


@pytest.mark.parametrize("name", ["rows.csv", "rows.csv.gz"])
def test_csv_pixels_then_label(tmp_path, name):
    x, y = pixels(5, 784), np.array([3, 1, 4, 1, 5])
    data = load_dataset(write_csv(tmp_path / name, x, y), MNIST)
    np.testing.assert_array_equal(data.x.reshape(5, 784), x / np.float32(255))  # 0..255 ints: /255
    np.testing.assert_array_equal(data.y, y)


def test_csv_header_with_label_first(tmp_path):
    x, y = pixels(3, 784), np.array([9, 8, 7])
    table = np.column_stack([y, x])
    header = "label," + ",".join(f"pixel{i}" for i in range(784))
    path = tmp_path / "kaggle.csv"
    path.write_text(header + "\n" + "\n".join(",".join(map(str, row)) for row in table) + "\n")
    data = load_dataset(path, MNIST)
    np.testing.assert_array_equal(data.y, y)
    np.testing.assert_array_equal(data.x.reshape(3, 784), x / np.float32(255))


def test_csv_of_float_values_is_not_rescaled(tmp_path):
    x = np.random.default_rng(0).random((2, 784)).round(3)
    data = load_dataset(write_csv(tmp_path / "floats.csv", x, [0, 1]), MNIST)
    np.testing.assert_allclose(data.x.reshape(2, 784), x, rtol=1e-6)


@pytest.mark.parametrize("row", ["1,2,x,4", "1,2"])
def test_csv_that_does_not_parse(tmp_path, row):
    path = tmp_path / "bad.csv"
    path.write_text("1,2,3,4\n" + row + "\n")
    error_message(DataError, lambda: load_dataset(path, InputSpec("x", ("N", 3))), "bad.csv")


def save_images(folder: Path, arrays: dict[str, list[np.ndarray]]) -> None:
    from PIL import Image

    for class_name, images in arrays.items():
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        for number, array in enumerate(images):
            Image.fromarray(array).save(folder / class_name / f"{number}.png")


def test_image_folder_classes_in_sorted_order(tmp_path):
    pytest.importorskip("PIL")
    shades = {"dog": 10, "ant": 20, "cat": 30}
    flat = {name: [np.full((28, 28), shade, np.uint8)] * 2 for name, shade in shades.items()}
    save_images(tmp_path, flat)
    data = load_dataset(tmp_path, MNIST)
    np.testing.assert_array_equal(data.y, [0, 0, 1, 1, 2, 2])  # ant, cat, dog
    np.testing.assert_array_equal(data.x[::2, 0, 0, 0], np.float32([20, 30, 10]) / np.float32(255))


def test_image_folder_rgb_into_nchw_model(tmp_path):
    pytest.importorskip("PIL")
    images = [pixels(32, 32, 3, seed=s) for s in range(3)]
    save_images(tmp_path, {"only": images})
    data = load_dataset(tmp_path, CIFAR)
    np.testing.assert_array_equal(data.x, np.stack(images).transpose(0, 3, 1, 2) / np.float32(255))


def test_image_folder_without_class_subfolders_is_unlabeled(tmp_path):
    from PIL import Image

    Image.fromarray(pixels(28, 28)).save(tmp_path / "a.png")
    data = load_dataset(tmp_path, MNIST)
    assert data.count == 1 and data.y is None


def test_image_folder_errors(tmp_path):
    from PIL import Image

    error_message(DataError, lambda: load_dataset(tmp_path, MNIST), str(tmp_path), "no images")
    save_images(tmp_path, {"a": [pixels(28, 28)], "b": [pixels(30, 30)]})
    error_message(DataError, lambda: load_dataset(tmp_path, MNIST), "b/0.png", "30x30", "28x28")
    Image.fromarray(pixels(28, 28)).save(tmp_path / "b" / "0.png")
    (tmp_path / "b" / "1.png").write_bytes(b"not a png")
    error_message(DataError, lambda: load_dataset(tmp_path, MNIST), "b/1.png")
    (tmp_path / "b" / "1.png").unlink()
    call = lambda: load_dataset(tmp_path, MNIST, layout="nchw")
    error_message(UsageError, call, "layout nchw", "NHWC")


def test_arrays_and_torch_style_batches():
    x, y = pixels(10, 28, 28), np.arange(10) % 10
    from_arrays = dataset_from_arrays(x, y.tolist(), MNIST)
    batches = [(x[i : i + 4], y[i : i + 4, None]) for i in range(0, 10, 4)]
    from_batches = dataset_from_batches(batches, MNIST)
    np.testing.assert_array_equal(from_arrays.x, from_batches.x)
    np.testing.assert_array_equal(from_batches.y, y)


def test_dataset_from_takes_every_form_the_api_accepts(tmp_path):
    """A path, (x, y), x alone, (x, y) batches and a CalibrationDataReader give the same inputs."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    x, y = pixels(10, 28, 28), np.arange(10) % 10
    np.savez(tmp_path / "d.npz", x=x, y=y)
    forms = [
        ((x, y), "<arrays>", True),
        (x, "<arrays>", False),
        ([(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)], "<list>", True),
        (Reader([{"Input3": x[i : i + 3, None]} for i in range(0, 10, 3)]), "<Reader>", False),
    ]
    expected = dataset_from(tmp_path / "d.npz", MNIST)
    for data, name, labeled in forms:
        got = dataset_from(data, MNIST)
        np.testing.assert_array_equal(got.x, expected.x)
        assert (got.y is not None) == labeled and describe_source(data) == name
        if labeled:
            np.testing.assert_array_equal(got.y, y)


def test_dataset_from_refuses_what_is_not_data():
    error_message(UsageError, lambda: dataset_from({"x": pixels(2, 28, 28)}, MNIST, argument="val"), "val: a dict is not data")
    error_message(UsageError, lambda: dataset_from(3, MNIST), "data: a int is not data")


def test_a_reader_feeding_other_inputs_is_a_data_error():
    class Reader:
        def __init__(self):
            self.feeds = iter([{"a": pixels(1, 28, 28), "b": pixels(1, 28, 28)}])

        def get_next(self):
            return next(self.feeds, None)

    error_message(DataError, lambda: dataset_from(Reader(), MNIST), "CalibrationDataReader batch 0", "'Input3'")


def test_batches_stop_once_the_samples_are_in():
    consumed = []

    def endless():
        for number in range(10**6):
            consumed.append(number)
            yield pixels(4, 28, 28), None

    data = dataset_from_batches(endless(), MNIST, samples=6)
    assert data.count == 6 and len(consumed) == 2


def test_batches_with_labels_in_some_only():
    batches = [(pixels(2, 28, 28), [0, 1]), (pixels(2, 28, 28), None)]
    error_message(DataError, lambda: dataset_from_batches(batches, MNIST), "batch 1", "labels")


# Layout and shape ---------------------------------------------------------------------------


def test_auto_layout_transposes_nhwc_data_for_an_nchw_model():
    x = pixels(4, 32, 32, 3)  # CIFAR as stored
    data = dataset_from_arrays(x, None, CIFAR)
    np.testing.assert_array_equal(data.x, x.transpose(0, 3, 1, 2) / np.float32(255))


def test_auto_layout_transposes_nchw_data_for_an_nhwc_model():
    x = pixels(4, 3, 32, 32)
    data = dataset_from_arrays(x, None, InputSpec("in", (None, 32, 32, 3)))
    np.testing.assert_array_equal(data.x, x.transpose(0, 2, 3, 1) / np.float32(255))


def test_auto_layout_on_dynamic_dims_takes_the_small_axis_as_channels():
    dynamic = InputSpec("in", ("N", "C", "H", "W"))
    assert dataset_from_arrays(pixels(2, 8, 8, 3), None, dynamic).x.shape == (2, 3, 8, 8)
    assert dataset_from_arrays(pixels(2, 3, 8, 8), None, dynamic).x.shape == (2, 3, 8, 8)


def test_explicit_layout_settles_what_the_shape_cannot():
    x = pixels(2, 3, 3, 3)  # fits as NCHW and as NHWC
    spec = InputSpec("in", (None, 3, 3, 3))
    np.testing.assert_array_equal(dataset_from_arrays(x, None, spec).x, x / np.float32(255))
    as_nhwc = dataset_from_arrays(x, None, spec, layout="nhwc").x
    np.testing.assert_array_equal(as_nhwc, x.transpose(0, 3, 1, 2) / np.float32(255))


def test_explicit_layout_that_does_not_fit():
    error_message(
        DataError, lambda: dataset_from_arrays(pixels(2, 32, 32, 3), None, CIFAR, layout="nchw"),
        "x (array)", "32x32x3", "'input' [N,3,32,32]",
    )


@pytest.mark.parametrize(
    "spec, expected",
    [(MNIST, (3, 1, 28, 28)), (InputSpec("in", (1, 28, 28, 1)), (3, 28, 28, 1))],
)
def test_grayscale_gets_a_channel_axis(spec, expected):
    x = pixels(3, 28, 28)
    data = dataset_from_arrays(x, None, spec)
    assert data.x.shape == expected
    np.testing.assert_array_equal(data.x.reshape(3, 28, 28), x / np.float32(255))


def test_flat_rows_are_reshaped_only_to_a_known_shape():
    assert dataset_from_arrays(pixels(2, 784), None, MNIST).x.shape == (2, 1, 28, 28)
    dynamic = InputSpec("in", ("N", 1, "H", "W"))
    call = lambda: dataset_from_arrays(pixels(2, 784), None, dynamic)
    error_message(DataError, call, "x (array)", "784")


def test_non_image_input_takes_flattened_images():
    mlp = InputSpec("features", ("N", 784))
    assert dataset_from_arrays(pixels(2, 28, 28), None, mlp).x.shape == (2, 784)
    call = lambda: dataset_from_arrays(pixels(2, 784), None, mlp, layout="nhwc")
    error_message(UsageError, call, "layout")


# Scaling ------------------------------------------------------------------------------------


def test_uint8_is_divided_by_255_by_default_and_float_is_left_alone():
    x = np.arange(256, dtype=np.uint8).reshape(256, 1)
    spec = InputSpec("in", ("N", 1))
    divided = x.astype(np.float32) / np.float32(255)
    assert np.array_equal(dataset_from_arrays(x, None, spec).x, divided)
    assert np.array_equal(dataset_from_arrays(x, None, spec, scale="1/255").x, divided)
    assert np.array_equal(dataset_from_arrays(x, None, spec, scale=1).x, x.astype(np.float32))
    as_float = x.astype(np.float64)
    assert np.array_equal(dataset_from_arrays(as_float, None, spec).x, x.astype(np.float32))
    assert np.allclose(dataset_from_arrays(as_float, None, spec, scale=0.5).x, x / 2)


@pytest.mark.parametrize("spec, axis", [(CIFAR, 1), (InputSpec("in", (None, 32, 32, 3)), 3)])
def test_mean_and_std_per_channel(spec, axis):
    x = pixels(2, 32, 32, 3)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    data = dataset_from_arrays(x, None, spec, mean=mean, std=",".join(map(str, std)))
    shape = [1, 1, 1, 1]
    shape[axis] = 3
    scaled = np.moveaxis(x, 3, axis) / np.float32(255)
    expected = (scaled - np.float32(mean).reshape(shape)) / np.float32(std).reshape(shape)
    np.testing.assert_allclose(data.x, expected, rtol=1e-6, atol=1e-6)


def test_mean_with_the_wrong_number_of_channels():
    call = lambda: dataset_from_arrays(pixels(1, 3, 32, 32), None, CIFAR, mean="0.5,0.5")
    error_message(UsageError, call, "mean", "2 values", "3 channels")


@pytest.mark.parametrize(
    "option, culprit",
    [({"scale": "1/0"}, "scale"), ({"scale": -1}, "scale"), ({"std": "0"}, "std"),
     ({"layout": "chw"}, "layout"), ({"seed": -1}, "seed"), ({"mean": "a,b"}, "mean")],
)
def test_bad_preprocessing_options(option, culprit):
    error_message(UsageError, lambda: DataSpec.from_options(**option), culprit)


# Subsetting ---------------------------------------------------------------------------------


def numbered(count: int) -> np.ndarray:
    """Samples whose only value is their index, so a selection can be read back."""
    return np.arange(count, dtype=np.float32).reshape(count, 1)


@pytest.mark.parametrize(
    "options, indices",
    [({"data_range": "12:"}, range(12, 20)), ({"data_range": "-3:"}, range(17, 20)),
     ({"data_range": ":4"}, range(4)), ({"data_range": slice(5, 8)}, range(5, 8)),
     ({"samples": 3}, range(3)), ({"data_range": "10:", "samples": 2}, range(10, 12))],
)
def test_range_and_first_samples(options, indices):
    data = dataset_from_arrays(numbered(20), np.arange(20), InputSpec("in", ("N", 1)), **options)
    np.testing.assert_array_equal(data.x[:, 0], list(indices))
    np.testing.assert_array_equal(data.y, list(indices))


def test_random_samples_are_seeded_and_stay_in_range():
    spec = InputSpec("in", ("N", 1))

    def pick(seed: int) -> np.ndarray:
        options = {"data_range": "60:", "samples": 10, "shuffle": True, "seed": seed}
        return dataset_from_arrays(numbered(100), None, spec, **options).x[:, 0]

    first, again, other = pick(0), pick(0), pick(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len(set(first)) == 10 and first.min() >= 60


def test_shuffle_without_samples_permutes_everything():
    data = dataset_from_arrays(numbered(50), None, InputSpec("in", ("N", 1)), shuffle=True)
    assert sorted(data.x[:, 0]) == list(range(50))
    assert data.selection == "50 of 50 shuffled with seed 0"


@pytest.mark.parametrize(
    "options, error_type, culprits",
    [({"samples": 21}, DataError, ("samples 21", "20 samples")),
     ({"data_range": "15:", "samples": 6}, DataError, ("samples 6", "5 samples", "[15:]")),
     ({"samples": 0}, UsageError, ("samples 0",)),
     ({"samples": -3}, UsageError, ("samples -3",)),
     ({"data_range": "9x:"}, UsageError, ("data_range '9x:'",)),
     ({"data_range": "0:30"}, DataError, ("data_range 0:30", "20 samples")),
     ({"data_range": "5:5"}, DataError, ("data_range 5:5", "none"))],
)
def test_bad_selection(options, error_type, culprits):
    call = lambda: dataset_from_arrays(numbered(20), None, InputSpec("in", ("N", 1)), **options)
    error_message(error_type, call, *culprits)


def test_index_range_prints_as_parsed():
    assert str(IndexRange.parse("932:")) == "932:" and str(IndexRange.parse(" -5 : -1 ")) == "-5:-1"


# Batching -----------------------------------------------------------------------------------


def test_batches_are_views_in_order():
    data = dataset_from_arrays(numbered(10), np.arange(10), InputSpec("in", ("N", 1)))
    batches = list(data.batches(4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert all(np.shares_memory(x, data.x) for x, _ in batches)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(10))
    assert not data.x.flags.writeable
    error_message(UsageError, lambda: data.batches(0), "batch_size 0")


# Bad data -----------------------------------------------------------------------------------


THREE = pixels(3, 28, 28)


def _nan_at(indices, value=np.nan) -> np.ndarray:
    x = np.zeros((6, 1, 28, 28), np.float32)
    for index in indices:
        x[index, 0, 5, 5] = value
    return x


@pytest.mark.parametrize(
    "arrays, num_classes, culprits",
    [
        ({"x": pixels(2, 3, 30, 30)}, None, ("'x' in", "3x30x30", "'Input3' [N,1,28,28]")),
        ({"x": np.array([["a"] * 784] * 2)}, None, ("'x' in", "<U1")),
        ({"x": _nan_at([3, 4])}, None, ("'x' in", "2 NaN/inf", "sample 3")),
        ({"x": _nan_at([5], np.inf)}, None, ("'x' in", "1 NaN/inf value", "sample 5")),
        ({"x": np.zeros((0, 1, 28, 28), np.uint8)}, None, ("'x' in", "empty")),
        ({"x": pixels(4, 28, 28), "y": np.arange(3)}, None, ("'y' in", "3 labels", "4 samples")),
        ({"x": THREE, "y": np.array([0, 1.5, 2])}, None, ("'y' in", "label 1.5", "sample 1")),
        ({"x": pixels(2, 28, 28), "y": np.array(["a", "b"])}, None, ("'y' in", "<U1")),
        ({"x": THREE, "y": np.array([0, -1, 2])}, None, ("'y' in", "label -1", "sample 1")),
        ({"x": THREE, "y": np.array([0, 10, 2])}, 10, ("'y' in", "label 10", "sample 1", "10 out")),
        ({"x": pixels(12, 28, 28), "y": np.arange(12) % 6}, 5, ("'y' in", "6 classes", "5")),
        ({"x": pixels(2, 28, 28), "y": np.zeros((2, 10))}, None, ("'y' in", "2x10")),
    ],
    ids=["shape", "strings", "nan", "inf", "empty", "lengths", "fractional-label", "string-labels",
         "negative-label", "label-out-of-range", "too-many-classes", "one-hot-labels"],
)
def test_bad_data_names_the_file_and_array(tmp_path, arrays, num_classes, culprits):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    call = lambda: load_dataset(path, MNIST, num_classes=num_classes)
    error_message(DataError, call, "bad.npz", *culprits)


def test_unreadable_paths(tmp_path):
    call = lambda name: lambda: load_dataset(tmp_path / name, MNIST)
    error_message(DataError, call("missing.npz"), "missing.npz", "does not exist")
    (tmp_path / "data.txt").write_text("1,2,3")
    error_message(DataError, call("data.txt"), "data.txt", "unknown data format")
    (tmp_path / "noise.npz").write_bytes(np.random.default_rng(0).bytes(200))
    error_message(DataError, lambda: load_dataset(tmp_path / "noise.npz", MNIST), "noise.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}]), allow_pickle=True)
    error_message(DataError, lambda: load_dataset(tmp_path / "objects.npy", MNIST), "objects.npy")
    np.savez(tmp_path / "cut.npz", x=pixels(50, 28, 28))
    content = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(content[: len(content) // 2])
    error_message(DataError, lambda: load_dataset(tmp_path / "cut.npz", MNIST), "cut.npz")


# The bundled example and real data in ../shared ---------------------------------------------


def test_bundled_example_fits_mnist8_and_is_classified_correctly():
    import onnxruntime

    data = load_dataset(EXAMPLE_NPZ, MNIST, num_classes=10)
    assert data.x.shape == (300, 1, 28, 28) and 0 <= data.x.min() and data.x.max() <= 1
    session = onnxruntime.InferenceSession(EXAMPLE_MODEL, providers=["CPUExecutionProvider"])
    predicted = [int(session.run(None, {"Input3": x})[0].argmax()) for x, _ in data.batches(1)]
    assert np.mean(np.array(predicted) == data.y) >= 0.97  # mnist-8 scores 98.9% on all of t10k


@pytest.mark.shared
def test_real_mnist_idx(shared_dir):
    data = load_dataset(shared_dir / "data/mnist/t10k-images-idx3-ubyte.gz", MNIST, num_classes=10)
    assert data.x.shape == (10000, 1, 28, 28) and data.x.max() == 1.0
    np.testing.assert_array_equal(data.y[:5], [7, 2, 1, 0, 4])
    per_digit = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # MNIST's published counts
    np.testing.assert_array_equal(np.bincount(data.y), per_digit)


@pytest.mark.shared
def test_real_mnist_csv(shared_dir):
    data = load_dataset(shared_dir / "data/mnist/mnist_5k.csv.gz", MNIST, num_classes=10)
    assert data.x.shape == (5000, 1, 28, 28) and data.x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(data.y), [500] * 10)


@pytest.mark.shared
def test_real_cifar_calibration_split(shared_dir):
    path = shared_dir / "data/cifar10/cifar10_test_jpeg_q75.npz"
    data = load_dataset(path, CIFAR, data_range="932:", samples=1000, shuffle=True, num_classes=10)
    assert data.x.shape == (1000, 3, 32, 32)
    with np.load(path) as archive:
        stored_x, stored_y = archive["x"], archive["y"]
    row_of = {image.tobytes(): row for row, image in enumerate(stored_x)}
    as_stored = np.round(data.x * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    rows = [row_of[image.tobytes()] for image in as_stored]
    assert min(rows) >= 932 and len(set(rows)) == 1000
    np.testing.assert_array_equal(data.y, stored_y[rows])


@pytest.mark.shared
def test_bundled_example_is_the_first_300_of_t10k(shared_dir):
    example = load_dataset(EXAMPLE_NPZ, MNIST)
    official = load_dataset(shared_dir / "data/mnist/t10k-images-idx3-ubyte.gz", MNIST, samples=300)
    np.testing.assert_array_equal(example.x, official.x)
    np.testing.assert_array_equal(example.y, official.y)


@pytest.mark.shared
def test_example_script_reproduces_the_committed_file(shared_dir):
    script = REPO / "examples" / "make_mnist_example.py"
    result = subprocess.run(
        [sys.executable, script, "--check", "--mnist-dir", shared_dir / "data/mnist"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _numbered(count: int, labeled: bool = True):
    """Samples whose first value is their index, so a split can be traced back."""
    x = np.zeros((count, 3, 2, 2), np.float32)
    x[:, 0, 0, 0] = np.arange(count)
    y = np.arange(count) % 10 if labeled else None
    return dataset_from_arrays(x, y, InputSpec("x", ("N", 3, 2, 2)))


def _indices(dataset) -> list[int]:
    return dataset.x[:, 0, 0, 0].astype(int).tolist()


@pytest.mark.parametrize("count", [7, 40, 300, 1001])
def test_held_out_split_has_no_overlap_and_covers_the_data(count):
    split = split_held_out(_numbered(count), seed=3)
    calibration, evaluation = _indices(split.calibration), _indices(split.evaluation)
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == list(range(count))
    assert calibration == sorted(calibration) and evaluation == sorted(evaluation)  # source order kept
    assert split.evaluation.y.tolist() == [i % 10 for i in evaluation]
    assert len(evaluation) == held_out_count(count)


def test_held_out_split_is_deterministic_and_follows_the_seed():
    data = _numbered(500)
    first, again, other = split_held_out(data, seed=0), split_held_out(data, seed=0), split_held_out(data, seed=1)
    assert _indices(first.evaluation) == _indices(again.evaluation)
    assert _indices(first.evaluation) != _indices(other.evaluation)
    assert "evaluation part, 100 of 500 held out (seed 0)" in first.evaluation.selection
    assert "calibration part, 400 of 500" in first.calibration.selection


def test_held_out_count_fraction_minimum_and_half():
    assert held_out_count(9068) == 1814  # 20%, rounded up
    assert held_out_count(300) == MIN_EVAL_SAMPLES  # 60 would be fewer than the minimum
    assert held_out_count(40) == 20  # fewer than 200 samples: half
    assert held_out_count(1000, 0.5) == 500


def test_held_out_split_keeps_unlabeled_data_unlabeled():
    split = split_held_out(_numbered(50, labeled=False))
    assert split.calibration.y is None and split.evaluation.y is None


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 2])
def test_held_out_fraction_out_of_range_is_a_usage_error(fraction):
    error_message(UsageError, lambda: split_held_out(_numbered(50), fraction), "eval_fraction")


def test_one_sample_cannot_be_split():
    error_message(DataError, lambda: split_held_out(_numbered(1)), "cannot be split", "eval_data")


def test_data_outside_the_input_range_is_refused_under_attack_and_warned_about_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    spec = InputSpec("x", (None, 3, 8, 8))
    check_input_range(dataset_from_arrays(x * 1.005, None, spec), 0.0, 1.0, attacked=True)
    raw = dataset_from_arrays(x * 255, None, spec)
    with pytest.raises(DataError, match=r"inputs span .*\.\.25\d.* outside --input-range 0,1; attacks clip"):
        check_input_range(raw, 0.0, 1.0, attacked=True)
    check_input_range(raw, 0.0, 1.0, attacked=False)
    assert "outside --input-range 0,1" in caplog.text
    check_input_range(raw, 0.0, 255.0, attacked=True)


def test_an_npz_array_declaring_more_than_the_limit_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quanos_onnx import data

    np.savez_compressed(tmp_path / "zeros.npz", x=np.zeros((64, 3, 8, 8), np.float32))
    monkeypatch.setattr(data, "MAX_ARRAY_BYTES", 1000)
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: pytest.fail("loaded"))
    with pytest.raises(DataError, match="'x' in .*zeros.npz: declares 49280 bytes, over the"):
        load_dataset(tmp_path / "zeros.npz", InputSpec("x", (None, 3, 8, 8)))


def test_a_seed_beyond_32_bits_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"seed 18446744073709551616 must be a whole number in 0\.\.4294967295"):
        DataSpec(seed=2**64)


# Image folders as people have them: labels file, resize, crop, channel order, offset ----------

RGB8 = InputSpec("input", ("N", 3, 8, 8))


def save_flat(folder: Path, arrays: list[np.ndarray], suffix: str = ".png") -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{number}{suffix}" for number in range(len(arrays))]
    for name, array in zip(names, arrays):
        Image.fromarray(array).save(folder / name)
    return names


def test_labels_file_gives_the_listed_images_in_its_order(tmp_path):
    pytest.importorskip("PIL")
    images = [np.full((8, 8, 3), shade, np.uint8) for shade in (10, 20, 30)]
    names = save_flat(tmp_path / "images", images)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"{names[2]}, 7\n{names[0]},3\n")  # a space after the comma, as ImageNet's
    data = load_dataset(tmp_path / "images", RGB8, labels=labels)
    np.testing.assert_array_equal(data.y, [7, 3])
    np.testing.assert_array_equal(np.asarray(data.x)[:, 0, 0, 0], np.float32([30, 10]) / np.float32(255))
    labels.write_text(f"file,label\n{names[1]},5\n")
    np.testing.assert_array_equal(load_dataset(tmp_path / "images", RGB8, labels=labels).y, [5])


def test_labels_file_errors_name_the_row(tmp_path):
    pytest.importorskip("PIL")
    names = save_flat(tmp_path / "images", [pixels(8, 8, 3)])
    labels = tmp_path / "labels.csv"
    labels.write_text(f"{names[0]},1\nmissing.png,2\n")
    error_message(DataError, lambda: load_dataset(tmp_path / "images", RGB8, labels=labels), "labels.csv", "row 2", "missing.png")
    labels.write_text(f"{names[0]},1\n{names[0]},cat\n")
    error_message(DataError, lambda: load_dataset(tmp_path / "images", RGB8, labels=labels), "row 2", "file,label")
    error_message(UsageError, lambda: dataset_from_arrays(pixels(2, 8, 8, 3), None, RGB8, labels=labels), "labels", "image folder")


def test_label_offset_shifts_labels_for_a_background_class(tmp_path):
    x, y = pixels(3, 8, 8, 3), np.array([0, 2, 999])
    data = dataset_from_arrays(x, y, RGB8, label_offset=1, num_classes=1001)
    np.testing.assert_array_equal(data.y, [1, 3, 1000])
    call = lambda: dataset_from_arrays(x, y, RGB8, label_offset=2, num_classes=1001)
    error_message(DataError, call, "label 1001", "label_offset 2")
    error_message(UsageError, lambda: dataset_from_arrays(x, y, RGB8, label_offset=-1), "label_offset")


def test_resize_shorter_side_then_centre_crop_as_torchvision(tmp_path):
    from PIL import Image

    image = pixels(12, 20, 3)  # height 12, width 20
    save_flat(tmp_path, [image])
    data = load_dataset(tmp_path, RGB8, resize=10, crop=8)
    resized = Image.fromarray(image).resize((16, 10), Image.BILINEAR)  # shorter side 12 -> 10
    expected = np.asarray(resized)[1:9, 4:12]  # the centre 8x8: top round(2/2)=1, left round(8/2)=4
    np.testing.assert_array_equal(np.asarray(data.x)[0], expected.transpose(2, 0, 1) / np.float32(255))


def test_resize_lets_images_of_other_sizes_share_one_folder(tmp_path):
    pytest.importorskip("PIL")
    save_flat(tmp_path, [pixels(8, 8, 3), pixels(16, 16, 3, seed=1)])
    error_message(DataError, lambda: load_dataset(tmp_path, RGB8), "16x16", "8x8", "--resize")
    assert load_dataset(tmp_path, RGB8, resize=8).x.shape == (2, 3, 8, 8)


def test_crop_larger_than_the_image_is_refused_naming_it(tmp_path):
    pytest.importorskip("PIL")
    save_flat(tmp_path, [pixels(6, 6, 3)])
    error_message(DataError, lambda: load_dataset(tmp_path, RGB8, crop=8), "img0.png", "6x6", "crop 8x8")


def test_bgr_channel_order_reverses_the_channels(tmp_path):
    pytest.importorskip("PIL")
    image = pixels(8, 8, 3)
    save_flat(tmp_path, [image])
    rgb = np.asarray(load_dataset(tmp_path, RGB8).x)
    bgr = np.asarray(load_dataset(tmp_path, RGB8, channel_order="bgr").x)
    np.testing.assert_array_equal(bgr, rgb[:, ::-1])
    error_message(UsageError, lambda: load_dataset(tmp_path, RGB8, channel_order="grb"), "channel_order")


def test_mean_and_std_apply_to_image_folders_per_channel(tmp_path):
    pytest.importorskip("PIL")
    image = pixels(8, 8, 3)
    save_flat(tmp_path, [image])
    data = load_dataset(tmp_path, RGB8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    expected = (image.transpose(2, 0, 1) / np.float32(255) - np.float32([0.5, 0.4, 0.3])[:, None, None]) / np.float32([0.2, 0.25, 0.5])[:, None, None]
    np.testing.assert_allclose(np.asarray(data.x)[0], expected, rtol=1e-6)


def test_image_folder_is_read_per_batch(tmp_path, monkeypatch):
    """A folder larger than memory streams: loading decodes one image (to learn the
    sample shape), and each batch decodes only its own images."""
    pytest.importorskip("PIL")
    from quanos_onnx import data as data_module

    save_flat(tmp_path, [pixels(8, 8, 3, seed=s) for s in range(10)])
    decoded: list[str] = []
    original = data_module.ImageDecoder.decode
    monkeypatch.setattr(data_module.ImageDecoder, "decode", lambda self, file: decoded.append(file.name) or original(self, file))
    data = load_dataset(tmp_path, RGB8)
    assert decoded == ["img0.png"] and data.count == 10
    decoded.clear()
    batches = data.batches(4)
    first, _ = next(batches)
    assert first.shape == (4, 3, 8, 8) and decoded == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert not first.flags.writeable
    assert [len(x) for x, _ in batches] == [4, 2]


def test_held_out_split_of_an_image_folder_stays_lazy_and_matches_the_decoded_split(tmp_path):
    pytest.importorskip("PIL")
    from quanos_onnx.data import LazyImages

    shades = {"a": 10, "b": 90, "c": 170}
    save_images(tmp_path, {name: [np.full((28, 28), shade + n, np.uint8) for n in range(4)] for name, shade in shades.items()})
    data = load_dataset(tmp_path, MNIST)
    split = split_held_out(data, 0.25, seed=2, minimum=1)
    assert isinstance(split.calibration.x, LazyImages) and isinstance(split.evaluation.x, LazyImages)
    eager = Dataset(np.asarray(data.x), data.y, data.source, data.selection)
    expected = split_held_out(eager, 0.25, seed=2, minimum=1)
    np.testing.assert_array_equal(np.asarray(split.evaluation.x), expected.evaluation.x)
    np.testing.assert_array_equal(np.asarray(split.calibration.x), expected.calibration.x)
    np.testing.assert_array_equal(split.evaluation.y, expected.evaluation.y)
