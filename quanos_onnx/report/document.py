"""The report document: what a run found, as deterministic JSON (report.json).

The Markdown and HTML reports are rendered from this document and the run's RunInfo
only, so what a person reads and what a pipeline parses cannot drift apart. Two runs with
the same inputs and seed give a byte-identical document: everything that differs from run
to run (start time, wall time, the command line with its output path, the interpreter and
package versions) is kept in RunInfo, which goes to run.json. docs/json.md has the schema.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..layers import Layer
from ..plan import Plan
from ..threads import usable_cores

REPORT_FORMAT = "quanos-report"
REPORT_VERSION = 1
RUN_FORMAT = "quanos-run"
RUN_VERSION = 1

TOOL_NAME = "quanos-onnx"
PACKAGES = ("numpy", "onnx", "onnx-ir", "onnxruntime", "torch", "matplotlib", "click")
"""Packages whose versions run.json records (read from their metadata, never imported)."""


@dataclass(frozen=True)
class RunInfo:
    """What differs between two otherwise identical runs; rendered, never compared."""

    command_line: tuple[str, ...]
    started_at: str
    wall_time_s: float
    accuracy_guard: Mapping[str, Any] | None = None
    """A compile's verification guard (Guard.to_json()), so run.json says when it failed."""
    threads: int | None = None
    """The intra-op threads the command set (None: the libraries' defaults, or no models run):
    the default follows the machine's cores, so a wall time means little without it."""
    usable_cores: int = field(default_factory=usable_cores)
    """The cores the run's process could use, taken when the run finished."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "command_line": shlex.join(self.command_line),
            "argv": list(self.command_line),
            "started_at": self.started_at,
            "wall_time_s": round(self.wall_time_s, 3),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": package_versions(),
            "accuracy_guard": None if self.accuracy_guard is None else dict(self.accuracy_guard),
            "threads": self.threads,
            "usable_cores": self.usable_cores,
        }


@dataclass(frozen=True)
class RunClock:
    """Started when a command starts; `finish()` gives the RunInfo when it has its results."""

    command_line: tuple[str, ...]
    started_at: str
    started: float

    @classmethod
    def start(cls, command_line: Sequence[str]) -> RunClock:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        return cls(tuple(command_line), now.isoformat().replace("+00:00", "Z"), time.perf_counter())

    def finish(self, threads: int | None = None) -> RunInfo:
        return RunInfo(self.command_line, self.started_at, time.perf_counter() - self.started, threads=threads)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_input(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An input file as given on the command line, with its sha256 (None for a folder)."""
    from ..model import file_sha256

    source = Path(path)
    return {"path": str(path), "sha256": file_sha256(source) if source.is_file() else None}


def data_input(path: str | os.PathLike[str], samples: int, selection: str = "all") -> dict[str, Any]:
    """The --data source and how many of its samples the run used."""
    return {**file_input(path), "samples": samples, "selection": selection}


def output_entry(name: str, content: bytes | str) -> dict[str, Any]:
    """An output file and the sha256 of its bytes, so a report vouches for its model."""
    import hashlib

    data = content.encode() if isinstance(content, str) else content
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest()}


def layer_rows(
    layers: Sequence[Layer],
    plan: Plan | None = None,
    ans: Mapping[str, Any] | None = None,
    lipschitz: Mapping[str, Any] | None = None,
    tolerance: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per layer: shape facts, the plan's bits (None without a plan) and ANS.

    ANS comes from the plan's entries (the values its bits were derived from) and
    otherwise from an ANS measurement document (AnsMeasurement.to_json()). With a
    `lipschitz` part (LipschitzEstimates.to_json()), each row also has the block's bound
    and mean local ratio; with a `tolerance` part (ToleranceTable.to_json()), each quantized
    layer's tolerance bits, the default allocator's bits and its KL at each candidate.
    """
    entries = plan.by_name() if plan is not None else {}
    measured = {row["layer"]: row for row in (ans or {}).get("layers", [])}
    rows = []
    for layer in layers:
        entry = entries.get(layer.name)
        ans_mean = entry.ans_mean if entry is not None else None
        ans_std = entry.ans_std if entry is not None else None
        if ans_mean is None and layer.name in measured:
            ans_mean, ans_std = measured[layer.name]["ans_mean"], measured[layer.name]["ans_std"]
        rows.append(
            {
                "name": layer.name,
                "op": layer.op,
                "params": layer.params,
                "macs": layer.macs,
                "is_output": layer.is_output,
                "weight_bits": None if entry is None else entry.weight_bits,
                "act_bits": None if entry is None else entry.act_bits,
                "keep_float": None if entry is None else entry.keep_float,
                "group": None if entry is None else entry.group,
                "ans_mean": ans_mean,
                "ans_std": ans_std,
            }
        )
    if lipschitz is not None:
        bounds = {row["layer"]: row["bound"] for row in lipschitz["bounds"]}
        local = {row["layer"]: row["local_mean"] for row in (lipschitz["local"] or {}).get("layers", [])}
        for row in rows:
            row["lipschitz_bound"] = bounds.get(row["name"])
            row["lipschitz_local"] = local.get(row["name"])
    if tolerance is not None:
        measured = {row["layer"]: row for row in tolerance["layers"]}
        for row in rows:
            entry = measured.get(row["name"])
            row["tolerance_bits"] = None if entry is None else entry["tolerance_bits"]
            row["allocator_bits"] = None if entry is None else entry["allocator_bits"]
            row["tolerance_kl"] = None if entry is None else dict(entry["kl"])
    return rows


def plan_summary(layers: Sequence[Layer], plan: Plan) -> dict[str, Any]:
    """The plan in a few figures. A milp plan (compile's default) adds how it was chosen
    (`how`) and how far it moved from the paper's Eqn 3 on the same ANS (`moved_from_eqn3`:
    the count of layers whose bits differ, the average weight bits of both, Eqn 3's bits)."""
    params = {layer.name: layer.params for layer in layers}
    summary: dict[str, Any] = {
        "method": plan.method,
        "k_init": plan.k_init,
        "k_min": plan.k_min,
        "average_weight_bits": round(plan.average_weight_bits(params), 4),
        "quantized_layers": sum(1 for entry in plan.layers if entry.quantized),
        "float_layers": sum(1 for entry in plan.layers if entry.keep_float),
    }
    quantized_joins = [join for join in plan.joins if join.bits is not None]
    if quantized_joins:
        summary["joins"] = {"quantized": len(quantized_joins), "operand_bits": plan.join_operand_bits}
    allocation = plan.details.get("allocation")
    if isinstance(allocation, Mapping) and "moved_from_eqn3" in allocation:
        moved = allocation["moved_from_eqn3"]
        summary["how"] = allocation["how"]
        summary["moved_from_eqn3"] = {
            "layers": moved["layers"],
            "layers_changed": moved["layers_changed"],
            "average_weight_bits": summary["average_weight_bits"],
            "eqn3_average_bits": round(moved["eqn3_average_bits"], 4),
            "eqn3_bits": dict(moved["eqn3_bits"]),
        }
    return summary


def energy_sections(
    layers: Sequence[Layer], plan: Plan | None, profiles: Sequence[Any] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The quanos-energy document of the plan, and the uniform 16/8-bit baselines per layer.

    `profiles` are hwmodel.HardwareProfile objects (default: the three built-in ones).
    """
    from ..hwmodel import BASELINE_BITS, builtin_profiles, estimate
    from ..hwmodel import to_json as energy_json
    from ..hwmodel.energy import uniform_baseline

    chosen = tuple(profiles) if profiles is not None else builtin_profiles()
    baselines = []
    for bits in BASELINE_BITS:
        uniform = uniform_baseline(layers, plan, bits)
        estimates = {profile.name: estimate(layers, uniform, profile) for profile in chosen}
        rows = []
        for index, layer in enumerate(layers):
            first = next(iter(estimates.values())).layers[index]
            rows.append(
                {
                    "name": layer.name,
                    "weight_bits": first.weight_bits,
                    "weight_memory_bits": first.weight_memory_bits,
                    "energy_pj": {name: result.layers[index].energy_pj for name, result in estimates.items()},
                }
            )
        baselines.append({"bits": bits, "layers": rows})
    return energy_json(layers, plan, chosen), baselines


def report_document(
    command: str,
    *,
    models: Sequence[Mapping[str, Any]],
    data: Mapping[str, Any] | None = None,
    plan_file: Mapping[str, Any] | None = None,
    seed: int | None = None,
    settings: Mapping[str, Any] | None = None,
    layers: Sequence[Mapping[str, Any]] = (),
    summary: Mapping[str, Any] | None = None,
    ans: Mapping[str, Any] | None = None,
    energy: Mapping[str, Any] | None = None,
    baselines: Sequence[Mapping[str, Any]] = (),
    evaluations: Sequence[Mapping[str, Any]] = (),
    audits: Sequence[Mapping[str, Any]] = (),
    verification: Mapping[str, Any] | None = None,
    pareto: Mapping[str, Any] | None = None,
    outputs: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The quanos-report document (docs/json.md); sections a command lacks are null or empty."""
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "command": command,
        "tool": {"name": TOOL_NAME, "version": __version__},
        "inputs": {
            "models": [dict(model) for model in models],
            "data": None if data is None else dict(data),
            "plan": None if plan_file is None else dict(plan_file),
        },
        "seed": seed,
        "settings": dict(settings or {}),
        "summary": None if summary is None else dict(summary),
        "layers": [dict(row) for row in layers],
        "ans": None if ans is None else dict(ans),
        "energy": None if energy is None else dict(energy),
        "baselines": [dict(baseline) for baseline in baselines],
        "evaluations": [dict(entry) for entry in evaluations],
        "audits": [dict(entry) for entry in audits],
        "verification": None if verification is None else dict(verification),
        "pareto": None if pareto is None else dict(pareto),
        "outputs": [dict(entry) for entry in outputs],
    }


def dumps(document: Mapping[str, Any]) -> str:
    """The one serialization of report and run documents (stable key order, a final newline)."""
    return json.dumps(document, indent=2, allow_nan=False) + "\n"
