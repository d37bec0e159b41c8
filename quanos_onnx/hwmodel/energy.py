"""Memory accesses, MACs, energy and weight memory of a model under a bit plan.

The paper's model (Section III, Table I, Eqns 4-5) per layer and image: N_A = N^2*I +
k^2*I*O memory accesses (the unpadded input map once, every weight once), N_C = M^2*I*k^2*O
MACs, and M_l = I*O*k^2*k_b weight bits. It is written for square convolutions; this
module states it in terms of tensor sizes so that every layer kind gets the same reading:

- activation accesses: every element of the layer's input tensor, once;
- weight accesses: every element of the weight tensor, once (so groups divide it);
- MACs: weight elements times the positions the kernel is applied at: the output map of a
  Conv, the input map of a ConvTranspose (each input pixel meets every weight of its group
  once, the scatter form; equal to the MACs of the Conv it is the transpose of), the rows
  of a Gemm/MatMul input (a 1x1 conv on a 1x1 map, repeated per row of a batched MatMul).

Biases are left out, as in the paper's formulas. Accesses are priced at their own width
(weights at weight bits, activations at activation bits); a MAC runs at the wider of the
two. A layer the plan keeps float, and every layer when there is no plan, counts at 32 bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError, PlanError
from ..layers import Layer
from ..plan import Plan
from .profiles import HardwareProfile, builtin_profiles

FLOAT_BITS = 32
"""The width a float layer counts at: the paper keeps its output layer at 32 bits."""

BASELINE_BITS = (16, 8)
"""The paper's homogeneous baselines every plan is compared with."""

ENERGY_FORMAT = "quanos-energy"
ENERGY_VERSION = 1


@dataclass(frozen=True)
class LayerCounts:
    """What one image costs a layer, independent of bits and hardware."""

    activation_accesses: int
    weight_accesses: int
    macs: int


@dataclass(frozen=True)
class LayerEnergy:
    """One layer's row of the estimate (per image; energies in pJ, memory in bits)."""

    name: str
    op: str
    weight_bits: int
    act_bits: int
    activation_accesses: int
    weight_accesses: int
    macs: int
    access_energy_pj: float
    mac_energy_pj: float
    weight_memory_bits: int

    @property
    def mac_bits(self) -> int:
        return max(self.weight_bits, self.act_bits)

    @property
    def mem_accesses(self) -> int:
        """N_A of the paper."""
        return self.activation_accesses + self.weight_accesses

    @property
    def energy_pj(self) -> float:
        return self.access_energy_pj + self.mac_energy_pj

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "mac_bits": self.mac_bits,
            "activation_accesses": self.activation_accesses,
            "weight_accesses": self.weight_accesses,
            "mem_accesses": self.mem_accesses,
            "macs": self.macs,
            "access_energy_pj": self.access_energy_pj,
            "mac_energy_pj": self.mac_energy_pj,
            "energy_pj": self.energy_pj,
            "weight_memory_bits": self.weight_memory_bits,
        }


@dataclass(frozen=True)
class EnergyEstimate:
    """A model's per-layer rows and totals on one hardware profile."""

    profile: HardwareProfile
    layers: tuple[LayerEnergy, ...]

    @property
    def mem_accesses(self) -> int:
        return sum(row.mem_accesses for row in self.layers)

    @property
    def macs(self) -> int:
        return sum(row.macs for row in self.layers)

    @property
    def access_energy_pj(self) -> float:
        return math.fsum(row.access_energy_pj for row in self.layers)

    @property
    def mac_energy_pj(self) -> float:
        return math.fsum(row.mac_energy_pj for row in self.layers)

    @property
    def energy_pj(self) -> float:
        return math.fsum(row.energy_pj for row in self.layers)

    @property
    def weight_memory_bits(self) -> int:
        return sum(row.weight_memory_bits for row in self.layers)

    def totals_json(self) -> dict[str, Any]:
        return {
            "mem_accesses": self.mem_accesses,
            "macs": self.macs,
            "access_energy_pj": self.access_energy_pj,
            "mac_energy_pj": self.mac_energy_pj,
            "energy_pj": self.energy_pj,
            "weight_memory_bits": self.weight_memory_bits,
        }


@dataclass(frozen=True)
class UniformComparison:
    """The plan against a homogeneous `bits`-bit baseline of the same model."""

    bits: int
    energy_pj: float
    weight_memory_bits: int
    energy_ratio: float
    memory_ratio: float

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "energy_pj": self.energy_pj,
            "weight_memory_bits": self.weight_memory_bits,
            "energy_ratio": self.energy_ratio,
            "memory_ratio": self.memory_ratio,
        }


def count_layer(layer: Layer) -> LayerCounts:
    """N_A split into activation and weight accesses, and N_C (see the module docstring)."""
    weight_elements = math.prod(layer.weight_shape)
    input_elements = math.prod(layer.input_shape)
    if layer.op == "Conv":
        positions = math.prod(layer.output_shape[2:])
    elif layer.op == "ConvTranspose":
        positions = math.prod(layer.input_shape[2:])
    else:
        positions = input_elements // layer.in_features
    return LayerCounts(
        activation_accesses=input_elements,
        weight_accesses=weight_elements,
        macs=positions * weight_elements,
    )


def layer_bits(layer: Layer, plan: Plan | None) -> tuple[int, int]:
    """(weight bits, activation bits) the hardware sees for this layer."""
    if plan is None:
        return FLOAT_BITS, FLOAT_BITS
    entry = plan.layer(layer.name)
    if entry.keep_float:
        return FLOAT_BITS, FLOAT_BITS
    if entry.weight_bits is None or entry.act_bits is None:
        raise PlanError(f"plan layer '{layer.name}': quantized but its bits are missing")
    return entry.weight_bits, entry.act_bits


def price_layer(
    layer: Layer, weight_bits: int, act_bits: int, profile: HardwareProfile
) -> LayerEnergy:
    counts = count_layer(layer)
    access_energy = (
        counts.activation_accesses * profile.access_pj(act_bits)
        + counts.weight_accesses * profile.access_pj(weight_bits)
    )
    mac_energy = counts.macs * profile.mac_pj(max(weight_bits, act_bits))
    return LayerEnergy(
        name=layer.name,
        op=layer.op,
        weight_bits=weight_bits,
        act_bits=act_bits,
        activation_accesses=counts.activation_accesses,
        weight_accesses=counts.weight_accesses,
        macs=counts.macs,
        access_energy_pj=access_energy,
        mac_energy_pj=mac_energy,
        weight_memory_bits=counts.weight_accesses * weight_bits,
    )


def estimate(
    layers: Sequence[Layer], plan: Plan | None, profile: HardwareProfile
) -> EnergyEstimate:
    """Per-layer and total figures for one image; no plan means the float model."""
    rows = tuple(price_layer(layer, *layer_bits(layer, plan), profile) for layer in layers)
    return EnergyEstimate(profile=profile, layers=rows)


def estimate_all(layers: Sequence[Layer], plan: Plan | None) -> dict[str, EnergyEstimate]:
    """The estimate on each built-in profile (standard, dg, dvafs), keyed by profile name."""
    return {profile.name: estimate(layers, plan, profile) for profile in builtin_profiles()}


def uniform_baseline(layers: Sequence[Layer], plan: Plan | None, bits: int) -> Plan:
    """The paper's homogeneous baseline of the same model: every layer at `bits`, the
    output layer kept float exactly when the compared plan keeps it float."""
    output_float = plan is None or any(
        plan.layer(layer.name).keep_float for layer in layers if layer.is_output
    )
    return Plan.uniform(layers, bits, keep_output_float=output_float)


def compare_to_uniform(
    layers: Sequence[Layer],
    plan: Plan | None,
    profile: HardwareProfile,
    baseline_bits: Sequence[int] = BASELINE_BITS,
) -> tuple[UniformComparison, ...]:
    """Energy and weight-memory ratios of the plan against uniform baselines (paper's "x")."""
    if not layers:
        raise ModelError(
            "the model has no quantizable layers (Conv, ConvTranspose, Gemm or MatMul with a "
            "constant weight), so there is nothing to price"
        )
    planned = estimate(layers, plan, profile)
    comparisons = []
    for bits in baseline_bits:
        baseline = estimate(layers, uniform_baseline(layers, plan, bits), profile)
        comparisons.append(
            UniformComparison(
                bits=bits,
                energy_pj=baseline.energy_pj,
                weight_memory_bits=baseline.weight_memory_bits,
                energy_ratio=planned.energy_pj / baseline.energy_pj,
                memory_ratio=planned.weight_memory_bits / baseline.weight_memory_bits,
            )
        )
    return tuple(comparisons)


def describe_bits(plan: Plan | None) -> str:
    return "float32 model (no plan)" if plan is None else f"plan ({plan.method})"


def to_json(
    layers: Sequence[Layer],
    plan: Plan | None,
    profiles: Sequence[HardwareProfile] | None = None,
) -> dict[str, Any]:
    """The energy section of plan.json and of `quanos energy --json` (docs/hardware.md)."""
    chosen = builtin_profiles() if profiles is None else tuple(profiles)
    return {
        "format": ENERGY_FORMAT,
        "version": ENERGY_VERSION,
        "units": {"energy": "pJ per image", "memory": "bits", "counts": "per image"},
        "bits_from": describe_bits(plan),
        "profiles": {
            profile.name: _profile_json(layers, plan, profile) for profile in chosen
        },
    }


def _profile_json(
    layers: Sequence[Layer], plan: Plan | None, profile: HardwareProfile
) -> dict[str, Any]:
    result = estimate(layers, plan, profile)
    return {
        "profile": profile.to_json(),
        "totals": result.totals_json(),
        "vs_uniform": [c.to_json() for c in compare_to_uniform(layers, plan, profile)],
        "layers": [row.to_json() for row in result.layers],
    }
