"""The reproduction study: is a QUANOS model more robust than a uniform one of the same size?

For one model (--setup resnet20 | mnist8 | fashion) it builds float, uniform 16 and 8 bits,
uniform at the QUANOS plan's rounded average bits (iso-compression, the paper's
Baseline-3) and QUANOS (k_init 16, FGSM eps 0.05 ANS); post-hoc, fine-tuned
(--stages finetune) and adversarially fine-tuned (--stages adv); and reports clean, FGSM and
PGD-7 accuracy, adversarial loss, weight memory and Standard/DG/DVAFS energy, the per-layer
ANS of the float and of the QUANOS-quantized model (paper Fig. 3a), and plots. Every cell
(plan, model, evaluation) is cached under bench/cache/study/<setup>/, so a rerun skips
what is done and an interrupted run resumes (evaluations are keyed by their sample counts,
ANS and plans by --ans-samples; delete the folder after changing anything else). Writes the '## <setup>' section of
docs/results.md and PNGs under docs/img/.

    PYTHONPATH=. python bench/study.py --setup resnet20 --stages posthoc,finetune,adv
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study_data import CACHE, REPO, SETUP_NAMES, Setup, cached, cost_row, load_setup  # noqa: E402

from quanos_onnx.finetune.train import DEFAULT_LEARNING_RATES  # noqa: E402

RESULTS = REPO / "docs/results.md"
IMAGES = REPO / "docs/img"
BATCH = 100
FGSM_EPS = (2 / 255, 8 / 255, 16 / 255, 0.05, 0.1, 0.2, 0.3)
PGD_EPS = (8 / 255, 16 / 255, 32 / 255)
PGD_STEPS, PGD_ALPHA = 7, 2 / 255
POSTHOC = ("float", "quanos", "uiso", "qb5", "u5", "u8", "u16")
"""Post-hoc variants in run order (the iso-compression pair first)."""
PRIORITY_POSTHOC = 5
"""Run order: the first five post-hoc rows, then fine-tuning, then uniform 8/16 (close to
float), then adversarial fine-tuning, so a run cut short loses the least informative rows."""
TUNED = ("uiso", "quanos", "u5", "qb5", "u8", "u16")
"""Fine-tuned variants in priority order (the iso-compression pair first)."""
LABELS = {
    "float": "float", "u16": "uniform 16", "u8": "uniform 8", "uiso": "uniform iso", "quanos": "QUANOS",
    "qb5": "QUANOS budget 5", "u5": "uniform 5",
}
BUDGET_BITS = 5.0
"""Eqn 3 alone gives this ResNet-20 about 2 bits (useless post-hoc), so the ANS ranking is also
compared with uniform at a usable size: allocate_budgeted to 5 bits against uniform 5."""


def batches(x: np.ndarray, y: np.ndarray, count: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    count = len(x) if count is None else min(count, len(x))
    for first in range(0, count, BATCH):
        last = min(first + BATCH, count)
        yield x[first:last], y[first:last]


class Study:
    def __init__(self, setup: Setup, options: argparse.Namespace) -> None:
        from quanos_onnx.layers import list_layers
        from quanos_onnx.model import load_model

        self.setup, self.options = setup, options
        self.cache = CACHE / setup.name
        self.proto = load_model(setup.model_path)
        self.layers = list_layers(self.proto)
        self.params = {layer.name: layer.params for layer in self.layers}
        self.calibration = [x for x, _ in batches(setup.tune_x, setup.tune_y, options.calibration_samples)]
        self.seconds: dict[str, float] = {}

    def timed(self, label: str, compute: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            started = time.perf_counter()
            value = compute()
            self.seconds[label] = time.perf_counter() - started
            print(f"[{self.setup.name}] {label}: {self.seconds[label]:.0f} s", flush=True)
            return {"value": value, "seconds": self.seconds[label]}
        return run

    # -- ANS and plans --------------------------------------------------------------
    def ans_float(self) -> dict[str, Any]:
        return cached(self.cache / f"ans_float{self.options.ans_samples}.json", self.timed("ANS float", lambda: self._ans(self.proto)))["value"]

    def _ans(self, proto: onnx.ModelProto) -> dict[str, Any]:
        from quanos_onnx.harness.ans import measure_ans
        from quanos_onnx.harness.attacks import Attack

        setup = self.setup
        tune = batches(setup.tune_x, setup.tune_y, self.options.ans_samples)
        return measure_ans(proto, self.layers, tune, Attack.fgsm(0.05)).to_json()

    def plans(self) -> dict[str, Any]:
        """Aligned plans (what the QDQ model gets) of every variant, as plan JSON."""
        from quanos_onnx.allocate import allocate, allocate_budgeted
        from quanos_onnx.harness.ans import AnsResult
        from quanos_onnx.layers import find_joins
        from quanos_onnx.passes.align import align_plan
        from quanos_onnx.plan import Plan

        def compute() -> dict[str, Any]:
            ans = [
                AnsResult(r["layer"], r["tensor"], r["ans_mean"], r["ans_std"], r["count"])
                for r in self.ans_float()["layers"]
            ]
            joins = find_joins(self.proto, self.layers)
            quanos = align_plan(allocate(self.layers, ans, k_init=16, k_min=2), self.layers, joins)
            iso_bits = int(round(quanos.average_weight_bits(self.params)))
            budgeted = align_plan(allocate_budgeted(self.layers, ans, BUDGET_BITS, k_init=16, k_min=2), self.layers, joins)
            plans = {
                "qb5": budgeted,
                "u5": Plan.uniform(self.layers, int(BUDGET_BITS)),
                "u16": Plan.uniform(self.layers, 16),
                "u8": Plan.uniform(self.layers, 8),
                "uiso": Plan.uniform(self.layers, iso_bits),
                "quanos": quanos,
            }
            return {name: plan.to_json() for name, plan in plans.items()}

        return cached(self.cache / f"plans{self.options.ans_samples}.json", compute)

    def plan(self, variant: str) -> Any:
        from quanos_onnx.plan import plan_from_json

        return plan_from_json(self.plans()[variant], f"plans.json:{variant}")

    # -- models ---------------------------------------------------------------------
    def model(self, name: str) -> onnx.ModelProto:
        """float, a post-hoc variant, 'ft-<variant>' or 'adv-<variant>' (cached .onnx)."""
        if name == "float":
            return self.proto
        path = self.cache / "models" / f"{name}.onnx"
        if path.exists():
            return onnx.load(str(path))
        started = time.perf_counter()
        if name in POSTHOC:
            from quanos_onnx.quantize import quantize

            proto = quantize(self.proto, self.plan(name), self.calibration, layers=self.layers).model
            history = None
        else:
            proto, history = self._finetune(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
        seconds = time.perf_counter() - started
        (self.cache / "models" / f"{name}.json").write_text(json.dumps({"seconds": seconds, "history": history}))
        print(f"[{self.setup.name}] model {name}: {seconds:.0f} s", flush=True)
        return proto

    def _finetune(self, name: str) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
        from quanos_onnx.data import dataset_from_arrays
        from quanos_onnx.finetune import FinetuneSettings, finetune
        from quanos_onnx.harness.attacks import Attack
        from quanos_onnx.model import input_spec

        kind, variant = name.split("-", 1)
        options, setup = self.options, self.setup
        train_count = min(options.tune_samples, len(setup.tune_x) - options.val_samples)
        spec = input_spec(self.proto)
        train = dataset_from_arrays(setup.tune_x[:train_count], setup.tune_y[:train_count], spec)
        val = dataset_from_arrays(setup.tune_x[-options.val_samples :], setup.tune_y[-options.val_samples :], spec)
        adversarial = Attack.fgsm(options.adv_eps) if kind == "adv" else None
        settings = FinetuneSettings(
            epochs=options.epochs, learning_rate=options.lr, batch_size=64, adversarial=adversarial,
            calibration_samples=options.calibration_samples,
        )
        result = finetune(self.proto, self.plan(variant), train, settings, val=val)
        history = [
            {
                "epoch": r.epoch, "train_accuracy": r.train_accuracy, "val_accuracy": r.val_accuracy,
                "val_adversarial_accuracy": r.val_adversarial_accuracy, "seconds": r.seconds,
            }
            for r in result.history
        ]
        return result.model, history

    # -- evaluation -----------------------------------------------------------------
    def same_plan_as(self, name: str) -> str | None:
        """An earlier post-hoc variant with exactly this plan (same model, so same numbers)."""
        if name not in POSTHOC or name == "float":
            return None
        bits = [(e.get("weight_bits"), e.get("act_bits")) for e in self.plans()[name]["layers"]]
        for other in POSTHOC[1 : POSTHOC.index(name)]:
            if [(e.get("weight_bits"), e.get("act_bits")) for e in self.plans()[other]["layers"]] == bits:
                return other
        return None

    def evaluation(self, name: str) -> dict[str, Any]:
        from quanos_onnx.harness.attacks import twin_of

        twin_variant = self.same_plan_as(name)
        if twin_variant is not None:
            print(f"[{self.setup.name}] {name} has the plan of {twin_variant}: its evaluation is reused", flush=True)
            return self.evaluation(twin_variant)
        proto = self.model(name)
        holder: dict[str, Any] = {}

        def twin() -> Any:
            if "twin" not in holder:
                holder["twin"] = twin_of(proto)
            return holder["twin"]

        options = self.options
        clean = cached(self.cache / "eval" / f"{name}.clean.json", lambda: self._clean(proto))
        fgsm = cached(
            self.cache / "eval" / f"{name}.fgsm{options.fgsm_samples}.json",
            self.timed(f"FGSM {name}", lambda: self._attacks(proto, twin(), "fgsm", options.fgsm_samples)),
        )
        pgd = cached(
            self.cache / "eval" / f"{name}.pgd{options.pgd_samples}.json",
            self.timed(f"PGD {name}", lambda: self._attacks(proto, twin(), "pgd", options.pgd_samples)),
        )
        return {"clean": clean, "fgsm": fgsm, "pgd": pgd}

    def _clean(self, proto: onnx.ModelProto) -> float:
        from quanos_onnx.harness.attacks import predictions
        from quanos_onnx.model import Runner, output_names

        runner, logits = Runner(proto), output_names(proto)[0]
        correct = 0
        for x, y in batches(self.setup.test_x, self.setup.test_y):
            (out,) = runner.run(x, [logits])
            correct += int((predictions(out) == y).sum())
        return correct / len(self.setup.test_x)

    def _attacks(self, proto: onnx.ModelProto, twin: Any, method: str, count: int) -> dict[str, Any]:
        from quanos_onnx.harness.evaluate import attack_grid, evaluate

        if method == "fgsm":
            grid = attack_grid(["fgsm"], FGSM_EPS)
        else:
            grid = attack_grid(["pgd"], PGD_EPS, steps=PGD_STEPS, alpha=PGD_ALPHA)
        result = evaluate(proto, batches(self.setup.test_x, self.setup.test_y, count), grid, twin=twin)
        return result.to_json()

    def ans_quantized(self) -> dict[str, Any]:
        """ANS measured on the QUANOS-quantized model, same attack and images (Fig. 3a)."""
        return cached(
            self.cache / f"ans_quanos{self.options.ans_samples}.json",
            self.timed("ANS quanos", lambda: self._ans(self.model("quanos"))),
        )["value"]

    def energy(self, variant: str) -> dict[str, float]:
        plan = None if variant == "float" else self.plan(variant)
        return cost_row(self.layers, plan, self.params)


def run(options: argparse.Namespace) -> str:
    import torch

    torch.set_num_threads(options.threads)
    setup = load_setup(options.setup, options.test_samples)
    study = Study(setup, options)
    stages = options.stages.split(",")
    names: list[str] = []
    if "posthoc" in stages:
        names += list(POSTHOC[:PRIORITY_POSTHOC])
    if "finetune" in stages:
        names += [f"ft-{variant}" for variant in TUNED[: options.tuned_variants]]
    if "posthoc" in stages:
        names += list(POSTHOC[PRIORITY_POSTHOC:])
    if "adv" in stages:
        names += [f"adv-{variant}" for variant in TUNED[: options.tuned_variants]]
    if options.only:
        names = [name for name in names if name in options.only.split(",")]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            results[name] = study.evaluation(name)
        except KeyboardInterrupt:
            raise
        section = report(study, results, options, complete=False)
        write_section(RESULTS, f"## {setup.name}", section)
    ans_quanos = study.ans_quantized() if "posthoc" in stages else None
    section = report(study, results, options, complete=True, ans_quanos=ans_quanos)
    write_section(RESULTS, f"## {setup.name}", section)
    return section


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _eps_label(eps: float) -> str:
    """0.05 stays 0.05; 8/255 (an awkward decimal) is written as a fraction of 255."""
    numerator = eps * 255
    if len(f"{eps:g}") > 5 and abs(numerator - round(numerator)) < 1e-6:
        return f"{round(numerator)}/255"
    return f"{eps:g}"


def report(
    study: Study,
    results: dict[str, dict[str, Any]],
    options: argparse.Namespace,
    *,
    complete: bool,
    ans_quanos: dict[str, Any] | None = None,
) -> str:
    setup = study.setup
    plans = study.plans()
    ans = study.ans_float()
    quanos_bits = study.plan("quanos").average_weight_bits(study.params)
    iso_bits = study.plan("uiso").average_weight_bits(study.params)
    fgsm_head = " | ".join(f"FGSM {_eps_label(e)}" for e in FGSM_EPS)
    pgd_head = " | ".join(f"PGD {_eps_label(e)}" for e in PGD_EPS)
    rows = []
    for name, result in results.items():
        variant = name.split("-", 1)[-1] if "-" in name else name
        kind = {"ft": "fine-tuned", "adv": "adv. fine-tuned (FGSM)"}.get(name.split("-")[0], "post-hoc")
        fgsm = [a["accuracy"] for a in result["fgsm"]["value"]["attacks"]]
        pgd = [a["accuracy"] for a in result["pgd"]["value"]["attacks"]]
        fgsm_clean = result["fgsm"]["value"]["clean_accuracy"]
        loss = fgsm_clean - fgsm[FGSM_EPS.index(0.1)]
        rows.append(
            f"| {LABELS[variant]} | {kind} | {study.energy(variant)['average_bits']:.2f} | {_pct(result['clean'])} | "
            + " | ".join(_pct(v) for v in fgsm) + " | " + " | ".join(_pct(v) for v in pgd) + f" | {_pct(loss)} |"
        )
    energy_rows = []
    for variant in POSTHOC:
        row = study.energy(variant)
        energy_rows.append(
            f"| {LABELS[variant]} | {row['average_bits']:.2f} | {row['memory_kb']:.1f} | "
            f"{row['standard'] / 1e6:.3f} | {row['dg'] / 1e6:.3f} | {row['dvafs'] / 1e6:.3f} |"
        )
    bits = {name: [entry.get("weight_bits") for entry in plan["layers"]] for name, plan in plans.items()}
    ans_rows = []
    quantized_ans = {r["layer"]: r for r in (ans_quanos or {}).get("layers", [])}
    for index, (layer, r) in enumerate(zip(study.layers, ans["layers"])):
        q = quantized_ans.get(layer.name)
        quanos_bits_here = bits["quanos"][index]
        quantized_cell = "-" if q is None else f"{q['ans_mean']:.4f}"
        ans_rows.append(
            f"| {index} | `{layer.name}` | {layer.params} | {r['ans_mean']:.4f} | "
            f"{quantized_cell} | {'float' if quanos_bits_here is None else quanos_bits_here} | {bits['qb5'][index] or 'float'} |"
        )
    plots = plot(study, results, ans, ans_quanos) if complete else []
    missing = [] if complete else ["(run in progress: more rows follow)"]
    shown = [part for index, part in enumerate(sys.argv[1:]) if "--machine" not in (part, sys.argv[index])]
    command = " ".join(["PYTHONPATH=. python bench/study.py", *shown])
    tune_note = (
        f"fine-tuning: {options.epochs} epoch(s) on the first {min(options.tune_samples, len(setup.tune_x) - options.val_samples)} "
        f"tune images, Adam lr {options.lr or DEFAULT_LEARNING_RATES['adam']}, best epoch (0 = post-hoc included) on the last "
        f"{options.val_samples} tune images; adversarial fine-tuning: FGSM eps {_eps_label(options.adv_eps)}, "
        "loss 0.5 clean + 0.5 attacked, best epoch by FGSM accuracy on the validation images"
    )
    return f"""## {setup.name}

- command: `{command}`
- machine: {options.machine or f'{machine()}, {options.threads} torch threads'}
- data: {setup.description}
- test: clean accuracy on {len(setup.test_x)} test images; FGSM on the first {min(options.fgsm_samples, len(setup.test_x))};
  PGD-{PGD_STEPS} (steps of 2/255, no random start) on the first {min(options.pgd_samples, len(setup.test_x))}.
  Attacks are white-box on the model's own torch twin (fake-quant for quantized models),
  accuracy counted by onnxruntime on the ONNX model.
- ANS: FGSM eps 0.05 on the first {ans['samples']} tune images ({_pct(ans['clean_accuracy'])}% clean,
  {_pct(ans['adversarial_accuracy'])}% under the attack); QUANOS: Eqn 3, k_init 16, k_min 2, classifier float,
  residual alignment applied; its parameter-weighted average is {quanos_bits:.2f} bits, so iso-compression
  uniform is {iso_bits:.0f} bits. "QUANOS budget 5": the same ANS through allocate_budgeted to a
  {BUDGET_BITS:g}-bit average ({study.plan('qb5').average_weight_bits(study.params):.2f} after alignment), against uniform 5. Calibration: min/max on the first {options.calibration_samples} tune images.
- {tune_note}
{chr(10).join('- ' + m for m in missing)}

Accuracy (%) and adversarial loss (clean minus FGSM 0.1 accuracy on the FGSM subset, points):

| model | training | avg bits | clean | {fgsm_head} | {pgd_head} | adv. loss (FGSM 0.1) |
|---|---|---:|---:|{'---:|' * (len(FGSM_EPS) + len(PGD_EPS))}---:|
{chr(10).join(rows)}

Weight memory and energy per image (hwmodel, built-in profiles; float counts 32-bit):

| model | avg bits | weight memory (kB) | Standard (uJ) | DG (uJ) | DVAFS (uJ) |
|---|---:|---:|---:|---:|---:|
{chr(10).join(energy_rows)}

ANS per layer, float model vs the QUANOS-quantized (post-hoc) model, same attack and images
(the paper's Fig. 3a), and the QUANOS bits (aligned):

| # | layer | params | ANS float | ANS quantized | QUANOS bits | budget-5 bits |
|---:|---|---:|---:|---:|---:|---:|
{chr(10).join(ans_rows)}

{chr(10).join(plots)}
"""


def plot(study: Study, results: dict[str, dict[str, Any]], ans: dict[str, Any], ans_quanos: dict[str, Any] | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMAGES.mkdir(parents=True, exist_ok=True)
    name = study.setup.name
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for label, result in results.items():
        style = "-" if "-" not in label else ("--" if label.startswith("ft") else ":")
        fgsm = [result["fgsm"]["value"]["clean_accuracy"]] + [a["accuracy"] for a in result["fgsm"]["value"]["attacks"]]
        pgd = [result["pgd"]["value"]["clean_accuracy"]] + [a["accuracy"] for a in result["pgd"]["value"]["attacks"]]
        left.plot([0, *FGSM_EPS], [100 * v for v in fgsm], style, marker="o", markersize=3, label=label)
        right.plot([0, *[255 * e for e in PGD_EPS]], [100 * v for v in pgd], style, marker="o", markersize=3, label=label)
    left.set(xlabel="FGSM eps", ylabel="accuracy (%)", title=f"{name}: FGSM")
    right.set(xlabel="PGD-7 eps (x/255)", title=f"{name}: PGD-7")
    right.legend(fontsize=6)
    figure.tight_layout()
    accuracy_png = IMAGES / f"study_{name}_accuracy.png"
    figure.savefig(accuracy_png)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(9, 3), dpi=80)
    positions = np.arange(len(study.layers))
    axis.bar(positions - 0.2, [r["ans_mean"] for r in ans["layers"]], 0.4, label="float model")
    if ans_quanos is not None:
        axis.bar(positions + 0.2, [r["ans_mean"] for r in ans_quanos["layers"]], 0.4, label="QUANOS-quantized")
    axis.set(xlabel="layer", ylabel="ANS (FGSM 0.05)", title=f"{name}: ANS per layer (paper Fig. 3a)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    ans_png = IMAGES / f"study_{name}_ans.png"
    figure.savefig(ans_png)
    plt.close(figure)
    return [f"![accuracy under attack](img/{accuracy_png.name})", "", f"![ANS per layer](img/{ans_png.name})"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=SETUP_NAMES, default="resnet20")
    parser.add_argument("--stages", default="posthoc", help="comma-separated: posthoc, finetune, adv")
    parser.add_argument("--tuned-variants", type=int, default=2, help="fine-tune the first N of uiso, quanos, u5, qb5, u8, u16")
    parser.add_argument("--only", default=None, help="comma-separated rows to run/report, e.g. float,quanos,ft-quanos")
    parser.add_argument("--test-samples", type=int, default=None, help="use the first N test images (default all)")
    parser.add_argument("--fgsm-samples", type=int, default=200)
    parser.add_argument("--pgd-samples", type=int, default=100)
    parser.add_argument("--ans-samples", type=int, default=1000)
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--tune-samples", type=int, default=2000, help="fine-tuning images per epoch")
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--adv-eps", type=float, default=8 / 255)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--machine", default=None,
        help="where the cached cells were computed, when not (only) here; default: this machine",
    )
    print(run(parser.parse_args()))


if __name__ == "__main__":
    main()
