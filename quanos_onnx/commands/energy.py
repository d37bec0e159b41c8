"""`quanos energy`: hardware profiles and the files of `quanos energy -o`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..layers import Layer
from ..plan import Plan

if TYPE_CHECKING:
    from ..hwmodel import HardwareProfile
    from ..report import RunClock

ENERGY_FILE = "energy.json"


def load_profiles(names: Sequence[str]) -> tuple[HardwareProfile, ...]:
    """`--hw` values: built-in names, 'all' (the three built-ins) or profile files; one per name."""
    from ..errors import UsageError
    from ..hwmodel import BUILTIN_PROFILES, load_profile

    profiles: list[HardwareProfile] = []
    for name in names:
        for profile in [load_profile(n) for n in BUILTIN_PROFILES] if name.lower() == "all" else [load_profile(name)]:
            known = next((p for p in profiles if p.name == profile.name), None)
            if known is None:
                profiles.append(profile)
            elif known.source != profile.source:
                raise UsageError(
                    f"--hw: profiles {known.source} and {profile.source} are both named '{profile.name}'",
                    hint='give each profile file its own "name"',
                )
    return tuple(profiles)


def energy_outputs(
    model_path: str,
    plan_path: str | None,
    layers: Sequence[Layer],
    plan: Plan | None,
    profiles: Sequence[HardwareProfile],
    clock: RunClock,
) -> dict[str, str]:
    """`quanos energy -o`: energy.json (the quanos-energy document) and the report files."""
    from .. import report

    energy, baselines = report.energy_sections(layers, plan, profiles)
    document = report.report_document(
        "energy",
        models=[report.file_input(model_path)],
        plan_file=report.file_input(plan_path) if plan_path else None,
        settings={"hw": [profile.source for profile in profiles]},
        layers=report.layer_rows(layers, plan),
        summary=report.plan_summary(layers, plan) if plan is not None else None,
        energy=energy,
        baselines=baselines,
    )
    return {ENERGY_FILE: report.dumps(energy), **report.report_files(document, clock.finish())}
