"""The paper's own procedure (Algorithm 1) from a random init, on Fashion-MNIST, over seeds.

Per seed, from one random init of one small CNN (2 conv + 2 FC, no BatchNorm: the tool's
normal form folds BatchNorms into the convs, so a from-scratch net trained through
`quanos_onnx.finetune` must not need them):

- QUANOS arm: train at uniform 16 bits for E1 epochs (`finetune`, plan = uniform 16), measure
  ANS on that partly trained 16-bit model (FGSM eps 0.05 on training images, the paper's
  setting), take the Eqn-3 plan (k_init 16, the tool's k_min 2, classifier float), and
  continue training those weights at that plan for E2 epochs (QAT through `finetune`).
- uniform arm (the paper's Baseline-3): uniform at round(Eqn-3 average bits), from the same
  init, for the same E1 + E2 epochs in the same two `finetune` calls (so both arms get the
  same learning-rate schedule: Adam, cosine from --lr to 0 in each call).

Both written ONNX models are tested on Fashion-MNIST t10k: clean accuracy on all 10000 in
onnxruntime; the paper's FGSM/PGD-7 grid and the robustness audit (FGSM, PGD-7, APGD-CE,
APGD-DLR, transfer from the float graph; worst case per sample; masking diagnostics) on
fixed leading subsets, attacks through each model's fake-quant twin; weight memory and
Standard/DG/DVAFS energy from hwmodel. Every cell is cached under
bench/cache/algorithm1/<config>/seed<k>/ (config = training sizes), so a rerun resumes.
Writes the "## Algorithm 1 from scratch (Fashion-MNIST)" section of docs/results.md.

    PYTHONPATH=. python bench/algorithm1.py --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_section import machine, write_section  # noqa: E402
from study_data import cached, cost_row  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs/results.md"
SECTION = "## Algorithm 1 from scratch (Fashion-MNIST)"
TABLES = "### Tables written by bench/algorithm1.py"
"""The script owns this subsection; the section's text above it (the finding) is written by hand."""
CACHE = REPO / "bench/cache/algorithm1"
EQN3_ARMS = ("quanos", "uniform")


def arms(options: argparse.Namespace) -> tuple[str, ...]:
    """The Eqn-3 pair, then with --budget-bits B the budgeted pair: 'quanos-bB' (the same ANS
    through allocate_budgeted to a B-bit average, from the same 16-bit phase 1) and 'uniform-B'."""
    budget = () if options.budget_bits is None else (f"quanos-b{options.budget_bits}", f"uniform-{options.budget_bits}")
    return (*EQN3_ARMS, *budget)


def label(arm: str) -> str:
    if arm.startswith("quanos-b"):
        return f"QUANOS budget {arm[8:]}"
    if arm.startswith("uniform-"):
        return f"uniform {arm[8:]}"
    return {"quanos": "QUANOS (Eqn 3)", "uniform": "uniform iso"}[arm]
ANS_EPS = 0.05
FGSM_EPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
PGD_EPS = (8 / 255, 16 / 255, 32 / 255)
PGD_STEPS, PGD_ALPHA = 7, 2 / 255
AUDIT_EPS = (8 / 255, 16 / 255)
BATCH = 100


def shared_folder() -> Path:
    """../shared beside the main checkout; a worktree under /work/wt reaches it two levels up."""
    for candidate in (REPO / "shared", REPO.parent / "shared", REPO.parent.parent / "shared"):
        if (candidate / "data/fashion-mnist").is_dir():
            return candidate
    sys.exit("Fashion-MNIST not found: expected shared/data/fashion-mnist beside the repository")


@dataclass(frozen=True)
class Data:
    """Fashion-MNIST as float32 NCHW in [0,1], int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_data(train_samples: int, val_samples: int) -> Data:
    from study_data import _idx_images, _idx_labels

    folder = shared_folder() / "data/fashion-mnist"
    x = _idx_images(folder / "train-images-idx3-ubyte.gz")
    y = _idx_labels(folder / "train-labels-idx1-ubyte.gz")
    return Data(
        x[:train_samples], y[:train_samples], x[-val_samples:], y[-val_samples:],
        _idx_images(folder / "t10k-images-idx3-ubyte.gz"), _idx_labels(folder / "t10k-labels-idx1-ubyte.gz"),
    )


def batches(x: np.ndarray, y: np.ndarray, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for first in range(0, min(count, len(x)), BATCH):
        last = min(first + BATCH, count)
        yield x[first:last], y[first:last]


def export_random_init(seed: int, target: Path) -> None:
    """conv16-pool-conv32-pool-fc64-fc10 with torch's default init under `seed`."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.zeros(1, 1, 28, 28),), str(target), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(target)))


class Seed:
    """One seed's two arms; every step cached in its folder."""

    def __init__(self, seed: int, data: Data, options: argparse.Namespace, folder: Path) -> None:
        from quanos_onnx.layers import list_layers
        from quanos_onnx.model import load_model

        self.seed, self.data, self.options, self.folder = seed, data, options, folder
        init = folder / "init.onnx"
        if not init.exists():
            export_random_init(seed, init)
        self.init = load_model(init)
        self.layers = list_layers(self.init)
        self.params = {layer.name: layer.params for layer in self.layers}

    def log(self, text: str) -> None:
        print(f"[seed {self.seed}] {text}", flush=True)

    # -- training -------------------------------------------------------------------
    def trained(self, name: str, start: onnx.ModelProto, plan: Any, epochs: int, validate: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
        """(compiled model, float model holding the trained float weights) of one finetune call."""
        from quanos_onnx.data import dataset_from_arrays
        from quanos_onnx.finetune import FinetuneSettings, finetune, with_weights
        from quanos_onnx.model import input_spec

        compiled_path, float_path = self.folder / f"{name}.onnx", self.folder / f"{name}.float.onnx"
        if compiled_path.exists() and float_path.exists():
            return onnx.load(str(compiled_path)), onnx.load(str(float_path))
        data, options = self.data, self.options
        spec = input_spec(start)
        train = dataset_from_arrays(data.train_x, data.train_y, spec)
        val = dataset_from_arrays(data.val_x, data.val_y, spec) if validate else None
        settings = FinetuneSettings(
            epochs=epochs, learning_rate=options.lr, batch_size=options.batch_size, seed=self.seed,
            calibration_samples=options.calibration_samples,
        )
        started = time.perf_counter()
        result = finetune(start, plan, train, settings, val=val)
        parameters = result.twin.parameters_by_name()
        names = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        weights = {n: p.detach().cpu().numpy() for n, p in parameters.items() if n in names}
        float_model = with_weights(start, weights)
        onnx.save(result.model, str(compiled_path))
        onnx.save(float_model, str(float_path))
        record = {**result.to_json(), "seconds": time.perf_counter() - started}
        (self.folder / f"{name}.json").write_text(json.dumps(record, indent=1))
        self.log(f"{name}: {record['seconds']:.0f} s, history {[h['val_accuracy'] for h in record['history']]}")
        return result.model, float_model

    def history(self, name: str) -> dict[str, Any]:
        return json.loads((self.folder / f"{name}.json").read_text())

    def ans(self) -> dict[str, Any]:
        """ANS of the partly trained 16-bit model: FGSM eps 0.05 on a seeded random sample of
        the training images (the paper: 1000-2000 random training inputs)."""
        from quanos_onnx.harness.ans import measure_ans
        from quanos_onnx.harness.attacks import Attack

        def compute() -> dict[str, Any]:
            sixteen, _ = self.phase1("quanos")
            pick = np.sort(np.random.default_rng(self.seed).choice(len(self.data.train_x), self.options.ans_samples, replace=False))
            x, y = self.data.train_x[pick], self.data.train_y[pick]
            return measure_ans(sixteen, self.layers, batches(x, y, len(x)), Attack.fgsm(ANS_EPS)).to_json()

        return cached(self.folder / f"ans{self.options.ans_samples}.json", compute)

    def plans(self) -> dict[str, Any]:
        """The Eqn-3 plan (k_init 16, k_min 2) and uniform at its rounded average bits."""
        from quanos_onnx.allocate import allocate
        from quanos_onnx.harness.ans import AnsResult
        from quanos_onnx.layers import find_joins
        from quanos_onnx.passes.align import align_plan
        from quanos_onnx.plan import Plan

        def compute() -> dict[str, Any]:
            ans = [AnsResult(r["layer"], r["tensor"], r["ans_mean"], r["ans_std"], r["count"]) for r in self.ans()["layers"]]
            quanos = align_plan(allocate(self.layers, ans, k_init=16, k_min=2), self.layers, find_joins(self.init, self.layers))
            iso = int(round(quanos.average_weight_bits(self.params)))
            return {"quanos": quanos.to_json(), "uniform": Plan.uniform(self.layers, iso).to_json()}

        return cached(self.folder / f"plans{self.options.ans_samples}.json", compute)

    def budget_plan(self, bits: int) -> dict[str, Any]:
        """The same ANS through allocate_budgeted to a `bits` average (one scale on every ANS)."""
        from quanos_onnx.allocate import allocate_budgeted
        from quanos_onnx.harness.ans import AnsResult
        from quanos_onnx.layers import find_joins
        from quanos_onnx.passes.align import align_plan

        def compute() -> dict[str, Any]:
            ans = [AnsResult(r["layer"], r["tensor"], r["ans_mean"], r["ans_std"], r["count"]) for r in self.ans()["layers"]]
            plan = allocate_budgeted(self.layers, ans, float(bits), k_init=16, k_min=2)
            return align_plan(plan, self.layers, find_joins(self.init, self.layers)).to_json()

        return cached(self.folder / f"plan_budget{bits}_{self.options.ans_samples}.json", compute)

    def plan(self, arm: str) -> Any:
        from quanos_onnx.plan import Plan, plan_from_json

        if arm == "sixteen":
            return Plan.uniform(self.layers, 16)
        if arm.startswith("quanos-b"):
            return plan_from_json(self.budget_plan(int(arm[8:])), f"budget plan of {arm}")
        if arm.startswith("uniform-"):
            return Plan.uniform(self.layers, int(arm[8:]))
        return plan_from_json(self.plans()[arm], f"plans.json:{arm}")

    def phase1(self, arm: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
        """E1 epochs from the random init: at 16 bits (every QUANOS arm shares this run) or,
        for a uniform arm, at its own bits."""
        if arm.startswith("quanos"):
            return self.trained("quanos.phase1", self.init, self.plan("sixteen"), self.options.epochs1, validate=False)
        return self.trained(f"{arm}.phase1", self.init, self.plan(arm), self.options.epochs1, validate=False)

    def final(self, arm: str) -> onnx.ModelProto:
        """E2 more epochs at the arm's plan from its phase-1 float weights; best validation epoch."""
        _, start = self.phase1(arm)
        compiled, _ = self.trained(f"{arm}.final", start, self.plan(arm), self.options.epochs2, validate=True)
        return compiled

    # -- tests ----------------------------------------------------------------------
    def clean(self, arm: str) -> dict[str, Any]:
        from quanos_onnx.harness.attacks import predictions
        from quanos_onnx.harness.robustness import wilson
        from quanos_onnx.model import Runner, output_names

        def compute() -> dict[str, Any]:
            proto = self.final(arm)
            runner, logits = Runner(proto), output_names(proto)[0]
            correct = 0
            for x, y in batches(self.data.test_x, self.data.test_y, len(self.data.test_x)):
                (out,) = runner.run(x, [logits])
                correct += int((predictions(out) == y).sum())
            return wilson(correct, len(self.data.test_x)).to_json()

        return cached(self.folder / "eval" / f"{arm}.clean.json", compute)

    def grid(self, arm: str) -> dict[str, Any]:
        """The paper's FGSM and PGD-7 grid on the first --grid-samples test images."""
        from quanos_onnx.harness.evaluate import attack_grid, evaluate

        count = self.options.grid_samples

        def compute() -> dict[str, Any]:
            started = time.perf_counter()
            attacks = attack_grid(["fgsm"], FGSM_EPS) + attack_grid(["pgd"], PGD_EPS, steps=PGD_STEPS, alpha=PGD_ALPHA)
            result = evaluate(self.final(arm), batches(self.data.test_x, self.data.test_y, count), attacks).to_json()
            self.log(f"grid {arm}: {time.perf_counter() - started:.0f} s")
            return result

        return cached(self.folder / "eval" / f"{arm}.grid{count}.json", compute)

    def audit(self, arm: str) -> dict[str, Any]:
        """The robustness audit (what `quanos evaluate --audit` runs) on the first --audit-samples."""
        from quanos_onnx.commands.options import AuditSettings, audit_model
        from quanos_onnx.harness.robustness import AUDIT_METHODS

        count = self.options.audit_samples

        def compute() -> dict[str, Any]:
            started = time.perf_counter()
            settings = AuditSettings(AUDIT_METHODS, AUDIT_EPS, self.options.apgd_steps, 1, 0.5, (0.0, 1.0))
            robustness, masking = audit_model(
                self.final(arm), batches(self.data.test_x, self.data.test_y, count), settings, seed=self.seed, progress=None
            )
            self.log(f"audit {arm}: {time.perf_counter() - started:.0f} s")
            return {"robustness": robustness.to_json(), "masking": masking.to_json()}

        return cached(self.folder / "eval" / f"{arm}.audit{count}_apgd{self.options.apgd_steps}.json", compute)

    def cost(self, arm: str) -> dict[str, float]:
        return cost_row(self.layers, self.plan(arm), self.params)


def config_name(options: argparse.Namespace) -> str:
    return f"n{options.train_samples}_e{options.epochs1}+{options.epochs2}_lr{options.lr:g}_b{options.batch_size}"


def run(options: argparse.Namespace) -> str:
    import torch

    torch.set_num_threads(options.threads)
    data = load_data(options.train_samples, options.val_samples)
    folder = CACHE / config_name(options)
    seeds = [Seed(s, data, options, folder / f"seed{s}") for s in options.seeds]
    stages: list[Callable[[Seed, str], Any]] = [
        lambda s, arm: s.final(arm), lambda s, arm: s.clean(arm), lambda s, arm: s.grid(arm),
    ]
    if options.report_only:
        stages = []
    elif options.audit_samples > 0:
        stages.append(lambda s, arm: s.audit(arm))
    for stage in stages:
        for seed in seeds:
            for arm in arms(options):
                stage(seed, arm)
        write_tables(report(seeds, options))
    tables = report(seeds, options)
    write_tables(tables)
    return tables


def write_tables(tables: str) -> None:
    """Replace the tables subsection, creating the section (finding to be written) if missing."""
    if SECTION not in RESULTS.read_text():
        write_section(RESULTS, SECTION, f"{SECTION}\n\n(finding: see the tables below)\n")
    write_section(RESULTS, TABLES, tables)


# -- report ---------------------------------------------------------------------------
def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _ci(share: dict[str, Any]) -> str:
    low, high = share["ci95"]
    return f"{_pct(share['accuracy'])} [{_pct(low)}, {_pct(high)}]"


def _eps_label(eps: float) -> str:
    numerator = eps * 255
    if len(f"{eps:g}") > 5 and abs(numerator - round(numerator)) < 1e-6:
        return f"{round(numerator)}/255"
    return f"{eps:g}"


def _mean_spread(values: list[float], *, signed: bool = False) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):{'+' if signed else ''}.1f} ± {100 * spread:.1f}"


def measures(seed: Seed, arm: str) -> dict[str, Any] | None:
    """Every figure of one run that is cached (None when its model is not trained yet)."""
    from quanos_onnx.harness.robustness import wilson

    options = seed.options
    eval_folder = seed.folder / "eval"
    if not (seed.folder / f"{arm}.final.onnx").exists():
        return None
    row: dict[str, Any] = {"cost": seed.cost(arm), "history": seed.history(f"{arm}.final")}
    if (eval_folder / f"{arm}.clean.json").exists():
        row["clean"] = seed.clean(arm)
    if (eval_folder / f"{arm}.grid{options.grid_samples}.json").exists():
        grid = seed.grid(arm)
        row["grid"] = {
            f"{a['method']} {_eps_label(a['eps'])}": wilson(round(a["accuracy"] * grid["samples"]), grid["samples"]).to_json()
            for a in grid["attacks"]
        }
    if (eval_folder / f"{arm}.audit{options.audit_samples}_apgd{options.apgd_steps}.json").exists():
        row["audit"] = seed.audit(arm)
    return row


def _figures(row: dict[str, Any], grid_keys: list[str]) -> list[float | None]:
    """clean, the grid columns and the audit's worst cases of one run (None: not measured)."""
    worst = {w["eps"]: w["accuracy"] for w in row["audit"]["robustness"]["worst_case"]} if "audit" in row else {}
    return [
        row["clean"]["accuracy"] if "clean" in row else None,
        *[row["grid"][k]["accuracy"] if "grid" in row else None for k in grid_keys],
        *[worst.get(eps) for eps in AUDIT_EPS],
    ]


def paired_rows(collected: dict[str, list[dict[str, Any]]], grid_keys: list[str], options: argparse.Namespace) -> list[str]:
    names = arms(options)
    rows = []
    for quanos, uniform in zip(names[::2], names[1::2]):
        pairs = list(zip(collected[quanos], collected[uniform]))
        if not pairs:
            continue
        cells = [f"{label(quanos)} vs {label(uniform)}", str(len(pairs))]
        columns = zip(*[[None if a is None or b is None else a - b for a, b in zip(_figures(q, grid_keys), _figures(u, grid_keys))] for q, u in pairs])
        for column in columns:
            values = [v for v in column if v is not None]
            seeds = ", ".join(f"{100 * v:+.1f}" for v in values)
            cells.append(f"{_mean_spread(values, signed=True)} ({seeds})" if values else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def budget_cells(seed: Seed) -> str:
    """The budgeted plan's bits and average, when --budget-bits asked for it."""
    bits = seed.options.budget_bits
    if bits is None:
        return ""
    plan = seed.plan(f"quanos-b{bits}")
    layers = ", ".join("float" if entry.weight_bits is None else str(entry.weight_bits) for entry in plan.layers)
    return f" {layers} | {plan.average_weight_bits(seed.params):.2f} |"


def report(seeds: list[Seed], options: argparse.Namespace) -> str:
    rows: list[str] = []
    audit_rows: list[str] = []
    masking_rows: list[str] = []
    plan_rows: list[str] = []
    collected: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms(options)}
    grid_keys = [f"fgsm {_eps_label(e)}" for e in (0.05, 0.1)] + [f"pgd {_eps_label(e)}" for e in PGD_EPS]
    for seed in seeds:
        if (seed.folder / f"plans{options.ans_samples}.json").exists():
            ans = seed.ans()
            bits = [entry.get("weight_bits") for entry in seed.plans()["quanos"]["layers"]]
            plan_rows.append(
                f"| {seed.seed} | {_pct(ans['clean_accuracy'])} / {_pct(ans['adversarial_accuracy'])} | "
                + ", ".join(f"{r['ans_mean']:.3f}" for r in ans["layers"])
                + " | " + ", ".join("float" if b is None else str(b) for b in bits)
                + f" | {seed.cost('quanos')['average_bits']:.2f} | {seed.cost('uniform')['average_bits']:.0f} |"
                + budget_cells(seed)
            )
        for arm in arms(options):
            row = measures(seed, arm)
            if row is None:
                continue
            collected[arm].append(row)
            cost = row["cost"]
            cells = [
                str(seed.seed), label(arm), f"{cost['average_bits']:.2f}",
                f"{row['history']['best_epoch']}/{options.epochs2}",
                _ci(row["clean"]) if "clean" in row else "-",
                *[_ci(row["grid"][k]) if "grid" in row else "-" for k in grid_keys],
                f"{cost['memory_kb']:.1f}", f"{cost['standard'] / 1e6:.3f}", f"{cost['dg'] / 1e6:.3f}", f"{cost['dvafs'] / 1e6:.3f}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
            if "audit" in row:
                robustness = row["audit"]["robustness"]
                by_eps = {w["eps"]: w for w in robustness["worst_case"]}
                attack_cells = []
                for eps in AUDIT_EPS:
                    for attack in robustness["attacks"]:
                        if attack["eps"] == eps:
                            attack_cells.append(f"{attack['name']} {_eps_label(eps)} {_pct(attack['accuracy'])}")
                audit_rows.append(
                    f"| {seed.seed} | {label(arm)} | {_ci(robustness['clean'])} | "
                    + " | ".join(_ci(by_eps[eps]) for eps in AUDIT_EPS)
                    + f" | {'; '.join(attack_cells)} |"
                )
                masking = row["audit"]["masking"]
                flagged = [c["check"] for c in masking["checks"] if c["flagged"]]
                gradients = robustness["gradients"]
                masking_rows.append(
                    f"| {seed.seed} | {label(arm)} | {masking['verdict']} | {', '.join(flagged) or '-'} | "
                    f"{gradients['all_zero_samples']} of {gradients['samples']} all zero, "
                    f"{100 * gradients['zero_entry_share']:.1f}% zero entries | {robustness['twin_disagreements']} |"
                )
    summary = []
    for arm in arms(options):
        runs = collected[arm]
        if not runs:
            continue
        cells = [label(arm), str(len(runs)), f"{statistics.mean(r['cost']['average_bits'] for r in runs):.2f}"]
        cells.append(_mean_spread([r["clean"]["accuracy"] for r in runs if "clean" in r]))
        cells += [_mean_spread([r["grid"][k]["accuracy"] for r in runs if "grid" in r]) for k in grid_keys]
        for eps in AUDIT_EPS:
            cells.append(_mean_spread([w["accuracy"] for r in runs if "audit" in r for w in r["audit"]["robustness"]["worst_case"] if w["eps"] == eps]))
        cells += [
            f"{statistics.mean(r['cost']['memory_kb'] for r in runs):.1f}",
            *[f"{statistics.mean(r['cost'][p] for r in runs) / 1e6:.3f}" for p in ("standard", "dg", "dvafs")],
        ]
        summary.append("| " + " | ".join(cells) + " |")
    paired = paired_rows(collected, grid_keys, options)
    shown = [
        part for index, part in enumerate(sys.argv[1:])
        if "--machine" not in (part, sys.argv[index]) and part != "--report-only"
    ]
    command = " ".join(["PYTHONPATH=. python bench/algorithm1.py", *shown])
    grid_head = " | ".join(k.upper() if k.startswith("fgsm") else f"PGD-7 {k[4:]}" for k in grid_keys)
    audit_head = " | ".join(f"worst case {_eps_label(e)}" for e in AUDIT_EPS)
    ratio = options.epochs1 / (options.epochs1 + options.epochs2)
    budget_note = "" if options.budget_bits is None else (
        f"- budgeted pair (not the paper's rule: Eqn 3 alone gives this net about 14 bits): the same ANS through\n"
        f"  allocate_budgeted to a {options.budget_bits}-bit average (one scale on every ANS, so the ANS order of the\n"
        f"  layers is kept), trained from the same 16-bit phase 1 for {options.epochs2} epochs, against uniform\n"
        f"  {options.budget_bits} bits trained {options.epochs1} + {options.epochs2} epochs from the same init.\n"
    )
    budget_head = "" if options.budget_bits is None else f" budget-{options.budget_bits} bits | budget avg bits |"
    return f"""{TABLES}

- command: `{command}`
- machine: {options.machine or f'{machine()}, {options.threads} torch thread'}
- model: conv3x3(16)-ReLU-maxpool-conv3x3(32)-ReLU-maxpool-FC(1568,64)-ReLU-FC(64,10), no
  BatchNorm (the tool folds BatchNorms away, so it cannot train them), torch default init under
  the seed, exported to ONNX; the same init for both arms of a seed.
- training (all through `quanos_onnx.finetune`, fake quantization with straight-through
  gradients, weights and activations at each layer's bits, classifier float): the first
  {options.train_samples} Fashion-MNIST training images per epoch, Adam lr {options.lr:g} on a cosine to 0
  within each call, batch {options.batch_size}. QUANOS: {options.epochs1} epoch(s) at uniform 16 bits, ANS, Eqn 3,
  then {options.epochs2} epochs at the Eqn-3 plan from those weights. Uniform: the same two calls
  ({options.epochs1} + {options.epochs2} epochs) at round(Eqn-3 average bits) from the same init. ANS after
  {options.epochs1} of {options.epochs1 + options.epochs2} epochs ({ratio:.0%}; the paper: 30 of 210, 14%). The second call keeps
  its best epoch by clean accuracy on the last {options.val_samples} training images (held out).
{budget_note}- ANS: FGSM eps {ANS_EPS} on {options.ans_samples} random training images (seeded); Eqn 3 with k_init 16
  and the tool's floor k_min 2 (the paper allows 1 bit).
- test: clean accuracy on all {len(seeds[0].data.test_x)} t10k images (onnxruntime on the written
  model); the paper's grid (FGSM, PGD-7 steps of 2/255, no random start) on the first
  {options.grid_samples}; the audit (FGSM, PGD-7, APGD-CE and APGD-DLR {options.apgd_steps} steps, transfer of
  APGD-CE from the model's float graph; worst case per sample; effort check APGD-CE with
  doubled steps and 3 restarts; eps 0.5 probe) at eps {', '.join(_eps_label(e) for e in AUDIT_EPS)} on the
  first {options.audit_samples}. Attacks through each model's fake-quant twin, counted by onnxruntime.
  Brackets: 95% Wilson intervals of one run; "±": standard deviation over seeds.

Eqn-3 plans per seed (ANS and bits per layer in order conv1, conv2, fc1, fc2; fc2 is the classifier, kept float):

| seed | 16-bit model at ANS: clean / FGSM 0.05 (%) | ANS per layer | Eqn-3 bits | avg bits | uniform iso bits |{budget_head}
|---:|---|---|---|---:|---:|{'---|---:|' if options.budget_bits is not None else ''}
{chr(10).join(plan_rows)}

Mean ± standard deviation over seeds (accuracy %, energy per image in uJ):

| model | seeds | avg bits | clean | {grid_head} | {audit_head} | weight memory (kB) | Standard | DG | DVAFS |
|---|---:|---:|---:|{'---:|' * len(grid_keys)}{'---:|' * len(AUDIT_EPS)}---:|---:|---:|---:|
{chr(10).join(summary)}

Paired differences, QUANOS minus uniform of the same seed and init (points, mean ± standard
deviation over seeds; each seed's difference in brackets):

| pair | seeds | clean | {grid_head} | {audit_head} |
|---|---:|---:|{'---:|' * len(grid_keys)}{'---:|' * len(AUDIT_EPS)}
{chr(10).join(paired)}

Per run (accuracy % [95% Wilson]; kept epoch of the second call):

| seed | model | avg bits | kept epoch | clean | {grid_head} | weight memory (kB) | Standard (uJ) | DG (uJ) | DVAFS (uJ) |
|---:|---|---:|---:|---:|{'---:|' * len(grid_keys)}---:|---:|---:|---:|
{chr(10).join(rows)}

Audit per run (robust accuracy %, worst case per sample over all attacks at the eps [95% Wilson]):

| seed | model | clean (audit subset) | {audit_head} | each attack |
|---:|---|---:|{'---:|' * len(AUDIT_EPS)}---|
{chr(10).join(audit_rows) or '| - | (not run yet) | | | |'}

Masking diagnostics (harness/masking.py):

| seed | model | verdict | checks failed | input gradients at the clean points | twin/ORT disagreements |
|---:|---|---|---|---|---:|
{chr(10).join(masking_rows) or '| - | (not run yet) | | | |'}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--val-samples", type=int, default=5000)
    parser.add_argument("--epochs1", type=int, default=1, help="epochs before ANS (the paper: 30)")
    parser.add_argument("--epochs2", type=int, default=6, help="epochs after Eqn 3 (the paper: 180 more)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--ans-samples", type=int, default=1000)
    parser.add_argument("--grid-samples", type=int, default=1000)
    parser.add_argument("--audit-samples", type=int, default=500)
    parser.add_argument("--apgd-steps", type=int, default=25)
    parser.add_argument("--budget-bits", type=int, default=None, help="also the budgeted pair at this average")
    parser.add_argument("--report-only", action="store_true", help="write the tables from the cached cells, compute nothing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default=None, help="where the cached cells were computed, when not here")
    print(run(parser.parse_args()))


if __name__ == "__main__":
    main()
