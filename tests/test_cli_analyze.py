"""`quanos analyze`: the audit report flags a gradient-masked model and clears a smooth one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from harness_models import tiny_inputs
from masked_models import smooth_model, stepped_model
from quanos_onnx.cli import main
from quanos_onnx.model import Runner

AUDIT = ("--samples", "60", "--audit-eps", "0.05,0.1", "--apgd-steps", "5", "--json")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("analyze")
    paths = {"smooth": folder / "smooth.onnx", "stepped": folder / "stepped.onnx", "data": folder / "data.npz"}
    onnx.save(smooth_model(), paths["smooth"])
    onnx.save(stepped_model(), paths["stepped"])
    x = tiny_inputs(60)
    # labels: the stepped model's own predictions, so every sample starts correctly classified
    labels = Runner(stepped_model()).run(x)[0].argmax(1)
    np.savez(paths["data"], x=x, y=labels)
    return paths


def _analyze(model: Path, data: Path, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["analyze", str(model), "--data", str(data), *AUDIT, *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_audit_of_a_hard_step_model_says_robustness_is_overestimated(files):
    document = _analyze(files["stepped"], files["data"])
    audit = document["audit"]
    assert audit["masking"]["verdict"] == "robustness likely overestimated"
    assert audit["verdict"].startswith("stepped.onnx (float) classifies 100.0%")
    assert "Robustness likely overestimated" in audit["verdict"]
    assert "input gradients are non-zero" in audit["verdict"]
    methods = {attack["method"] for attack in audit["robustness"]["attacks"]}
    assert methods == {"fgsm", "pgd", "apgd-ce", "apgd-dlr"}  # a float model has no transfer source
    assert [row["eps"] for row in audit["robustness"]["worst_case"]] == [0.05, 0.1]
    assert audit["eqn3"]["quantized_layers"] == 2
    # the documents' FGSM/PGD rows are the audit's
    assert [a["method"] for a in document["evaluation"]["attacks"]] == ["fgsm", "pgd", "fgsm", "pgd"]


def test_the_audit_of_a_smooth_model_finds_no_masking(files):
    audit = _analyze(files["smooth"], files["data"])["audit"]
    flagged = [check["check"] for check in audit["masking"]["checks"] if check["flagged"]]
    assert flagged == []
    assert "None of the 6 gradient-masking checks" in audit["verdict"]


def test_the_summary_starts_with_the_verdict_and_writes_the_report(files, tmp_path):
    result = CliRunner().invoke(
        main, ["analyze", str(files["stepped"]), "--data", str(files["data"]), *AUDIT[:-1], "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("stepped.onnx (float) classifies")
    assert "gradient-masking checks: robustness likely overestimated" in result.stdout
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "**verdict, stepped.onnx**" in markdown and "## Gradient-masking checks, stepped.onnx" in markdown
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="robustness-0"' in html and 'id="masking-0"' in html


def test_an_unknown_audit_attack_is_a_usage_error(files):
    result = CliRunner().invoke(
        main, ["analyze", str(files["smooth"]), "--data", str(files["data"]), "--audit-attacks", "fgsm,cw"]
    )
    assert result.exit_code == 2 and "'cw' is not one of" in result.output


def test_no_tolerance_samples_is_a_usage_error(files):
    result = CliRunner().invoke(
        main, ["analyze", str(files["smooth"]), "--data", str(files["data"]), "--tolerance-samples", "0"]
    )
    assert result.exit_code == 2 and "--tolerance-samples 0 must be a whole number of at least 1" in result.output


@pytest.fixture(scope="module")
def two_models(files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`quanos analyze smooth.onnx stepped.onnx -o OUT` in this process: OUT."""
    out = tmp_path_factory.mktemp("two") / "out"
    result = CliRunner().invoke(
        main, ["analyze", str(files["smooth"]), str(files["stepped"]), "--data", str(files["data"]), *AUDIT[:-1], "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"== {files['smooth']} (smooth/)")
    return out


def test_several_models_each_get_the_folder_a_single_run_would_write(files, two_models, tmp_path):
    names = ["analysis.json", "report.html", "report.json", "report.md", "run.json"]
    assert sorted(path.name for path in two_models.iterdir()) == ["smooth", "stepped"]
    assert all(sorted(path.name for path in (two_models / folder).iterdir()) == names for folder in ("smooth", "stepped"))
    single = CliRunner().invoke(
        main, ["analyze", str(files["stepped"]), "--data", str(files["data"]), *AUDIT[:-1], "-o", str(tmp_path / "one")]
    )
    assert single.exit_code == 0, single.output
    for name in ("analysis.json", "report.json"):
        assert (two_models / "stepped" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    listed = CliRunner().invoke(main, ["analyze", str(files["smooth"]), str(files["stepped"]), "--data", str(files["data"]), *AUDIT])
    assert [document["model"] for document in json.loads(listed.stdout)] == [str(files["smooth"]), str(files["stepped"])]


def test_several_models_analysed_as_ray_jobs_give_the_same_files(files, two_models, tmp_path, ray_address, quanos_in_child):
    out = tmp_path / "ray"
    result = quanos_in_child(
        "analyze", files["smooth"], files["stepped"], "--data", files["data"], *AUDIT[:-1], "--ray", ray_address, "-o", out,
        cwd=tmp_path, ray=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for folder in ("smooth", "stepped"):
        for name in ("analysis.json", "report.json"):  # report.md and run.json also say when and how it ran
            assert (out / folder / name).read_bytes() == (two_models / folder / name).read_bytes(), (folder, name)


def test_no_figures_writes_the_report_with_its_tables_alone(files, tmp_path):
    result = CliRunner().invoke(
        main, ["analyze", str(files["smooth"]), "--data", str(files["data"]), *AUDIT[:-1], "--no-figures", "-o", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report.html").read_text()
    assert "<img" not in html and "Figures left out (--no-figures)" in html
    assert 'id="robustness-0"' in html and 'id="layers"' in html
