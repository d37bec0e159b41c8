"""Memory and energy of a model under a bit plan on precision-scalable hardware.

The paper's hardware model (Section III): memory accesses and MACs from layer shapes,
priced by a hardware profile (Standard, data gating, DVAFS), with weight memory in bits.
Profiles are data files (profiles/*.json); docs/hardware.md says which of the paper's
numbers this reproduces.
"""

from .energy import (
    BASELINE_BITS,
    FLOAT_BITS,
    EnergyEstimate,
    LayerCounts,
    LayerEnergy,
    UniformComparison,
    compare_to_uniform,
    count_layer,
    describe_bits,
    estimate,
    estimate_all,
    to_json,
)
from .profiles import BUILTIN_PROFILES, HardwareProfile, builtin_profiles, load_profile
from .summary import summary_table

__all__ = [
    "BASELINE_BITS",
    "BUILTIN_PROFILES",
    "FLOAT_BITS",
    "EnergyEstimate",
    "HardwareProfile",
    "LayerCounts",
    "LayerEnergy",
    "UniformComparison",
    "builtin_profiles",
    "compare_to_uniform",
    "count_layer",
    "describe_bits",
    "estimate",
    "estimate_all",
    "load_profile",
    "summary_table",
    "to_json",
]
