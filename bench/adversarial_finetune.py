"""Adversarial fine-tuning of the best iso-size pair (the paper's Table IV/VII setting; issue 20, item 3).

Model: the Fashion-MNIST CNN of bench/study_data.py. Plans at 4 average bits, the budget
where the compile's allocation differed most from uniform (docs/benchmarks.md, "Allocation
under the compile's PTQ"), built from bench/allocate_ptq.py's sensitivity table (kl, PTQ
grids, its first 256 calibration images) and ANS (FGSM 0.05 on its 512 calibration images):

- ans: the integer program (`allocate.solve.solve`, Budget("avg-bits", 4)) at the default
  ANS weight, what the compile does;
- accuracy-only: the same program with ans_weight 0;
- uniform: `Plan.uniform(layers, 4)` (classifier float, as every plan here).

"before": each plan written by `quantize(..., ptq=PtqSettings())`, the compile's PTQ, on
allocate_ptq's 512 calibration images. "after": that model fine-tuned by
`quanos_onnx.finetune(..., adv_train="fgsm")` from its own dequantized weights
(`finetune.float_model_of`), the same budget for every arm (--epochs, --train-samples,
--lr, --batch-size, FGSM --adv-eps, loss 0.5 CE(clean) + 0.5 CE(FGSM)), kept epoch chosen
by FGSM accuracy on a validation split, once per --seeds (shuffle order and calibration
sample of the fine-tuning). Training images: Fashion-MNIST train [10000, 10000 + n); the
validation split: the next --val-samples; neither overlaps allocate_ptq's calibration
and validation images (train [0, 1512)).

Every written ONNX model is measured: clean accuracy on all 10000 t10k images in
onnxruntime (95% Wilson interval), the robustness audit (`commands.options.audit_model`,
what `quanos analyze` runs: FGSM, PGD-7 of 2/255, APGD-CE and APGD-DLR, transfer of APGD-CE
from the model's float graph, worst case per sample; effort and eps-0.5 probes; masking
diagnostics) at the eps of the Algorithm 1 section (8/255, 16/255) on the first
--audit-samples t10k images; weight memory and Standard/DG/DVAFS energy from hwmodel.

Every cell is a JSON (or ONNX) file under bench/cache/adversarial-finetune/<config>/, so a
rerun resumes; writes the tables subsection of docs/results.md's "## Adversarial
fine-tuning (the paper's Table IV/VII setting)" section.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/adversarial_finetune.py --seeds 0,1,2
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
from algorithm1 import AUDIT_EPS, _ci, _eps_label, _mean_spread, _pct  # noqa: E402
from allocate_ptq import CALIBRATION, SENSITIVITY, Bench  # noqa: E402
from report_section import machine, write_section  # noqa: E402
from study_data import FASHION, _idx_images, _idx_labels, cached, cost_row  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs/results.md"
SECTION = "## Adversarial fine-tuning (the paper's Table IV/VII setting)"
TABLES = "### Tables written by bench/adversarial_finetune.py"
"""The script owns this subsection; the section's text above it (the finding) is written by hand."""
CACHE = REPO / "bench/cache/adversarial-finetune"
ARMS = ("ans", "accuracy-only", "uniform")
LABELS = {"float": "float (reference)", "ans": "ANS-weighted (default)", "accuracy-only": "accuracy-only", "uniform": "uniform 4"}
AVERAGE_BITS = 4
TRAIN_FIRST = 10000
BATCH = 100


def batches(x: np.ndarray, y: np.ndarray, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for first in range(0, min(count, len(x)), BATCH):
        yield x[first : min(first + BATCH, count)], y[first : min(first + BATCH, count)]


class Study:
    """The three plans of the Fashion CNN at 4 bits, their PTQ models and fine-tuned models."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.bench = Bench("fashion")
        self.layers, self.params = self.bench.layers, self.bench.params
        self.folder = CACHE / config_name(options)
        train_x = _idx_images(FASHION / "train-images-idx3-ubyte.gz")
        train_y = _idx_labels(FASHION / "train-labels-idx1-ubyte.gz")
        last = TRAIN_FIRST + options.train_samples
        self.train = (train_x[TRAIN_FIRST:last], train_y[TRAIN_FIRST:last])
        self.val = (train_x[last : last + options.val_samples], train_y[last : last + options.val_samples])
        self.test_x, self.test_y = self.bench.test_x, self.bench.test_y

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # -- plans and models -----------------------------------------------------------
    def plans(self) -> dict[str, Any]:
        """name -> plan JSON; the allocations read allocate_ptq's cached table and ANS."""
        from quanos_onnx.allocate.solve import DEFAULT_ANS_WEIGHT, Budget, solve
        from quanos_onnx.plan import Plan

        def compute() -> dict[str, Any]:
            table, ans = self.bench.sensitivity("ptq"), self.bench.ans()
            budget = Budget("avg-bits", float(AVERAGE_BITS))
            joins = self.bench.joins
            return {
                "ans": solve(self.layers, joins, table, budget, ans=ans, ans_weight=DEFAULT_ANS_WEIGHT).to_json(),
                "accuracy-only": solve(self.layers, joins, table, budget, ans=ans, ans_weight=0.0).to_json(),
                "uniform": Plan.uniform(self.layers, AVERAGE_BITS).to_json(),
                "ans_weight": DEFAULT_ANS_WEIGHT,
                "ans_values": ans,
            }

        return cached(self.folder / "plans.json", compute)

    def plan(self, arm: str) -> Any:
        from quanos_onnx.plan import plan_from_json

        return plan_from_json(self.plans()[arm], f"plans.json:{arm}")

    def measured_arms(self) -> tuple[str, ...]:
        """The arms with a plan of their own: an arm whose bits equal an earlier arm's is
        that arm (same PTQ model, and fine-tuning is deterministic), so it is measured once."""
        return tuple(arm for arm in ARMS if self.same_as(arm) is None)

    def same_as(self, arm: str) -> str | None:
        """The earlier arm with the same bits per layer, if any."""
        plans = self.plans()

        def bits(name: str) -> list[Any]:
            return [entry.get("weight_bits") for entry in plans[name]["layers"]]

        return next((other for other in ARMS[: ARMS.index(arm)] if bits(other) == bits(arm)), None)

    def before(self, arm: str) -> onnx.ModelProto:
        """The plan written with the compile's PTQ (the float model for 'float')."""
        if arm == "float":
            return self.bench.proto
        path = self.folder / "before" / f"{arm}.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(self.bench.written(self.plan(arm)), str(path))
        return onnx.load(str(path))

    def after(self, arm: str, seed: int) -> onnx.ModelProto:
        """The PTQ model adversarially fine-tuned (FGSM) by quanos_onnx.finetune under `seed`."""
        import quanos_onnx as qn
        from quanos_onnx.finetune import float_model_of

        path = self.folder / f"seed{seed}" / f"{arm}.onnx"
        if path.exists():
            return onnx.load(str(path))
        options = self.options
        started, cpu = time.perf_counter(), time.process_time()
        result = qn.finetune(
            float_model_of(self.before(arm)), self.train, val=self.val, plan=self.plan(arm), epochs=options.epochs,
            lr=options.lr, adv_train="fgsm", adv_eps=options.adv_eps, batch_size=options.batch_size, seed=seed,
            threads=1,
        )
        record = {**result.summary_json(), "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f"{arm}.finetune.json").write_text(json.dumps(record, indent=1, default=str))
        onnx.save(result.model, str(path))
        history = [(h["val_accuracy"], h["val_adversarial_accuracy"]) for h in record["history"]]
        self.log(f"finetune {arm} seed {seed}: {record['wall_seconds']:.0f} s wall, kept {record['best_epoch']}, {history}")
        return result.model

    def history(self, arm: str, seed: int) -> dict[str, Any]:
        return json.loads((self.folder / f"seed{seed}" / f"{arm}.finetune.json").read_text())

    def model(self, arm: str, stage: str) -> onnx.ModelProto:
        """stage: 'before' or 'seed<k>'."""
        return self.before(arm) if stage == "before" else self.after(arm, int(stage[4:]))

    # -- measurements ---------------------------------------------------------------
    def clean(self, arm: str, stage: str) -> dict[str, Any]:
        from quanos_onnx.harness.attacks import predictions
        from quanos_onnx.harness.robustness import wilson
        from quanos_onnx.model import Runner, output_names

        def compute() -> dict[str, Any]:
            proto = self.model(arm, stage)
            runner, logits = Runner(proto), output_names(proto)[0]
            correct = 0
            for x, y in batches(self.test_x, self.test_y, len(self.test_x)):
                (out,) = runner.run(x, [logits])
                correct += int((predictions(out) == y).sum())
            return wilson(correct, len(self.test_x)).to_json()

        return cached(self.folder / "eval" / f"{stage}.{arm}.clean.json", compute)

    def audit(self, arm: str, stage: str) -> dict[str, Any]:
        from quanos_onnx.commands.options import AuditSettings, audit_model
        from quanos_onnx.harness.robustness import AUDIT_METHODS

        count, steps = self.options.audit_samples, self.options.apgd_steps

        def compute() -> dict[str, Any]:
            started = time.perf_counter()
            settings = AuditSettings(AUDIT_METHODS, AUDIT_EPS, steps, 1, 0.5, (0.0, 1.0))
            seed = 0 if stage == "before" else int(stage[4:])
            robustness, masking = audit_model(
                self.model(arm, stage), batches(self.test_x, self.test_y, count), settings, seed=seed, progress=None
            )
            self.log(f"audit {stage} {arm}: {time.perf_counter() - started:.0f} s")
            return {"robustness": robustness.to_json(), "masking": masking.to_json()}

        return cached(self.folder / "eval" / f"{stage}.{arm}.audit{count}_apgd{steps}.json", compute)

    def cost(self, arm: str) -> dict[str, float]:
        plan = None if arm == "float" else self.plan(arm)
        return cost_row(self.layers, plan, self.params)

    def measured(self, arm: str, stage: str) -> dict[str, Any] | None:
        """The cached figures of one model (None until its clean accuracy is measured)."""
        eval_folder = self.folder / "eval"
        if not (eval_folder / f"{stage}.{arm}.clean.json").exists():
            return None
        row: dict[str, Any] = {"clean": self.clean(arm, stage), "cost": self.cost(arm)}
        if (eval_folder / f"{stage}.{arm}.audit{self.options.audit_samples}_apgd{self.options.apgd_steps}.json").exists():
            row["audit"] = self.audit(arm, stage)
        if stage != "before":
            row["history"] = self.history(arm, int(stage[4:]))
        return row


def config_name(options: argparse.Namespace) -> str:
    return f"n{options.train_samples}_e{options.epochs}_lr{options.lr:g}_b{options.batch_size}_eps{options.adv_eps:g}"


def run(options: argparse.Namespace) -> str:
    import torch

    torch.set_num_threads(1)
    study = Study(options)
    plans = study.plans()
    arms = study.measured_arms()
    stages: list[tuple[str, str]] = [("float", "before"), *((arm, "before") for arm in arms)]
    stages += [(arm, f"seed{seed}") for seed in options.seeds for arm in arms]
    if not options.report_only:
        study.log("plans: " + "; ".join(f"{arm} {[e.get('weight_bits') for e in plans[arm]['layers']]}" for arm in ARMS))
        # one group (before, then each seed) finished at a time, so a cut-short run leaves whole seeds
        for group in dict.fromkeys(stage for _, stage in stages):
            for arm, stage in stages:
                if stage == group:
                    study.clean(arm, stage)
                    if options.audit_samples > 0:
                        study.audit(arm, stage)
            write_tables(report(study, stages))
    tables = report(study, stages)
    write_tables(tables)
    return tables


def write_tables(tables: str) -> None:
    """Replace the tables subsection, creating the section (finding to be written) if missing."""
    if SECTION not in RESULTS.read_text():
        write_section(RESULTS, SECTION, f"{SECTION}\n\n(finding: see the tables below)\n")
    write_section(RESULTS, TABLES, tables)


# -- report ---------------------------------------------------------------------------
def _attack(audit: dict[str, Any], name: str, eps: float) -> float | None:
    return next((a["accuracy"] for a in audit["robustness"]["attacks"] if a["name"] == name and a["eps"] == eps), None)


def _worst(audit: dict[str, Any], eps: float) -> dict[str, Any]:
    return next(w for w in audit["robustness"]["worst_case"] if w["eps"] == eps)


COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("clean (10000)", lambda row: row["clean"]["accuracy"]),
    *((f"FGSM {_eps_label(e)}", lambda row, e=e: _attack(row["audit"], "fgsm", e) if "audit" in row else None) for e in AUDIT_EPS),
    *((f"PGD-7 {_eps_label(e)}", lambda row, e=e: _attack(row["audit"], "pgd-7", e) if "audit" in row else None) for e in AUDIT_EPS),
    *((f"worst case {_eps_label(e)}", lambda row, e=e: _worst(row["audit"], e)["accuracy"] if "audit" in row else None) for e in AUDIT_EPS),
)


def _value(values: list[float], *, signed: bool = False) -> str:
    """One model's figure as it is; several (seeds) as mean ± standard deviation."""
    if len(values) == 1:
        return f"{100 * values[0]:{'+' if signed else ''}.1f}"
    return _mean_spread(values, signed=signed)


def _cost_cells(cost: dict[str, float]) -> list[str]:
    return [f"{cost['average_bits']:.2f}", f"{cost['memory_kb']:.1f}",
            *[f"{cost[p] / 1e6:.3f}" for p in ("standard", "dg", "dvafs")]]


def report(study: Study, stages: list[tuple[str, str]]) -> str:
    options = study.options
    arms = study.measured_arms()
    seeds = [f"seed{s}" for s in options.seeds]
    plans = study.plans()
    plan_rows = []
    for arm in ARMS:
        same = study.same_as(arm)
        if same is not None:
            plan_rows.append(f"| {LABELS[arm]} | the same plan as {LABELS[same]}, measured once | | | | | |")
            continue
        bits = ", ".join("float" if e.get("weight_bits") is None else str(e["weight_bits"]) for e in plans[arm]["layers"])
        plan_rows.append(f"| {LABELS[arm]} | {bits} | " + " | ".join(_cost_cells(study.cost(arm))) + " |")
    plan_rows.append(f"| {LABELS['float']} | all float | " + " | ".join(_cost_cells(study.cost("float"))) + " |")
    head = " | ".join(name for name, _ in COLUMNS)
    summary, runs, audits, masking = [], [], [], []
    collected: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for arm, stage in stages:
        row = study.measured(arm, stage)
        if row is None:
            continue
        when = "before" if stage == "before" else "after"
        collected.setdefault((arm, when), []).append(row)
        kept = "-" if stage == "before" else f"{row['history']['best_epoch']}/{options.epochs}"
        when_text = "none" if arm == "float" else "PTQ (before)" if stage == "before" else f"FGSM-trained, seed {stage[4:]}"
        cells = [LABELS[arm], when_text, kept, _ci(row["clean"])]
        if "audit" in row:
            robustness = row["audit"]["robustness"]
            cells += [_ci(robustness["clean"]), *(_ci(_worst(row["audit"], e)) for e in AUDIT_EPS)]
            each = "; ".join(f"{a['name']} {_eps_label(a['eps'])} {_pct(a['accuracy'])}" for a in robustness["attacks"])
            epochs = "" if stage == "before" else " -> ".join(
                f"{_pct(h['val_accuracy'])}/{_pct(h['val_adversarial_accuracy'])}" for h in row["history"]["history"]
            )
            audits.append("| " + " | ".join(cells) + f" | {epochs or '-'} | {each} |")
            check = row["audit"]["masking"]
            flagged = [c["check"] for c in check["checks"] if c["flagged"]]
            gradients = robustness["gradients"]
            masking.append(
                f"| {LABELS[arm]} | {cells[1]} | {check['verdict']} | {', '.join(flagged) or '-'} | "
                f"{gradients['all_zero_samples']} of {gradients['samples']} all zero, "
                f"{100 * gradients['zero_entry_share']:.1f}% zero entries | {robustness['twin_disagreements']} |"
            )
        runs.append(cells)
    for arm in ("float", *arms):
        for when in ("before", "after"):
            rows = collected.get((arm, when), [])
            if not rows:
                continue
            values = [_value([v for v in (get(r) for r in rows) if v is not None]) for _, get in COLUMNS]
            summary.append(f"| {LABELS[arm]} | {'-' if arm == 'float' else when} | {len(rows)} | " + " | ".join(values) + " | "
                           + " | ".join(_cost_cells(rows[0]["cost"])) + " |")
    paired = []
    pairs = [(a, b) for a, b in (("ans", "uniform"), ("ans", "accuracy-only"), ("accuracy-only", "uniform")) if a in arms and b in arms]
    for first, second in pairs:
        for when, stage_names in (("before", ["before"]), ("after", seeds)):
            differences = []
            for stage in stage_names:
                a, b = study.measured(first, stage), study.measured(second, stage)
                if a is None or b is None:
                    continue
                differences.append([None if get(a) is None or get(b) is None else get(a) - get(b) for _, get in COLUMNS])
            if not differences:
                continue
            cells = []
            for column in zip(*differences):
                values = [v for v in column if v is not None]
                each = f" ({', '.join(f'{100 * v:+.1f}' for v in values)})" if len(values) > 1 else ""
                cells.append(f"{_value(values, signed=True)}{each}" if values else "-")
            paired.append(f"| {LABELS[first]} - {LABELS[second]} | {when} | {len(differences)} | " + " | ".join(cells) + " |")
    gains = []
    for arm in arms:
        before = study.measured(arm, "before")
        afters = [r for r in (study.measured(arm, s) for s in seeds) if r is not None]
        if before is None or not afters:
            continue
        cells = []
        for _, get in COLUMNS:
            values = [get(r) - get(before) for r in afters if get(r) is not None and get(before) is not None]
            cells.append(_value(values, signed=True) if values else "-")
        gains.append(f"| {LABELS[arm]} | {len(afters)} | " + " | ".join(cells) + " |")
    seconds = [r["history"]["wall_seconds"] for rows in collected.values() for r in rows if "history" in r]
    cpu = [r["history"]["cpu_seconds"] for rows in collected.values() for r in rows if "history" in r]
    timing = f"{min(seconds):.0f}-{max(seconds):.0f} s wall, {min(cpu):.0f}-{max(cpu):.0f} s CPU each" if seconds else "-"
    shown = [part for index, part in enumerate(sys.argv[1:]) if "--machine" not in (part, sys.argv[index]) and part != "--report-only"]
    command = " ".join(["OMP_NUM_THREADS=1 PYTHONPATH=. python bench/adversarial_finetune.py", *shown])
    audit_head = " | ".join(f"worst case {_eps_label(e)}" for e in AUDIT_EPS)
    return f"""{TABLES}

- command: `{command}`
- machine: {options.machine or f'{machine()}, 1 torch thread'}
- model: the Fashion-MNIST CNN of bench/study_data.py (conv16-conv32/2-conv64/2-avgpool-FC, BatchNorms folded),
  3 quantizable layers and the float classifier.
- plans at {AVERAGE_BITS} average bits: the integer program (`solve`, Budget("avg-bits", {AVERAGE_BITS}), bits 2..8) on
  bench/allocate_ptq.py's sensitivity table (kl, PTQ grids, its first {SENSITIVITY} calibration images) with ANS
  (FGSM 0.05 on its {CALIBRATION} calibration images, Fashion-MNIST train [0, {CALIBRATION})) at the default ANS weight,
  the same with ANS weight 0, and uniform 4 (classifier float in all).
- before: each plan written by `quantize(..., ptq=PtqSettings())` (the compile's PTQ) on those {CALIBRATION} images.
- after: `quanos_onnx.finetune(float_model_of(before), plan=..., adv_train="fgsm", adv_eps={_eps_label(options.adv_eps)})` from the
  PTQ model's own dequantized weights; the same budget for every arm: {options.epochs} epochs of Fashion-MNIST train
  [{TRAIN_FIRST}, {TRAIN_FIRST + options.train_samples}) ({options.train_samples} images), Adam lr {options.lr:g} on a cosine to 0, batch
  {options.batch_size}, loss 0.5 CE(clean) + 0.5 CE(FGSM); re-exported with the tool's plain PTQ (absmax weights, min/max
  activation ranges on 512 of the training images) after each epoch; kept epoch (of 0..{options.epochs}, 0 = the re-exported
  start) by FGSM accuracy on train [{TRAIN_FIRST + options.train_samples}, {TRAIN_FIRST + options.train_samples + options.val_samples}); seeds {', '.join(map(str, options.seeds))} (shuffle
  order and calibration sample). Fine-tuning took {timing}.
- test: clean accuracy of each written ONNX model in onnxruntime on all {len(study.test_x)} t10k images; the audit
  (`audit_model`, what `quanos analyze` runs: FGSM, PGD-7 of 2/255, APGD-CE and APGD-DLR {options.apgd_steps} steps, transfer of
  APGD-CE from the model's float graph, worst case per sample; effort check APGD-CE with doubled steps and 3
  restarts; eps 0.5 probe) at eps {', '.join(_eps_label(e) for e in AUDIT_EPS)} on the first {options.audit_samples}, white-box through each model's
  fake-quant twin, counted by onnxruntime. Brackets: 95% Wilson intervals of one model; "±": standard deviation
  over the fine-tuning seeds (one model before fine-tuning, so no spread there). Energy per image in uJ.

Plans, weight memory and energy:

| plan | bits per layer (conv1, conv2, conv3, fc) | avg bits | weight memory (kB) | Standard (uJ) | DG (uJ) | DVAFS (uJ) |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(plan_rows)}

Before and after adversarial fine-tuning (accuracy %, mean ± standard deviation over seeds; FGSM and PGD-7 columns
and the worst case are from the audit on the first {options.audit_samples} test images):

| model | fine-tuning | models | {head} | avg bits | weight memory (kB) | Standard | DG | DVAFS |
|---|---|---:|{'---:|' * len(COLUMNS)}---:|---:|---:|---:|---:|
{chr(10).join(summary)}

Iso-size differences (points; after: mean ± standard deviation over seeds, each seed in brackets, the same seed's
fine-tuning for both plans):

| pair | fine-tuning | seeds | {head} |
|---|---|---:|{'---:|' * len(COLUMNS)}
{chr(10).join(paired)}

What adversarial fine-tuning changed (after minus before, points, mean ± standard deviation over seeds):

| plan | seeds | {head} |
|---|---:|{'---:|' * len(COLUMNS)}
{chr(10).join(gains)}

Audit per model (robust accuracy %, worst case per sample over all attacks at the eps [95% Wilson]):

| model | fine-tuning | kept epoch | clean (10000) | clean (audit subset) | {audit_head} | validation clean/FGSM % by epoch (0 = start, re-exported) | each attack |
|---|---|---:|---:|---:|{'---:|' * len(AUDIT_EPS)}---|---|
{chr(10).join(audits) or '| (not run yet) | | | | | | | |'}

Masking diagnostics (harness/masking.py):

| model | fine-tuning | verdict | checks failed | input gradients at the clean points | twin/ORT disagreements |
|---|---|---|---|---|---:|
{chr(10).join(masking) or '| (not run yet) | | | | | |'}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--val-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--adv-eps", type=float, default=16 / 255, help="FGSM eps of the fine-tuning (default 16/255, the audit's largest)")
    parser.add_argument("--audit-samples", type=int, default=500)
    parser.add_argument("--apgd-steps", type=int, default=25)
    parser.add_argument("--report-only", action="store_true", help="write the tables from the cached cells, compute nothing")
    parser.add_argument("--machine", default=None, help="where the cached cells were computed, when not here")
    print(run(parser.parse_args()))


if __name__ == "__main__":
    main()
