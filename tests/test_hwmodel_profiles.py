"""Hardware profiles: the built-ins, user files, and refusal of bad files by field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from quanos_onnx.errors import ProfileError
from quanos_onnx.hwmodel import load_profile


def standard_document() -> dict[str, Any]:
    return {
        "format": "quanos-hardware-profile",
        "version": 1,
        "name": "mine",
        "access_pj_per_bit": 2.5,
        "mac_multiply_pj": 3.1,
        "mac_multiply_reference_bits": 32,
        "mac_add_pj": 0.1,
    }


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(document))
    return path


def test_builtins_carry_table_i_and_their_provenance() -> None:
    for name in ("standard", "dg", "dvafs"):
        profile = load_profile(name)
        assert profile.name == name
        assert profile.access_pj(8) == pytest.approx(20.0)  # 2.5 pJ per bit
        assert "Table I" in " ".join(profile.provenance)
    standard = load_profile("standard")
    assert standard.mac_pj(32) == pytest.approx(3.2)  # 32-bit MULT 3.1 + ADD 0.1
    assert standard.mac_pj(16) == pytest.approx(1.65)


def test_dg_and_dvafs_state_that_e_cfg_is_derived_not_printed() -> None:
    for name in ("dg", "dvafs"):
        provenance = " ".join(load_profile(name).provenance)
        assert "DERIVED, not sourced" in provenance and "back-solved" in provenance


def test_e_cfg_table_as_in_the_design_brief() -> None:
    dg, dvafs = load_profile("dg"), load_profile("dvafs")
    assert [dg.scale(b) for b in (1, 5, 8, 16)] == [0.269, 0.464, 0.610, 1.0]
    assert [dvafs.scale(b) for b in (1, 4, 5, 8, 9, 16)] == [0.052, 0.058, 0.160, 0.177, 0.659, 1.0]
    # Wider than the table (a float layer at 32 bits): the full-width MAC, no scaling.
    assert dvafs.scale(32) == 1.0
    assert dvafs.mac_pj(32) == pytest.approx(3.2)


def test_builtin_names_ignore_case() -> None:
    assert load_profile("DVAFS").name == "dvafs"


def test_user_file_is_read_and_used(tmp_path: Path) -> None:
    document = standard_document() | {
        "access_pj_per_bit": 5.0,
        "mac_scale": {"1": 0.5, "2": 0.75},
        "provenance": "measured on my chip",
    }
    profile = load_profile(str(write(tmp_path, document)))
    assert profile.name == "mine"
    assert profile.access_pj(4) == pytest.approx(20.0)
    assert profile.mac_pj(2) == pytest.approx((3.1 * 2 / 32 + 0.1) * 0.75)
    assert profile.mac_pj(8) == pytest.approx((3.1 * 8 / 32 + 0.1) * 0.75)  # widest entry
    assert profile.provenance == ("measured on my chip",)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"access_pj_per_bit": -1}, "access_pj_per_bit"),
        ({"access_pj_per_bit": "2.5"}, "access_pj_per_bit"),
        ({"mac_multiply_pj": True}, "mac_multiply_pj"),
        ({"mac_multiply_reference_bits": 32.5}, "mac_multiply_reference_bits"),
        ({"mac_add_pj": -0.1}, "mac_add_pj"),
        ({"mac_scale": {"1": 0.5, "3": 0.7}}, "mac_scale.2"),
        ({"mac_scale": {"one": 0.5}}, "mac_scale.one"),
        ({"mac_scale": {"1": 0}}, "mac_scale.1"),
        ({"mac_scale": [0.5]}, "mac_scale"),
        ({"acces_pj_per_bit": 2.5}, "acces_pj_per_bit"),
        ({"name": ""}, "name"),
        ({"provenance": 3}, "provenance"),
        ({"format": "something-else"}, "format"),
        ({"version": 2}, "version"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    path = write(tmp_path, standard_document() | change)
    with pytest.raises(ProfileError, match=f"'{field}'") as error:
        load_profile(str(path))
    assert str(path) in str(error.value)


def test_missing_field_is_named(tmp_path: Path) -> None:
    document = standard_document()
    del document["mac_add_pj"]
    with pytest.raises(ProfileError, match="missing field 'mac_add_pj'"):
        load_profile(str(write(tmp_path, document)))


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  oops\n}')
    with pytest.raises(ProfileError, match="broken.json: malformed JSON at line 3"):
        load_profile(str(path))


def test_unknown_name_that_is_no_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such file and not a built-in profile"):
        load_profile(str(tmp_path / "tpu"))


@pytest.mark.parametrize(("field", "value"), [("access_pj_per_bit", 1e308), ("mac_add_pj", 1e7), ("mac_multiply_reference_bits", 10**9)])
def test_values_that_would_overflow_an_estimate_are_refused(tmp_path: Path, field: str, value: float) -> None:
    profile = {
        "format": "quanos-hardware-profile", "version": 1, "name": "big",
        "access_pj_per_bit": 2.5, "mac_multiply_pj": 3.1, "mac_multiply_reference_bits": 32, "mac_add_pj": 0.1,
        field: value,
    }
    (tmp_path / "big.json").write_text(json.dumps(profile))
    with pytest.raises(ProfileError, match=field):
        load_profile(tmp_path / "big.json")
