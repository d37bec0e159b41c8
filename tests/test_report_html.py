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
