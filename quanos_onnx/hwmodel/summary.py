"""The estimate as a plain-text table, for `quanos energy` and the compile summary."""

from __future__ import annotations

from collections.abc import Sequence

from .energy import EnergyEstimate, UniformComparison

_HEADER = ("layer", "op", "w/a bits", "N_A", "N_C (MACs)", "energy uJ", "memory kbit")
_RIGHT_ALIGNED = frozenset(range(2, len(_HEADER)))

PJ_PER_UJ = 1e6
PJ_PER_MJ = 1e9


def summary_table(
    result: EnergyEstimate, comparisons: Sequence[UniformComparison], bits_from: str
) -> str:
    """Per-layer rows, a total row, and the ratios against the uniform baselines."""
    rows = [_HEADER]
    for row in result.layers:
        rows.append(
            (
                row.name,
                row.op,
                f"{row.weight_bits}/{row.act_bits}",
                f"{row.mem_accesses:,}",
                f"{row.macs:,}",
                f"{row.energy_pj / PJ_PER_UJ:,.3f}",
                f"{row.weight_memory_bits / 1000:,.1f}",
            )
        )
    rows.append(
        (
            "total",
            "",
            "",
            f"{result.mem_accesses:,}",
            f"{result.macs:,}",
            f"{result.energy_pj / PJ_PER_UJ:,.3f}",
            f"{result.weight_memory_bits / 1000:,.1f}",
        )
    )
    profile = result.profile
    lines = [
        f"hardware: {profile.name} ({profile.source}) {profile.description}".rstrip(),
        f"bits: {bits_from}; float layers count at 32 bits; per image",
        "",
        *_aligned(rows),
        "",
        f"total energy {result.energy_pj / PJ_PER_MJ:.4f} mJ "
        f"(memory access {result.access_energy_pj / PJ_PER_MJ:.4f}, MAC {result.mac_energy_pj / PJ_PER_MJ:.4f}); "
        f"weight memory {result.weight_memory_bits / 1e6:.4f} Mbit",
    ]
    for comparison in comparisons:
        lines.append(
            f"vs uniform {comparison.bits}-bit: energy {comparison.energy_ratio:.3f}x, "
            f"memory {comparison.memory_ratio:.3f}x"
        )
    return "\n".join(lines)


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in _RIGHT_ALIGNED else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
