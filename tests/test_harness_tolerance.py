"""harness/tolerance.py: each layer's KL and top-1 agreement alone at each bit-width, its tolerance."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from json_schema import load_schemas, validate
from quanos_onnx.allocate.sensitivity import measure
from quanos_onnx.errors import DataError
from quanos_onnx.harness import tolerance as tolerance_module
from quanos_onnx.harness.tolerance import MIN_AGREEMENT, measure_tolerance, tolerance_bits
from quanos_onnx.layers import find_joins, list_layers
from quanos_onnx.model import normalize
from tiny_models import GraphBuilder, random_inputs, resnet_style

BITS = (2, 3, 4, 6, 8)


def spiky_mlp(outlier: float = 30.0) -> onnx.ModelProto:
    """x[16] -> Gemm 'spiky' -> Relu -> Gemm 'benign' -> Relu -> Gemm 'classifier' (float).

    Every output channel of 'spiky' has one weight `outlier` times the others' scale on input
    feature 0, which the data keeps at exactly 0: the float function does not see it, but its
    per-channel absmax grid is so coarse that the real weights round away at few bits.
    """
    builder = GraphBuilder(seed=3)
    spiky = builder.relu(builder.gemm("x", 16, 32, name="spiky"))
    benign = builder.relu(builder.gemm(spiky, 32, 32, name="benign"))
    model = builder.model(["N", 16], builder.gemm(benign, 32, 10, name="classifier"), 10)
    weight = next(init for init in model.graph.initializer if init.name == "spiky.w")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[:, 0] = outlier * np.abs(values).max()
    weight.CopyFrom(onnx.numpy_helper.from_array(values, "spiky.w"))
    return normalize(model)


def spiky_inputs(count: int) -> np.ndarray:
    x = np.random.default_rng(4).random((count, 16), dtype=np.float32)
    x[:, 0] = 0.0
    return x


def test_a_layer_with_a_huge_range_weight_tolerates_fewer_bits_than_a_benign_one():
    model = spiky_mlp()
    x = spiky_inputs(200)
    table = measure_tolerance(model, list_layers(model), [x[:100], x[100:]], bits=BITS)
    rows = {row.layer: row for row in table.layers}
    assert set(rows) == {"spiky", "benign"}  # the output layer stays float
    spiky, benign = rows["spiky"], rows["benign"]
    assert benign.tolerance is not None
    assert spiky.tolerance is None or spiky.tolerance > benign.tolerance
    assert spiky.kl[BITS.index(4)] > 10 * benign.kl[BITS.index(4)]
    assert spiky.agreement[BITS.index(2)] < benign.agreement[BITS.index(2)]
    assert table.samples == 200 and table.min_agreement == MIN_AGREEMENT


def test_the_kl_is_the_allocators_single_layer_table_and_the_cut_runs_exactly(monkeypatch):
    """The tolerance's KL is allocate.sensitivity's `kl` table with every other layer float
    (same calibration, same QDQ models); running only the changed tail gives the same logits
    as running the whole model."""
    model = normalize(resnet_style())
    layers = list_layers(model)
    batches = [random_inputs(model, 24, seed) for seed in range(2)]
    split = measure_tolerance(model, layers, batches, bits=BITS)
    reference = measure("kl", model, layers, find_joins(model, layers), batches, bits=BITS, background=None)
    assert split.sensitivity().layers == reference.layers
    np.testing.assert_allclose(np.array(split.sensitivity().cost), np.array(reference.cost), rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(tolerance_module, "_splittable", lambda model: False)
    whole = measure_tolerance(model, layers, batches, bits=BITS)
    for cut, full in zip(split.layers, whole.layers):
        np.testing.assert_allclose(cut.kl, full.kl, rtol=1e-5, atol=1e-7)
        assert cut.agreement == full.agreement and cut.tolerance == full.tolerance


def test_the_allocator_plan_keeps_the_tolerance_plans_average_bits_and_the_json_validates():
    model = normalize(resnet_style())
    layers = list_layers(model)
    table = measure_tolerance(model, layers, [random_inputs(model, 32, 5)], bits=BITS)
    assert table.allocator_plan.average_bits <= table.tolerance_plan.average_bits + 1e-9
    assert all(row.allocator_bits in BITS for row in table.layers)
    document = table.to_json()
    assert validate(document, "urn:quanos:tolerance", load_schemas()) == []
    assert list(document["layers"][0]["kl"]) == [str(b) for b in BITS]


@pytest.mark.parametrize(
    ("agreement", "expected"),
    [
        ((0.5, 0.9, 1.0, 1.0, 1.0), 4),
        ((1.0, 0.98, 1.0, 1.0, 1.0), 4),  # 2 bits happen to agree, but 3 do not: not tolerated
        ((0.2, 0.5, 0.9, 0.95, 0.98), None),
        ((0.99, 0.995, 1.0, 1.0, 1.0), 2),
    ],
)
def test_the_tolerance_is_the_fewest_bits_from_which_on_every_wider_candidate_agrees(agreement, expected):
    assert tolerance_bits(BITS, agreement) == expected


def test_no_samples_is_a_data_error():
    model = spiky_mlp()
    with pytest.raises(DataError, match="no samples"):
        measure_tolerance(model, list_layers(model), [])
