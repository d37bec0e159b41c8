"""Peers on ResNet-20: onnxruntime.quantization and a per-layer sensitivity sweep vs QUANOS.

- quantize_static int8 (QDQ, per-channel int8 weights, uint8 activations) on the same
  calibration images as quanos;
- quantize_static with TensorQuantOverrides exported from the QUANOS plan (the same layer
  ranking; quanos_onnx.export.to_ort_overrides rounds each layer up to 4/8/16 bits);
- a sensitivity sweep in the style of AIMET QuantAnalyzer / Quark: quantize one layer at a
  time to 4 bits (weights and input activation, everything else float) and measure the
  relative logit error and accuracy on tune images (L quantize + inference runs), against
  QUANOS's ANS (one FGSM attack). Both rankings then get a plan at the same average bits
  (allocate_budgeted at the QUANOS plan's average) and are evaluated clean and under attack.

Reuses bench/study.py's cache (the QUANOS plan and ANS) and caches its own cells under
bench/cache/study/resnet20/peers/. Writes '## Peers' in docs/results.md.

    PYTHONPATH=. python bench/peers.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study import BUDGET_BITS, FGSM_EPS, PGD_EPS, RESULTS, Study, batches, cached  # noqa: E402
from study_data import load_setup  # noqa: E402

SWEEP_BITS = 4
EVAL_FGSM = (8 / 255, 0.05)
EVAL_PGD = 8 / 255


def ort_static(source: Path, calibration: list[np.ndarray], target: Path, extra: dict[str, Any] | None = None) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({"input": batch} for batch in calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    options: dict[str, Any] = dict(
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    options.update(extra or {})
    quantize_static(str(source), str(target), Reader(), **options)
    return onnx.load(str(target))


class Peers:
    def __init__(self, study: Study, options: argparse.Namespace) -> None:
        self.study, self.options = study, options
        self.cache = study.cache / "peers"
        self.sweep_x, self.sweep_y = study.setup.tune_x[: options.sweep_samples], study.setup.tune_y[: options.sweep_samples]

    def sweep(self) -> dict[str, Any]:
        """Per layer: relative logit error and accuracy with only that layer at SWEEP_BITS."""
        from quanos_onnx.model import Runner, output_names
        from quanos_onnx.quantize import quantize
        from quanos_onnx.plan import LayerPlan, Plan

        study = self.study

        def logits(proto: onnx.ModelProto) -> np.ndarray:
            runner, name = Runner(proto), output_names(proto)[0]
            return np.concatenate([runner.run(x, [name])[0] for x, _ in batches(self.sweep_x, self.sweep_y)])

        def compute() -> dict[str, Any]:
            started = time.perf_counter()
            reference = logits(study.proto)
            rows = []
            for layer in study.layers:
                if layer.is_output:
                    continue
                plan = Plan(tuple(
                    LayerPlan(other.name, SWEEP_BITS, SWEEP_BITS) if other.name == layer.name
                    else LayerPlan(other.name, None, None, keep_float=True)
                    for other in study.layers
                ), method=f"sweep-{layer.name}")
                quantized = logits(quantize(study.proto, plan, study.calibration, layers=study.layers).model)
                error = float(np.linalg.norm(quantized - reference) / np.linalg.norm(reference))
                accuracy = float((quantized.argmax(1) == self.sweep_y).mean())
                rows.append({"layer": layer.name, "relative_error": error, "accuracy": accuracy})
            return {"seconds": time.perf_counter() - started, "rows": rows, "samples": len(self.sweep_x)}

        return cached(self.cache / f"sweep{self.options.sweep_samples}.json", compute)

    def plans(self) -> dict[str, Any]:
        """Sweep-ranked and ANS-ranked plans at the QUANOS plan's average bits."""
        from quanos_onnx.allocate import allocate_budgeted
        from quanos_onnx.harness.ans import AnsResult
        from quanos_onnx.layers import find_joins
        from quanos_onnx.passes.align import align_plan

        study = self.study
        target = BUDGET_BITS
        ans = [AnsResult(r["layer"], r["tensor"], r["ans_mean"], r["ans_std"], r["count"]) for r in study.ans_float()["layers"]]
        errors = {row["layer"]: row["relative_error"] for row in self.sweep()["rows"]}
        sweep_scores = [AnsResult(r.layer, r.tensor, errors.get(r.layer, 0.0), 0.0, r.count) for r in ans]
        joins = find_joins(study.proto, study.layers)
        plans = {}
        for name, scores in (("ans-ranked", ans), ("sweep-ranked", sweep_scores)):
            raw = allocate_budgeted(study.layers, scores, target, k_init=16, k_min=2)
            plans[name] = align_plan(raw, study.layers, joins)
        return {"target": target, "plans": plans}

    def models(self, workdir: Path) -> dict[str, tuple[onnx.ModelProto, float]]:
        """Every peer model with its parameter-weighted average weight bits."""
        from quanos_onnx.export import ort_quantize_options, to_ort_overrides
        from quanos_onnx.model import save_model
        from quanos_onnx.quantize import quantize

        study = self.study
        float_path = save_model(study.proto, workdir / "float.onnx")
        models: dict[str, tuple[onnx.ModelProto, float]] = {}
        int8 = self.cache / "ort_int8.onnx"
        if not int8.exists():
            int8.parent.mkdir(parents=True, exist_ok=True)
            ort_static(float_path, study.calibration, int8)
        models["quantize_static int8 (U8S8)"] = (onnx.load(str(int8)), 8.0)
        mixed = self.cache / "ort_mixed.onnx"
        document, _ = to_ort_overrides(study.model("quanos"))
        ort_bits = self._ort_average(document)
        if not mixed.exists():
            ort_static(float_path, study.calibration, mixed, ort_quantize_options(document))
        models["quantize_static mixed 4/8/16 (QUANOS ranking)"] = (onnx.load(str(mixed)), ort_bits)
        plans = self.plans()["plans"]
        path = self.cache / "sweep-ranked.onnx"
        if not path.exists():
            onnx.save(quantize(study.proto, plans["sweep-ranked"], study.calibration, layers=study.layers).model, str(path))
        models["quanos sweep-ranked, budget 5"] = (onnx.load(str(path)), plans["sweep-ranked"].average_weight_bits(study.params))
        models["quanos uniform 5 (study)"] = (study.model("u5"), study.plan("u5").average_weight_bits(study.params))
        models["quanos ANS-ranked, budget 5 (study)"] = (study.model("qb5"), plans["ans-ranked"].average_weight_bits(study.params))
        return models

    def _ort_average(self, document: dict[str, Any]) -> float:
        overrides = document["TensorQuantOverrides"]
        total = weighted = 0
        for layer in self.study.layers:
            entry = overrides.get(layer.weight)
            if entry is None:
                continue
            bits = int(entry[0]["quant_type"].removeprefix("QInt"))
            total += layer.params
            weighted += layer.params * bits
        return weighted / total

    def evaluate(self, label: str, proto: onnx.ModelProto) -> dict[str, Any]:
        from quanos_onnx.harness.attacks import Attack, twin_of
        from quanos_onnx.harness.evaluate import evaluate

        study, options = self.study, self.options
        setup = study.setup
        if label.endswith("(study)"):
            variant = "u5" if "uniform 5" in label else "qb5"
            result = study.evaluation(variant)
            fgsm = result["fgsm"]["value"]["attacks"]
            return {
                "clean": result["clean"],
                "fgsm": [fgsm[FGSM_EPS.index(eps)]["accuracy"] for eps in EVAL_FGSM],
                "pgd": [result["pgd"]["value"]["attacks"][PGD_EPS.index(EVAL_PGD)]["accuracy"]],
            }

        def compute() -> dict[str, Any]:
            clean = study._clean(proto)
            try:
                twin = twin_of(proto)
            except Exception as error:  # a peer's graph the twin cannot differentiate
                return {"clean": clean, "fgsm": None, "pgd": None, "twin_error": str(error).splitlines()[0]}
            fgsm = evaluate(proto, batches(setup.test_x, setup.test_y, options.fgsm_samples),
                            [Attack.fgsm(eps) for eps in EVAL_FGSM], twin=twin)
            pgd = evaluate(proto, batches(setup.test_x, setup.test_y, options.pgd_samples),
                           [Attack.pgd(EVAL_PGD, steps=7, alpha=2 / 255)], twin=twin)
            return {
                "clean": clean,
                "fgsm": [a.accuracy for a in fgsm.attacks],
                "pgd": [a.accuracy for a in pgd.attacks],
            }

        key = label.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
        result = cached(self.cache / f"eval_{key}_{options.fgsm_samples}_{options.pgd_samples}.json", compute)
        print(f"evaluated {label}", flush=True)
        return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-samples", type=int, default=500)
    parser.add_argument("--fgsm-samples", type=int, default=200)
    parser.add_argument("--pgd-samples", type=int, default=100)
    parser.add_argument("--ans-samples", type=int, default=1000, help="as bench/study.py (its cache is reused)")
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    study = Study(load_setup("resnet20"), options)
    peers = Peers(study, options)
    ans_seconds = json.loads((study.cache / f"ans_float{options.ans_samples}.json").read_text())["seconds"] \
        if (study.cache / f"ans_float{options.ans_samples}.json").exists() else None
    study.ans_float()
    if ans_seconds is None:
        ans_seconds = study.seconds["ANS float"]
    sweep = peers.sweep()
    with tempfile.TemporaryDirectory() as directory:
        models = peers.models(Path(directory))
    rows = []
    for label, (proto, bits) in models.items():
        result = peers.evaluate(label, proto)
        fgsm = result["fgsm"] or [None] * len(EVAL_FGSM)
        pgd = result["pgd"] or [None]
        note = result.get("twin_error", "")
        rows.append(
            f"| {label} | {bits:.2f} | {_pct(result['clean'])} | {' | '.join(_pct(v) for v in fgsm)} | {_pct(pgd[0])} | {note} |"
        )
    ans = study.ans_float()
    ranking_ans = [r["layer"] for r in sorted(ans["layers"][:-1], key=lambda r: -r["ans_mean"])]
    ranking_sweep = [r["layer"] for r in sorted(sweep["rows"], key=lambda r: -r["relative_error"])]
    plans = peers.plans()["plans"]
    sweep_rows = [
        f"| `{row['layer']}` | {row['relative_error']:.4f} | {100 * row['accuracy']:.1f} | "
        f"{ranking_sweep.index(row['layer']) + 1} | {ranking_ans.index(row['layer']) + 1} | "
        f"{plans['sweep-ranked'].layer(row['layer']).weight_bits} | {plans['ans-ranked'].layer(row['layer']).weight_bits} |"
        for row in sweep["rows"]
    ]
    from scipy.stats import spearmanr

    errors = {r["layer"]: r["relative_error"] for r in sweep["rows"]}
    ans_by_layer = {r["layer"]: r["ans_mean"] for r in ans["layers"]}
    rho = spearmanr([errors[name] for name in errors], [ans_by_layer[name] for name in errors]).statistic
    command = " ".join(["PYTHONPATH=. python bench/peers.py", *sys.argv[1:]])
    section = f"""## Peers (ResNet-20)

- command: `{command}`
- machine: {machine()}, {options.threads} torch threads
- calibration for every quantizer: the first {options.calibration_samples} tune images
  (cifar10_test_jpeg_q75.npz from index 932). Test: clean on the exact 932; FGSM on the first
  {options.fgsm_samples}; PGD-7 (steps of 2/255) on the first {options.pgd_samples}.
- quantize_static int8: QDQ, per-channel int8 weights, uint8 activations (ours keeps the
  classifier float; quantize_static quantizes it too).
- quantize_static mixed: `to_ort_overrides` of the QUANOS model (each layer's bits rounded up
  to onnxruntime's 4/8/16), hence its larger average.
- budgeted plans: `allocate_budgeted` to a {peers.plans()['target']:g}-bit average with either ranking: QUANOS's
  ANS (the study's "QUANOS budget 5") or the sweep's relative logit error; residual alignment applied.
  (Eqn 3 alone gives this model about 2 bits, where every plan is near chance post-hoc; see the
  resnet20 section.) "(study)" rows are read from bench/study.py's evaluations (same images and attacks).

Analysis cost: ANS (one FGSM attack, {study.ans_float()['samples']} images) {ans_seconds:.0f} s;
per-layer sweep ({len(sweep['rows'])} layers at {SWEEP_BITS} bits, {sweep['samples']} images each) {sweep['seconds']:.0f} s.
Spearman rank correlation between ANS and the sweep's error: {rho:.2f}.

| model | avg weight bits | clean | FGSM 8/255 | FGSM 0.05 | PGD-7 8/255 | note |
|---|---:|---:|---:|---:|---:|---|
{chr(10).join(rows)}

Per-layer sweep (relative logit error and accuracy on {sweep['samples']} tune images with only that layer at {SWEEP_BITS} bits),
rank by each method (1 = most sensitive) and the bits each budgeted plan gives:

| layer | sweep error | sweep accuracy | sweep rank | ANS rank | sweep-ranked bits | ANS-ranked bits |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(sweep_rows)}
"""
    write_section(RESULTS, "## Peers", section)
    print(section)


if __name__ == "__main__":
    main()
