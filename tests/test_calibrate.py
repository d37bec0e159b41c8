"""passes/calibrate.py: activation ranges measured in onnxruntime, streamed over batches."""

from __future__ import annotations

import numpy as np
import pytest

from quanos_onnx.errors import DataError, UsageError
from quanos_onnx.model import Runner, normalize
from quanos_onnx.passes.calibrate import collect_ranges

from tiny_models import random_inputs, vgg_chain

TENSORS = ["relu1_out", "conv1_out", "maxpool3_out"]


@pytest.fixture(scope="module")
def model():
    return normalize(vgg_chain())


def test_minmax_over_streamed_batches_equals_the_whole_data(model):
    x = random_inputs(model, 40, seed=1) * 2.0 - 0.5
    batches = (x[i : i + 16] for i in range(0, len(x), 16))
    ranges = collect_ranges(model, TENSORS, batches)
    values = Runner(model, TENSORS).run(x, TENSORS)
    for name, value in zip(TENSORS, values):
        assert ranges[name].low == pytest.approx(float(value.min()), abs=1e-6)
        assert ranges[name].high == pytest.approx(float(value.max()), abs=1e-6)
    assert ranges["relu1_out"].low == 0.0
    assert ranges["conv1_out"].low < 0.0


def test_percentile_clips_outliers_inside_the_minmax_range(model):
    x = random_inputs(model, 32, seed=2)
    minmax = collect_ranges(model, TENSORS, [x])
    clipped = collect_ranges(model, TENSORS, [x], method="percentile", percentile=99.0)
    for name in TENSORS:
        assert minmax[name].low <= clipped[name].low
        assert clipped[name].high < minmax[name].high


def test_no_tensors_needs_no_data(model):
    assert collect_ranges(model, [], []) == {}


def test_empty_calibration_data_is_a_data_error(model):
    with pytest.raises(DataError, match="calibration data is empty"):
        collect_ranges(model, TENSORS, [])


@pytest.mark.parametrize(
    ("options", "culprit"),
    [({"method": "mean"}, "calibration"), ({"method": "percentile", "percentile": 40.0}, "percentile")],
)
def test_bad_options_are_usage_errors_naming_the_option(model, options, culprit):
    with pytest.raises(UsageError, match=culprit):
        collect_ranges(model, TENSORS, [random_inputs(model, 2)], **options)
