"""The CLI's contract with users and scripts (docs/cli.md): exit codes, one-line errors,
--debug tracebacks, Ctrl-C leaving no output, and a fast `quanos --help`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_models import vgg_chain

from quanos_onnx import outputs
from quanos_onnx.commands import compile as compile_room
from quanos_onnx.cli import _interrupt_once, compile_command, main
from quanos_onnx.errors import ModelError


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[str, str]:
    model, data = tmp_path / "tiny.onnx", tmp_path / "data.npz"
    onnx.save(vgg_chain(channels=(4, 8)), model)
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((8, 3, 8, 8), dtype=np.float32), y=np.arange(8))
    return str(model), str(data)


def compile_bits(inputs: tuple[str, str], out: Path, *extra: str) -> list[str]:
    return ["compile", inputs[0], "--data", inputs[1], "--bits", "8", "-o", str(out), *extra]


def interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def test_success_exits_0_and_writes_model_plan_and_report(inputs: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, compile_bits(inputs, out))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    written = sorted(path.name for path in out.iterdir())
    assert written == ["model.quanos.onnx", "plan.json", "report.html", "report.json", "report.md", "run.json"]


def test_the_interrupt_handler_raises_once_however_often_it_is_called() -> None:
    """A second Ctrl-C queued while the first is being taken gets its handler call too:
    that call must not raise into the cleanup."""
    previous = _interrupt_once()
    try:
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert handler(signal.SIGINT, None) is None
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_a_stage_exits_130_and_writes_nothing(inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compile_room, "quantize", interrupt)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, compile_bits(inputs, out))
    assert result.exit_code == 130
    assert result.stderr.splitlines() == ["error: interrupted; no output was written"]
    assert not out.exists()


def test_ctrl_c_inside_exec_code_under_python_m_still_exits_130(inputs: tuple[str, str], tmp_path: Path) -> None:
    """A Ctrl-C that lands in code built by exec() (a dataclass's __init__ during an
    import) must not make `python -m` die of SIGINT (-2) after the line is printed."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys\n"
        "from quanos_onnx import cli\n"
        "from quanos_onnx.commands import compile as compile_room\n"
        "def quantize(*args, **kwargs):\n"
        "    exec('raise KeyboardInterrupt')\n"
        "compile_room.quantize = quantize\n"
        f"sys.argv = ['quanos', *{compile_bits(inputs, tmp_path / 'out')!r}]\n"
        "cli.main()\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    done = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], env=environment, capture_output=True, timeout=120)
    assert (done.returncode, done.stderr.decode().splitlines()) == (130, ["error: interrupted; no output was written"])
    assert not (tmp_path / "out").exists()


def test_an_import_cut_short_by_ctrl_c_is_an_interrupt_not_an_internal_error(
    inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pybind11 turns a Ctrl-C during a C extension's import into "ImportError:
    initialization failed" with the KeyboardInterrupt as its cause."""

    def interrupted_import(*args: object, **kwargs: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise ImportError("initialization failed") from interrupt

    monkeypatch.setattr(compile_room, "quantize", interrupted_import)
    result = CliRunner().invoke(main, compile_bits(inputs, tmp_path / "out"))
    assert (result.exit_code, result.stderr.splitlines()) == (130, ["error: interrupted; no output was written"])


@pytest.mark.parametrize("files_before_interrupt", [0, 1, 4])
def test_ctrl_c_while_writing_removes_what_was_written(
    inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files_before_interrupt: int
) -> None:
    real_write = outputs.write_file_bytes
    calls = []

    def write_then_interrupt(target: Path, data: bytes) -> None:
        calls.append(target)
        if len(calls) > files_before_interrupt:
            raise KeyboardInterrupt
        real_write(target, data)

    monkeypatch.setattr(outputs, "write_file_bytes", write_then_interrupt)
    out = tmp_path / "existing"
    out.mkdir()
    result = CliRunner().invoke(main, compile_bits(inputs, out))
    assert result.exit_code == 130
    assert list(out.iterdir()) == []


def test_ctrl_c_in_analyze_and_energy_writes_nothing(inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "write_file_bytes", interrupt)
    analyze = CliRunner().invoke(
        main, ["analyze", inputs[0], "--data", inputs[1], "--samples", "4", "--audit-eps", "0.1", "--audit-attacks", "fgsm", "--large-eps", "0.5", "-o", str(tmp_path / "a")]
    )
    energy = CliRunner().invoke(main, ["energy", inputs[0], "-o", str(tmp_path / "e")])
    assert (analyze.exit_code, energy.exit_code) == (130, 130)
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()


def test_debug_shows_the_traceback_of_a_user_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.onnx")
    plain = CliRunner().invoke(main, ["layers", missing])
    debug = CliRunner().invoke(main, ["layers", missing, "--debug"])
    assert plain.exit_code == 1 and isinstance(plain.exception, SystemExit)
    assert debug.exit_code == 1 and isinstance(debug.exception, ModelError)


def test_an_internal_error_is_one_line_marked_as_a_bug(inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shape mismatch\n  deep detail")

    monkeypatch.setattr(compile_room, "quantize", broken)
    result = CliRunner().invoke(main, compile_bits(inputs, tmp_path / "out"))
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: internal error, RuntimeError: shape mismatch (hint: this is a bug")
    debug = CliRunner().invoke(main, compile_bits(inputs, tmp_path / "out", "--debug"))
    assert isinstance(debug.exception, RuntimeError)
    assert not (tmp_path / "out").exists()


def test_quanos_compile_entry_point_reports_usage_errors_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        compile_command.main(["model.onnx", "--bits", "many"], prog_name="quanos-compile")
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: Invalid value for '--bits': 'many' is not a valid integer. (hint: run 'quanos-compile --help')"
    ]


def test_help_and_version_exit_0() -> None:
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0
    assert CliRunner().invoke(main, ["compile", "--help"]).exit_code == 0
    version = CliRunner().invoke(main, ["--version"])
    assert version.exit_code == 0 and "quanos" in version.stdout


def test_help_imports_no_heavy_module() -> None:
    """`quanos --help` must stay fast: torch, matplotlib, onnxruntime and ray load inside commands."""
    code = (
        "import sys; from click.testing import CliRunner; from quanos_onnx.cli import main; "
        "CliRunner().invoke(main, ['--help']); "
        "print(sorted(m for m in ('torch', 'matplotlib', 'onnxruntime', 'onnx', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"


def test_layers_imports_neither_torch_nor_matplotlib(tmp_path: Path) -> None:
    """`quanos layers` only reads the graph: torch, matplotlib, onnxruntime and ray (seconds
    of imports on a loaded machine) stay out of it."""
    from tiny_models import vgg_chain

    onnx.save(vgg_chain(), tmp_path / "chain.onnx")
    code = (
        "import sys; from click.testing import CliRunner; from quanos_onnx.cli import main; "
        f"result = CliRunner().invoke(main, ['layers', {str(tmp_path / 'chain.onnx')!r}]); "
        "assert result.exit_code == 0, result.output; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'onnxruntime', 'scipy', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"


def test_command_line_of_the_run_is_recorded(inputs: tuple[str, str], tmp_path: Path) -> None:
    args = compile_bits(inputs, tmp_path / "out")
    assert CliRunner().invoke(main, args).exit_code == 0
    run = (tmp_path / "out" / "run.json").read_text()
    assert f'"argv": [\n    "quanos",\n    "compile",\n    "{inputs[0]}"' in run


@pytest.mark.parametrize(
    ("command", "options_class"),
    [
        ("compile", "quanos_onnx.commands.compile.CompileOptions"),
        ("analyze", "quanos_onnx.commands.analyze.AnalyzeOptions"),
        ("evaluate", "quanos_onnx.commands.evaluate.EvaluateOptions"),
        ("finetune", "quanos_onnx.commands.finetune.FinetuneOptions"),
        ("energy", "quanos_onnx.commands.energy.EnergyOptions"),
        ("export", "quanos_onnx.commands.export.ExportOptions"),
    ],
)
def test_every_api_option_is_a_flag_of_the_same_name(command: str, options_class: str) -> None:
    """The CLI builds the API's options dataclass from its parameters by name, and names an
    error's argument by the flag of that name: no option may be missing or named otherwise."""
    import importlib
    from dataclasses import fields

    from quanos_onnx.cli import flag_naming

    module, _, name = options_class.rpartition(".")
    parameters = {param.name for param in main.commands[command].params}
    missing = {field.name for field in fields(getattr(importlib.import_module(module), name))} - parameters
    assert missing == set()
    naming = flag_naming(main.commands[command])
    assert naming("model") in ("MODEL", "QMODEL") or command in ("evaluate", "analyze")  # MODEL [MORE ...]
    assert all(naming(field).startswith("--") for field in parameters - {"model", "models"})
