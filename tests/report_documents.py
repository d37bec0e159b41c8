"""Report documents built from tiny models and made-up measurements, for the report tests.

They go through the real builders (quanos_onnx.report) and the real library objects
(AnsResult, Evaluation, Attack), so a test that renders them renders what a command would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tiny_models import vgg_chain

from quanos_onnx.allocate import allocate
from quanos_onnx.harness.ans import AnsMeasurement, AnsResult
from quanos_onnx.harness.attacks import Attack
from quanos_onnx.harness.evaluate import AttackAccuracy, Evaluation
from quanos_onnx.layers import Layer, list_layers
from quanos_onnx.model import normalize
from quanos_onnx.plan import Plan
from quanos_onnx.report import RunInfo, energy_sections, layer_rows, plan_summary, report_document

RUN = RunInfo(("quanos", "compile", "tiny.onnx", "-o", "out dir"), "2024-05-06T07:08:09Z", 12.345)


def tiny_layers(channels: tuple[int, ...] = (4, 8, 8, 16)) -> tuple[Layer, ...]:
    return list_layers(normalize(vgg_chain(channels=channels)))


def ans_measurement(layers: tuple[Layer, ...], seed: int = 0) -> AnsMeasurement:
    rng = np.random.default_rng(seed)
    results = tuple(
        AnsResult(layer.name, layer.block_output, float(rng.uniform(0.05, 0.6)), float(rng.uniform(0, 0.05)), 32)
        for layer in layers
    )
    return AnsMeasurement(results, Attack.fgsm(0.05), 32, "data", 0.9375, 0.40625, unperturbed=0)


def evaluation(clean: float, drop: float) -> Evaluation:
    attacks = [Attack.fgsm(eps) for eps in (0.05, 0.1, 0.2)] + [Attack.pgd(eps, steps=7) for eps in (8 / 255, 16 / 255)]
    results = tuple(
        AttackAccuracy(attack, max(0.0, clean - drop * attack.eps * 5), min(clean, drop * attack.eps * 5))
        for attack in attacks
    )
    return Evaluation(64, "data", clean, results, np.arange(64) < round(64 * clean))


def compile_document(layers: tuple[Layer, ...] | None = None) -> dict[str, Any]:
    layers = layers or tiny_layers()
    measurement = ans_measurement(layers)
    plan = allocate(layers, measurement.layers, k_init=8, k_min=2)
    energy, baselines = energy_sections(layers, plan)
    return report_document(
        "compile",
        models=[{"path": "models/tiny.onnx", "sha256": "ab" * 32}],
        data={"path": "data.npz", "sha256": "cd" * 32, "samples": 64, "selection": "all"},
        seed=0,
        settings={"eps": "0.05", "k_init": 8},
        layers=layer_rows(layers, plan, measurement.to_json()),
        summary=plan_summary(layers, plan),
        ans=measurement.to_json(),
        energy=energy,
        baselines=baselines,
        outputs=[{"file": "model.quanos.onnx", "sha256": "ef" * 32}],
    )


def milp_plan(layers: tuple[Layer, ...]) -> Plan:
    """A plan as compile's default writes it: two layers moved off Eqn 3's bits, and the
    allocation details (how, moved_from_eqn3) compile puts in it."""
    from dataclasses import replace

    from quanos_onnx.commands.compile import moved_from_eqn3

    eqn3 = allocate(layers, ans_measurement(layers).layers, k_init=8, k_min=2)
    moved = {layers[0].name: 7, layers[1].name: 6}
    plan = replace(
        eqn3.with_layers(
            replace(e, weight_bits=moved[e.name], act_bits=moved[e.name]) if e.name in moved else e for e in eqn3.layers
        ),
        method="milp",
    )
    how = "smallest average-bits budget within 1 point(s) of float"
    return plan.with_details(allocation={"how": how, "moved_from_eqn3": moved_from_eqn3(layers, eqn3, plan)})


def analysis_document() -> dict[str, Any]:
    layers = tiny_layers()
    measurement = ans_measurement(layers, seed=1)
    model = {"path": "models/tiny.onnx", "sha256": "ab" * 32}
    return report_document(
        "analyze",
        models=[model],
        data={"path": "data.npz", "sha256": "cd" * 32, "samples": 64, "selection": "all"},
        seed=0,
        layers=layer_rows(layers, None, measurement.to_json()),
        ans=measurement.to_json(),
        evaluations=[{"model": model, "evaluation": evaluation(0.95, 0.9).to_json()}],
    )
