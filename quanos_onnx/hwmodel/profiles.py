"""Hardware profiles: the energy constants of the paper's accelerator, kept as data.

The constants (and especially E_cfg, which the paper only plots) are assumptions a user
may want to replace with their own silicon's numbers, so they live in JSON files with
their provenance beside them rather than in code. A user file goes through the same
schema check as the built-ins, and a bad file is refused naming the field at fault.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ProfileError

PROFILE_FORMAT = "quanos-hardware-profile"
PROFILE_VERSION = 1
BUILTIN_PROFILES = ("standard", "dg", "dvafs")

_REQUIRED = (
    "format",
    "version",
    "name",
    "access_pj_per_bit",
    "mac_multiply_pj",
    "mac_multiply_reference_bits",
    "mac_add_pj",
)
_OPTIONAL = ("description", "provenance", "mac_scale")

MAX_ENERGY_PJ = 1e6
"""Largest energy constant a profile may give (pJ per bit or per MAC, and E_cfg): real
accelerators are within 0.01-100 pJ, and the bound keeps every estimate finite."""

MAX_WIDTH_BITS = 64
"""Widest bit-width a profile may describe (mac_multiply_reference_bits, mac_scale keys)."""


@dataclass(frozen=True)
class HardwareProfile:
    """Per-access and per-MAC energy of a precision-scalable accelerator (paper Table I).

    A k-bit memory access costs `access_pj_per_bit * k` pJ. A k-bit MAC costs
    `(mac_multiply_pj * k / mac_multiply_reference_bits + mac_add_pj) * E_cfg(k)` pJ, where
    E_cfg is `mac_scale[k - 1]` (Eqn 5); an empty `mac_scale` means E_cfg = 1 (Eqn 4).
    Widths beyond the table use its widest entry: the MAC array is built for that width,
    so a wider (float, 32-bit) layer gains nothing from precision scaling.
    """

    name: str
    description: str
    provenance: tuple[str, ...]
    access_pj_per_bit: float
    mac_multiply_pj: float
    mac_multiply_reference_bits: int
    mac_add_pj: float
    mac_scale: tuple[float, ...]
    source: str

    def access_pj(self, bits: int) -> float:
        """Energy of one memory access of a `bits`-wide word."""
        return self.access_pj_per_bit * bits

    def mac_pj(self, bits: int) -> float:
        """Energy of one MAC at `bits` precision, scaled by E_cfg on DG/DVAFS hardware."""
        standard = self.mac_multiply_pj * bits / self.mac_multiply_reference_bits + self.mac_add_pj
        return standard * self.scale(bits)

    def scale(self, bits: int) -> float:
        """E_cfg(bits): the configuration's MAC energy relative to the full-width MAC."""
        if not self.mac_scale:
            return 1.0
        return self.mac_scale[min(bits, len(self.mac_scale)) - 1]

    def to_json(self) -> dict[str, Any]:
        """The constants an energy figure was computed with, so the figure can be re-derived."""
        return {
            "name": self.name,
            "source": self.source,
            "access_pj_per_bit": self.access_pj_per_bit,
            "mac_multiply_pj": self.mac_multiply_pj,
            "mac_multiply_reference_bits": self.mac_multiply_reference_bits,
            "mac_add_pj": self.mac_add_pj,
            "mac_scale": {str(bits): value for bits, value in enumerate(self.mac_scale, 1)},
        }


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """A built-in profile by name ('standard', 'dg', 'dvafs'), else a JSON file path.

    Built-in names win over a file of the same name in the working directory; pass
    './dg' to read such a file.
    """
    text = str(name_or_path)
    if text.lower() in BUILTIN_PROFILES:
        resource = resources.files(__package__).joinpath("profiles", f"{text.lower()}.json")
        return parse_profile(json.loads(resource.read_text()), f"built-in:{text.lower()}")
    return _load_profile_file(Path(text))


def builtin_profiles() -> tuple[HardwareProfile, ...]:
    return tuple(load_profile(name) for name in BUILTIN_PROFILES)


def _load_profile_file(path: Path) -> HardwareProfile:
    from ..inputs import read_document

    if not path.exists():
        raise ProfileError(
            f"hardware profile '{path}': no such file and not a built-in profile",
            hint=f"use one of {', '.join(BUILTIN_PROFILES)} or a JSON profile file",
        )
    return parse_profile(read_document(path, ProfileError, "hardware profile"), str(path))


def parse_profile(data: Any, source: str) -> HardwareProfile:
    """Check a profile document against the schema; every error names the field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a hardware profile must be a JSON object")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ProfileError(f"{source}: unknown field '{unknown[0]}'")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ProfileError(f"{source}: missing field '{missing[0]}'")
    if data["format"] != PROFILE_FORMAT:
        raise ProfileError(f"{source}: field 'format' must be \"{PROFILE_FORMAT}\"")
    if data["version"] != PROFILE_VERSION:
        raise ProfileError(
            f"{source}: field 'version' is {data['version']!r}; this tool reads {PROFILE_VERSION}"
        )
    return HardwareProfile(
        name=_text(data, "name", source),
        description=_text(data, "description", source, required=False),
        provenance=_provenance(data.get("provenance"), source),
        access_pj_per_bit=_positive(data["access_pj_per_bit"], "access_pj_per_bit", source),
        mac_multiply_pj=_positive(data["mac_multiply_pj"], "mac_multiply_pj", source),
        mac_multiply_reference_bits=_positive_int(
            data["mac_multiply_reference_bits"], "mac_multiply_reference_bits", source
        ),
        mac_add_pj=_non_negative(data["mac_add_pj"], "mac_add_pj", source),
        mac_scale=_mac_scale(data.get("mac_scale"), source),
        source=source,
    )


def _text(data: dict[str, Any], key: str, source: str, *, required: bool = True) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise ProfileError(f"{source}: field '{key}' must be a non-empty string")
    return value


def _provenance(value: Any, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return tuple(value)
    raise ProfileError(f"{source}: field 'provenance' must be a string or a list of strings")


def _number(value: Any, field: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"{source}: field '{field}' must be a finite number, got {value!r}")
    if abs(value) > MAX_ENERGY_PJ:
        raise ProfileError(f"{source}: field '{field}' is {value!r}, above the limit of {MAX_ENERGY_PJ:g}")
    return float(value)


def _positive(value: Any, field: str, source: str) -> float:
    number = _number(value, field, source)
    if number <= 0:
        raise ProfileError(f"{source}: field '{field}' must be positive, got {value!r}")
    return number


def _non_negative(value: Any, field: str, source: str) -> float:
    number = _number(value, field, source)
    if number < 0:
        raise ProfileError(f"{source}: field '{field}' must not be negative, got {value!r}")
    return number


def _positive_int(value: Any, field: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_WIDTH_BITS:
        raise ProfileError(f"{source}: field '{field}' must be an integer in 1..{MAX_WIDTH_BITS}, got {value!r}")
    return value


def _mac_scale(value: Any, source: str) -> tuple[float, ...]:
    """E_cfg by bit-width: an object with keys "1".."n", no gaps (a gap would be a guess)."""
    if value is None:
        return ()
    if not isinstance(value, dict) or not value:
        raise ProfileError(
            f"{source}: field 'mac_scale' must be an object mapping bit-widths \"1\"..\"n\" to numbers"
        )
    widths: dict[int, float] = {}
    for key, scale in value.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 2 and 1 <= int(key) <= MAX_WIDTH_BITS):
            raise ProfileError(f"{source}: field 'mac_scale.{key}' is not a bit-width (1..{MAX_WIDTH_BITS})")
        widths[int(key)] = _positive(scale, f"mac_scale.{key}", source)
    expected = set(range(1, max(widths) + 1))
    gaps = sorted(expected - set(widths))
    if gaps:
        raise ProfileError(f"{source}: field 'mac_scale.{gaps[0]}' is missing (widths must run 1..{max(widths)})")
    return tuple(widths[bits] for bits in sorted(widths))
