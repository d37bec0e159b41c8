"""report.plots: which figures a document gets, and that each is a real, stable PNG."""

from __future__ import annotations

import io

from PIL import Image
from report_documents import analysis_document, compile_document, evaluation, tiny_layers

from quanos_onnx.report import report_document
from quanos_onnx.report.plots import MAX_FIGURE_WIDTH, DPI, accuracy_plot, figures


def size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        image.verify()
        return image.size


def test_a_compile_document_gets_sensitivity_bits_and_cost_figures() -> None:
    plots = figures(compile_document())
    assert [plot.key for plot in plots] == ["ans", "bits", "layer-cost", "totals"]
    for plot in plots:
        width, height = size(plot.png)
        assert 300 < width <= MAX_FIGURE_WIDTH * DPI and 200 < height < 2000
        assert plot.title and plot.caption


def test_an_analysis_gets_sensitivity_and_accuracy_but_no_bits() -> None:
    assert [plot.key for plot in figures(analysis_document())] == ["ans", "accuracy"]


def test_figures_are_byte_identical_for_the_same_document() -> None:
    document = compile_document()
    assert [p.png for p in figures(document)] == [p.png for p in figures(document)]


def test_many_layers_stay_within_the_width_limit() -> None:
    layers = tiny_layers(channels=tuple([4] * 30))
    for plot in figures(compile_document(layers)):
        assert size(plot.png)[0] <= MAX_FIGURE_WIDTH * DPI


def test_accuracy_curves_have_a_panel_per_method_and_a_line_per_model() -> None:
    entries = [
        {"model": {"path": f"run{i}/model.onnx", "sha256": None}, "evaluation": evaluation(0.9, 0.3 * i).to_json()}
        for i in range(1, 4)
    ]
    plot = accuracy_plot(entries)
    assert "64 samples" in plot.caption
    width, height = size(plot.png)
    assert width > height  # two panels side by side: FGSM and PGD-7


def test_an_all_float_plan_and_missing_std_still_draw() -> None:
    document = compile_document()
    for row in document["layers"]:
        row.update(weight_bits=None, act_bits=None, keep_float=True, ans_std=None)
    keys = [plot.key for plot in figures(document)]
    assert keys == ["ans", "bits", "layer-cost", "totals"]


def test_a_document_without_data_for_figures_gets_none() -> None:
    document = report_document("evaluate", models=[{"path": "m.onnx", "sha256": None}])
    assert figures(document) == []
