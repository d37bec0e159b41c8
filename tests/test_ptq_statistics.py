"""ptq/statistics.py: one calibration pass shared by many plans gives exactly the models of fresh passes."""

from __future__ import annotations

import pytest

from quanos_onnx.layers import list_layers
from quanos_onnx.model import normalize
from quanos_onnx.plan import Plan
from quanos_onnx.ptq import PtqSettings
from quanos_onnx.ptq import statistics as statistics_module
from quanos_onnx.ptq.statistics import CalibrationStatistics
from quanos_onnx.quantize import quantize

from tiny_models import random_inputs, resnet_style

SETTINGS = (PtqSettings(), PtqSettings(act_range="mse", equalize=True))


@pytest.fixture(scope="module")
def resnet():
    model = normalize(resnet_style())
    return model, list_layers(model), [random_inputs(model, 16, seed) for seed in range(2)]


def _count_collections(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = statistics_module.collect_histograms

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(statistics_module, "collect_histograms", counting)
    return calls


@pytest.mark.parametrize("settings", SETTINGS)
def test_shared_statistics_write_the_same_models_as_fresh_calibrations(resnet, settings):
    """8 bits first (min/max: extremes only), then 3 and 5 bits (entropy or mse: counted histograms)."""
    model, layers, calibration = resnet
    statistics = CalibrationStatistics(model, calibration, equalized=settings.equalize)
    for bits in (8, 3, 5):
        plan = Plan.uniform(layers, bits)
        shared = quantize(model, plan, calibration, layers=layers, ptq=settings, statistics=statistics).model
        fresh = quantize(model, plan, calibration, layers=layers, ptq=settings).model
        assert shared.SerializeToString(deterministic=True) == fresh.SerializeToString(deterministic=True), bits


def test_a_second_plan_reads_no_calibration_data_again(resnet, monkeypatch):
    model, layers, calibration = resnet
    statistics = CalibrationStatistics(model, calibration)
    calls = _count_collections(monkeypatch)
    quantize(model, Plan.uniform(layers, 4), calibration, layers=layers, statistics=statistics)
    assert len(calls) == 1
    quantize(model, Plan.uniform(layers, 3), calibration, layers=layers, statistics=statistics)
    quantize(model, Plan.uniform(layers, 5, keep_output_float=False), calibration, layers=layers, statistics=statistics)
    # only the tensors around the output layer, which the first plans left float, are new
    assert len(calls) == 2 and calls[1] < calls[0]


def test_a_min_max_histogram_is_counted_again_when_a_range_search_needs_it(resnet, monkeypatch):
    model, layers, calibration = resnet
    statistics = CalibrationStatistics(model, calibration)
    calls = _count_collections(monkeypatch)
    quantize(model, Plan.uniform(layers, 8), calibration, layers=layers, statistics=statistics)
    quantize(model, Plan.uniform(layers, 8), calibration, layers=layers, statistics=statistics)
    assert len(calls) == 1
    quantize(model, Plan.uniform(layers, 4), calibration, layers=layers, statistics=statistics)
    assert len(calls) == 2


def test_statistics_of_other_data_are_refused(resnet):
    model, layers, calibration = resnet
    statistics = CalibrationStatistics(model, calibration)
    other = [batch.copy() for batch in calibration]
    with pytest.raises(ValueError, match="another model, data or equalization"):
        quantize(model, Plan.uniform(layers, 4), other, layers=layers, statistics=statistics)
    with pytest.raises(ValueError, match="another model, data or equalization"):
        quantize(model, Plan.uniform(layers, 4), calibration, layers=layers, ptq=PtqSettings(equalize=True), statistics=statistics)


def test_each_layers_clipped_grid_is_searched_once_per_bit_width(resnet, monkeypatch):
    model, layers, calibration = resnet
    statistics = CalibrationStatistics(model, calibration)
    searched: list[int] = []
    original = statistics_module.clipped_grid

    def counting(weight, bits, *args, **kwargs):
        searched.append(bits)
        return original(weight, bits, *args, **kwargs)

    monkeypatch.setattr(statistics_module, "clipped_grid", counting)
    quantized = len(Plan.uniform(layers, 4).by_name()) - 1  # the classifier stays float
    quantize(model, Plan.uniform(layers, 4), calibration, layers=layers, statistics=statistics)
    quantize(model, Plan.uniform(layers, 4), calibration, layers=layers, statistics=statistics)
    assert searched == [4] * quantized
    quantize(model, Plan.uniform(layers, 6), calibration, layers=layers, statistics=statistics)
    assert searched == [4] * quantized + [6] * quantized
