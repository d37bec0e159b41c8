"""Adversarially fine-tuned vs plain models under quantization, and three robustness signals
for allocation (issue 21, items 3 and 4; docs/robustness-signals.md).

For each model (the shared ResNet-20 and the Fashion-MNIST CNN of bench/study_data.py):

1. `finetune`: adversarial fine-tuning with this tool's own `quanos_onnx.finetune`
   (`adv_train="fgsm"`) at the all-float plan, kept epoch chosen by validation accuracy
   under the training attack (epoch 0, the plain model, included).
2. For the plain and the fine-tuned model (`variant` plain | adv): ANS (FGSM 0.05, the
   compile default) and the Lipschitz bounds on the calibration images, compile's default
   sensitivity table (kl, bits 2..8) on the first SENSITIVITY of them, then the plans:
   uniform 4/5/6 bits (Plan.uniform: classifier float) and the integer program in budget
   mode (avg-bits 4 and 5) with `robustness_signal` ans (ANS weight DEFAULT_ANS_WEIGHT),
   lipschitz (same weight) and accuracy-only (weight 0).
3. Every plan is compiled by quantize() with compile's default PTQ (PtqSettings()) on the
   calibration images, and measured on test data that nothing above saw: clean accuracy of
   the written QDQ model in onnxruntime on the whole test set, robust accuracy on its first
   `robust` images as the worst case over PGD-10, APGD-CE and FGSM at the model's eps
   (harness.robustness.audit_robustness, white-box on the fake-quant twin, counted in
   onnxruntime). The worst case is run as a cascade: PGD-10 on every correctly classified
   image, then APGD-CE and FGSM only on the images still standing (the worst case is the
   same set; the cascade skips attacking images already broken).

Every artifact is cached under bench/cache/adversarial/ (one JSON per cell, keyed by the
plan's bits and eps, so identical plans are measured once; per-sample outcomes are kept, so
a table shows every row on the same images: the smallest robust count among its cells);
rerunning resumes. A setup's `extra_eps` adds robust columns at a smaller eps where the
main one leaves every model near 0%. The runs behind docs/robustness-signals.md:

    PYTHONPATH=. python bench/adversarial_quantization.py --model fashion --averages 3,4,5
    PYTHONPATH=. python bench/adversarial_quantization.py --model resnet20 --robust 150 --averages 3,4,5
    PYTHONPATH=. python bench/adversarial_quantization.py --model resnet20 --robust 100 --averages 3,4,5 --extra-eps-only
    PYTHONPATH=. python bench/adversarial_quantization.py --table --model resnet20 --model fashion --averages 3,4,5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine  # noqa: E402
from study_data import CIFAR_TEST, CIFAR_TUNE, FASHION, RESNET20, _idx_images, _idx_labels, _nchw, cached, load_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench/cache/adversarial"
DOC = REPO / "docs/robustness-signals.md"
BATCH = 64
CALIBRATION = 512
SENSITIVITY = 128
"""Sensitivity on the first 128 calibration images (compile's default is 256; halved for the shared VM)."""
ANS_EPS = 0.05
UNIFORM_BITS = (4, 5, 6)
AVERAGES = (4, 5)
SIGNALS = ("ans", "lipschitz", "accuracy-only")
APGD_STEPS = 25
VARIANTS = ("plain", "adv")
FINDINGS = """## Findings

**Adversarial fine-tuning.** Fashion-MNIST: two epochs of FGSM fine-tuning (eps 0.1, 10000 images; 212 s
wall, 27 s CPU) raised the worst-case robust accuracy at eps 0.03 from 11.6% [9.8, 13.7] to 42.7% [39.7, 45.8]
(1000 t10k images) and at 0.1 from 0.0% to 1.6% [1.0, 2.6], with clean accuracy 81.7% -> 82.1% (10000 images).
ResNet-20: no FGSM (2/255) fine-tuning that fits this VM made it more robust. Each of four runs through
`quanos_onnx.finetune` lowered validation accuracy under FGSM after its first epoch (clean/FGSM %, 500 JPEG
images): Adam 3e-4, 4000 images, batch 64: 79.4/8.6 -> 49.6/8.0 (validation [4932:5432]); 1e-4, 3000
images: 81.0/13.2 -> 66.4/9.8; 1e-5: 81.0/13.2 -> 83.2/12.4; 3e-5, batch 32 (the script's setting): 81.0/13.2 ->
70.6/9.8; the first three were stopped after that epoch (earlier settings of this script; logs in
bench/cache/adversarial/). The plain model's FGSM cross-entropy at 2/255 is about 12 (9% accuracy), and 100-200
steps do not get past the drop in both accuracies that adversarial training starts with. A one-off check of
plain fine-tuning (`quanos_onnx.finetune` at the float plan without `adv_train`, Adam 1e-4, one epoch on JPEG
[5000:5640], validated on [6000:6256]) raised clean validation accuracy from 78.9% to 82.0% on the same graph,
so the trainer works. ResNet-20 therefore has plain rows only, and the answer to item 3 rests on Fashion-MNIST.

**Does quantization cost the adversarially fine-tuned model more (Song, Ranjan and Li)?** Fashion-MNIST,
uniform bits, robust accuracy at eps 0.03 on 1000 images: yes at 5 and 6 bits, by a few points. Quantization
costs the fine-tuned model 1.9 and 6.1 points against -0.5 and +2.8 for the plain one; adv - plain = +2.4
[+0.6, +4.2] and +3.3 [+1.1, +5.6] points (paired bootstrap over the same images). Part of this is a floor:
the plain model has only 11.6% to lose. At 4 bits both models *gain* robust accuracy (plain 11.6% -> 32.3%,
adv 42.7% -> 47.7%) while clean accuracy falls 7.0 and 4.2 points. That is the pattern of gradient masking by
coarse quantization, which APGD-CE in the cascade does not undo, so the 4-bit robust figures are not evidence of
robustness (the check is a transfer attack from the float model, as in `quanos analyze`'s audit). Clean
accuracy (10000 images): no. At 5-6 bits both lose the same (adv - plain +0.1 [-0.4, +0.7] and +0.0
[-0.5, +0.6] points); at 4 bits the fine-tuned model loses less (4.2 against 7.0 points; -2.7 [-3.6, -1.9]).
At the training eps 0.1 every Fashion model is at 0-3% and the columns cannot separate them.

**ANS vs Lipschitz vs accuracy-only at the same average bits.** ResNet-20 (plain): at 4 and 5 bits the three
signals give one plan. The default weight 0.25 moves nothing here (as measured in docs/method.md), and neither
does the Lipschitz term. At 3 bits the ANS plan differs and is no better (82.7% clean, 36% robust at 0.5/255,
against 83.0% and 38% on 100 images). The allocated plans beat uniform on clean accuracy at 4 bits (90.1% vs
84.9%, 932 images), and at 0.5/255 their robust accuracy is within the intervals of uniform and float (52% vs 49%
and 58%; 100 images). At 2/255 every plan is at 0-6% on 150 images. Fashion-MNIST (three quantized layers of
144, 4608 and 18432 weights, so few iso-size combinations, and the budget leaves 0.2-0.4 bits unused) is where
the signals disagree. ANS moves the most bits, towards robust accuracy at some clean cost: plain 4 bits 74.9%
clean / 7.8% robust (eps 0.03) against 79.8 / 5.6 for accuracy-only; fine-tuned 3 bits 62.8 / 26.1 against
51.6 / 20.1 (better on both); fine-tuned 4 bits 70.3 / 31.5 against 76.3 / 33.6 (worse on both). The Lipschitz
plan equals the accuracy-only plan in 4 of the 6 Fashion cases. Where it differs it is worse on both counts
(plain 3 bits 60.8 / 3.4 against 64.3 / 3.6; fine-tuned 5 bits 80.8 / 38.6 against 81.3 / 40.8). So on these
models neither robustness term reliably buys robust accuracy at equal size. ANS changes plans more than the
Lipschitz bound does. The measured cost alone (accuracy-only) gives the best or near-best clean accuracy in every
case but one: on the fine-tuned CNN at 3 bits the ANS plan is 11 points better (62.8% against 51.6%). The
robustness terms are therefore a per-model choice to be checked on held-out data, and accuracy-only is the safer
default. Only the fine-tuned Fashion CNN keeps substantial robust accuracy (37-48% at eps 0.03 at 4-6 uniform
bits); at the main eps (2/255 for ResNet-20, 0.1 for Fashion) every model and plan is at 0-6%.
"""
"""The findings (docs/robustness-signals.md), written from the measured tables above them."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray
    source: str


@dataclass(frozen=True)
class Setup:
    """One model and its data: fine-tuning `train`/`val`, `calibration` (also ANS, bounds and
    sensitivity), `test` (nothing else reads it); `eps` is the evaluation and training eps."""

    name: str
    model: Path
    train: Split
    val: Split
    calibration: Split
    test: Split
    eps: float
    eps_text: str
    robust: int
    epochs: int
    lr: float
    batch: int
    """Fine-tuning batch size."""
    extra_eps: tuple[tuple[float, str], ...] = ()
    """Further evaluation eps (cells cached apart): robust columns that are not at the floor."""


def resnet20(robust: int) -> Setup:
    tune, test = np.load(CIFAR_TUNE), np.load(CIFAR_TEST)

    def jpeg(first: int, last: int) -> Split:
        return Split(_nchw(tune["x"][first:last]), tune["y"][first:last].astype(np.int64), f"JPEG q75 CIFAR-10 test [{first}:{last}]")

    return Setup(
        "resnet20", RESNET20,
        train=jpeg(932, 3932), val=jpeg(3932, 4432), calibration=jpeg(932, 932 + CALIBRATION),
        test=Split(_nchw(test["x"]), test["y"].astype(np.int64), "exact first 932 CIFAR-10 test images"),
        eps=2 / 255, eps_text="2/255", robust=robust, epochs=1, lr=3e-5, batch=32, extra_eps=((0.5 / 255, "0.5/255"),),
    )


def fashion(robust: int) -> Setup:
    model = load_setup("fashion").model_path  # trains and caches the CNN on first use
    train_x = _idx_images(FASHION / "train-images-idx3-ubyte.gz")
    train_y = _idx_labels(FASHION / "train-labels-idx1-ubyte.gz")

    def part(first: int, last: int) -> Split:
        return Split(train_x[first:last], train_y[first:last], f"Fashion-MNIST train [{first}:{last}]")

    return Setup(
        "fashion", model,
        train=part(0, 10000), val=part(10000, 11000), calibration=part(50000, 50000 + CALIBRATION),
        test=Split(_idx_images(FASHION / "t10k-images-idx3-ubyte.gz"), _idx_labels(FASHION / "t10k-labels-idx1-ubyte.gz"), "Fashion-MNIST t10k"),
        eps=0.1, eps_text="0.1", robust=robust, epochs=2, lr=5e-4, batch=BATCH, extra_eps=((0.03, "0.03"),),
    )


SETUPS: dict[str, Callable[[int], Setup]] = {"resnet20": resnet20, "fashion": fashion}
DEFAULT_ROBUST = {"resnet20": 250, "fashion": 1000}


def _batches(x: np.ndarray, y: np.ndarray | None = None) -> list[Any]:
    if y is None:
        return [x[i : i + BATCH] for i in range(0, len(x), BATCH)]
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


# -- 1. adversarial fine-tuning -------------------------------------------------------------
def adversarial_model(setup: Setup) -> Path:
    """The model fine-tuned by quanos_onnx.finetune (FGSM training at the float plan)."""
    target = CACHE / setup.name / "adv.onnx"
    if target.exists():
        return target
    import quanos_onnx as qn
    from quanos_onnx.layers import list_layers
    from quanos_onnx.model import load_model
    from quanos_onnx.plan import LayerPlan, Plan

    layers = list_layers(load_model(setup.model))
    float_plan = Plan(tuple(LayerPlan(layer.name, None, None, keep_float=True) for layer in layers), method="float")
    started, cpu = time.perf_counter(), time.process_time()
    result = qn.finetune(
        setup.model, (setup.train.x, setup.train.y), val=(setup.val.x, setup.val.y), plan=float_plan,
        epochs=setup.epochs, lr=setup.lr, adv_train="fgsm", adv_eps=setup.eps, batch_size=setup.batch,
        on_epoch=lambda record: print(f"{setup.name} finetune {record.to_json()}", flush=True),
    )
    document = {
        **result.summary_json(), "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
        "train": setup.train.source, "val": setup.val.source, "eps": setup.eps,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    result.save(target)
    (CACHE / setup.name / "adv-finetune.json").write_text(json.dumps(document, indent=1, default=str))
    return target


def fine_tuned(setup: Setup) -> bool:
    """Whether fine-tuning kept a trained epoch (epoch 0 is the plain model: no adv variant)."""
    return json.loads((CACHE / setup.name / "adv-finetune.json").read_text())["best_epoch"] > 0


# -- 2. signals and plans -------------------------------------------------------------------
class Variant:
    """One float model (plain or adversarially fine-tuned) with its signals and plans."""

    def __init__(self, setup: Setup, variant: str) -> None:
        from quanos_onnx.layers import find_joins, list_layers
        from quanos_onnx.model import load_model

        self.setup, self.variant = setup, variant
        self.proto = load_model(setup.model if variant == "plain" else adversarial_model(setup))
        self.layers = list_layers(self.proto)
        self.joins = find_joins(self.proto, self.layers)
        self.params = {layer.name: layer.params for layer in self.layers}
        self.folder = CACHE / setup.name / variant
        self.calibration = _batches(setup.calibration.x)

    def ans(self) -> dict[str, float]:
        def compute() -> dict[str, Any]:
            from quanos_onnx.harness.ans import measure_ans
            from quanos_onnx.harness.attacks import Attack

            cal = self.setup.calibration
            result = measure_ans(self.proto, self.layers, _batches(cal.x, cal.y), Attack.fgsm(ANS_EPS))
            return {r.layer: r.mean for r in result.layers}

        return cached(self.folder / "ans.json", compute)

    def lipschitz(self) -> dict[str, float]:
        def compute() -> dict[str, Any]:
            from quanos_onnx.harness.lipschitz import operator_bounds

            return {bound.layer: bound.bound for bound in operator_bounds(self.proto, self.layers)}

        return cached(self.folder / "lipschitz.json", compute)

    def sensitivity(self) -> Any:
        from quanos_onnx.allocate.sensitivity import Sensitivity, measure

        def compute() -> dict[str, Any]:
            cal = self.setup.calibration
            table = measure(
                "kl", self.proto, self.layers, self.joins, _batches(cal.x[:SENSITIVITY]),
                labels=_batches(cal.y[:SENSITIVITY]), bits=tuple(range(2, 9)),
            )
            print(f"{self.setup.name}/{self.variant} sensitivity: {table.seconds:.0f} s", flush=True)
            return {"layers": list(table.layers), "bits": list(table.bits), "rows": [list(r) for r in table.cost],
                    "method": table.method, "samples": table.samples, "seconds": table.seconds}

        data = cached(self.folder / "sensitivity-kl.json", compute)
        return Sensitivity(tuple(data["layers"]), tuple(data["bits"]), tuple(tuple(r) for r in data["rows"]),
                           data["method"], data["samples"], data["seconds"])

    def plans(self, averages: tuple[int, ...]) -> dict[str, Any]:
        """name -> Plan (None: the float model)."""
        from quanos_onnx.allocate.solve import DEFAULT_ANS_WEIGHT, Budget, solve
        from quanos_onnx.plan import Plan

        plans: dict[str, Any] = {"float": None}
        for bits in UNIFORM_BITS:
            plans[f"uniform-{bits}"] = Plan.uniform(self.layers, bits)
        table, ans, bounds = self.sensitivity(), self.ans(), self.lipschitz()
        for average in averages:
            for signal in SIGNALS:
                weight = 0.0 if signal == "accuracy-only" else DEFAULT_ANS_WEIGHT
                plans[f"{signal}-{average}"] = solve(
                    self.layers, self.joins, table, Budget("avg-bits", float(average)), ans=ans, ans_weight=weight,
                    lipschitz=bounds, robustness_signal="ans" if signal == "accuracy-only" else signal,  # type: ignore[arg-type]
                )
        return plans

    # -- 3. measurement ---------------------------------------------------------------------
    def cell_path(self, plan: Any, eps: float | None = None) -> tuple[Path, str]:
        """The cell's cache file, keyed by the plan's bits (and eps, when not the setup's own)."""
        bits = None if plan is None else [entry.weight_bits for entry in plan.layers]
        key = hashlib.sha256(json.dumps(bits).encode()).hexdigest()[:12]
        suffix = "" if eps is None or eps == self.setup.eps else f"-eps{eps:g}"
        return self.folder / "cells" / f"{key}{suffix}.json", key

    def cell(self, name: str, plan: Any, eps: float | None = None) -> dict[str, Any]:
        bits = None if plan is None else [entry.weight_bits for entry in plan.layers]
        path, key = self.cell_path(plan, eps)
        result = cached(path, lambda: self.measure(plan, self.setup.eps if eps is None else eps))
        average = None if plan is None else plan.average_weight_bits(self.params)
        return {"plan": name, "bits": bits, "key": key, "average": average, **result}

    def measure(self, plan: Any, eps: float) -> dict[str, Any]:
        from quanos_onnx.harness.apgd import Apgd
        from quanos_onnx.harness.attacks import Attack, twin_of
        from quanos_onnx.harness.robustness import AttackSuite, audit_robustness
        from quanos_onnx.model import Runner, output_names
        from quanos_onnx.quantize import quantize

        started, cpu = time.perf_counter(), time.process_time()
        model = self.proto if plan is None else quantize(self.proto, plan, self.calibration, layers=self.layers, joins=self.joins).model
        quantize_seconds = time.perf_counter() - started
        test = self.setup.test
        name = output_names(model)[0]
        runner = Runner(model, [name])
        logits = np.concatenate([runner.run(b, [name])[0] for b in _batches(test.x)])
        clean = logits.argmax(1) == test.y
        count = min(self.setup.robust, len(test.x))
        x, y = test.x[:count], test.y[:count]
        standing = clean[:count].copy()
        twin = twin_of(model)
        cascade = (("pgd10", Attack.pgd(eps, steps=10)), ("apgd-ce", Apgd("ce", eps, APGD_STEPS, 1)), ("fgsm", Attack.fgsm(eps)))
        broken: dict[str, int] = {}
        for label, attack in cascade:
            rows = np.flatnonzero(standing)
            if len(rows) == 0:
                broken[label] = 0
                continue
            audit = audit_robustness(model, _batches(x[rows], y[rows]), AttackSuite((attack,)), twin=twin)
            survived = audit.outcomes[0]
            broken[label] = int((~survived).sum())
            standing[rows] = survived
        return {
            "clean_correct": int(clean.sum()), "clean_samples": len(clean),
            "robust_clean_correct": int(clean[:count].sum()), "robust_correct": int(standing.sum()), "robust_samples": count,
            "eps": eps, "broken_by": broken, "quantize_seconds": quantize_seconds,
            "clean_outcomes": "".join("1" if c else "0" for c in clean),
            "robust_outcomes": "".join("1" if r else "0" for r in standing),
            "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
        }


def run_cells(setup: Setup, averages: tuple[int, ...], variants: tuple[str, ...], extra_only: bool = False) -> None:
    for variant in variants:
        bench = Variant(setup, variant)
        plans = bench.plans(averages)
        for eps in (*(() if extra_only else (setup.eps,)), *(eps for eps, _ in setup.extra_eps)):
            for name, plan in plans.items():
                row = bench.cell(name, plan, eps)
                print(f"{setup.name}/{variant} eps {eps:g} {name}: avg {row['average']} clean {row['clean_correct']}/"
                      f"{row['clean_samples']} robust {row['robust_correct']}/{row['robust_samples']} ({row['wall_seconds']:.0f} s)", flush=True)


# -- 4. the tables ------------------------------------------------------------------------
def load_rows(setup: Setup, variant: str, averages: tuple[int, ...], eps: float) -> dict[str, dict[str, Any]]:
    """The cached cells of one variant at one eps by plan name (plans re-solved: cheap and deterministic)."""
    bench = Variant(setup, variant)
    rows = {}
    for name, plan in bench.plans(averages).items():
        path, key = bench.cell_path(plan, eps)
        if path.exists():
            bits = None if plan is None else [entry.weight_bits for entry in plan.layers]
            rows[name] = {"plan": name, "bits": bits, "key": key,
                          "average": None if plan is None else plan.average_weight_bits(bench.params), **json.loads(path.read_text())}
    return rows


def _truncate(row: dict[str, Any], robust: int) -> None:
    """Robust figures on the first `robust` test images (cells measured on more keep their
    per-sample outcomes, so every row of a table is on the same images)."""
    outcomes = row["robust_outcomes"][:robust]
    row.update(robust_outcomes=outcomes, robust_samples=robust, robust_correct=outcomes.count("1"))


def _outcomes(row: dict[str, Any], kind: str) -> np.ndarray:
    return np.frombuffer(row[f"{kind}_outcomes"].encode(), np.uint8) == ord("1")


def _share(row: dict[str, Any], kind: str) -> str:
    from quanos_onnx.harness.robustness import wilson

    correct, samples = (row["clean_correct"], row["clean_samples"]) if kind == "clean" else (row["robust_correct"], row["robust_samples"])
    interval = wilson(correct, samples)
    return f"{100 * interval.share:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def _drop_difference(plain: tuple[dict, dict], adv: tuple[dict, dict], kind: str, draws: int = 4000) -> tuple[float, float, float, float, float]:
    """(drop plain, drop adv, adv - plain, 95% paired-bootstrap interval) in points.

    Drop = float accuracy - quantized accuracy of the same model on the same samples; the
    bootstrap resamples the test samples jointly for all four models."""
    outcomes = [_outcomes(row, kind).astype(float) for row in (*plain, *adv)]
    drop_plain = 100 * (outcomes[0].mean() - outcomes[1].mean())
    drop_adv = 100 * (outcomes[2].mean() - outcomes[3].mean())
    per_sample = (outcomes[2] - outcomes[3]) - (outcomes[0] - outcomes[1])
    rng = np.random.default_rng(0)
    means = np.array([per_sample[rng.integers(0, len(per_sample), len(per_sample))].mean() for _ in range(draws)])
    low, high = np.percentile(100 * means, [2.5, 97.5])
    return drop_plain, drop_adv, drop_adv - drop_plain, float(low), float(high)


def render(models: tuple[str, ...], averages: tuple[int, ...]) -> str:
    lines = [
        "# Robustness signals and adversarially fine-tuned models",
        "",
        "Issue 21, items 3 and 4: does quantization cost an adversarially fine-tuned model more than a plain one "
        "(Song, Ranjan and Li, arXiv 2110.12308), and how do ANS-weighted, Lipschitz-weighted and accuracy-only "
        "allocation (docs/method.md, section \"The robustness signal\") compare at the same average bits. Produced by",
        "",
        "    PYTHONPATH=. python bench/adversarial_quantization.py --model fashion --averages 3,4,5",
        "    PYTHONPATH=. python bench/adversarial_quantization.py --model resnet20 --robust 150 --averages 3,4,5",
        "    PYTHONPATH=. python bench/adversarial_quantization.py --model resnet20 --robust 100 --averages 3,4,5 --extra-eps-only",
        "    PYTHONPATH=. python bench/adversarial_quantization.py --table --model resnet20 --model fashion --averages 3,4,5",
        "",
        f"on a 2-core VM ({machine()}; the load average stayed between 9 and 18 while the cells ran, as 4 other "
        "engineers' jobs shared the cores, so wall times were up to 10x the CPU times quoted). Torch one thread per process.",
        "",
        "**Setup.** Plain = the float model as shipped; adv = that model fine-tuned by `quanos_onnx.finetune(..., "
        "adv_train=\"fgsm\")` at the all-float plan (loss 0.5 CE(clean) + 0.5 CE(FGSM), Adam, cosine schedule, "
        "the epoch with the best validation accuracy under the training attack kept, epoch 0 included). "
        f"Quantized models: `quantize()` with compile's default PTQ (`PtqSettings()`: entropy ranges up to 6 bits, "
        f"output-error weight clipping, bias correction) on {CALIBRATION} calibration images; the classifier stays float. "
        "Clean accuracy: the written ONNX model in onnxruntime on the whole test set. Robust accuracy: the worst case "
        "over PGD-10 (step 2.5 eps/10, no random start), APGD-CE "
        f"({APGD_STEPS} steps, 1 restart) and FGSM at the model's eps, white-box on the fake-quant twin, counted in "
        "onnxruntime (`harness.robustness.audit_robustness`), on the first test images (a sample misclassified clean "
        "counts as broken). Brackets: 95% Wilson intervals.",
        "",
    ]
    for name in models:
        setup = SETUPS[name](DEFAULT_ROBUST[name])
        finetune = json.loads((CACHE / name / "adv-finetune.json").read_text())
        history = " -> ".join(
            f"{100 * r['val_accuracy']:.1f}/{100 * r['val_adversarial_accuracy']:.1f}" for r in finetune["history"]
        )
        lines += [
            f"## {name}",
            "",
            f"Fine-tuning: {setup.train.source} ({len(setup.train.x)} images), {setup.epochs} epoch(s), FGSM eps "
            f"{setup.eps_text}, Adam lr {setup.lr:g}, batch {setup.batch}; validation on {setup.val.source}: clean/FGSM accuracy % "
            f"after epochs 0..{setup.epochs} {history}, kept epoch {finetune['best_epoch']}; "
            f"{finetune['wall_seconds']:.0f} s wall, {finetune['cpu_seconds']:.0f} s CPU. Calibration: {setup.calibration.source}; "
            f"sensitivity (kl, bits 2..8) on its first {SENSITIVITY}. Test: {setup.test.source}, clean on {len(setup.test.x)}.",
            "",
        ]
        robust_model = fine_tuned(setup)
        if not robust_model:
            lines += [
                "No fine-tuned epoch beat epoch 0 (the plain model) on validation accuracy under FGSM, so the kept model "
                "is the plain one and this model has no adv rows.",
                "",
            ]
        for eps, eps_text in ((setup.eps, setup.eps_text), *setup.extra_eps):
            plain = load_rows(setup, "plain", averages, eps)
            adv = load_rows(setup, "adv", averages, eps) if robust_model else {}
            if plain:
                lines += _tables(plain, adv, eps_text, averages)
    return "\n".join(lines) + "\n"


def _tables(plain: dict[str, dict[str, Any]], adv: dict[str, dict[str, Any]], eps_text: str, averages: tuple[int, ...]) -> list[str]:
    """Items 3 and 4 at one eps: uniform plain vs adv with the cost of quantization, then the signals."""
    rows = (*plain.values(), *adv.values())
    robust = min(row["robust_samples"] for row in rows)
    for row in rows:
        _truncate(row, robust)
    cpu = sorted(row["cpu_seconds"] for row in rows)
    order = ["float", *(f"uniform-{b}" for b in sorted(UNIFORM_BITS, reverse=True))]
    lines = [
        f"### Robust at eps {eps_text}: uniform bits" + (", plain vs adversarially fine-tuned (item 3)" if adv else " (plain)"),
        "",
        f"Robust accuracy on the first {robust} test images; one cell (compile + clean + attacks) took "
        f"{cpu[0]:.0f}-{cpu[-1]:.0f} s CPU (median {cpu[len(cpu) // 2]:.0f} s).",
        "",
    ]
    if not adv:
        return lines + _plain_uniform(plain, order) + _signals(plain, adv, eps_text, averages)
    lines += [
        "| plan | plain clean % | plain robust % | adv clean % | adv robust % |",
        "|---|---|---|---|---|",
    ]
    for plan in order:
        if plan in plain and plan in adv:
            lines.append(f"| {plan} | {_share(plain[plan], 'clean')} | {_share(plain[plan], 'robust')} | "
                         f"{_share(adv[plan], 'clean')} | {_share(adv[plan], 'robust')} |")
    lines += [
        "",
        "Cost of quantization (float minus quantized, points; adv - plain with a 95% paired-bootstrap interval over the test samples):",
        "",
        "| plan | clean: plain | clean: adv | adv - plain | robust: plain | robust: adv | adv - plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for plan in order[1:]:
        if plan in plain and plan in adv and "float" in plain and "float" in adv:
            cells = []
            for kind in ("clean", "robust"):
                dp, da, diff, low, high = _drop_difference((plain["float"], plain[plan]), (adv["float"], adv[plan]), kind)
                cells += [f"{dp:+.1f}", f"{da:+.1f}", f"{diff:+.1f} [{low:+.1f}, {high:+.1f}]"]
            lines.append(f"| {plan} | " + " | ".join(cells) + " |")
    return lines + _signals(plain, adv, eps_text, averages)


def _plain_uniform(plain: dict[str, dict[str, Any]], order: list[str]) -> list[str]:
    lines = ["| plan | clean % | robust % |", "|---|---|---|"]
    lines += [f"| {plan} | {_share(plain[plan], 'clean')} | {_share(plain[plan], 'robust')} |" for plan in order if plan in plain]
    return lines


def _signals(plain: dict[str, dict[str, Any]], adv: dict[str, dict[str, Any]], eps_text: str, averages: tuple[int, ...]) -> list[str]:
    from quanos_onnx.allocate.solve import DEFAULT_ANS_WEIGHT

    lines = [
        "",
        f"### Robust at eps {eps_text}: allocation signals at the same average bits (item 4)",
        "",
        f"Integer program, budget avg-bits = target, bits 2..8; weight {DEFAULT_ANS_WEIGHT:g} (the default) for the ans and "
        "lipschitz terms, 0 for accuracy-only. Identical plans are measured once.",
        "",
        "| model | plan | average bits | clean % | robust % | same plan as |",
        "|---|---|---|---|---|---|",
    ]
    for variant, table in (("plain", plain), ("adv", adv)) if adv else (("plain", plain),):
        for average in averages:
            seen: dict[str, str] = {}
            for plan in (f"uniform-{average}", *(f"{signal}-{average}" for signal in SIGNALS)):
                if plan not in table:
                    continue
                row = table[plan]
                same = seen.get(row["key"], "")
                seen.setdefault(row["key"], plan)
                lines.append(f"| {variant} | {plan} | {row['average']:.2f} | {_share(row, 'clean')} | {_share(row, 'robust')} | {same} |")
    return lines + [""]


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=tuple(SETUPS), action="append")
    parser.add_argument("--stage", default="all", choices=("finetune", "cells", "all"))
    parser.add_argument("--robust", type=int, default=None, help="robust-accuracy samples (default per model)")
    parser.add_argument("--averages", default="4,5", help="average bits of the allocated plans")
    parser.add_argument("--variant", choices=VARIANTS, action="append", help="plain, adv (default both)")
    parser.add_argument("--extra-eps-only", action="store_true", help="measure only the cells at the extra eps")
    parser.add_argument("--table", action="store_true", help="write docs/robustness-signals.md from the cache")
    options = parser.parse_args()
    averages = tuple(int(a) for a in options.averages.split(","))
    if options.table:
        DOC.write_text(render(tuple(options.model or SETUPS), averages) + FINDINGS)
        print(DOC.read_text())
        return
    for name in options.model or ():
        setup = SETUPS[name](options.robust or DEFAULT_ROBUST[name])
        variants = tuple(options.variant or VARIANTS)
        if "adv" in variants or options.stage == "finetune":
            adversarial_model(setup)
            if not fine_tuned(setup):
                print(f"{name}: fine-tuning kept epoch 0 (the plain model); no adv cells", flush=True)
                variants = tuple(v for v in variants if v != "adv")
        if options.stage in ("cells", "all"):
            run_cells(setup, averages, variants, options.extra_eps_only)


if __name__ == "__main__":
    main()
