"""verify.py: the compiled model against float and uniform on held-out data; the guard,
the warnings, labels from the float model, and the compile command's exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from finetune_task import trained_task
from quanos_onnx.cli import EXIT_ACCURACY_GUARD, main
from quanos_onnx.data import Dataset
from quanos_onnx.errors import UsageError
from quanos_onnx.harness.attacks import Attack
from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner
from quanos_onnx.plan import LayerPlan, Plan
from quanos_onnx.quantize import quantize
from quanos_onnx.verify import (
    EVAL_PGD_STEPS,
    Guard,
    ModelRow,
    VerifySettings,
    comparison_warnings,
    evaluation_attacks,
    kernel_warnings,
    paired_drop_interval,
    parse_max_accuracy_drop,
    saturation_warnings,
    uniform_bits_near,
    verify,
)

EVAL = 120


@pytest.fixture(scope="module")
def task():
    """The quadrant task (float ~99%, 2-bit uniform much lower), a quantizer and eval data."""
    model, train, val = trained_task()
    layers = list_layers(model)
    calls: list[str] = []

    def quantize_plan(plan: Plan) -> onnx.ModelProto:
        calls.append(plan.method)
        return quantize(model, plan, [train.x[:256]], layers=layers).model

    evaluation = Dataset(np.array(val.x[:EVAL]), val.y[:EVAL], "val", "first 120")
    return model, layers, quantize_plan, calls, evaluation


def _settings(**changes) -> VerifySettings:
    return VerifySettings(**{"attacks": (Attack.fgsm(0.05),), "robust_samples": 32, **changes})


def _top1(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    (logits,) = Runner(model).run(x)
    return logits.argmax(axis=1)


def test_rows_compare_the_compiled_model_with_float_and_uniform(task):
    model, layers, quantize_plan, calls, evaluation = task
    plan = Plan.uniform(layers, 3)
    compiled = quantize_plan(plan)
    calls.clear()
    result = verify(model, compiled, plan, quantize_plan, evaluation, _settings(), layers=layers)
    assert [row.name for row in result.rows] == ["compiled", "float", "uniform 3", "uniform 8"]
    assert calls == ["uniform-8"]  # uniform 3 is the compiled plan itself: reused, not rebuilt
    expected = (_top1(compiled, evaluation.x) == evaluation.y).mean()
    assert result.compiled.clean_accuracy == pytest.approx(expected)
    assert result.float_row.clean_accuracy == pytest.approx((_top1(model, evaluation.x) == evaluation.y).mean())
    assert result.rows[2].clean_accuracy == result.compiled.clean_accuracy
    assert result.samples == EVAL and result.robust_samples == 32 and result.labels == "data"
    assert all(len(row.attacks) == 1 for row in result.rows)
    float_row, uniform8 = result.float_row, result.rows[3]
    assert float_row.weight_memory_bits > uniform8.weight_memory_bits > result.compiled.weight_memory_bits
    assert float_row.energy_pj["dvafs"] > uniform8.energy_pj["dvafs"] > result.compiled.energy_pj["dvafs"]
    assert result.guard.accuracy_drop == pytest.approx(100 * (float_row.clean_accuracy - result.compiled.clean_accuracy))
    outcomes = [_top1(m, evaluation.x) == evaluation.y for m in (model, compiled)]
    assert result.guard.interval == paired_drop_interval(*outcomes)
    assert result.guard.interval[0] <= result.guard.accuracy_drop <= result.guard.interval[1]
    assert result.headline().startswith("compiled: clean ")
    assert "uniform 8:" in result.headline() and "FGSM eps=0.05" in result.headline()
    document = result.to_json()
    assert document["models"][0]["name"] == "compiled" and document["guard"]["passed"] == result.passed
    assert document["guard"]["accuracy_drop_interval"] == [round(bound, 4) for bound in result.guard.interval]


def test_labels_from_the_float_model_measure_agreement_with_float(task):
    model, layers, quantize_plan, _, evaluation = task
    plan = Plan.uniform(layers, 2, keep_output_float=False)
    compiled = quantize_plan(plan)
    unlabeled = Dataset(evaluation.x, None, "val", "unlabeled")
    result = verify(model, compiled, plan, quantize_plan, unlabeled, _settings(attacks=()), layers=layers)
    assert result.labels == "float model"
    assert result.float_row.clean_accuracy == 1.0
    agreement = (_top1(compiled, evaluation.x) == _top1(model, evaluation.x)).mean()
    assert result.compiled.clean_accuracy == pytest.approx(agreement)
    assert agreement < 1.0
    assert result.headline().startswith("compiled: agreement with float ")
    assert "float 100" not in result.headline()
    assert not result.passed and "points below float" in result.guard_line()
    low, high = result.guard.interval
    assert f"95% interval of the drop: {low:.1f} to {high:.1f} points" in result.guard_line()


def test_guard_passes_up_to_the_limit_and_none_turns_it_off():
    assert Guard(1.0, 1.0, (-1.0, 3.0)).passed and Guard(1.0, -3.0, (-5.0, -1.0)).passed
    assert not Guard(1.0, 1.01, (-1.0, 3.0)).passed  # the measured drop decides, not the interval
    assert Guard(None, 80.0, (75.0, 85.0)).passed and not Guard(None, 80.0, (75.0, 85.0)).enabled
    assert parse_max_accuracy_drop("none") is None and parse_max_accuracy_drop("2.5") == 2.5
    for bad in ("-1", "lots", "nan"):
        with pytest.raises(UsageError, match="max_accuracy_drop"):
            parse_max_accuracy_drop(bad)


def _paired(only_reference: int, only_compared: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    reference = np.array([True] * only_reference + [False] * only_compared + [True] * both + [False] * neither)
    compared = np.array([False] * only_reference + [True] * only_compared + [True] * both + [False] * neither)
    return reference, compared


def test_the_drop_interval_comes_from_the_samples_the_models_disagree_on():
    low, high = paired_drop_interval(*_paired(16, 5, 190, 45))  # MobileNetV2's held-out split, this session
    assert low < 100 * 11 / 256 < high and low > 0  # the drop (4.3 points) is beyond noise
    # By hand: p_b = 17/258, p_c = 6/258, 1.96 sqrt((p_b + p_c - (p_b - p_c)^2) / 258) = 0.0361
    assert (low, high) == pytest.approx((0.66, 7.87), abs=0.01)
    # Agreement on more samples narrows it around the smaller drop it implies.
    diluted = paired_drop_interval(*_paired(16, 5, 190 + 256, 45))
    assert 0 < diluted[0] < 100 * 11 / 512 < diluted[1] and diluted[1] - diluted[0] < high - low
    # Swapping the models mirrors the interval; models that never disagree measure no drop,
    # within what 256 samples can rule out.
    assert paired_drop_interval(*reversed(_paired(16, 5, 190, 45))) == pytest.approx((-high, -low))
    agreeing = paired_drop_interval(*_paired(0, 0, 200, 56))
    assert agreeing[0] == pytest.approx(-agreeing[1]) and 0 < agreeing[1] < 1.5
    with pytest.raises(ValueError, match="not paired"):
        paired_drop_interval(np.ones(3, bool), np.ones(4, bool))


def test_the_drop_interval_covers_the_true_drop_about_95_percent_of_the_time():
    """Simulated paired outcomes with a true drop of 3 points on 256 samples (6% only float
    right, 3% only the compiled model); the interval conditional on the disagreements covered 92%."""
    rng = np.random.default_rng(0)
    covered = 0
    draws = 2000
    for _ in range(draws):
        kind = rng.choice(4, size=256, p=[0.06, 0.03, 0.75, 0.16])
        reference, compared = np.isin(kind, (0, 2)), np.isin(kind, (1, 2))
        low, high = paired_drop_interval(reference, compared)
        covered += low <= 3.0 <= high
    assert 0.93 <= covered / draws <= 0.97


def test_evaluation_attacks():
    assert evaluation_attacks("none", 0.05) == ()
    fgsm, pgd = evaluation_attacks("fgsm,pgd", 0.03)
    assert (fgsm.method, fgsm.eps) == ("fgsm", 0.03)
    assert (pgd.method, pgd.eps, pgd.steps) == ("pgd", 0.03, EVAL_PGD_STEPS)
    with pytest.raises(UsageError, match="eval_attacks"):
        evaluation_attacks("fgsm,cw", 0.05)
    with pytest.raises(UsageError, match="eval_samples"):
        VerifySettings((), robust_samples=0)


def _row(name: str, kind: str, bits: float, clean: float, memory: int, energy: float) -> ModelRow:
    return ModelRow(name, kind, bits, clean, (), clean, memory, {"standard": energy, "dvafs": energy / 2})


def test_warning_below_uniform_of_the_same_size():
    rows = [
        _row("compiled", "compiled", 4.2, 0.60, 400, 10.0),
        _row("float", "float", 32.0, 0.92, 3200, 80.0),
        _row("uniform 4", "uniform", 4.0, 0.66, 400, 10.0),
        _row("uniform 8", "uniform", 8.0, 0.91, 800, 20.0),
    ]
    (warning,) = comparison_warnings(rows)
    assert "less accurate than uniform 4-bit" in warning and "60.0% against 66.0%" in warning


def test_warning_dearer_than_uniform_8_without_being_more_accurate():
    rows = [
        _row("compiled", "compiled", 9.5, 0.91, 950, 25.0),
        _row("float", "float", 32.0, 0.92, 3200, 80.0),
        _row("uniform 10", "uniform", 10.0, 0.91, 1000, 26.0),
        _row("uniform 8", "uniform", 8.0, 0.91, 800, 20.0),
    ]
    (warning,) = comparison_warnings(rows)
    assert "costs more than uniform 8-bit" in warning
    assert "1.19x the weight memory" in warning and "1.25x the energy on standard" in warning
    more_accurate = [_row("compiled", "compiled", 9.5, 0.95, 950, 25.0), *rows[1:]]
    assert comparison_warnings(more_accurate) == []


def test_no_warning_when_the_compiled_model_is_the_uniform_model():
    same = _row("compiled", "compiled", 8.0, 0.9, 800, 20.0)
    rows = [same, _row("float", "float", 32.0, 0.92, 3200, 80.0), _row("uniform 8", "uniform", 8.0, 0.9, 800, 20.0)]
    assert comparison_warnings(rows) == []


def test_warning_for_layers_above_8_bits():
    plan = Plan((LayerPlan("a", 12, 12), LayerPlan("b", 4, 9), LayerPlan("c", 8, 8), LayerPlan("out", None, None, keep_float=True)))
    (warning,) = kernel_warnings(plan)
    assert warning.startswith("2 layer(s) above 8 bits (a, b) leave onnxruntime's integer kernels")
    assert kernel_warnings(Plan((LayerPlan("c", 8, 8),))) == []


def test_uniform_bits_near_rounds_half_up(task):
    _, layers, *_ = task
    assert uniform_bits_near(Plan.uniform(layers, 5), layers) == 5
    assert uniform_bits_near(Plan(tuple(LayerPlan(layer.name, None, None, keep_float=True) for layer in layers)), layers) is None


# The compile command -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model, train, _ = trained_task()
    folder = tmp_path_factory.mktemp("verify")
    paths = {"model": folder / "quadrant.onnx", "data": folder / "train.npz", "unlabeled": folder / "x.npy"}
    onnx.save(model, paths["model"])
    np.savez(paths["data"], x=np.array(train.x[:600]), y=train.y[:600])
    np.save(paths["unlabeled"], np.array(train.x[:600]))
    return paths


def _compile(files: dict[str, Path], out: Path, *extra: str, data: str = "data"):
    arguments = ["compile", str(files["model"]), "--data", str(files[data]), "-o", str(out), "--eval-samples", "16", *extra]
    return CliRunner().invoke(main, arguments)


def test_compile_that_breaks_the_guard_writes_its_outputs_and_exits_with_the_guard_code(files, tmp_path):
    plain = ["--calibration", "minmax", "--weight-clipping", "absmax", "--no-bias-correction"]
    result = _compile(files, tmp_path / "out", "--bits", "2", "--quantize-output", *plain)
    assert result.exit_code == EXIT_ACCURACY_GUARD == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "accuracy guard" in errors[0] and "points below float" in errors[0]
    assert "--max-accuracy-drop is 1" in errors[0] and "hint:" in errors[0]
    assert result.stdout.startswith("compiled: clean ")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert report["verification"]["guard"]["passed"] is False
    assert run["accuracy_guard"] == report["verification"]["guard"]
    assert (tmp_path / "out" / "model.quanos.onnx").is_file()
    low, high = report["verification"]["guard"]["accuracy_drop_interval"]
    assert f"95% interval {low:.1f} to {high:.1f}" in (tmp_path / "out" / "report.md").read_text()
    assert "FAILED" in (tmp_path / "out" / "report.md").read_text()
    selection = report["verification"]["data"]["selection"]
    assert "evaluation part, 120 of 600 held out (seed 0)" in selection
    assert report["inputs"]["data"]["samples"] == 480  # calibration part only


def test_compile_that_keeps_its_accuracy_exits_0(files, tmp_path):
    result = _compile(files, tmp_path / "out", "--bits", "8", "--json")
    assert result.exit_code == 0, result.output
    verification = json.loads(result.stdout)["verification"]
    assert verification["guard"]["passed"] and [m["name"] for m in verification["models"]] == ["compiled", "float", "uniform 8"]
    off = _compile(files, tmp_path / "off", "--bits", "2", "--quantize-output", "--max-accuracy-drop", "none")
    assert off.exit_code == 0, off.output
    assert "accuracy guard: off" in off.stdout


def test_compile_without_labels_reports_agreement_with_float(files, tmp_path):
    result = _compile(files, tmp_path / "out", "--bits", "8", "--eval-attacks", "none", data="unlabeled")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("compiled: agreement with float ")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["labels"] == "float model"
    assert "agreement with float" in (tmp_path / "out" / "report.md").read_text()


def test_no_eval_and_eval_data(files, tmp_path):
    skipped = _compile(files, tmp_path / "skipped", "--bits", "8", "--no-eval")
    assert skipped.exit_code == 0, skipped.output
    report = json.loads((tmp_path / "skipped" / "report.json").read_text())
    assert report["verification"] is None and report["inputs"]["data"]["samples"] == 600
    given = _compile(files, tmp_path / "given", "--bits", "8", "--eval-data", str(files["unlabeled"]), "--eval-attacks", "none")
    assert given.exit_code == 0, given.output
    report = json.loads((tmp_path / "given" / "report.json").read_text())
    assert report["verification"]["data"]["samples"] == 600 and report["inputs"]["data"]["samples"] == 600
    both = _compile(files, tmp_path / "both", "--bits", "8", "--no-eval", "--eval-data", str(files["data"]))
    assert both.exit_code == 2 and "--eval-data is given but evaluation is turned off" in both.stderr


def _saturating_conv() -> tuple[onnx.ModelProto, Plan, np.ndarray]:
    """Class 0's weights (1, 1) fill both 8-bit products of a pair (2 * 255 * 127 > 32767),
    class 1's (1.5, 0) do not: on inputs of ones exact kernels score class 0 (2 > 1.5), a
    saturating kernel class 1 (about 1.01 < 1.5)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.array([[1, 1], [1.5, 0]], np.float32).reshape(2, 2, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), helper.make_node("Flatten", ["c"], ["y"], name="flat")],
        "pairs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    calibration = np.random.default_rng(0).uniform(0, 1, (64, 2, 1, 1)).astype(np.float32)
    calibration[:2] = 1.0
    return model, Plan((LayerPlan("conv", 8, 8),)), calibration


def test_saturating_kernels_are_reported_with_the_exact_accuracy():
    from quanos_onnx.ptq import PtqSettings
    from quanos_onnx.twin.fusion import pair_saturation

    if not pair_saturation().conv:
        pytest.skip("this CPU's onnxruntime computes u8 x s8 convolutions exactly")
    model, plan, calibration = _saturating_conv()
    plain = PtqSettings(act_range="minmax", weight_clipping="absmax", bias_correction=False)
    compiled = quantize(model, plan, [calibration], ptq=plain).model
    x, labels = np.ones((10, 2, 1, 1), np.float32), np.zeros(10, np.int64)
    (warning,) = saturation_warnings(compiled, plan, x, labels, 0.0, 4)
    assert "1 layer(s) with 8-bit weights" in warning and "clean 0.0% here, 100.0% with exact kernels" in warning
    assert saturation_warnings(compiled, plan, x, labels, 1.0, 4) == []
    seven = Plan((LayerPlan("conv", 7, 8),))
    assert saturation_warnings(quantize(model, seven, [calibration], ptq=plain).model, seven, x, labels, 0.0, 4) == []


def test_no_saturation_warning_on_cpus_that_compute_exactly(monkeypatch):
    from quanos_onnx.twin import fusion

    monkeypatch.setattr(fusion, "pair_saturation", lambda: fusion.PairSaturation())
    model, plan, calibration = _saturating_conv()
    assert saturation_warnings(model, plan, np.ones((4, 2, 1, 1), np.float32), np.zeros(4, np.int64), 0.0, 4) == []
