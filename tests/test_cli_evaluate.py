"""`quanos evaluate`: float and compiled models side by side under one attack grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from finetune_task import trained_task
from harness_models import tiny_onnx, tiny_weights
from tiny_models import dynamic_size_classifier
from quanos_onnx.cli import main
from quanos_onnx.harness.attacks import Attack
from quanos_onnx.harness.evaluate import evaluate
from quanos_onnx.layers import list_layers
from quanos_onnx.model import load_model
from quanos_onnx.commands.evaluate import EvaluateOptions
from quanos_onnx.quantize import quantize
from quanos_onnx.plan import Plan

SAMPLES = 96


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model, train, val = trained_task()
    folder = tmp_path_factory.mktemp("evaluate")
    compiled = quantize(model, Plan.uniform(list_layers(model), 2, keep_output_float=False), [train.x[:256]]).model
    paths = {"float": folder / "float.onnx", "compiled": folder / "two_bit.onnx", "data": folder / "val.npz"}
    onnx.save(model, paths["float"])
    onnx.save(compiled, paths["compiled"])
    np.savez(paths["data"], x=np.array(val.x[:SAMPLES]), y=val.y[:SAMPLES])
    return paths


def _run(*arguments: object) -> object:
    return CliRunner().invoke(main, ["evaluate", *map(str, arguments)])


def test_one_table_of_clean_and_adversarial_accuracy_per_model_and_eps(files, tmp_path):
    result = _run(files["float"], files["compiled"], "--data", files["data"], "--eps", "0.05,0.1", "--pgd-steps", 3, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["model", "bits", "attack", "eps", "accuracy", "adversarial_loss"]
    rows = [line.split() for line in lines[3:13]]
    assert [(row[0], row[2], row[3]) for row in rows[:5]] == [
        ("float.onnx", "clean", "-"), ("float.onnx", "fgsm", "0.05"), ("float.onnx", "fgsm", "0.1"),
        ("float.onnx", "pgd-3", "0.05"), ("float.onnx", "pgd-3", "0.1"),
    ]
    assert rows[5][:3] == ["two_bit.onnx", "2", "clean"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "evaluation.json", "report.html", "report.json", "report.md", "run.json"
    ]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["command"] == "evaluate" and len(report["evaluations"]) == 2
    document = json.loads((tmp_path / "evaluation.json").read_text())
    assert document["format"] == "quanos-evaluation" and document["data"]["samples"] == SAMPLES
    assert [entry["kind"] for entry in document["models"]] == ["float", "compiled (uniform-2)"]


def test_accuracies_are_those_of_the_deployed_models(files):
    result = _run(files["float"], files["compiled"], "--data", files["data"], "--attack", "pgd", "--eps", "0.08", "--pgd-steps", 4, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    data = np.load(files["data"])
    for entry, path in zip(document["models"], (files["float"], files["compiled"])):
        expected = evaluate(load_model(path), [(data["x"][:64], data["y"][:64]), (data["x"][64:], data["y"][64:])], [Attack.pgd(0.08, steps=4)])
        got = entry["evaluation"]
        assert got["clean_accuracy"] == pytest.approx(expected.clean_accuracy)
        assert got["attacks"][0]["accuracy"] == pytest.approx(expected.attacks[0].accuracy)
        assert got["attacks"][0]["adversarial_loss"] == pytest.approx(got["clean_accuracy"] - got["attacks"][0]["accuracy"])
    clean = [entry["evaluation"]["clean_accuracy"] for entry in document["models"]]
    assert clean[1] < clean[0]


def test_paper_grid():
    attacks = EvaluateOptions(paper=True).attacks()
    assert [(a.method, round(a.eps, 4), a.steps) for a in attacks] == [
        *[("fgsm", eps, 1) for eps in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)],
        *[("pgd", round(eps / 255, 4), 7) for eps in (8, 16, 32)],
    ]
    assert all(a.step_size == pytest.approx(2 / 255) for a in attacks[6:])
    assert len(EvaluateOptions(paper=True, attack=("pgd",)).attacks()) == 3


def test_refusals(files, tmp_path):
    no_eps = _run(files["float"], "--data", files["data"])
    assert no_eps.exit_code == 2 and "--eps is required" in no_eps.output
    both = _run(files["float"], "--data", files["data"], "--paper", "--eps", "0.1")
    assert both.exit_code == 2 and "--paper" in both.output
    unknown = _run(files["float"], "--data", files["data"], "--attack", "cw", "--eps", "0.1")
    assert unknown.exit_code == 2 and "'cw'" in unknown.output
    other = tmp_path / "other.onnx"
    onnx.save(tiny_onnx(tiny_weights()), other)
    mismatch = _run(files["float"], other, "--data", files["data"], "--eps", "0.1")
    assert mismatch.exit_code == 1 and "other.onnx: input shape" in mismatch.output


def test_apgd_and_transfer_attacks_run_the_audit_with_a_verdict_per_model(files, tmp_path):
    result = _run(
        files["float"], files["compiled"], "--data", files["data"], "--samples", 48, "--attack", "fgsm,apgd-ce,transfer",
        "--eps", "0.05", "--apgd-steps", 5, "--json",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    float_audit, compiled_audit = (entry["audit"] for entry in document["models"])
    assert [a["method"] for a in float_audit["robustness"]["attacks"]] == ["fgsm", "apgd-ce"]
    assert [a["method"] for a in compiled_audit["robustness"]["attacks"]] == ["fgsm", "apgd-ce", "transfer"]
    assert compiled_audit["eqn3"] is None and compiled_audit["kind"].startswith("compiled")
    worst = compiled_audit["robustness"]["worst_case"][0]
    each = [a["accuracy"] for a in compiled_audit["robustness"]["attacks"]]
    assert worst["accuracy"] <= min(each)
    assert [a["method"] for a in document["models"][0]["evaluation"]["attacks"]] == ["fgsm"]


def test_the_paper_grid_does_not_mix_with_the_audit(files):
    result = _run(files["float"], "--data", files["data"], "--paper", "--attack", "fgsm,apgd-ce")
    assert result.exit_code == 2 and "--paper" in result.output


def test_attack_none_measures_clean_accuracy_alone(files, tmp_path):
    result = _run(files["float"], files["compiled"], "--data", files["data"], "--attack", "none", "--json", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["attacks"] == []
    data = np.load(files["data"])
    for entry, path in zip(document["models"], (files["float"], files["compiled"])):
        expected = evaluate(load_model(path), [(data["x"], data["y"])], [])
        assert entry["evaluation"]["attacks"] == []
        assert entry["evaluation"]["clean_accuracy"] == pytest.approx(expected.clean_accuracy)
    assert json.loads((tmp_path / "report.json").read_text())["evaluations"][0]["evaluation"]["attacks"] == []
    with_eps = _run(files["float"], "--data", files["data"], "--attack", "none", "--eps", "0.1")
    assert with_eps.exit_code == 2 and "clean accuracy alone" in with_eps.output


def test_dynamic_size_model_on_a_labelled_image_folder(tmp_path: Path) -> None:
    """--input-shape fixes the model's dynamic height and width; the images (of two sizes)
    are resized, centre-cropped and labelled by a labels file, offset by one class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    onnx.save(dynamic_size_classifier(4), tmp_path / "dynamic.onnx")
    (tmp_path / "images").mkdir()
    rows = []
    for number in range(6):
        size = (12, 10) if number % 2 else (10, 14)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{number}.jpg")
        rows.append(f"{number}.jpg, {number % 3}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    common = [tmp_path / "dynamic.onnx", "--data", tmp_path / "images", "--labels", tmp_path / "labels.csv",
              "--resize", 10, "--crop", 8, "--label-offset", 1, "--attack", "fgsm", "--eps", "0.05", "--json"]
    refused = CliRunner().invoke(main, ["layers", str(tmp_path / "dynamic.onnx")])
    assert refused.exit_code == 1 and "--input-shape" in refused.output
    listed = CliRunner().invoke(main, ["layers", str(tmp_path / "dynamic.onnx"), "--input-shape", "3x8x8", "--json"])
    assert [layer["name"] for layer in json.loads(listed.output)["layers"]] == ["conv", "fc"]
    result = _run(*common, "--input-shape", "3x8x8")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["data"]["samples"] == 6


def test_models_evaluated_as_ray_jobs_give_the_same_files(files, tmp_path, ray_address, quanos_in_child):
    arguments = [files["float"], files["compiled"], "--data", files["data"], "--eps", "0.05", "--pgd-steps", 3]
    here = _run(*arguments, "-o", tmp_path / "here")
    assert here.exit_code == 0, here.output
    on_ray = quanos_in_child("evaluate", *arguments, "--ray", ray_address, "-o", tmp_path / "ray", cwd=tmp_path, ray=True)
    assert on_ray.returncode == 0, on_ray.stdout + on_ray.stderr
    for name in ("evaluation.json", "report.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name


def test_ray_without_ray_installed_is_one_line_and_exit_2(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importlib.util.find_spec then finds no ray
    result = _run(files["float"], "--data", files["data"], "--attack", "none", "--ray", "auto")
    assert result.exit_code == 2
    assert result.output.splitlines() == ["error: --ray auto: Ray is not installed (hint: pip install quanos-onnx[ray])"]


def test_no_figures_never_imports_matplotlib(files, tmp_path):
    code = (
        "import sys; from click.testing import CliRunner; from quanos_onnx.cli import main; "
        f"result = CliRunner().invoke(main, ['evaluate', {str(files['float'])!r}, '--data', {str(files['data'])!r}, "
        f"'--eps', '0.05', '--pgd-steps', '2', '--no-figures', '-o', {str(tmp_path)!r}]); "
        "assert result.exit_code == 0, result.output; "
        "print(sorted(m for m in ('matplotlib', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"
    html = (tmp_path / "report.html").read_text()
    assert "<img" not in html and 'id="accuracy"' in html
