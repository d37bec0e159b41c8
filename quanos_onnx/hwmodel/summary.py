"""The estimate as a plain-text table, for `quanos energy` and the compile summary."""

from __future__ import annotations

from collections.abc import Sequence

from ..report.text import format_table
from .energy import EnergyEstimate, UniformComparison

PJ_PER_UJ = 1e6
PJ_PER_MJ = 1e9
BITS_PER_KBIT = 1e3
BITS_PER_MBIT = 1e6


def summary_table(
    result: EnergyEstimate, comparisons: Sequence[UniformComparison], bits_from: str
) -> str:
    """Per-layer rows, a total row, and the ratios against the uniform baselines."""
    rows: list[dict[str, object]] = [
        {
            "layer": row.name,
            "op": row.op,
            "w/a bits": f"{row.weight_bits}/{row.act_bits}",
            "N_A": row.mem_accesses,
            "N_C (MACs)": row.macs,
            "energy uJ": row.energy_pj / PJ_PER_UJ,
            "memory kbit": row.weight_memory_bits / BITS_PER_KBIT,
        }
        for row in result.layers
    ]
    rows.append(
        {
            "layer": "total",
            "N_A": result.mem_accesses,
            "N_C (MACs)": result.macs,
            "energy uJ": result.energy_pj / PJ_PER_UJ,
            "memory kbit": result.weight_memory_bits / BITS_PER_KBIT,
        }
    )
    profile = result.profile
    lines = [
        f"hardware: {profile.name} ({profile.source}) {profile.description}".rstrip(),
        f"bits: {bits_from}; float layers count at 32 bits; per image",
        "",
        format_table(rows),
        "",
        f"total energy {result.energy_pj / PJ_PER_MJ:.4f} mJ "
        f"(memory access {result.access_energy_pj / PJ_PER_MJ:.4f}, "
        f"MAC {result.mac_energy_pj / PJ_PER_MJ:.4f}); "
        f"weight memory {result.weight_memory_bits / BITS_PER_MBIT:.4f} Mbit",
    ]
    lines.extend(
        f"vs uniform {comparison.bits}-bit: energy {comparison.energy_ratio:.3f}x, "
        f"memory {comparison.memory_ratio:.3f}x"
        for comparison in comparisons
    )
    return "\n".join(lines)
