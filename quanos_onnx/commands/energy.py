"""`quanos energy`: memory and energy of a model under a plan on hardware profiles (paper
Eqns 4-5), as the quanos-energy document, tables and the report of `quanos energy -o`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, arg
from ..layers import Layer, list_layers
from ..plan import Plan
from .options import ModelSource, Options, PlanSource, api_command_line, input_paths, read_model, read_plan_input
from .results import check_output_dir, save_files

if TYPE_CHECKING:
    from ..hwmodel import HardwareProfile
    from ..report import RunInfo

ENERGY_FILE = "energy.json"


@dataclass(frozen=True, kw_only=True)
class EnergyOptions(Options):
    """`hw`: built-in profile names (standard, dg, dvafs), 'all' (those three) or profile
    JSON files (docs/hardware.md)."""

    hw: tuple[str, ...] = ("standard",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hw:
            raise UsageError(f"{arg('hw')} names no hardware profile", hint="e.g. standard, dg, dvafs or all")


@dataclass(frozen=True)
class EnergyResult:
    """`energy` is the quanos-energy document (energy.json); `estimates` the per-profile
    hwmodel.EnergyEstimate; `unplanned` the layers the plan leaves out (counted as float)."""

    layers: tuple[Layer, ...]
    plan: Plan | None
    profiles: tuple[HardwareProfile, ...]
    energy: Mapping[str, Any]
    report: Mapping[str, Any]
    run: RunInfo
    unplanned: tuple[str, ...] = ()
    inputs: tuple[Path, ...] = ()
    written: tuple[Path, ...] = ()

    def files(self) -> dict[str, bytes | str]:
        """The files `quanos energy -o` writes: energy.json and the report."""
        from .. import report

        return {ENERGY_FILE: report.dumps(self.energy), **report.report_files(self.report, self.run)}

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write files() into `directory`, all or nothing; never over an input file."""
        return save_files(directory, self.files(), self.inputs)

    def summary_text(self) -> str:
        """One table per profile (counts, energy, memory; the comparison to uniform bits)."""
        from ..hwmodel import compare_to_uniform, describe_bits, estimate, summary_table

        tables = [
            summary_table(
                estimate(self.layers, self.plan, profile),
                compare_to_uniform(self.layers, self.plan, profile),
                describe_bits(self.plan),
            )
            for profile in self.profiles
        ]
        return "\n".join(["\n\n".join(tables), *(f"wrote {path}" for path in self.written)])


def run_energy(
    model: ModelSource,
    options: EnergyOptions,
    *,
    plan: PlanSource | None = None,
    save_to: str | os.PathLike[str] | None = None,
    command_line: Sequence[str] | None = None,
) -> EnergyResult:
    """Memory accesses, MACs, energy and weight memory per layer and in total.

    Without a plan the model counts as float (32 bits everywhere).
    """
    from .. import report
    from ..plan import validate_plan

    clock = report.RunClock.start(api_command_line() if command_line is None else command_line)
    inputs = input_paths(model, plan)
    check_output_dir(save_to, inputs, names=(ENERGY_FILE, *report.REPORT_FILES))
    profiles = load_profiles(options.hw)
    source = read_model(model)
    layers = list_layers(source.proto)
    given = None if plan is None else read_plan_input(plan)
    checked = None if given is None else validate_plan(given.plan, layers, given.name)
    unplanned = () if given is None else tuple(l.name for l in layers if l.name not in given.plan.by_name())
    energy, baselines = report.energy_sections(layers, checked, profiles)
    document = report.report_document(
        "energy",
        models=[source.report_entry()],
        plan_file=None if given is None else given.report_entry(),
        settings={"hw": [profile.source for profile in profiles]},
        layers=report.layer_rows(layers, checked),
        summary=report.plan_summary(layers, checked) if checked is not None else None,
        energy=energy,
        baselines=baselines,
    )
    result = EnergyResult(tuple(layers), checked, profiles, energy, document, clock.finish(), unplanned, tuple(inputs))
    return result if save_to is None else replace(result, written=result.save(save_to))


def load_profiles(names: Sequence[str]) -> tuple[HardwareProfile, ...]:
    """`hw` values: built-in names, 'all' (the three built-ins) or profile files; one per name."""
    from ..hwmodel import BUILTIN_PROFILES, load_profile

    profiles: list[HardwareProfile] = []
    for name in names:
        for profile in [load_profile(n) for n in BUILTIN_PROFILES] if name.lower() == "all" else [load_profile(name)]:
            known = next((p for p in profiles if p.name == profile.name), None)
            if known is None:
                profiles.append(profile)
            elif known.source != profile.source:
                raise UsageError(
                    f"{arg('hw')}: profiles {known.source} and {profile.source} are both named '{profile.name}'",
                    hint='give each profile file its own "name"',
                )
    return tuple(profiles)
