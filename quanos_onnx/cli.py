"""Command line: the only module that imports click.

Stage modules are imported inside each command so that `quanos --help` stays fast.
"""

from __future__ import annotations

import json

import click

from . import __version__
from .errors import QuanosError


class _QuanosGroup(click.Group):
    """Turns a QuanosError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except QuanosError as error:
            click.echo(f"error: {error.one_line()}", err=True)
            ctx.exit(error.exit_code)


@click.group(cls=_QuanosGroup)
@click.version_option(__version__, prog_name="quanos")
def main() -> None:
    """QUANOS hybrid quantization for ONNX image classifiers."""


@main.command()
@click.argument("model", type=str)
@click.option(
    "--plan",
    "plan_path",
    type=str,
    default=None,
    help="Bit plan (plan.json); without it the float model, 32 bits everywhere.",
)
@click.option(
    "--hw",
    "hardware",
    default="standard",
    show_default=True,
    help="Hardware profile: standard, dg, dvafs or a profile JSON file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the quanos-energy JSON document.")
def energy(model: str, plan_path: str | None, hardware: str, as_json: bool) -> None:
    """Memory accesses, MACs, energy and weight memory per layer and in total (paper Eqns 4-5)."""
    from .hwmodel import compare_to_uniform, describe_bits, estimate, load_profile, summary_table
    from .hwmodel import to_json as energy_json
    from .layers import list_layers
    from .model import load_model
    from .plan import read_plan, validate_plan

    profile = load_profile(hardware)
    layers = list_layers(load_model(model))
    plan = None
    if plan_path is not None:
        given = read_plan(plan_path)
        plan = validate_plan(given, layers, plan_path)
        unplanned = sorted({layer.name for layer in layers} - set(given.by_name()))
        if unplanned:
            click.echo(f"note: {len(unplanned)} layer(s) not in the plan count as float: "
                       f"{', '.join(unplanned)}", err=True)
    if as_json:
        click.echo(json.dumps(energy_json(layers, plan, [profile]), indent=2))
        return
    result = estimate(layers, plan, profile)
    comparisons = compare_to_uniform(layers, plan, profile)
    click.echo(summary_table(result, comparisons, describe_bits(plan)))
