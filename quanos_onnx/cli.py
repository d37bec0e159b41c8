"""Command line: `quanos` (a group of commands) and `quanos-compile`.

The only module that imports click. Every failure a user can cause ends in one line on
stderr that starts with "error:" and names the culprit, and an exit code (docs/cli.md):
0 success, 1 bad model/data/plan/profile/output (QuanosError), 2 usage (a bad option,
click's own usage errors included), 3 outputs complete but stdout failed or Ctrl-C came
after writing them, 130 interrupted with nothing written; a failed run leaves the output
folder as it was. --debug shows the traceback instead. Heavy modules are imported inside commands
so that `quanos --help` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys


def _exit_on_early_interrupt(signum: int, frame: object) -> None:
    """Ctrl-C while the program is still importing: nothing can have been written yet."""
    os.write(2, b"error: interrupted; no output was written\n")
    os._exit(130)


if __name__ == "__main__" or os.path.basename(sys.argv[0]) in ("quanos", "quanos-compile"):
    signal.signal(signal.SIGINT, _exit_on_early_interrupt)  # main() installs the real handler

import json  # noqa: E402
import logging  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import Naming, QuanosError, printable  # noqa: E402
from .outputs import forget_written, written_files  # noqa: E402
from .threads import DEFAULT_THREADS  # noqa: E402

EXIT_BAD_INPUT = 1
EXIT_WRITTEN = 3
"""The outputs are complete on disk, but the command was cut short after writing them
(stdout refused the result, or Ctrl-C came after the files were in place)."""
EXIT_ACCURACY_GUARD = 4
"""compile wrote its outputs, but the compiled model broke --max-accuracy-drop (docs/cli.md)."""
EXIT_INTERRUPTED = 130
INTERRUPTED = "error: interrupted; no output was written"


@dataclass(frozen=True)
class Invocation:
    """The command line as the user typed it, for the report's provenance (ctx.obj)."""

    argv: tuple[str, ...]


class OneLineErrors:
    """main() for the group and the commands: click's usage errors in one line, exit 2.

    click would print a usage block and "Error: ..." on several lines; scripts and humans
    get the same single "error: ..." line as for every other failure instead.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        arguments = list(sys.argv[1:] if args is None else args)
        program = (prog_name,) if prog_name else _program_name() if args is None else (getattr(self, "name", None) or "quanos",)
        extra.setdefault("obj", Invocation((*program, *arguments)))
        if not standalone_mode:
            return super().main(arguments, prog_name, complete_var, False, **extra)  # type: ignore[misc]
        forget_written()
        previous = _interrupt_once()
        # Called with args (a script, click's CliRunner): give the caller its handler back.
        after = previous if args is not None else signal.SIG_IGN
        try:
            code = super().main(arguments, prog_name, complete_var, False, **extra)  # type: ignore[misc]
            sys.stdout.flush()
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()
            _exit(error.exit_code, after)
        except click.ClickException as error:
            click.echo(f"error: {_click_error_line(error)}", err=True)
            _exit(error.exit_code, after)
        except (click.Abort, KeyboardInterrupt):
            line, code = _interrupted()
            click.echo(line, err=True)
            _exit(code, after)
        except OSError as error:
            line, code = _stdout_lost(error)
            click.echo(line, err=True)
            _exit(code, after)
        _exit(code if isinstance(code, int) else 0, after)


def _interrupt_once() -> Any:
    """The first Ctrl-C raises KeyboardInterrupt; later ones are ignored, so a second
    Ctrl-C cannot cut short the cleanup that puts the output folder back as it was, nor
    the one line that says so. Returns the handler it replaced.

    SIG_IGN alone does not do it: a second signal that lands after Python took the first
    from its queue but before the handler's first line runs is queued again, and its
    handler call would raise a second KeyboardInterrupt in the cleanup (the process then
    died of SIGINT, status -2, after printing the line). So the handler raises once."""
    raised = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal raised
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if raised:
            return
        raised = True
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread: keep Python's handler
        return None


def _exit(code: int, handler: Any) -> None:
    """Exit with `code`, which already says what is on disk. A program ignores Ctrl-C from
    here on (while the interpreter shuts down) rather than change that answer; a caller
    that passed args gets its own handler back."""
    if handler is not None:
        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:
            pass
    _forget_unhandled_interrupt()
    sys.exit(code)


def _forget_unhandled_interrupt() -> None:
    """CPython 3.11 marks a KeyboardInterrupt that leaves code run by exec() of a string
    as "unhandled" (dataclasses and namedtuple build their methods that way, so a Ctrl-C
    during an import often lands there), even when we catch it later. Under `python -m`
    the interpreter then kills itself with SIGINT at exit (status -2) instead of exiting
    with our code. Every exec() of a string clears that mark first, so one empty exec()
    here does it."""
    exec("")  # noqa: S102


def _interrupted() -> tuple[str, int]:
    """The line and exit code of a Ctrl-C: 130 only when this command wrote nothing."""
    written = written_files()
    if not written:
        return INTERRUPTED, EXIT_INTERRUPTED
    return f"error: interrupted after the outputs were written; {_describe(written)} complete", EXIT_WRITTEN


def _stdout_lost(error: OSError) -> tuple[str, int]:
    """stdout refused the result (a closed pipe, a full disk): say so, and whether the
    outputs exist (exit 3) or nothing was written (exit 1)."""
    _silence_stdout()
    reason = printable(error.strerror or str(error) or type(error).__name__)
    written = written_files()
    if not written:
        return f"error: stdout: cannot write the result ({reason}) (hint: check the pipe or disk that stdout goes to)", EXIT_BAD_INPUT
    return f"error: stdout: cannot write the result ({reason}); {_describe(written)} complete", EXIT_WRITTEN


def _describe(paths: Sequence[Path]) -> str:
    folders = sorted({str(path.parent) for path in paths})
    if len(folders) == 1:
        names = ", ".join(path.name for path in paths)
        return printable(f"the outputs in {folders[0]} ({names}) are")
    return printable(f"the outputs {', '.join(str(path) for path in paths)} are")


def _silence_stdout() -> None:
    """Point a broken stdout at /dev/null, so the interpreter's final flush cannot print a
    second error (the recipe of Python's signal documentation for EPIPE)."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


def _caused_by_interrupt(error: BaseException) -> bool:
    """Whether a Ctrl-C is behind this error: a C extension whose import is interrupted
    (pybind11's "ImportError: initialization failed") keeps the KeyboardInterrupt only
    as its cause. That is an interrupt for the user, not an internal error."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _from_stdout(error: BaseException) -> bool:
    """Whether an OSError was raised writing the command's result (click.echo to stdout)."""
    if not isinstance(error, OSError):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return any(frame.name == "echo" and Path(frame.filename).match("click/utils.py") for frame in frames)


def _program_name() -> tuple[str, ...]:
    """How the user started us: `quanos-compile`, `quanos` or `python -m quanos_onnx.cli`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return ("python", "-m", spec.name.removesuffix(".__main__"))
    return (Path(sys.argv[0]).name,)


def _click_error_line(error: click.ClickException) -> str:
    message = printable(error.format_message())
    context = getattr(error, "ctx", None)
    if isinstance(error, click.UsageError) and context is not None:
        message += f" (hint: run '{context.command_path} --help')"
    return message


class QuanosCommand(OneLineErrors, click.Command):
    """A click command that reports user errors in one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except QuanosError as error:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {error.one_line(flag_naming(self))}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            line, code = _interrupted()
            click.echo(line, err=True)
            ctx.exit(code)
        except Exception as error:
            if _caused_by_interrupt(error):
                line, code = _interrupted()
                click.echo(line, err=True)
                ctx.exit(code)
            if _from_stdout(error):
                line, code = _stdout_lost(error)  # type: ignore[arg-type]
                click.echo(line, err=True)
                ctx.exit(code)
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {_internal_error_line(error)}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


def flag_naming(command: click.Command) -> Naming:
    """The CLI's names for the API arguments an error names: the option's long flag
    (`input_range` -> `--input-range`) or the argument's metavar (`model` -> MODEL). The
    commands' parameter names are the API's argument names, so this is a lookup."""
    names: dict[str, str] = {}
    for param in command.params:
        if param.name is None:
            continue
        if isinstance(param, click.Option):
            names[param.name] = max(param.opts, key=len)
        else:
            names[param.name] = param.metavar or param.name.upper()
    return lambda name: names.get(name, "--" + name.replace("_", "-"))


def _internal_error_line(error: Exception) -> str:
    """A failure the code did not foresee: still one line, marked as a bug to report."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = f": {printable(lines[0])}" if lines else ""
    return (
        f"internal error, {type(error).__name__}{detail} "
        "(hint: this is a bug in quanos-onnx; rerun with --debug and report the traceback)"
    )


class QuanosGroup(OneLineErrors, click.Group):
    """The `quanos` group: its own usage errors (unknown command) in one line too."""


def _command_line() -> tuple[str, ...]:
    context = click.get_current_context()
    invocation = context.find_object(Invocation)
    return invocation.argv if invocation is not None else tuple(sys.argv)


def common_options(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.option("--debug", is_flag=True, help="Show tracebacks for errors.")(function)
    function = click.option("-q", "--quiet", is_flag=True, help="Only errors: no warnings, notes or progress bars.")(function)
    function = click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")(function)
    return function


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Log lines on stderr; Python warnings of the libraries underneath only with -v.

    Third-party warnings (torch, onnx) are about their internals, not the user's input, so
    they go through logging and stay out of the one-line contract of a normal run.
    """
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, stream=sys.stderr, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose and not quiet else logging.ERROR)


class PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped: warnings quote names from the user's files."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


def data_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--data", "data", type=click.Path(dir_okay=True), help="Labelled inputs: .npz (x, y), .npy, idx(.gz), .csv(.gz) or an image folder."),
        click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True, help="Layout of the data's images."),
        click.option("--scale", default=None, help="Multiply pixels by this (e.g. 1/255); uint8 data is scaled by 1/255 by default."),
        click.option("--mean", default=None, help="Per-channel mean to subtract (comma-separated)."),
        click.option("--std", default=None, help="Per-channel std to divide by (comma-separated)."),
        click.option("--data-range", default=None, help="START:STOP slice of the data's samples (e.g. 932:)."),
        click.option("--input-shape", default=None, help="Fix the model's dynamic input dims: 3x224x224 (or 1x3x224x224; the batch stays dynamic)."),
        click.option("--labels", type=click.Path(dir_okay=False), default=None, help="Labels of an image folder: a CSV of file,label rows (files relative to the folder)."),
        click.option("--label-offset", type=int, default=0, show_default=True, help="Add this to every label (1 for a 1001-class model with background class 0)."),
        click.option("--resize", type=int, default=None, help="Resize images' shorter side to this many pixels (bilinear)."),
        click.option("--crop", default=None, help="Crop the images' centre: SIZE or HEIGHTxWIDTH (after --resize)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where the twin (attacks, ANS, fine-tuning) and onnxruntime compute; cuda needs a GPU and a CUDA build of torch (onnxruntime-gpu for onnxruntime)."),
        click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True, help="Channel order the model takes for colour images."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and attacks."),
        click.option("--threads", type=int, default=DEFAULT_THREADS or 0, show_default=True, help="Threads of torch and of onnxruntime (intra-op), set together; the default is every core this process may use; 0 keeps the libraries' defaults (docs/benchmarks.md)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _typed(options: dict[str, Any], *, eps_lists: Sequence[str] = ()) -> dict[str, Any]:
    """The API's typed values for the options the command line gives as text: eps values
    ('8/255'), ranges ('0,1', '932:'), scales ('1/255') and per-channel lists."""
    from .commands import options as text

    converters: dict[str, Callable[[str], Any]] = {
        "eps": lambda value: text.eps_from_text(value, "eps"),
        "pgd_alpha": lambda value: text.eps_from_text(value, "pgd_alpha"),
        "adv_eps": lambda value: text.eps_from_text(value, "adv_eps"),
        "adv_alpha": lambda value: text.eps_from_text(value, "adv_alpha"),
        "large_eps": lambda value: text.eps_from_text(value, "large_eps"),
        "input_range": text.input_range_from_text,
        "data_range": text.data_range_from_text,
        "scale": text.scale_from_text,
        "mean": lambda value: text.floats_from_text(value, "mean"),
        "std": lambda value: text.floats_from_text(value, "std"),
        "input_shape": text.shape_from_text,
        "crop": text.crop_from_text,
    }
    for name in eps_lists:
        converters[name] = lambda value, name=name: text.eps_list_from_text(value, name)
    typed = {name: converters[name](value) if name in converters and value is not None else value for name, value in options.items()}
    if "threads" in typed:
        typed["threads"] = typed["threads"] or None
    return typed


def _command_options(options_class: type[Any], values: dict[str, Any]) -> Any:
    """The command's options dataclass from the parsed command line (fields by name)."""
    from dataclasses import fields

    return options_class(**{field.name: values[field.name] for field in fields(options_class) if field.name in values})


def audit_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The APGD settings and the large-eps probe of the robustness audit (analyze, evaluate)."""
    options = [
        click.option("--apgd-steps", type=int, default=50, show_default=True, help="APGD iterations per restart (the effort check doubles them)."),
        click.option("--apgd-restarts", type=int, default=1, show_default=True, help="APGD random restarts (the effort check adds two)."),
        click.option("--large-eps", default="0.5", show_default=True, help="Strength of the probe that should break every sample (masking check)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(name="quanos", cls=QuanosGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quanos")
def main() -> None:
    """quanos-onnx: adversarial-noise-sensitivity driven mixed-precision quantization of ONNX classifiers (QUANOS)."""


@main.command("layers", cls=QuanosCommand)
@click.argument("model", metavar="MODEL", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--input-shape", default=None, help="Fix the model's dynamic input dims: 3x224x224 (the batch stays dynamic).")
@click.option("--lipschitz", is_flag=True, help="Add each layer block's Lipschitz upper bound (operator norm, BatchNorm folded; imports torch).")
@common_options
def layers_command(model: str, as_json: bool, input_shape: str | None, lipschitz: bool, verbose: int, quiet: bool, debug: bool) -> None:
    """List the quantizable layers of MODEL and the residual joins."""
    _configure_logging(verbose, quiet)
    from .commands.layers import run_layers
    from .commands.options import shape_from_text

    result = run_layers(model, None if input_shape is None else shape_from_text(input_shape), lipschitz=lipschitz)
    _echo_result(result.document(), result.summary_text, as_json=as_json)


@main.command("energy", cls=QuanosCommand)
@click.argument("model", metavar="MODEL", type=click.Path())
@click.option("--plan", "plan", type=click.Path(), default=None, help="Per-layer bits from a plan.json; without it the float model (32 bits everywhere).")
@click.option("--hw", "hw", multiple=True, default=("standard",), show_default=True, help="Hardware profile: standard, dg, dvafs, all (those three) or a profile JSON file; repeatable.")
@click.option("-o", "--output", "output", default=None, type=click.Path(), help="Also write energy.json and the report (report.html, report.md, report.json, run.json) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the quanos-energy JSON document (docs/hardware.md).")
@common_options
def energy_command(model: str, plan: str | None, hw: tuple[str, ...], output: str | None, as_json: bool, verbose: int, quiet: bool, debug: bool) -> None:
    """Memory accesses, MACs, energy and weight memory of MODEL per layer and in total (paper Eqns 4-5)."""
    _configure_logging(verbose, quiet)
    from .commands.energy import EnergyOptions, run_energy

    result = run_energy(model, EnergyOptions(hw=hw), plan=plan, save_to=output, command_line=_command_line())
    if result.unplanned and not quiet:
        click.echo(f"note: {len(result.unplanned)} layer(s) not in the plan count as float: {', '.join(result.unplanned)}", err=True)
    _echo_result(result.energy, result.summary_text, as_json=as_json)


def compile_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("model", metavar="MODEL", type=click.Path()),
        click.option("-o", "--output", "output", default="quanos-out", show_default=True, type=click.Path(), help="Output directory."),
        click.option("--bits", type=int, default=None, help="Uniform bits for every layer (a baseline) instead of QUANOS."),
        click.option("--plan", "plan", type=click.Path(), default=None, help="Per-layer bits from a plan.json instead of QUANOS."),
        click.option("--quantize-output", is_flag=True, help="Quantize the output layer too (kept float by default)."),
        click.option("--first-last-bits", type=int, default=None, metavar="N", help="Keep the first quantized layer and, with --quantize-output, the output layer at N bits (weights and input) whatever the plan says, and the first layer's output (its readers' input) at N bits, as the PTQ papers do with 8; the milp counts them in its budget."),
        click.option("--input-bits", type=int, default=None, metavar="N", help="Read the model input at no more than N bits (the first layer's input activation), on the written plan and every plan the milp measures: a coarse input grid keeps small perturbations out (docs/method.md, \"Input bit depth\")."),
        click.option("--act-bits", type=int, default=None, metavar="N", help="Every quantized layer's activations at N bits whatever its weight bits (weights-only mixed precision; 8 suits onnxruntime's CPU kernels, where narrower activations save nothing): on the written plan, the milp's table and trial plans, and the verification's uniform models (docs/method.md, \"Activation bits\")."),
        click.option("--join-operand-bits", default="auto", show_default=True, metavar="N|paper|auto", help="Quantize the operands of residual Add/Concat joins at no fewer than N bits; the join's sum still meets the k-bit input grid of the layer it feeds, so a block's output is rounded once (as BRECQ/QDrop place quantizers; docs/quantization.md, \"Residual joins\"). paper: the paper's rule, operands at the join's bits. auto: 8, except the paper's rule for --method eqn3 and a --plan's own."),
        click.option("--calibration", type=click.Choice(["auto", "probe", "minmax", "percentile", "entropy", "mse"]), default="auto", show_default=True, help="Activation range estimator, per quantizer at its bits (auto: entropy up to 6 bits, min/max above; probe: at 6 bits and fewer entropy or mse, whichever a uniform 4-bit probe on the calibration data finds closer to float; docs/quantization.md)."),
        click.option("--percentile", type=float, default=99.99, show_default=True, help="Percentile for --calibration percentile."),
        click.option("--weight-clipping", type=click.Choice(["absmax", "mse", "output"]), default="output", show_default=True, help="Per-channel weight scales: absmax, or the clipping that minimizes the weight's (mse) or the layer output's (output) error."),
        click.option("--bias-correction/--no-bias-correction", default=True, show_default=True, help="Correct each layer's mean output shift on the calibration data (layers with inputs of 4+ bits)."),
        click.option("--equalize/--no-equalize", default=False, show_default=True, help="Cross-layer equalization of Conv -> ReLU -> Conv chains before quantizing."),
        click.option("--rounding", type=click.Choice(["nearest", "gptq", "adaround", "brecq"]), default="nearest", show_default=True, help="Weight rounding: nearest; gptq (closed form, layer by layer, seconds to minutes); or optimized through the twin per layer (adaround) or per residual block with QDrop (brecq)."),
        click.option("--rounding-iterations", type=int, default=500, show_default=True, help="Optimization steps per layer or block for --rounding adaround|brecq."),
        click.option("--calibration-samples", type=int, default=512, show_default=True, help="Samples used to calibrate activation ranges."),
        click.option("--storage", type=click.Choice(["int8", "int4", "int2"]), default="int8", show_default=True, help="Weight containers: int4/int2 store layers of <= 4 / <= 2 bits packed (smaller file; see docs/interop.md)."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        click.option("--k-init", type=int, default=16, show_default=True, help="Eqn 3's initial bits."),
        click.option("--k-min", type=int, default=2, show_default=True, help="Fewest bits a layer may get."),
        click.option("--rounds", type=int, default=1, show_default=True, help="Iterative QUANOS: re-measure ANS on the quantized model and allocate from the mean of all measurements, until the bits stop changing or N rounds."),
        click.option("--target-avg-bits", type=float, default=None, help="Scale ANS so the parameter-weighted average bits meet this budget."),
        click.option("--method", type=click.Choice(["milp", "eqn3"]), default="milp", show_default=True, help="milp: measured per-layer cost + an exact integer program, ANS-weighted; without --budget the smallest plan within --max-accuracy-drop of float (docs/method.md). eqn3: the paper's rule (with --k-init, --rounds, --target-avg-bits)."),
        click.option("--budget", default=None, metavar="KIND=VALUE", help="milp: avg-bits=B, bytes=N, energy=PROFILE:PJ (standard, dg, dvafs or a profile file; pJ per image) or bitops=N. Without it: the smallest plan within --max-accuracy-drop; with it, the solved plan or the widest uniform plan within the budget, whichever is more accurate on the samples after calibration, and with a guard then repaired (bits raised) until the guard holds there."),
        click.option("--ans-weight", type=float, default=0.25, show_default=True, help="milp: share of the best predicted cost spent on giving high-ANS layers fewer bits (0: accuracy only)."),
        click.option("--robustness-signal", type=click.Choice(["ans", "lipschitz", "both"]), default="ans", show_default=True, help="milp: the robustness term weighted by --ans-weight: ANS (high-ANS layers get fewer bits), the layers' Lipschitz bounds (high-bound layers keep more bits) or both (docs/method.md)."),
        click.option("--sensitivity", type=click.Choice(["auto", "kl", "mse", "fisher"]), default="auto", show_default=True, help="milp: per-layer cost estimator (logit KL or MSE in onnxruntime, or the gradient score through the twin; auto: kl unless the table would cost over 5e12 multiply-accumulates, then fisher)."),
        click.option("--sensitivity-samples", type=int, default=256, show_default=True, help="milp: samples the sensitivity is measured on."),
        click.option("--max-bits", type=int, default=8, show_default=True, help="milp: widest candidate bits (candidates are --k-min..--max-bits; 8 keeps every layer in onnxruntime's integer kernels)."),
        click.option("--pareto", is_flag=True, help="milp: also solve one plan per average-bits budget, write and measure each (and uniform 2..8) like the compiled model, and chart the front (pareto.png, report.html)."),
        click.option("--eval-data", "eval_data", type=click.Path(dir_okay=True), default=None, help="Evaluate the compiled model on this data (read like --data) instead of a held-out part of --data."),
        click.option("--eval-fraction", type=float, default=0.2, show_default=True, help="Share of --data held out to evaluate the compiled model (at least 100 samples, or half the data)."),
        click.option("--eval-attacks", default="fgsm,pgd", show_default=True, help="Attacks of the verification at --eps (PGD: 7 steps), or none."),
        click.option("--eval-samples", type=int, default=64, show_default=True, help="Held-out samples attacked per model (clean accuracy uses all of them)."),
        click.option("--evaluate/--no-eval", "evaluate", default=True, help="Verify the compiled model on held-out data against float and uniform (default) or skip it."),
        click.option("--max-accuracy-drop", default="1.0", show_default=True, help="Points of clean accuracy the compiled model may lose against float before compile exits 4; none: no guard."),
    ]
    for option in reversed(options):
        function = option(function)
    return attack_options(data_options(run_options(function)))


def run_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Where the independent jobs run, and whether the report draws figures (compile, analyze, evaluate)."""
    options = [
        click.option("--ray", "ray", default=None, metavar="auto|ADDRESS", help="Run the independent jobs (evaluate/analyze: one per model; compile: the milp search's trial plans) as Ray tasks on this cluster (auto: the running one; local: a new one for this command); needs pip install quanos-onnx[ray] (docs/cli.md)."),
        click.option("--figures/--no-figures", "figures", default=True, help="Draw report.html's figures (default), or write it with the tables alone and never import matplotlib."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def attack_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--attack", type=click.Choice(["fgsm", "pgd"]), default="fgsm", show_default=True, help="Attack used to measure ANS."),
        click.option("--eps", default="0.05", show_default=True, help="Attack strength in [0,1]-input units (e.g. 0.05 or 8/255)."),
        click.option("--pgd-steps", type=int, default=10, show_default=True, help="PGD iterations."),
        click.option("--pgd-alpha", default=None, help="PGD step size (default 2.5*eps/steps)."),
        click.option("--samples", type=int, default=None, help="Samples attacked for ANS (default: up to 1000; analyze: up to 200, for ANS and the audit)."),
        click.option("--input-range", default="0,1", show_default=True, help="LO,HI of the model's input (e.g. 0,255 for raw pixels); eps scales with it."),
        click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per attack/inference batch."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@contextmanager
def _progress_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar on a terminal; silence when stderr is a pipe or a file, or with -q."""
    if not sys.stderr.isatty() or not logging.getLogger().isEnabledFor(logging.WARNING):
        yield lambda done: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


@main.command("compile", cls=QuanosCommand)
@compile_options
@common_options
def compile_command(**options: Any) -> None:
    """Compile MODEL into a mixed-precision QDQ ONNX model (QUANOS, or --bits/--plan baselines)."""
    _configure_logging(options.pop("verbose"), options.pop("quiet"))
    from .commands.compile import CompileOptions, parse_join_operand_bits, run_compile
    from .commands.options import methods_from_text
    from .verify import parse_max_accuracy_drop

    typed = _typed(options)
    typed["eval_attacks"] = methods_from_text(options["eval_attacks"], "eval_attacks")
    typed["max_accuracy_drop"] = parse_max_accuracy_drop(options["max_accuracy_drop"])
    typed["join_operand_bits"] = parse_join_operand_bits(options["join_operand_bits"])
    result = run_compile(
        typed["model"],
        typed["data"],
        _command_options(CompileOptions, typed),
        plan=typed["plan"],
        eval_data=typed["eval_data"],
        save_to=typed["output"],
        command_line=_command_line(),
        progress=_progress_bar,
    )
    _echo_result(result.summary_json(), result.summary_text, as_json=options["as_json"])
    if logging.getLogger().isEnabledFor(logging.WARNING):
        for warning in result.warnings:
            click.echo(f"warning: {printable(warning)}", err=True)
    if not result.passed and result.verification is not None:
        click.echo(f"error: {printable(result.verification.guard_line())}", err=True)
        click.get_current_context().exit(EXIT_ACCURACY_GUARD)


@main.command("analyze", cls=QuanosCommand)
@click.argument("model", metavar="MODEL [MORE ...]", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "output", default=None, type=click.Path(), help="Also write analysis.json and the report (report.html, report.md, report.json, run.json) here; with several models, into one folder per model (OUTPUT/STEM/).")
@click.option("--audit-attacks", default="fgsm,pgd,apgd-ce,apgd-dlr,transfer", show_default=True, help="Attacks of the robustness audit (transfer: compiled models only).")
@click.option("--audit-eps", default="2/255,8/255", show_default=True, help="Strengths of the robustness audit; every attack runs at each.")
@audit_options
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON (a list of them for several models).")
@click.option("--lipschitz", is_flag=True, help="Also each layer block's Lipschitz bound and the local ratios measured on the ANS samples (docs/method.md).")
@click.option("--tolerance/--no-tolerance", default=True, show_default=True, help="Each quantized layer alone at 2..8 bits: logit KL, top-1 agreement with float, the fewest bits it tolerates and the default allocator's bits (--no-tolerance: skip, for speed).")
@click.option("--tolerance-samples", type=int, default=100, show_default=True, help="Samples the tolerance is measured on (the first of the audit's).")
@attack_options
@data_options
@run_options
@common_options
def analyze_command(**options: Any) -> None:
    """Audit MODEL (float or compiled), or each of several: robust accuracy as the worst case over FGSM, PGD,
    APGD-CE/DLR and transfer attacks, gradient-masking checks and a verdict, ANS per layer and its Eqn-3 bits."""
    _configure_logging(options.pop("verbose"), options.pop("quiet"))
    from .commands.analyze import AnalyzeOptions, run_analyze
    from .commands.options import audit_methods_from_text

    methods = audit_methods_from_text(options["audit_attacks"], "audit_attacks")
    typed = _typed({**options, "audit_attacks": methods}, eps_lists=("audit_eps",))
    models = list(typed["model"])
    result = run_analyze(
        models[0] if len(models) == 1 else models,
        typed["data"],
        _command_options(AnalyzeOptions, typed),
        save_to=typed["output"],
        command_line=_command_line(),
        progress=_progress_bar,
    )
    _echo_result(result.document, result.summary_text, as_json=options["as_json"])


def _echo_result(document: Any, summary: Callable[[], str], *, as_json: bool) -> None:
    """A command's result on stdout: its JSON document with --json, else the summary table."""
    click.echo(json.dumps(document, indent=2) if as_json else summary())


@main.command("export", cls=QuanosCommand)
@click.argument("model", metavar="QMODEL", type=click.Path())
@click.option("--to", "to", type=click.Choice(["qonnx", "ort-overrides"]), required=True, help="QONNX Quant nodes, or TensorQuantOverrides for onnxruntime.quantization.")
@click.option("-o", "--output", "output", type=click.Path(), default=None, help="Output file (default: next to QMODEL, .qonnx.onnx or .ort_overrides.json).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON (docs/json.md).")
@common_options
def export_command(model: str, to: str, output: str | None, as_json: bool, verbose: int, quiet: bool, debug: bool) -> None:
    """Export QMODEL (written by quanos-compile) for another toolchain, at its plan's bits."""
    _configure_logging(verbose, quiet)
    from .commands.export import ExportOptions, run_export
    from .export import default_output

    result = run_export(model, ExportOptions(to=to), save_to=output if output is not None else default_output(model, to))  # type: ignore[arg-type]
    for warning in () if quiet else result.warnings:
        click.echo(f"warning: {printable(warning)}", err=True)
    _echo_result(result.summary_json(), lambda: "\n".join(f"wrote {path}" for path in result.written), as_json=as_json)


@main.command("evaluate", cls=QuanosCommand)
@click.argument("models", metavar="MODEL [MORE ...]", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "output", default=None, type=click.Path(), help="Also write evaluation.json and the report (report.html, report.md, report.json, run.json) here.")
@click.option("--attack", default="fgsm,pgd", show_default=True, help="Attacks, comma-separated: fgsm, pgd, apgd-ce, apgd-dlr, transfer (the last three run the robustness audit), or none for clean accuracy alone.")
@click.option("--audit", is_flag=True, help="Run the robustness audit (worst case per sample, masking checks, verdict) for FGSM/PGD alone too.")
@audit_options
@click.option("--eps", default=None, help="Strengths in [0,1]-input units, comma-separated (e.g. 0.05,0.1 or 8/255,16/255).")
@click.option("--pgd-steps", type=int, default=10, show_default=True, help="PGD iterations.")
@click.option("--pgd-alpha", default=None, help="PGD step size (default 2.5*eps/steps).")
@click.option("--paper", is_flag=True, help="The paper's grid: FGSM eps 0.05-0.3 by 0.05; PGD 7 steps of 2/255 at 8, 16, 32/255.")
@click.option("--samples", type=int, default=None, help="Evaluate the first N samples (default: all).")
@click.option("--input-range", default="0,1", show_default=True, help="LO,HI of the models' input; eps scales with it.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per attack/inference batch.")
@click.option("--json", "as_json", is_flag=True, help="Print the quanos-evaluation JSON document.")
@data_options
@run_options
@common_options
def evaluate_command(**options: Any) -> None:
    """Clean and adversarial accuracy of one or more models (float or compiled), side by side."""
    _configure_logging(options.pop("verbose"), options.pop("quiet"))
    from .commands.evaluate import EvaluateOptions, run_evaluate
    from .commands.options import audit_methods_from_text

    typed = _typed({**options, "attack": audit_methods_from_text(options["attack"], "attack")}, eps_lists=("eps",))
    result = run_evaluate(
        list(typed["models"]),
        typed["data"],
        _command_options(EvaluateOptions, typed),
        save_to=typed["output"],
        command_line=_command_line(),
        progress=_progress_bar,
    )
    _echo_result(result.document, result.summary_text, as_json=options["as_json"])


@main.command("finetune", cls=QuanosCommand)
@click.argument("model", metavar="MODEL", type=click.Path())
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="The fine-tuned compiled model to write (.onnx).")
@click.option("--plan", "plan", type=click.Path(), default=None, help="plan.json to train at (default: the plan stored in a compiled MODEL).")
@click.option("--val", "val", type=click.Path(), default=None, help="Validation data: keep the best epoch on it.")
@click.option("--val-split", type=float, default=None, help="Hold out this fraction of --data (after a seeded shuffle) for validation.")
@click.option("--epochs", type=int, required=True, help="Passes over the training data.")
@click.option("--lr", type=float, default=None, help="Learning rate (default 1e-4 adam, 1e-3 sgd), decaying to 0 on a cosine.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True, help="Optimizer (sgd with momentum 0.9).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per training batch.")
@click.option("--adv-train", type=click.Choice(["fgsm", "pgd"]), default=None, help="Adversarial fine-tuning: attack every batch with this.")
@click.option("--adv-eps", default="8/255", show_default=True, help="Strength of the training attack in [0,1]-input units.")
@click.option("--adv-steps", type=int, default=7, show_default=True, help="PGD iterations of the training attack.")
@click.option("--adv-alpha", default=None, help="PGD step of the training attack (default 2.5*eps/steps).")
@click.option("--adv-weight", type=float, default=0.5, show_default=True, help="Loss weight of the attacked batch (1: attacked only).")
@click.option("--input-range", default="0,1", show_default=True, help="LO,HI of the model's input; eps scales with it.")
@click.option("--calibration", type=click.Choice(["minmax", "percentile"]), default="minmax", show_default=True, help="Activation range estimator.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="Percentile for --calibration percentile.")
@click.option("--calibration-samples", type=int, default=512, show_default=True, help="Samples used to calibrate activation ranges.")
@click.option("--storage", type=click.Choice(["int8", "int4", "int2"]), default="int8", show_default=True, help="Weight containers of the written model, as for compile.")
@click.option("--json", "as_json", is_flag=True, help="Print the quanos-finetune JSON document.")
@data_options
@common_options
def finetune_command(**options: Any) -> None:
    """Fine-tune MODEL at a plan through its fake-quant twin and write the compiled result."""
    verbose, quiet = options.pop("verbose"), options.pop("quiet")
    _configure_logging(verbose, quiet)
    from .commands.finetune import FinetuneOptions, run_finetune

    def report(record: Any) -> None:
        if not quiet:
            click.echo(_epoch_line(record, options["epochs"]), err=True)

    typed = _typed(options)
    result = run_finetune(
        typed["model"],
        typed["data"],
        _command_options(FinetuneOptions, typed),
        plan=typed["plan"],
        val=typed["val"],
        save_to=typed["output"],
        progress=_progress_bar,
        on_epoch=report,
    )
    _echo_result(result.summary_json(), result.summary_text, as_json=options["as_json"])


def _epoch_line(record: Any, epochs: int) -> str:
    parts = [f"epoch {record.epoch}/{epochs}" if record.epoch else "before fine-tuning"]
    for label, value in (
        ("loss", record.train_loss),
        ("train acc", record.train_accuracy),
        ("train adv acc", record.train_adversarial_accuracy),
        ("val acc", record.val_accuracy),
        ("val adv acc", record.val_adversarial_accuracy),
    ):
        if value is not None:
            parts.append(f"{label} {value:.4f}")
    return ", ".join(parts) + f" ({record.seconds:.1f} s)"


def compile_main() -> None:
    """Entry point of `quanos-compile` (the same command as `quanos compile`)."""
    compile_command.main(prog_name="quanos-compile")


if __name__ == "__main__":
    main()
