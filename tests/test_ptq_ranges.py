"""ptq/ranges.py: streaming histograms of the calibration set and k-bit range choices."""

from __future__ import annotations

import numpy as np
import pytest

from quanos_onnx.errors import DataError, UsageError
from quanos_onnx.model import Runner, normalize
from quanos_onnx.passes.calibrate import Range
from quanos_onnx.ptq.ranges import HISTOGRAM_BINS, TensorHistogram, choose_range, collect_histograms

from tiny_models import random_inputs, vgg_chain

TENSORS = ["relu1_out", "conv1_out", "maxpool3_out"]


@pytest.fixture(scope="module")
def model():
    return normalize(vgg_chain())


def heavy_tailed(count: int, seed: int = 0) -> np.ndarray:
    """Mostly N(0, 1) with a few large outliers: the case clipping exists for."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=count)
    values[rng.choice(count, count // 500, replace=False)] *= 12.0
    return values.astype(np.float32)


def histogram_of(*batches: np.ndarray) -> TensorHistogram:
    histogram = TensorHistogram()
    for batch in batches:
        histogram.add(batch)
    return histogram


def grid_error(values: np.ndarray, value_range: Range, bits: int) -> float:
    """Squared error of `values` through the asymmetric k-bit grid of passes/qdq."""
    low, high = min(value_range.low, 0.0), max(value_range.high, 0.0)
    scale = (high - low) / (2**bits - 1)
    zero = np.round(-low / scale)
    levels = np.clip(np.round(values / scale) + zero, 0, 2**bits - 1)
    return float(np.sum((values - (levels - zero) * scale) ** 2))


def test_minmax_over_streamed_batches_equals_the_whole_data(model):
    x = random_inputs(model, 40, seed=1) * 2.0 - 0.5
    histograms = collect_histograms(model, TENSORS, (x[i : i + 16] for i in range(0, len(x), 16)))
    for name, value in zip(TENSORS, Runner(model, TENSORS).run(x, TENSORS)):
        chosen = choose_range(histograms[name], 4, "minmax")
        assert chosen.low == pytest.approx(min(float(value.min()), 0.0), abs=1e-6)
        assert chosen.high == pytest.approx(float(value.max()), abs=1e-6)
    assert choose_range(histograms["relu1_out"], 4, "minmax").low == 0.0
    assert choose_range(histograms["conv1_out"], 4, "minmax").low < 0.0


def test_memory_does_not_grow_with_the_samples():
    histogram = histogram_of(*(heavy_tailed(1000, seed) * (seed + 1) for seed in range(20)))
    assert histogram.positive.size == histogram.negative.size == HISTOGRAM_BINS
    assert histogram.count == 20_000


def test_percentile_is_the_whole_set_percentile_whatever_the_batching():
    values = heavy_tailed(20_000)
    whole = choose_range(histogram_of(values), 8, "percentile", 99.9)
    split = choose_range(histogram_of(*np.array_split(values, 37)), 8, "percentile", 99.9)
    assert split.low == pytest.approx(whole.low, rel=1e-9)
    assert split.high == pytest.approx(whole.high, rel=1e-9)
    low, high = np.percentile(values, [0.1, 99.9])
    assert whole.low == pytest.approx(low, rel=0.01)
    assert whole.high == pytest.approx(high, rel=0.01)


def test_growing_the_range_keeps_every_count_in_the_right_bin():
    values = heavy_tailed(5000)
    small_first = histogram_of(values[np.argsort(np.abs(values))])
    direct = histogram_of(values)
    np.testing.assert_array_equal(small_first.positive, direct.positive)
    np.testing.assert_array_equal(small_first.negative, direct.negative)


def test_a_group_histogram_is_the_histogram_of_its_tensors_together():
    first, second = heavy_tailed(3000, 1), np.abs(heavy_tailed(3000, 2)) * 5.0
    merged = histogram_of(first).merged([histogram_of(second)])
    together = histogram_of(np.concatenate([first, second]))
    assert (merged.low, merged.high, merged.limit) == (together.low, together.high, together.limit)
    np.testing.assert_array_equal(merged.positive, together.positive)
    np.testing.assert_array_equal(merged.negative, together.negative)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("signed", [True, False])
def test_mse_range_has_less_k_bit_error_than_minmax(bits, signed):
    values = heavy_tailed(50_000, bits)
    values = values if signed else np.maximum(values, 0.0)
    histogram = histogram_of(values)
    minmax, mse = choose_range(histogram, bits, "minmax"), choose_range(histogram, bits, "mse")
    assert mse.high < minmax.high
    assert (mse.low < 0.0) == signed
    assert grid_error(values, mse, bits) < (0.7 if bits <= 4 else 1.0) * grid_error(values, minmax, bits)


def test_ranges_depend_on_the_bits():
    histogram = histogram_of(np.maximum(heavy_tailed(50_000), 0.0))
    highs = [choose_range(histogram, bits, "mse").high for bits in (2, 4, 8)]
    assert highs[0] < highs[1] < highs[2]
    entropy = [choose_range(histogram, bits, "entropy").high for bits in (3, 8)]
    assert entropy[0] < entropy[1] <= histogram.high


def test_entropy_clips_outliers_and_keeps_a_compact_tensor():
    histogram = histogram_of(np.maximum(heavy_tailed(50_000), 0.0))
    assert 0.05 * histogram.high < choose_range(histogram, 4, "entropy").high < 0.6 * histogram.high
    uniform = histogram_of(np.random.default_rng(0).uniform(0, 1, 50_000).astype(np.float32))
    assert choose_range(uniform, 4, "entropy").high > 0.9


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_above_eight_bits_the_searches_keep_minmax(method):
    histogram = histogram_of(heavy_tailed(10_000))
    assert choose_range(histogram, 12, method) == choose_range(histogram, 12, "minmax")


def test_an_all_zero_tensor_gets_the_empty_range():
    assert choose_range(histogram_of(np.zeros(100, np.float32)), 4, "mse") == Range(0.0, 0.0)


def test_no_tensors_needs_no_data(model):
    assert collect_histograms(model, [], []) == {}


def test_empty_calibration_data_is_a_data_error(model):
    with pytest.raises(DataError, match="calibration data is empty"):
        collect_histograms(model, TENSORS, [])


@pytest.mark.parametrize(("method", "percentile", "culprit"), [("mean", 99.0, "calibration"), ("percentile", 40.0, "percentile")])
def test_bad_options_are_usage_errors_naming_the_option(method, percentile, culprit):
    with pytest.raises(UsageError) as raised:
        choose_range(histogram_of(heavy_tailed(100)), 4, method, percentile)
    assert raised.value.arguments == (culprit,)


def test_a_histogram_is_the_same_whatever_the_batches_it_was_added_in() -> None:
    """Calibration adds activations a few samples at a time (model.ACTIVATION_CHUNK): R grows
    by exact doublings, so chunks whose range keeps growing give the whole batch's histogram."""
    rng = np.random.default_rng(3)
    values = rng.normal(0, 1, (64, 8, 5, 5)).astype(np.float32) * np.geomspace(0.01, 50, 64, dtype=np.float32)[:, None, None, None]
    values[5] = 0.0
    whole, chunked = TensorHistogram(), TensorHistogram()
    whole.add(values)
    for start in range(0, 64, 16):
        chunked.add(values[start : start + 16])
    assert chunked.limit == whole.limit and (chunked.low, chunked.high, chunked.zeros) == (whole.low, whole.high, whole.zeros)
    assert np.array_equal(chunked.positive, whole.positive) and np.array_equal(chunked.negative, whole.negative)


def test_a_tensors_histogram_does_not_depend_on_the_tensors_collected_with_it(shared_dir):
    """onnxruntime fuses a node with its consumer unless the tensor between them is fetched,
    which moves values in the last bit (on ResNet-20 a block output's maximum by 1.4e-6):
    the calibration of a tensor must be the same whichever plan asked for it, or two compiles
    write different uniform 8-bit models from the same data."""
    import onnx

    proto = onnx.load(str(shared_dir / "models" / "cifar10" / "resnet20_cifar10_akamaster.onnx"))
    images = np.load(shared_dir / "data" / "cifar10" / "cifar10_test_jpeg_q75.npz")["x"][932 : 932 + 64]
    batches = [images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0]
    tensor = "/m/layer1/layer1.2/Relu_1_output_0"
    everything = [node.output[0] for node in proto.graph.node if node.op_type in ("Conv", "Relu", "Add")]
    alone = collect_histograms(proto, [tensor], batches)[tensor]
    together = collect_histograms(proto, everything, batches)[tensor]
    assert (alone.low, alone.high) == (together.low, together.high)
    np.testing.assert_array_equal(alone.positive, together.positive)
