"""report.document: the deterministic report document, run info, and the uniform baselines."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from json_schema import load_schemas, validate
from report_documents import RUN, ans_measurement, compile_document, milp_plan, tiny_layers

from quanos_onnx.hwmodel import estimate, load_profile
from quanos_onnx.plan import JoinPlan, LayerPlan, Plan
from quanos_onnx.report import (
    RunClock,
    data_input,
    dumps,
    energy_sections,
    evaluation_report,
    file_input,
    layer_rows,
    output_entry,
    plan_summary,
    report_files,
)
from quanos_onnx.report.document import RunInfo, report_document
from quanos_onnx.threads import usable_cores

SCHEMAS = load_schemas()


def test_layer_rows_take_ans_from_the_plan_before_the_measurement() -> None:
    layers = tiny_layers()
    measurement = ans_measurement(layers).to_json()
    plan = Plan((LayerPlan(layers[0].name, 5, 6, ans_mean=0.5, ans_std=0.1),))
    rows = layer_rows(layers, plan, measurement)
    assert (rows[0]["weight_bits"], rows[0]["act_bits"], rows[0]["ans_mean"]) == (5, 6, 0.5)
    assert rows[1]["weight_bits"] is None and rows[1]["keep_float"] is None
    assert rows[1]["ans_mean"] == measurement["layers"][1]["ans_mean"]
    assert rows[-1]["is_output"] is True


def test_layer_rows_without_plan_or_measurement_have_no_bits_and_no_ans() -> None:
    rows = layer_rows(tiny_layers())
    assert all(row["weight_bits"] is None and row["ans_mean"] is None for row in rows)


def test_baselines_are_the_uniform_models_per_layer_with_the_output_float_like_the_plan() -> None:
    layers = tiny_layers()
    plan = Plan.uniform(layers, 4)  # keeps the classifier float
    energy, baselines = energy_sections(layers, plan, [load_profile("dg")])
    assert [b["bits"] for b in baselines] == [16, 8]
    sixteen = {row["name"]: row for row in baselines[0]["layers"]}
    expected = estimate(layers, Plan.uniform(layers, 16), load_profile("dg"))
    for row in expected.layers:
        assert sixteen[row.name]["energy_pj"] == {"dg": pytest.approx(row.energy_pj)}
        assert sixteen[row.name]["weight_memory_bits"] == row.weight_memory_bits
    assert sixteen["classifier"]["weight_bits"] == 32
    assert list(energy["profiles"]) == ["dg"]


def test_plan_summary_counts_and_weights_by_parameters() -> None:
    layers = tiny_layers()
    plan = Plan.uniform(layers, 6)
    summary = plan_summary(layers, plan)
    assert summary == {
        "method": "uniform-6", "k_init": 6, "k_min": 6, "average_weight_bits": 6.0,
        "quantized_layers": len(layers) - 1, "float_layers": 1,
    }


@pytest.mark.parametrize("operand_bits", [8, None])
def test_plan_summary_says_which_rule_the_quantized_joins_follow(operand_bits: int | None) -> None:
    layers = tiny_layers()
    joins = (JoinPlan("add", 4, ("a", "b"), layers[1].name), JoinPlan("float_add", None, ("c", "d"), None))
    plan = replace(Plan.uniform(layers, 4), joins=joins, join_operand_bits=operand_bits)
    summary = plan_summary(layers, plan)
    assert summary["joins"] == {"quantized": 1, "operand_bits": operand_bits}
    assert "joins" not in plan_summary(layers, Plan.uniform(layers, 4))
    document = report_document("compile", models=[{"path": "m.onnx", "sha256": None}], summary=summary)
    assert validate(document, "urn:quanos:quanos-report", SCHEMAS) == []


def test_plan_summary_of_a_milp_plan_says_how_far_it_moved_from_eqn3() -> None:
    layers = tiny_layers()
    plan = milp_plan(layers)
    summary = plan_summary(layers, plan)
    moved = summary["moved_from_eqn3"]
    assert summary["method"] == "milp"
    assert summary["how"] == plan.details["allocation"]["how"]
    assert (moved["layers"], moved["layers_changed"]) == (len(layers) - 1, 2)
    assert moved["average_weight_bits"] == summary["average_weight_bits"]
    params = {layer.name: layer.params for layer in layers}
    eqn3 = plan.with_layers(
        LayerPlan(e.name, moved["eqn3_bits"][e.name], moved["eqn3_bits"][e.name]) if e.quantized else e for e in plan.layers
    )
    assert moved["eqn3_average_bits"] == pytest.approx(eqn3.average_weight_bits(params), abs=1e-4)
    document = report_document("compile", models=[{"path": "m.onnx", "sha256": None}], summary=summary)
    assert validate(document, "urn:quanos:quanos-report", SCHEMAS) == []


def test_inputs_carry_their_sha256_and_a_folder_has_none(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    assert file_input(model) == {"path": str(model), "sha256": hashlib.sha256(b"model bytes").hexdigest()}
    assert data_input(tmp_path, 30, "0:30") == {"path": str(tmp_path), "sha256": None, "samples": 30, "selection": "0:30"}
    assert output_entry("plan.json", "{}") == {"file": "plan.json", "sha256": hashlib.sha256(b"{}").hexdigest()}


def test_run_clock_records_start_wall_time_and_quoted_command_line() -> None:
    run = RunClock.start(["quanos", "compile", "my model.onnx"]).finish()
    document = run.to_json()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", document["started_at"])
    assert 0 <= document["wall_time_s"] < 5
    assert document["command_line"] == "quanos compile 'my model.onnx'"
    assert document["packages"]["onnx"] is not None
    assert document["threads"] is None and document["usable_cores"] >= 1
    assert validate(document, "urn:quanos:quanos-run", SCHEMAS) == []


def test_run_json_records_the_threads_the_command_set() -> None:
    document = RunClock.start(["quanos", "evaluate", "m.onnx"]).finish(threads=3).to_json()
    assert (document["threads"], document["usable_cores"]) == (3, usable_cores())
    assert validate(document, "urn:quanos:quanos-run", SCHEMAS) == []
    elsewhere = RunInfo(("quanos", "evaluate"), "2026-01-01T00:00:00Z", 1.0, threads=2, usable_cores=16)
    assert elsewhere.to_json()["usable_cores"] == 16  # the run's machine, not the reader's


def test_document_has_every_section_and_validates() -> None:
    document = compile_document()
    assert validate(json.loads(dumps(document)), "urn:quanos:quanos-report", SCHEMAS) == []
    empty = report_document("energy", models=[{"path": "m.onnx", "sha256": None}])
    assert (empty["ans"], empty["energy"], empty["summary"], empty["evaluations"]) == (None, None, None, [])
    assert validate(empty, "urn:quanos:quanos-report", SCHEMAS) == []


def test_dumps_refuses_nan_rather_than_writing_invalid_json() -> None:
    with pytest.raises(ValueError):
        dumps({"ans_mean": float("nan")})


def test_evaluation_report_for_the_evaluate_command(tmp_path: Path) -> None:
    from report_documents import evaluation

    first, second = tmp_path / "float.onnx", tmp_path / "q" / "float.onnx"
    second.parent.mkdir()
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    document = evaluation_report(
        [(file_input(first), evaluation(0.95, 0.9)), (file_input(second), evaluation(0.9, 0.5))],
        data=data_input(tmp_path, 64),
        seed=3,
        settings={"attack": ["fgsm", "pgd"]},
    )
    files = report_files(document, RUN)
    assert sorted(files) == ["report.html", "report.json", "report.md", "run.json"]
    document = json.loads(files["report.json"])
    assert validate(document, "urn:quanos:quanos-report", SCHEMAS) == []
    assert document["command"] == "evaluate" and [m["sha256"] for m in document["inputs"]["models"]] == [
        hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest(),
    ]
    assert 'id="accuracy"' in files["report.html"]
