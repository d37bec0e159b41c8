"""Every command's --json and every JSON file a run writes match the schemas of docs/json.md.

The commands run once on a tiny model (module fixture); each document is then checked
against its schema with the jsonschema package (json_schema.py), the schemas as shipped in
quanos_onnx/schemas, which must be the ones docs/json.md documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from json_schema import load_schemas, validate
from tiny_models import vgg_chain

from quanos_onnx.cli import main
from quanos_onnx.schemas import schemas_in_page

SCHEMAS = load_schemas()
DOCS_JSON = Path(__file__).resolve().parents[1] / "docs" / "json.md"


def run_json(*args: str) -> Any:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Any]]:
    """(schema id, document) for every document the CLI prints or writes, by a test name."""
    tmp = tmp_path_factory.mktemp("json")
    model, data = tmp / "tiny.onnx", tmp / "data.npz"
    onnx.save(vgg_chain(channels=(4, 8)), model)
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((12, 3, 8, 8), dtype=np.float32), y=np.arange(12) % 10)
    common = ("--data", str(data), "--samples", "8", "--batch-size", "4")
    unguarded = ("--eval-samples", "4", "--max-accuracy-drop", "none")  # a random model: verified, not judged
    found: dict[str, tuple[str, Any]] = {
        "layers": ("urn:quanos:quanos-layers", run_json("layers", str(model))),
        "compile-bits": ("urn:quanos:quanos-compile", run_json("compile", str(model), "--data", str(data), "--bits", "6", *unguarded, "-o", str(tmp / "bits"))),
        "compile-quanos": ("urn:quanos:quanos-compile", run_json("compile", str(model), *common, "--eval-data", str(data), *unguarded, "-o", str(tmp / "quanos"))),
        "analyze": ("urn:quanos:quanos-analysis", run_json("analyze", str(model), *common, "--audit-eps", "8/255", "--apgd-steps", "3", "-o", str(tmp / "analysis"))),
        "layers-lipschitz": ("urn:quanos:quanos-layers", run_json("layers", str(model), "--lipschitz")),
        "analyze-lipschitz": ("urn:quanos:quanos-analysis", run_json("analyze", str(model), *common, "--audit-eps", "8/255", "--audit-attacks", "fgsm", "--lipschitz", "--no-tolerance", "-o", str(tmp / "analysis-lipschitz"))),
        "energy": ("urn:quanos:quanos-energy", run_json("energy", str(model), "--plan", str(tmp / "quanos" / "plan.json"), "--hw", "all", "-o", str(tmp / "energy"))),
        "export-qonnx": ("urn:quanos:quanos-export", run_json("export", str(tmp / "quanos" / "model.quanos.onnx"), "--to", "qonnx", "-o", str(tmp / "q.onnx"))),
        "export-ort": ("urn:quanos:quanos-export", run_json("export", str(tmp / "bits" / "model.quanos.onnx"), "--to", "ort-overrides", "-o", str(tmp / "o.json"))),
        "evaluate": ("urn:quanos:quanos-evaluation", run_json("evaluate", str(model), str(tmp / "bits" / "model.quanos.onnx"), *common, "--eps", "0.1", "--pgd-steps", "1", "-o", str(tmp / "evaluation"))),
        "evaluate-audit": ("urn:quanos:quanos-evaluation", run_json("evaluate", str(model), str(tmp / "bits" / "model.quanos.onnx"), *common, "--attack", "fgsm,apgd-dlr,transfer", "--eps", "0.1", "--apgd-steps", "3", "-o", str(tmp / "audit"))),
        "finetune": ("urn:quanos:quanos-finetune", run_json("finetune", str(tmp / "bits" / "model.quanos.onnx"), "--data", str(data), "--val-split", "0.25", "--epochs", "1", "--batch-size", "4", "-o", str(tmp / "tuned.onnx"))),
    }
    files = {
        "plan-bits": ("urn:quanos:quanos-plan", "bits/plan.json"),
        "plan-quanos": ("urn:quanos:quanos-plan", "quanos/plan.json"),
        "analysis-file": ("urn:quanos:quanos-analysis", "analysis/analysis.json"),
        "energy-file": ("urn:quanos:quanos-energy", "energy/energy.json"),
        "evaluation-file": ("urn:quanos:quanos-evaluation", "evaluation/evaluation.json"),
    }
    for name, (schema, relative) in files.items():
        found[name] = (schema, json.loads((tmp / relative).read_text()))
    for run in ("bits", "quanos", "analysis", "energy", "evaluation", "audit"):
        found[f"report-{run}"] = ("urn:quanos:quanos-report", json.loads((tmp / run / "report.json").read_text()))
        found[f"run-{run}"] = ("urn:quanos:quanos-run", json.loads((tmp / run / "run.json").read_text()))
    found["report-analysis-lipschitz"] = ("urn:quanos:quanos-report", json.loads((tmp / "analysis-lipschitz" / "report.json").read_text()))
    return found


DOCUMENT_NAMES = [
    "layers", "layers-lipschitz", "compile-bits", "compile-quanos", "analyze", "analyze-lipschitz", "report-analysis-lipschitz", "energy", "export-qonnx", "export-ort",
    "evaluate", "evaluate-audit", "finetune", "plan-bits", "plan-quanos", "analysis-file", "energy-file", "evaluation-file",
    *(f"{kind}-{run}" for run in ("bits", "quanos", "analysis", "energy", "evaluation", "audit") for kind in ("report", "run")),
]


@pytest.mark.parametrize("name", DOCUMENT_NAMES)
def test_document_matches_its_documented_schema(name: str, documents: dict[str, tuple[str, Any]]) -> None:
    schema_id, document = documents[name]
    assert validate(document, schema_id, SCHEMAS) == []


def test_reports_carry_the_sections_their_command_produces(documents: dict[str, tuple[str, Any]]) -> None:
    quanos = documents["report-quanos"][1]
    assert quanos["command"] == "compile" and quanos["ans"] is not None and quanos["energy"] is not None
    assert [entry["file"] for entry in quanos["outputs"]] == ["model.quanos.onnx", "plan.json"]
    assert documents["report-bits"][1]["ans"] is None
    analysis = documents["report-analysis"][1]
    assert analysis["summary"] is None and len(analysis["evaluations"]) == 1
    assert [audit["kind"] for audit in analysis["audits"]] == ["float"]
    audited = documents["report-audit"][1]
    assert [audit["kind"] for audit in audited["audits"]] == ["float", "compiled (uniform-6)"]
    transfer = [a for a in audited["audits"][1]["robustness"]["attacks"] if a["method"] == "transfer"]
    assert len(transfer) == 1 and not any(a["method"] == "transfer" for a in audited["audits"][0]["robustness"]["attacks"])
    energy = documents["report-energy"][1]
    assert list(energy["energy"]["profiles"]) == ["standard", "dg", "dvafs"]
    assert energy["inputs"]["plan"]["sha256"] is not None


def test_every_command_has_json() -> None:
    for name, command in main.commands.items():
        flags = {flag for parameter in command.params if isinstance(parameter, click.Option) for flag in parameter.opts}
        assert "--json" in flags, name


def test_every_documented_format_is_checked() -> None:
    documented = {schema_id for schema_id in SCHEMAS if schema_id.startswith("urn:quanos:quanos-")}
    checked = {
        "urn:quanos:quanos-layers", "urn:quanos:quanos-compile", "urn:quanos:quanos-analysis",
        "urn:quanos:quanos-energy", "urn:quanos:quanos-export", "urn:quanos:quanos-plan",
        "urn:quanos:quanos-report", "urn:quanos:quanos-run", "urn:quanos:quanos-evaluation",
        "urn:quanos:quanos-finetune",
    }
    assert documented == checked


def test_the_validator_catches_a_broken_document(documents: dict[str, tuple[str, Any]]) -> None:
    schema_id, document = documents["report-quanos"]
    broken = json.loads(json.dumps(document))
    del broken["seed"]
    broken["layers"][0]["weight_bits"] = "eight"
    broken["surprise"] = 1
    errors = validate(broken, schema_id, SCHEMAS)
    assert "$: 'seed' is a required property" in errors
    assert any(error.startswith("$: Additional properties are not allowed ('surprise'") for error in errors)
    assert any(error.startswith("$.layers[0].weight_bits: 'eight' is not of type") for error in errors)


def test_the_shipped_schemas_are_the_documented_ones_and_valid() -> None:
    """After editing docs/json.md: `python -m quanos_onnx.schemas docs/json.md`."""
    assert SCHEMAS == schemas_in_page(DOCS_JSON.read_text())
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_analyze_puts_each_layers_tolerance_beside_ans(documents: dict[str, tuple[str, Any]]) -> None:
    _, analysis = documents["analyze"]
    _, report = documents["report-analysis"]
    tolerance = {row["layer"]: row for row in analysis["tolerance"]["layers"]}
    quantized = {row["name"] for row in report["layers"] if not row["is_output"]}
    assert set(tolerance) == quantized
    assert analysis["tolerance"]["bits"] == [2, 3, 4, 5, 6, 7, 8]
    for row in report["layers"]:
        entry = tolerance.get(row["name"])
        assert row["tolerance_bits"] == (None if entry is None else entry["tolerance_bits"])
        assert row["tolerance_kl"] == (None if entry is None else entry["kl"])
    sentence = analysis["audit"]["tolerance"]
    assert sentence.startswith("quantization tolerance") and sentence[1:] in analysis["audit"]["verdict"]
    _, skipped = documents["analyze-lipschitz"]
    assert skipped["tolerance"] is None and skipped["audit"]["tolerance"] is None


def test_analyze_lipschitz_puts_bound_and_local_ratio_beside_ans(documents: dict[str, tuple[str, Any]]) -> None:
    _, analysis = documents["analyze-lipschitz"]
    _, report = documents["report-analysis-lipschitz"]
    bounds = {row["layer"]: row["bound"] for row in analysis["lipschitz"]["bounds"]}
    local = {row["layer"]: row for row in analysis["lipschitz"]["local"]["layers"]}
    assert set(bounds) == {row["layer"] for row in analysis["ans"]["layers"]}
    for row in report["layers"]:
        assert row["lipschitz_bound"] == bounds[row["name"]]
        assert row["lipschitz_local"] == local[row["name"]]["local_mean"]
        assert local[row["name"]]["local_max"] <= bounds[row["name"]] * (1 + 1e-6)
