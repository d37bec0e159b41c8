"""report.html: one self-contained page with every figure and table of the document."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image
from report_documents import RUN, analysis_document, compile_document

from quanos_onnx.report import render_html


def test_the_page_is_self_contained() -> None:
    page = render_html(compile_document(), RUN)
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["'](https?:|//|file:)""", page)
    assert "default-src 'none'; img-src data:" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4 == page.count("<img ")
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.verify()


def test_sections_follow_the_reading_order_and_the_nav_links_them() -> None:
    page = render_html(compile_document(), RUN)
    sections = re.findall(r'<section id="([a-z-]+)">', page)
    assert sections == ["ans", "bits", "layers", "layer-cost", "totals", "outputs", "provenance"]
    for key in sections:
        assert f'href="#{key}"' in page


def test_figures_and_tables_of_an_analysis() -> None:
    page = render_html(analysis_document(), RUN)
    assert re.findall(r'<section id="([a-z-]+)">', page) == ["ans", "layers", "accuracy", "provenance"]
    assert "PGD-7" in page and "95.0%" in page


def test_provenance_shows_the_run() -> None:
    page = render_html(compile_document(), RUN)
    provenance = page[page.index('<section id="provenance">'):]
    for text in ("quanos compile tiny.onnx -o out dir", "12.3 s", "2024-05-06T07:08:09Z", "ab" * 32, "data.npz (64 samples"):
        assert text in provenance


def test_names_from_the_model_are_escaped() -> None:
    document = compile_document()
    document["layers"][0]["name"] = "<script>alert(1)</script>"
    page = render_html(document, RUN)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_layers_table_of_an_analysis_shows_each_layers_tolerance_beside_ans() -> None:
    from report_documents import ans_measurement, evaluation, tiny_layers

    from quanos_onnx.harness.tolerance import LayerTolerance, PlanCheck, ToleranceTable
    from quanos_onnx.report import layer_rows, report_document

    layers = tiny_layers()
    bits = (2, 4, 8)
    quantized = [layer for layer in layers if not layer.is_output]
    rows = tuple(
        LayerTolerance(layer.name, (1.5, 0.25, 0.0125), (0.5, 0.995, 1.0), None if index == 0 else 4, 8 - index)
        for index, layer in enumerate(quantized)
    )
    tolerance = ToleranceTable(bits, 100, 0.99, rows, PlanCheck(5.0, 0.97, 0.02), PlanCheck(5.0, 0.98, 0.01), 1.0).to_json()
    measurement = ans_measurement(layers)
    model = {"path": "models/tiny.onnx", "sha256": "ab" * 32}
    document = report_document(
        "analyze", models=[model], data={"path": "data.npz", "sha256": "cd" * 32, "samples": 64, "selection": "all"},
        seed=0, layers=layer_rows(layers, None, measurement.to_json(), None, tolerance), ans=measurement.to_json(),
        evaluations=[{"model": model, "evaluation": evaluation(0.95, 0.9).to_json()}],
    )
    page = render_html(document, RUN)
    table = page[page.index('<section id="layers">'):page.index('<section id="accuracy">')]
    assert "tolerance bits" in table and "allocator bits" in table and "KL alone at 2 / 4 / 8 bits" in table
    assert "&gt;8" in table  # the first layer keeps fewer than 99% even at 8 bits
    assert "1.5 / 0.25 / 0.013" in table
    assert table.count("<tr>") == len(layers) + 1
