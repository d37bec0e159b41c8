"""The public Python API (quanos_onnx/__init__.py, docs/api.md): every data form gives the same
model, results hold the artifacts in memory, save() writes what the CLI writes byte for byte,
errors name the API argument, and importing the package stays light."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnxruntime.quantization import CalibrationDataReader
from tiny_models import vgg_chain

import quanos_onnx as qn
from quanos_onnx import report
from quanos_onnx.cli import main
from quanos_onnx.commands.analyze import AnalyzeOptions
from quanos_onnx.commands.compile import CompileOptions
from quanos_onnx.commands.energy import EnergyOptions
from quanos_onnx.commands.evaluate import EvaluateOptions
from quanos_onnx.commands.export import ExportOptions
from quanos_onnx.commands.finetune import FinetuneOptions

REPO = Path(__file__).resolve().parents[1]
FIXED_RUN = report.RunInfo(("quanos", "compile"), "2026-01-01T00:00:00Z", 1.0)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("api")
    model = vgg_chain(channels=(4, 8))
    model.producer_name, model.producer_version = "test-exporter", "9.9"
    rng = np.random.default_rng(0)
    x, y = rng.random((24, 3, 8, 8), dtype=np.float32), rng.integers(0, 10, 24)
    onnx.save(model, folder / "model.onnx")
    np.savez(folder / "data.npz", x=x, y=y)
    return {"model": str(folder / "model.onnx"), "proto": model, "data": str(folder / "data.npz"), "x": x, "y": y}


class Reader(CalibrationDataReader):
    """What a user of onnxruntime.quantization.quantize_static already has."""

    def __init__(self, x: np.ndarray, batch: int) -> None:
        self.feeds = iter([{"x": x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def test_compile_returns_the_model_in_memory_named_as_ours(task) -> None:
    result = qn.compile(task["model"], task["data"], bits=8)
    assert isinstance(result.model, onnx.ModelProto) and isinstance(result.plan, qn.Plan)
    assert result.model.producer_name == "quanos-onnx" and result.model.producer_version == qn.__version__
    metadata = {entry.key: entry.value for entry in result.model.metadata_props}
    assert metadata["quanos.source_producer_name"] == "test-exporter"
    assert metadata["quanos.source_producer_version"] == "9.9"
    assert result.report["command"] == "compile" and result.energy["profiles"]
    assert [entry.weight_bits for entry in result.plan.layers if entry.quantized] == [8, 8]


def test_every_data_form_and_an_in_memory_model_compile_to_the_same_bytes(task) -> None:
    """x alone and a CalibrationDataReader are unlabeled: calibration needs no labels."""
    x, y = task["x"], task["y"]
    expected = qn.compile(task["model"], task["data"], bits=6).model.SerializeToString()
    forms = {
        "arrays": (x, y),
        "x alone": x,
        "batches": [(x[i : i + 5], y[i : i + 5]) for i in range(0, len(x), 5)],
        "reader": Reader(x, 7),
    }
    for name, data in forms.items():
        assert qn.compile(task["model"], data, bits=6).model.SerializeToString() == expected, name
    assert qn.compile(task["proto"], task["data"], bits=6).model.SerializeToString() == expected


def test_a_torch_dataloader_is_data(task) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.from_numpy(task["x"]), torch.from_numpy(task["y"])), batch_size=10)
    expected = qn.compile(task["model"], task["data"], bits=6).model.SerializeToString()
    assert qn.compile(task["model"], loader, bits=6).model.SerializeToString() == expected


def test_save_writes_the_cli_files_byte_for_byte(task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same settings and seed, same bytes: run provenance (start, wall time, command line)
    is the only thing that differs between two runs, so it is fixed here."""
    monkeypatch.setattr(report.RunClock, "finish", lambda self, threads=None: FIXED_RUN)
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    cli = CliRunner().invoke(
        main, ["compile", task["model"], "--data", task["data"], "--plan", str(_plan(tmp_path)), "--eps", "8/255",
               "--calibration-samples", "16", "--input-range", "0,1", "--max-accuracy-drop", "none", "-o", str(cli_out)]
    )
    assert cli.exit_code == 0, cli.output
    result = qn.compile(
        task["model"], task["data"], plan=str(_plan(tmp_path)), eps=8 / 255, calibration_samples=16, max_accuracy_drop=None
    )
    written = result.save(api_out)
    names = sorted(path.name for path in cli_out.iterdir())
    assert names == sorted(path.name for path in written) == sorted(result.files())
    for name in names:
        assert (api_out / name).read_bytes() == (cli_out / name).read_bytes(), name


def test_analyze_evaluate_energy_and_export_save_what_their_commands_write(task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report.RunClock, "finish", lambda self, threads=None: FIXED_RUN)
    compiled = tmp_path / "q.onnx"
    result = qn.compile(task["model"], task["data"], bits=4)
    compiled.write_bytes(result.model.SerializeToString())
    runs = {
        "analyze": (qn.analyze(task["model"], task["data"], samples=8, audit_attacks=("fgsm",), audit_eps=(0.1,), apgd_steps=2),
                    ["analyze", task["model"], "--data", task["data"], "--samples", "8", "--audit-attacks", "fgsm", "--audit-eps", "0.1", "--apgd-steps", "2"]),
        "evaluate": (qn.evaluate([task["model"], str(compiled)], task["data"], attack=("fgsm",), eps=(0.1,)),
                     ["evaluate", task["model"], str(compiled), "--data", task["data"], "--attack", "fgsm", "--eps", "0.1"]),
        "energy": (qn.energy(task["model"], plan=result.plan, hw=("all",)), None),
    }
    for name, (api_result, arguments) in runs.items():
        written = api_result.save(tmp_path / f"api-{name}")
        assert sorted(p.name for p in written) == sorted(api_result.files())
        if arguments is None:
            continue
        cli = CliRunner().invoke(main, [*arguments, "-o", str(tmp_path / f"cli-{name}")])
        assert cli.exit_code == 0, cli.output
        for path in written:
            assert path.read_bytes() == (tmp_path / f"cli-{name}" / path.name).read_bytes(), (name, path.name)
    exported = qn.export(result.model, to="ort-overrides")
    assert exported.overrides is not None and exported.model is None
    cli = CliRunner().invoke(main, ["export", str(compiled), "--to", "ort-overrides", "-o", str(tmp_path / "o.json")])
    assert cli.exit_code == 0, cli.output
    assert exported.save(tmp_path / "api.json")[0].read_bytes() == (tmp_path / "o.json").read_bytes()
    assert isinstance(qn.export(str(compiled), to="qonnx").model, onnx.ModelProto)


def test_layers_and_finetune(task, tmp_path: Path) -> None:
    listed = qn.layers(task["proto"])
    assert [layer.name for layer in listed.layers] == ["conv0", "conv1", "classifier"]
    assert listed.document()["model"] == "<onnx.ModelProto>"
    compiled = qn.compile(task["model"], task["data"], bits=6).model
    tuned = qn.finetune(compiled, (task["x"], task["y"]), epochs=1, batch_size=8, calibration_samples=8)
    assert tuned.model.producer_name == "quanos-onnx" and tuned.document["output"] is None
    assert {e.key: e.value for e in tuned.model.metadata_props}["quanos.source_producer_name"] == "test-exporter"
    target = tmp_path / "tuned.onnx"
    assert tuned.save(target) == (target,) and target.read_bytes() == tuned.model.SerializeToString()


def test_errors_name_the_api_argument_and_the_cli_names_the_flag(task, tmp_path: Path) -> None:
    with pytest.raises(qn.UsageError) as error:
        qn.compile(task["model"], task["data"], input_range="0,1")
    assert str(error.value).startswith("input_range '0,1' is not a tuple of 2") and error.value.arguments == ("input_range",)
    with pytest.raises(qn.UsageError, match=r"^target_avg_bits '6' is not a number or None$"):
        qn.compile(task["model"], task["data"], target_avg_bits="6")
    with pytest.raises(qn.UsageError, match=r"^input_range 1,0: LO must be below HI"):
        qn.compile(task["model"], task["data"], input_range=(1, 0))
    with pytest.raises(qn.UsageError, match=r"^bits and plan exclude each other$"):
        qn.compile(task["model"], task["data"], bits=8, plan=str(_plan(tmp_path)))
    with pytest.raises(qn.UsageError, match=r"^data: a dict is not data$"):
        qn.compile(task["model"], {"x": task["x"]}, bits=8)
    with pytest.raises(qn.UsageError, match=r"^model 3 is not a path"):
        qn.compile(3, task["data"], bits=8)
    cli = CliRunner().invoke(main, ["compile", task["model"], "--data", task["data"], "--input-range", "1,0", "-o", str(tmp_path / "o")])
    assert cli.exit_code == 2 and cli.stderr.startswith("error: --input-range 1,0: LO must be below HI")
    cli = CliRunner().invoke(main, ["compile", task["model"], "--data", task["data"], "--bits", "8", "--plan", str(_plan(tmp_path))])
    assert "error: --bits and --plan exclude each other" in cli.stderr


@pytest.mark.parametrize(
    ("function", "options_class", "inputs"),
    [
        (qn.compile, CompileOptions, {"model", "data", "plan", "eval_data", "progress"}),
        (qn.analyze, AnalyzeOptions, {"model", "data", "progress"}),
        (qn.evaluate, EvaluateOptions, {"models", "data", "progress"}),
        (qn.finetune, FinetuneOptions, {"model", "data", "plan", "val", "progress", "on_epoch"}),
        (qn.energy, EnergyOptions, {"model", "plan"}),
        (qn.export, ExportOptions, {"model"}),
    ],
)
def test_each_function_takes_its_options_with_their_defaults(function, options_class, inputs) -> None:
    """The keyword arguments are the options dataclass's fields, defaults included."""
    parameters = inspect.signature(function).parameters
    assert set(parameters) == {field.name for field in fields(options_class)} | inputs
    for field in fields(options_class):
        expected = inspect.Parameter.empty if field.default is MISSING else field.default
        assert parameters[field.name].default == expected, field.name
        assert parameters[field.name].kind is inspect.Parameter.KEYWORD_ONLY


def test_the_api_functions_survive_importing_the_stages_of_the_same_name() -> None:
    import quanos_onnx.export  # noqa: F401
    import quanos_onnx.finetune  # noqa: F401
    import quanos_onnx.layers  # noqa: F401
    from quanos_onnx.finetune import apply_plan

    assert callable(apply_plan)
    assert inspect.isfunction(qn.layers) and inspect.isfunction(qn.export) and inspect.isfunction(qn.finetune)
    assert sys.modules["quanos_onnx.layers"].list_layers is not None


@pytest.mark.parametrize(
    "code",
    [
        "import quanos_onnx",
        "from click.testing import CliRunner; from quanos_onnx.cli import main; "
        "result = CliRunner().invoke(main, ['layers', 'examples/mnist/mnist-8.onnx']); assert result.exit_code == 0, result.output",
    ],
)
def test_import_and_quanos_layers_load_no_torch_or_matplotlib(code: str) -> None:
    check = f"{code}; import sys; print(sorted(m for m in ('torch', 'matplotlib', 'onnxruntime', 'ray') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


def _plan(folder: Path) -> Path:
    path = folder / "plan.json"
    plan = {"format": "quanos-plan", "version": 1, "layers": [{"name": "conv0", "bits": 3}, {"name": "conv1", "bits": 5}]}
    path.write_text(json.dumps(plan))
    return path
