"""`quanos compile` / `quanos-compile` with --bits and --plan: outputs, determinism, and one
clear line (and no file left behind) for each way the input can be wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from quanos_onnx.cli import compile_command, main
from quanos_onnx.plan import Plan, read_plan
from quanos_onnx.ptq import PROBE_TIE_KL

from json_schema import load_schemas, validate
from tiny_models import GraphBuilder, resnet_style, vgg_chain

REPO = Path(__file__).resolve().parents[1]

MODEL_FILE = "model.quanos.onnx"
PLAN_FILE = "plan.json"


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny VGG-style model, labelled npz data and a mixed plan, with cwd inside."""
    onnx.save(vgg_chain(), tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.random((40, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 40))
    plan = {"format": "quanos-plan", "version": 1, "layers": [
        {"name": "conv0", "bits": 3}, {"name": "conv1", "weight_bits": 6, "act_bits": 5},
        {"name": "conv2", "bits": 9}, {"name": "conv3", "bits": 2},
    ]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _compile(args: list[str], *, via_group: bool = False):
    if via_group:
        return CliRunner().invoke(main, ["compile", *args])
    return CliRunner().invoke(compile_command, args)


@pytest.mark.parametrize("via_group", [False, True], ids=["quanos-compile", "quanos compile"])
def test_uniform_bits_writes_a_runnable_model_and_its_plan(workdir: Path, via_group: bool):
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "8", "-o", "out"], via_group=via_group)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (workdir / "out").iterdir()) == sorted(
        [MODEL_FILE, PLAN_FILE, "report.html", "report.json", "report.md", "run.json"]
    )
    for name in ("conv0", "conv3", "classifier"):
        assert name in result.output
    plan = read_plan(workdir / "out" / PLAN_FILE)
    assert [(e.name, e.weight_bits) for e in plan.layers] == [
        ("conv0", 8), ("conv1", 8), ("conv2", 8), ("conv3", 8), ("classifier", None),
    ]
    session = ort.InferenceSession(str(workdir / "out" / MODEL_FILE), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"x": np.load(workdir / "data.npz")["x"][:5]})
    assert logits.shape == (5, 10)


def test_rounding_gptq_changes_the_integers_on_the_same_grid(workdir: Path):
    """--rounding gptq reaches ptq/gptq.py: the same scales as round-to-nearest, other integers."""
    args = ["model.onnx", "--data", "data.npz", "--plan", "plan.json", "--no-eval", "--no-figures"]
    assert _compile([*args, "-o", "nearest"]).exit_code == 0
    result = _compile([*args, "--rounding", "gptq", "-o", "gptq"])
    assert result.exit_code == 0, result.output

    def weights(folder: str) -> dict[str, np.ndarray]:
        model = onnx.load(workdir / folder / MODEL_FILE)
        return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if ".weight_w" in t.name}

    nearest, gptq = weights("nearest"), weights("gptq")
    assert nearest.keys() == gptq.keys()
    for name in nearest:
        if name.endswith("_scale"):
            np.testing.assert_array_equal(nearest[name], gptq[name])
    assert any(not np.array_equal(nearest[n], gptq[n]) for n in nearest if n.endswith("_quantized"))


def test_plan_sets_per_layer_bits(workdir: Path):
    result = _compile(["model.onnx", "--data", "data.npz", "--plan", "plan.json", "-o", "out", "--no-eval"])
    assert result.exit_code == 0, result.output
    plan = read_plan(workdir / "out" / PLAN_FILE).by_name()
    assert (plan["conv1"].weight_bits, plan["conv1"].act_bits) == (6, 5)
    assert plan["conv2"].weight_bits == 9 and plan["classifier"].keep_float
    model = onnx.load(workdir / "out" / MODEL_FILE)
    weight_types = {t.name.split(".weight")[0]: t.data_type for t in model.graph.initializer if ".weight_w" in t.name}
    assert weight_types == {"conv0": onnx.TensorProto.INT8, "conv1": onnx.TensorProto.INT8,
                            "conv2": onnx.TensorProto.INT16, "conv3": onnx.TensorProto.INT8}


def test_plan_json_says_which_range_method_the_probe_chose_and_why(workdir: Path):
    """With --calibration probe the method at 6 bits and fewer is measured on the calibration
    data and the plan says which and with what divergences; with auto, or at 8 bits, nothing
    is measured."""
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "4", "--calibration", "probe", "-o", "out", "--no-eval"])
    assert result.exit_code == 0, result.output
    ranges = read_plan(workdir / "out" / PLAN_FILE).details["activation_ranges"]
    assert set(ranges["kl_from_float"]) == {"entropy", "mse"}
    kl = ranges["kl_from_float"]
    assert ranges["method"] == ("mse" if kl["mse"] < kl["entropy"] - PROBE_TIE_KL else "entropy")
    for flags in (["--bits", "8", "--calibration", "probe"], ["--bits", "4"]):
        result = _compile(["model.onnx", "--data", "data.npz", *flags, "-o", "out2", "--no-eval"])
        assert result.exit_code == 0, result.output
        assert "activation_ranges" not in read_plan(workdir / "out2" / PLAN_FILE).details


def test_json_summary(workdir: Path):
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "6", "-o", "out", "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [row["weight_bits"] for row in summary["layers"]] == [6, 6, 6, 6, None]


def test_same_inputs_give_byte_identical_outputs(workdir: Path):
    """Two separate processes with different string-hash seeds (set and dict orders differ)."""
    onnx.save(resnet_style(), workdir / "resnet.onnx")
    bits = {"stem": 3, "block1.conv1": 9, "block1.conv2": 5, "block2.conv1": 4, "block2.conv2": 6, "block2.shortcut": 2}
    plan = {"format": "quanos-plan", "version": 1, "layers": [{"name": n, "bits": b} for n, b in bits.items()]}
    (workdir / "resnet_plan.json").write_text(json.dumps(plan))
    for out, seed in (("first", "1"), ("second", "2")):
        environment = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "quanos_onnx.cli", "compile", "resnet.onnx", "--data", "data.npz",
                   "--plan", "resnet_plan.json", "-o", out, "-q"]
        completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr
    for name in (MODEL_FILE, PLAN_FILE):
        assert (workdir / "first" / name).read_bytes() == (workdir / "second" / name).read_bytes()


def _no_quantizable_layer(path: Path) -> None:
    builder = GraphBuilder()
    onnx.save(builder.model(["N", 3, 8, 8], builder.relu("x")), path)


def _truncated(path: Path) -> None:
    data = vgg_chain().SerializeToString()
    path.write_bytes(data[: len(data) // 2])


def _bad_plan(path: Path, entry: dict) -> None:
    path.write_text(json.dumps({"format": "quanos-plan", "version": 1, "layers": [entry]}))


def _data(path: Path, x: np.ndarray) -> None:
    np.savez(path, x=x)


def _with_nan(path: Path) -> None:
    x = np.random.default_rng(1).random((40, 3, 8, 8), dtype=np.float32)
    x[7, 1, 2, 3] = np.nan
    _data(path, x)


# (name, what to create, arguments, expected exit code, words the one line must contain)
BAD_INPUTS = [
    ("path missing", None, ["absent.onnx", "--data", "data.npz", "--bits", "8"], 1, ["absent.onnx", "not found"]),
    ("truncated protobuf", ("cut.onnx", _truncated), ["cut.onnx", "--data", "data.npz", "--bits", "8"], 1,
     ["cut.onnx", "not an ONNX model"]),
    ("not a model", ("notes.onnx", lambda p: p.write_text("these are my notes\n")),
     ["notes.onnx", "--data", "data.npz", "--bits", "8"], 1, ["notes.onnx", "not an ONNX model"]),
    ("no quantizable layer", ("relu.onnx", _no_quantizable_layer), ["relu.onnx", "--data", "data.npz", "--bits", "8"],
     1, ["relu.onnx", "no quantizable layer"]),
    ("plan names an unknown layer", ("typo.json", lambda p: _bad_plan(p, {"name": "conv9", "bits": 4})),
     ["model.onnx", "--data", "data.npz", "--plan", "typo.json"], 1, ["typo.json", "'conv9'"]),
    ("plan bits 17", ("wide.json", lambda p: _bad_plan(p, {"name": "conv1", "bits": 17})),
     ["model.onnx", "--data", "data.npz", "--plan", "wide.json"], 1, ["wide.json", "conv1", "17 bits"]),
    ("bits 1", None, ["model.onnx", "--data", "data.npz", "--bits", "1"], 2, ["--bits 1", "2..16"]),
    ("bits 17", None, ["model.onnx", "--data", "data.npz", "--bits", "17"], 2, ["--bits 17", "2..16"]),
    ("join operand bits 1", None, ["model.onnx", "--data", "data.npz", "--bits", "4", "--join-operand-bits", "1"], 2,
     ["--join-operand-bits 1", "2..16"]),
    ("join operand bits a word", None, ["model.onnx", "--data", "data.npz", "--bits", "4", "--join-operand-bits", "many"], 2,
     ["--join-operand-bits", "'many'", "paper"]),
    ("data shape does not match", ("big.npz", lambda p: _data(p, np.zeros((4, 3, 9, 9), np.float32))),
     ["model.onnx", "--data", "big.npz", "--bits", "8"], 1, ["big.npz", "3x9x9", "[N,3,8,8]"]),
    ("NaN in data", ("nan.npz", _with_nan), ["model.onnx", "--data", "nan.npz", "--bits", "8"], 1,
     ["nan.npz", "NaN", "sample 7"]),
]


@pytest.mark.parametrize(("create", "args", "code", "words"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_culprit_and_leaves_nothing(workdir: Path, create, args, code, words):
    if create is not None:
        name, make = create
        make(workdir / name)
    result = _compile([*args, "-o", "out"])
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0]
    assert not (workdir / "out").exists()


def test_output_equal_to_the_input_path_is_refused(workdir: Path):
    before = (workdir / "model.onnx").read_bytes()
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "8", "-o", "model.onnx"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: model.onnx: output directory is the input file (hint: ")
    assert (workdir / "model.onnx").read_bytes() == before


def test_output_under_a_file_is_not_writable(workdir: Path):
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "8", "-o", "data.npz/out"])
    assert result.exit_code == 1
    assert "data.npz/out" in result.output and "not writable" in result.output


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_output_inside_a_read_only_directory_is_refused(workdir: Path):
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _compile(["model.onnx", "--data", "data.npz", "--bits", "8", "-o", "locked/out"])
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 1 and "not writable" in result.output
    assert not any(locked.iterdir())


def test_a_failed_write_removes_the_files_already_written(workdir: Path):
    (workdir / "out" / PLAN_FILE).mkdir(parents=True)
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "8", "-o", "out"])
    assert result.exit_code == 1
    assert "plan.json" in result.output
    assert [p.name for p in (workdir / "out").iterdir()] == [PLAN_FILE]


def test_milp_with_a_budget_keeps_it_and_says_how_far_it_moved_from_eqn3(workdir: Path):
    result = _compile([
        "model.onnx", "--data", "data.npz", "--method", "milp", "--budget", "avg-bits=4", "--max-accuracy-drop", "none",
        "--calibration-samples", "24", "--samples", "16", "--sensitivity-samples", "16", "--no-eval",
        "-o", "out", "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert validate(summary, "urn:quanos:quanos-compile", load_schemas()) == []
    assert summary["method"] == "milp"
    allocation = summary["allocation"]
    assert allocation["how"] == "integer program within avg-bits=4"
    assert allocation["search_samples"] == 20 and allocation["moved_from_eqn3"]["layers"] == 4
    assert summary["average_weight_bits"] <= 4.0
    plan = read_plan(workdir / "out" / PLAN_FILE)
    assert {e.weight_bits for e in plan.layers if e.quantized} <= set(range(2, 9))
    assert plan.details["allocation"]["sensitivity"]["method"] == "kl@7+ptq"


def test_a_budget_gives_the_uniform_plan_of_its_size_when_that_measured_better(workdir: Path, monkeypatch):
    """The solved plan here is mixed (7, 6, 4, 4 bits); uniform 4 fits 4.5 average bits."""
    from quanos_onnx.commands import compile as compile_room

    def uniform_is_better(trial, plan):
        bits = {e.weight_bits for e in plan.layers if e.quantized}
        return 0.9 if len(bits) == 1 else 0.8

    monkeypatch.setattr(compile_room._SearchTrial, "accuracy", uniform_is_better)
    result = _compile([
        "model.onnx", "--data", "data.npz", "--budget", "avg-bits=4.5", "--max-accuracy-drop", "none",
        "--calibration-samples", "24", "--samples", "16", "--sensitivity-samples", "16", "--no-eval",
        "-o", "out", "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["allocation"]["how"] == (
        "integer program within avg-bits=4.5; uniform 4 bits kept, more accurate on the search split than the "
        "solved plan (90.0% against 80.0%)"
    )
    assert {row["weight_bits"] for row in summary["layers"] if row["weight_bits"] is not None} == {4}
    plan = read_plan(workdir / "out" / PLAN_FILE)
    assert plan.details["uniform_check"]["kept"] == "uniform"


@pytest.mark.parametrize("signal", ["lipschitz", "both"])
def test_milp_takes_the_lipschitz_robustness_signal(workdir: Path, signal: str):
    result = _compile([
        "model.onnx", "--data", "data.npz", "--budget", "avg-bits=4", "--robustness-signal", signal,
        "--calibration-samples", "24", "--samples", "16", "--sensitivity-samples", "16", "--no-eval",
        "-o", "out", "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert validate(summary, "urn:quanos:quanos-compile", load_schemas()) == []
    assert summary["allocation"]["robustness_signal"] == signal
    assert summary["average_weight_bits"] <= 4.0
    plan = read_plan(workdir / "out" / PLAN_FILE)
    assert plan.details["allocation"]["robustness_signal"] == signal


def test_milp_without_a_budget_finds_the_smallest_plan_within_the_guard(workdir: Path):
    result = _compile([
        "model.onnx", "--data", "data.npz", "--method", "milp", "--max-accuracy-drop", "5",
        "--max-bits", "6", "--calibration-samples", "24", "--samples", "16", "--sensitivity-samples", "16",
        "--no-eval", "-o", "out", "--json",
    ])
    assert result.exit_code == 0, result.output
    allocation = json.loads(result.output)["allocation"]
    assert allocation["how"].startswith("smallest average-bits budget within 5 point(s)")
    assert allocation["search_accuracy"] >= allocation["float_accuracy"] - 0.05
    assert allocation["sensitivity"]["method"] == "kl@7+ptq"  # measured on the compile's own grids
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["summary"]["moved_from_eqn3"]["layers"] == allocation["moved_from_eqn3"]["layers"]
    assert "moved from Eqn 3" in (workdir / "out" / "report.md").read_text()


PARETO_ARGS = [
    "--max-accuracy-drop", "100", "--max-bits", "6", "--calibration-samples", "16", "--samples", "16",
    "--sensitivity-samples", "16", "--eval-samples", "8",
]


def test_pareto_writes_the_measured_front_of_written_models_and_its_chart(workdir: Path):
    result = _compile(["model.onnx", "--data", "data.npz", "--pareto", *PARETO_ARGS, "-o", "out", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert validate(summary, "urn:quanos:quanos-compile", load_schemas()) == []
    front = summary["allocation"]["pareto"]
    points = {point["name"]: point for point in front["points"]}
    mixed = [f"mixed avg-bits={b}" for b in range(2, 7)]
    assert list(points) == [*mixed, *(f"uniform {b}" for b in range(2, 7)), "compiled", "float"]
    assert [points[name]["kind"] for name in mixed] == ["mixed"] * 5
    assert all(points[name]["average_weight_bits"] <= b + 1e-9 for name, b in zip(mixed, range(2, 7)))
    assert all(len(point["attacks"]) == 2 for point in front["points"])
    # the compiled model and the uniform models are the verification's own rows
    verification = {row["name"]: row for row in summary["verification"]["models"]}
    for name in ("compiled", "float", "uniform 2"):
        assert points[name]["clean_accuracy"] == verification[name]["clean_accuracy"]
        assert [a["accuracy"] for a in points[name]["attacks"]] == [a["accuracy"] for a in verification[name]["attacks"]]
    chart = (workdir / "out" / "pareto.png").read_bytes()
    assert chart.startswith(b"\x89PNG")
    assert "Pareto front: accuracy against size and energy" in (workdir / "out" / "report.html").read_text()
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["pareto"] == front and validate(report, "urn:quanos:quanos-report", load_schemas()) == []
    # a mixed point is the model a compile of its plan writes, measured on the same split
    bits = points["mixed avg-bits=4"]["bits"]
    plan = {"format": "quanos-plan", "version": 1, "layers": [{"name": n, "bits": b} for n, b in bits.items() if b]}
    (workdir / "front4.json").write_text(json.dumps(plan))
    again = _compile(["model.onnx", "--data", "data.npz", "--plan", "front4.json", *PARETO_ARGS[:2], "--calibration-samples",
                      "16", "--eval-samples", "8", "-o", "out4", "--json"])
    assert again.exit_code == 0, again.output
    rebuilt = json.loads(again.output)["verification"]["models"][0]
    assert rebuilt["clean_accuracy"] == points["mixed avg-bits=4"]["clean_accuracy"]
    assert [a["accuracy"] for a in rebuilt["attacks"]] == [a["accuracy"] for a in points["mixed avg-bits=4"]["attacks"]]


def test_pareto_with_act_bits_measures_every_point_under_them(workdir: Path):
    result = _compile(["model.onnx", "--data", "data.npz", "--pareto", "--act-bits", "8", *PARETO_ARGS, "-o", "out", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    names = [point["name"] for point in summary["allocation"]["pareto"]["points"]]
    assert [n for n in names if n.startswith("uniform")] == [f"uniform {b} (activations 8)" for b in range(2, 7)]
    verification = {row["name"] for row in summary["verification"]["models"]}
    assert {n for n in names if n.startswith("uniform")} & verification  # the verification's uniform row is a point
    assert {row["act_bits"] for row in summary["layers"] if row["weight_bits"]} == {8}


def test_pareto_needs_the_evaluation(workdir: Path):
    result = _compile(["model.onnx", "--data", "data.npz", "--pareto", "--no-eval", "-o", "out"])
    assert result.exit_code == 2
    assert "--pareto measures every plan of the front on the held-out split" in result.output
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("quantize_output", [True, False])
def test_first_last_bits_pins_the_first_and_the_quantized_output_layer(workdir: Path, quantize_output: bool):
    output_flag = ["--quantize-output"] if quantize_output else []
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "4", "--first-last-bits", "8", *output_flag, "-o", "out", "--no-eval"])
    assert result.exit_code == 0, result.output
    plan = read_plan(workdir / "out" / PLAN_FILE)
    # conv1 reads conv0's output: at 8 bits, as BRECQ quantizes the first layer's output.
    assert [(e.name, e.weight_bits, e.act_bits) for e in plan.layers] == [
        ("conv0", 8, 8), ("conv1", 4, 8), ("conv2", 4, 4), ("conv3", 4, 4),
        ("classifier", 8, 8) if quantize_output else ("classifier", None, None),
    ]
    assert plan.details["first_last_bits"] == {
        "bits": 8, "layers": ["conv0", "classifier"] if quantize_output else ["conv0"], "output_readers": ["conv1"],
    }
    model = onnx.load(workdir / "out" / MODEL_FILE)
    names = {t.name for t in model.graph.initializer}
    assert {"x_q8_scale", "conv0.weight_w8_quantized", "conv1.weight_w4_quantized"} <= names
    conv1_input = next(n for n in model.graph.node if n.name == "conv1").input[0]
    producer = next(n for n in model.graph.node if conv1_input in n.output)
    assert producer.op_type == "DequantizeLinear" and "_q8" in producer.input[1]
    assert ("classifier.weight_w8_quantized" in names) == quantize_output


def test_join_operand_bits_write_the_joins_at_those_bits_and_record_them_in_the_plan(workdir: Path):
    onnx.save(resnet_style(), workdir / "residual.onnx")
    result = _compile(["residual.onnx", "--data", "data.npz", "--bits", "4", "--join-operand-bits", "8", "-o", "out", "--no-eval"])
    assert result.exit_code == 0, result.output
    plan = read_plan(workdir / "out" / PLAN_FILE)
    assert plan.join_operand_bits == 8 and {j.bits for j in plan.joins} == {4}
    names = {t.name for t in onnx.load(workdir / "out" / MODEL_FILE).graph.initializer}
    assert any("_q8@block1.add" in n for n in names) and not any("_q4@block1.add" in n for n in names)
    assert any("_q4_scale" in n and "@" not in n for n in names)
    again = _compile(["residual.onnx", "--data", "data.npz", "--plan", f"out/{PLAN_FILE}", "-o", "again", "--no-eval"])
    assert again.exit_code == 0, again.output
    assert read_plan(workdir / "again" / PLAN_FILE).join_operand_bits == 8
    graphs = [onnx.load(workdir / folder / MODEL_FILE).graph.SerializeToString() for folder in ("out", "again")]
    assert graphs[0] == graphs[1]


@pytest.mark.parametrize(("args", "expected"), [
    ([], 8),
    (["--join-operand-bits", "paper"], None),
    (["--method", "eqn3", "--k-init", "4", "--samples", "8"], None),
    (["--method", "eqn3", "--k-init", "4", "--samples", "8", "--join-operand-bits", "8"], 8),
], ids=["auto is 8", "paper", "eqn3 keeps the paper's rule", "eqn3 with 8"])
def test_join_operands_default_to_8_bits_except_under_the_papers_rule(workdir: Path, args: list[str], expected: int | None):
    onnx.save(resnet_style(), workdir / "residual.onnx")
    bits = [] if "eqn3" in args else ["--bits", "4"]
    result = _compile(["residual.onnx", "--data", "data.npz", *bits, *args, "-o", "out", "--no-eval"])
    assert result.exit_code == 0, result.output
    assert read_plan(workdir / "out" / PLAN_FILE).join_operand_bits == expected
    names = {t.name for t in onnx.load(workdir / "out" / MODEL_FILE).graph.initializer}
    assert any("_q8@block1.add" in n for n in names) == (expected == 8)
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["settings"]["join_operand_bits"] == expected  # resolved, never "auto"
    assert report["summary"]["joins"]["operand_bits"] == expected
    rule = "rounded once" if expected == 8 else "the paper's rule"
    assert rule in next(line for line in (workdir / "out" / "report.md").read_text().splitlines() if "residual joins" in line)


def test_a_plan_written_under_the_papers_rule_keeps_it_when_compiled_again(workdir: Path):
    onnx.save(resnet_style(), workdir / "residual.onnx")
    first = _compile(["residual.onnx", "--data", "data.npz", "--bits", "4", "--join-operand-bits", "paper", "-o", "out", "--no-eval"])
    assert first.exit_code == 0, first.output
    again = _compile(["residual.onnx", "--data", "data.npz", "--plan", f"out/{PLAN_FILE}", "-o", "again", "--no-eval"])
    assert again.exit_code == 0, again.output
    assert read_plan(workdir / "again" / PLAN_FILE).join_operand_bits is None
    graphs = [onnx.load(workdir / folder / MODEL_FILE).graph.SerializeToString() for folder in ("out", "again")]
    assert graphs[0] == graphs[1]


def test_a_plan_with_join_operand_bits_brings_them_to_every_model_the_compile_writes(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """The verification's uniform baselines are written under the plan's join placement too."""
    from quanos_onnx.commands import compile as compile_module

    onnx.save(resnet_style(), workdir / "residual.onnx")
    plan = {"format": "quanos-plan", "version": 1, "join_operand_bits": 8,
            "layers": [{"name": name, "bits": 4} for name in ("stem", "block1.conv1", "block1.conv2")]}
    (workdir / "wide.json").write_text(json.dumps(plan))
    placements: list[int | None] = []
    original = compile_module.quantize

    def recording(*args, **kwargs):
        placements.append(kwargs["ptq"].with_join_operands(args[1]).join_operand_bits)
        return original(*args, **kwargs)

    monkeypatch.setattr(compile_module, "quantize", recording)
    result = _compile(["residual.onnx", "--data", "data.npz", "--plan", "wide.json", "-o", "out", "--eval-samples", "8"])
    assert result.exit_code in (0, 4), result.output
    assert len(placements) >= 3 and set(placements) == {8}  # compiled, uniform of its bits, uniform 8


def test_input_bits_quantize_the_model_input_coarser_than_the_first_layers_weights(workdir: Path):
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "6", "--input-bits", "3", "-o", "out", "--no-eval"])
    assert result.exit_code == 0, result.output
    plan = read_plan(workdir / "out" / PLAN_FILE)
    assert [(e.name, e.weight_bits, e.act_bits) for e in plan.layers][:2] == [("conv0", 6, 3), ("conv1", 6, 6)]
    model = onnx.load(workdir / "out" / MODEL_FILE)
    assert {"x_q3_scale", "conv0.weight_w6_quantized"} <= {t.name for t in model.graph.initializer}


def test_the_milp_search_measures_its_plans_with_the_input_bits(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    from quanos_onnx.commands import compile as compile_room

    measured = []
    real = compile_room.quantize

    def recording(model, plan, *args, **kwargs):
        measured.append(plan.by_name()["conv0"].act_bits)
        return real(model, plan, *args, **kwargs)

    monkeypatch.setattr(compile_room, "quantize", recording)
    result = _compile([
        "model.onnx", "--data", "data.npz", "--budget", "avg-bits=5", "--input-bits", "3", "--max-accuracy-drop", "none",
        "--calibration-samples", "24", "--samples", "16", "--sensitivity-samples", "16", "--no-eval", "-o", "out", "--json",
    ])
    assert result.exit_code == 0, result.output
    assert measured and set(measured) <= {2, 3}  # every trial plan and the written one read the input at 3 bits or fewer
    layers = {row["layer"]: row for row in json.loads(result.output)["layers"]}
    assert layers["conv0"]["act_bits"] <= 3


def test_act_bits_write_every_activation_at_those_bits_and_compare_with_uniform_weights_at_them(workdir: Path):
    result = _compile(["model.onnx", "--data", "data.npz", "--bits", "3", "--act-bits", "8", "-o", "out", "--eval-samples", "8", "--json"])
    assert result.exit_code in (0, 4), result.output
    plan = read_plan(workdir / "out" / PLAN_FILE)
    assert {(e.weight_bits, e.act_bits) for e in plan.layers if e.quantized} == {(3, 8)}
    model = onnx.load(workdir / "out" / MODEL_FILE)
    names = {t.name for t in model.graph.initializer}
    assert {"x_q8_scale", "conv1.weight_w3_quantized"} <= names and not any("_q3_" in name for name in names)
    rows = [m["name"] for m in json.loads(result.stdout)["verification"]["models"]]
    assert rows == ["compiled", "float", "uniform 3 (activations 8)", "uniform 8"]


def _record_plans_and_tables(
    monkeypatch: pytest.MonkeyPatch, of_plan: Callable[[Plan], Any], of_table: Callable[[dict[str, Any]], Any]
) -> tuple[list[Any], list[Any]]:
    """What every plan the compile quantizes (`of_plan`) and every sensitivity table it
    measures (`of_table`, from measure's keyword arguments) were given, in order."""
    from quanos_onnx.allocate import sensitivity
    from quanos_onnx.commands import compile as compile_room

    plans: list[Any] = []
    tables: list[Any] = []
    real_quantize, real_measure = compile_room.quantize, sensitivity.measure

    def recording(model, plan, *args, **kwargs):
        plans.append(of_plan(plan))
        return real_quantize(model, plan, *args, **kwargs)

    def table(*args, **kwargs):
        tables.append(of_table(kwargs))
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(compile_room, "quantize", recording)
    monkeypatch.setattr(sensitivity, "measure", table)
    return plans, tables


def test_the_milp_table_and_search_measure_weights_with_the_act_bits(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    measured, tables = _record_plans_and_tables(
        monkeypatch, lambda plan: {e.act_bits for e in plan.layers if e.quantized}, lambda kwargs: kwargs["act_bits"]
    )
    result = _compile([
        "model.onnx", "--data", "data.npz", "--budget", "avg-bits=3", "--act-bits", "8", "--max-accuracy-drop", "none",
        "--calibration-samples", "24", "--samples", "16", "--sensitivity-samples", "16", "--no-eval", "-o", "out", "--json",
    ])
    assert result.exit_code == 0, result.output
    assert tables == [8] and measured and all(bits == {8} for bits in measured)
    summary = json.loads(result.output)
    assert summary["average_weight_bits"] <= 3.0
    assert {row["act_bits"] for row in summary["layers"] if row["weight_bits"]} == {8}


def test_first_last_bits_are_fixed_in_the_integer_program_and_counted_in_its_budget(workdir: Path):
    result = _compile([
        "model.onnx", "--data", "data.npz", "--budget", "avg-bits=4", "--first-last-bits", "8", "--quantize-output",
        "--max-accuracy-drop", "none", "--calibration-samples", "24", "--samples", "16", "--sensitivity-samples", "16",
        "--no-eval", "-o", "out", "--json",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["average_weight_bits"] <= 4.0
    layers = {row["layer"]: row for row in summary["layers"]}
    assert (layers["conv0"]["weight_bits"], layers["classifier"]["weight_bits"]) == (8, 8)
    assert (layers["conv0"]["act_bits"], layers["classifier"]["act_bits"]) == (8, 8)
    assert layers["conv1"]["act_bits"] == 8  # the first layer's output, whatever conv1's weight bits


def test_first_last_bits_put_the_first_output_at_those_bits_in_the_table_and_every_trial_plan(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    measured, tables = _record_plans_and_tables(
        monkeypatch,
        lambda plan: (plan.by_name()["conv0"].weight_bits, plan.by_name()["conv1"].act_bits),
        lambda kwargs: kwargs["first_output"],
    )
    result = _compile([
        "model.onnx", "--data", "data.npz", "--first-last-bits", "6", "--calibration-samples", "16", "--samples", "16",
        "--sensitivity-samples", "16", "--no-eval", "-o", "out", "--json",
    ])
    assert result.exit_code == 0, result.output
    assert [(t.readers, t.bits) for t in tables] == [(("conv1",), 6)]
    assert len(measured) > 2 and set(measured) == {(6, 6)}  # the search's trial plans and the written one
    plan = read_plan(workdir / "out" / PLAN_FILE)
    assert plan.details["first_last_bits"]["output_readers"] == ["conv1"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--bits", "4", "--first-last-bits", "1"], "error: --first-last-bits 1 is outside 2..16"),
        (["--budget", "avg-bits=4", "--first-last-bits", "12"], "error: --first-last-bits 12 is outside the integer program's candidates --k-min..--max-bits (2..8)"),
        (["--bits", "4", "--input-bits", "1"], "error: --input-bits 1 is outside 2..16"),
        (["--bits", "4", "--act-bits", "17"], "error: --act-bits 17 is outside 2..16"),
    ],
)
def test_first_last_bits_out_of_range_is_one_line(workdir: Path, args, words):
    result = _compile(["model.onnx", "--data", "data.npz", "-o", "out", *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[0].startswith(words), result.output
    assert not (workdir / "out").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--method", "eqn3", "--budget", "avg-bits=4"], "--budget needs --method milp"),
        (["--method", "milp", "--target-avg-bits", "4"], "--target-avg-bits and --rounds are Eqn 3's"),
        (["--method", "milp", "--budget", "size=4"], "--budget 'size=4'"),
        (["--method", "eqn3", "--robustness-signal", "lipschitz"], "--robustness-signal needs --method milp"),
    ],
)
def test_allocation_options_of_the_other_method_are_refused(workdir: Path, args, words):
    result = _compile(["model.onnx", "--data", "data.npz", "-o", "out", *args])
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not (workdir / "out").exists()


def test_the_ans_weight_default_is_the_solvers():
    from quanos_onnx.allocate.solve import DEFAULT_ANS_WEIGHT
    from quanos_onnx.commands.compile import CompileOptions

    option = next(p for p in compile_command.params if p.name == "ans_weight")
    assert option.default == DEFAULT_ANS_WEIGHT == CompileOptions().ans_weight


def test_a_milp_search_keeps_samples_of_its_own_out_of_calibration() -> None:
    from quanos_onnx.commands.compile import MIN_SEARCH_SAMPLES, calibration_samples

    assert calibration_samples(512, 200, searched=True) == 100
    assert calibration_samples(512, 600, searched=True) == 600 - MIN_SEARCH_SAMPLES
    assert calibration_samples(512, 5000, searched=True) == 512
    assert calibration_samples(512, 200, searched=False) == 512
    assert calibration_samples(512, 1, searched=True) == 1


def test_the_search_judges_a_plan_by_a_lower_bound_on_its_paired_difference_from_float() -> None:
    from quanos_onnx.commands.compile import GUARD_STANDARD_ERRORS, guarded_accuracy

    float_correct = np.array([True] * 99 + [False])
    same = float_correct.copy()
    assert guarded_accuracy(float_correct, same) == pytest.approx(0.99)
    lucky = float_correct.copy()
    lucky[:3] = False
    lucky[99] = True  # 3 lost, 1 gained: 97% against 99%, 4 discordant samples
    assert guarded_accuracy(float_correct, lucky) == pytest.approx(0.97 - GUARD_STANDARD_ERRORS * 2 / 100)


def test_the_milp_search_on_ray_writes_the_same_model_and_plan(workdir: Path, ray_address: str, quanos_in_child):
    """The search's trial plans (bisection rounds, the Pareto front and its uniform points)
    as Ray jobs: the same plan, search record and model bytes as in one process."""
    common = [
        "model.onnx", "--data", "data.npz", "--max-accuracy-drop", "5", "--pareto", "--max-bits", "6",
        "--calibration-samples", "24", "--samples", "16", "--sensitivity-samples", "16", "--eval-samples", "8", "--no-figures",
    ]
    here = _compile([*common, "-o", "here"])
    assert here.exit_code == 0, here.output
    on_ray = quanos_in_child(*common, "--ray", ray_address, "-o", "ray", cwd=workdir, entry="compile_main", ray=True)
    assert on_ray.returncode == 0, on_ray.stdout + on_ray.stderr
    for name in (MODEL_FILE, PLAN_FILE, "report.json"):
        assert (workdir / "ray" / name).read_bytes() == (workdir / "here" / name).read_bytes(), name
    assert "<img" not in (workdir / "ray" / "report.html").read_text()
