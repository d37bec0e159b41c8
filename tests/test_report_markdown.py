"""report.md (and the content it shares with the HTML page): the numbers, as tables."""

from __future__ import annotations

from report_documents import RUN, analysis_document, compile_document

from quanos_onnx.report import render_markdown


def test_headline_figures_and_tables() -> None:
    document = compile_document()
    text = render_markdown(document, RUN)
    summary = document["summary"]
    assert text.startswith("# tiny.onnx: compile report\n")
    assert f"- **average weight bits**: {summary['average_weight_bits']:.2f}" in text
    for heading in ("## Layers", "## Energy and memory in total", "## Outputs", "## Provenance"):
        assert heading in text
    standard = document["energy"]["profiles"]["standard"]
    ratio = standard["vs_uniform"][0]["energy_ratio"]
    assert f"({ratio:.2f}x)" in text
    assert "| classifier | Gemm |" in text and "| float | float |" in text


def test_analysis_lists_accuracy_per_attack_and_eps() -> None:
    text = render_markdown(analysis_document(), RUN)
    assert "| tiny.onnx | clean | - | 95.0% | - |" in text
    assert "| tiny.onnx | PGD-7 | 0.03137 |" in text
    assert "most sensitive layer" in text


def test_cells_cannot_break_the_table() -> None:
    document = compile_document()
    document["layers"][0]["name"] = "odd|name\nwith newline"
    text = render_markdown(document, RUN)
    assert "| odd\\|name with newline |" in text


def test_models_sharing_a_file_name_are_told_apart_by_their_folders() -> None:
    from quanos_onnx.report.content import model_labels

    assert model_labels(["a/float.onnx", "b/model.quanos.onnx"]) == ["float.onnx", "model.quanos.onnx"]
    assert model_labels(["runs/q8/model.quanos.onnx", "runs/q4/model.quanos.onnx", "float.onnx"]) == [
        "q8/model.quanos.onnx", "q4/model.quanos.onnx", "float.onnx",
    ]
