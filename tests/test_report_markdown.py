"""report.md (and the content it shares with the HTML page): the numbers, as tables."""

from __future__ import annotations

from report_documents import RUN, analysis_document, compile_document, milp_plan, tiny_layers

from quanos_onnx.report import plan_summary, render_markdown


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


def test_the_report_says_which_method_ran() -> None:
    text = render_markdown(compile_document(), RUN)
    assert "- **method**: the paper's Eqn 3 (--method eqn3), k_init 8, k_min 2" in text
    assert "moved from Eqn 3" not in text and "Eqn 3 bits" not in text


def test_a_milp_report_says_how_far_the_plan_moved_from_eqn3() -> None:
    layers = tiny_layers()
    plan = milp_plan(layers)
    document = {**compile_document(layers), "summary": plan_summary(layers, plan)}
    text = render_markdown(document, RUN)
    moved = document["summary"]["moved_from_eqn3"]
    assert "- **method**: measured sensitivity + integer program (milp, the default): smallest average-bits" in text
    assert (
        f"- **moved from Eqn 3**: 2 of {len(layers) - 1} quantized layers have other bits than Eqn 3 gives on the same "
        f"ANS; average weight bits {moved['average_weight_bits']:.2f} (this plan) against "
        f"{moved['eqn3_average_bits']:.2f} (Eqn 3)"
    ) in text
    header = next(line for line in text.splitlines() if line.startswith("| layer |"))
    assert header.endswith("| Eqn 3 bits |")
    first = next(line for line in text.splitlines() if line.startswith(f"| {layers[0].name} |"))
    assert first.endswith(f"| {moved['eqn3_bits'][layers[0].name]} |")
    last = next(line for line in text.splitlines() if line.startswith(f"| {layers[-1].name} |"))
    assert last.endswith("| float |")


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
