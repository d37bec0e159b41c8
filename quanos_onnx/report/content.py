"""What a report says, independent of how it is typeset: headline figures, tables, provenance.

report.md and report.html both render this, so the two always carry the same numbers;
the HTML adds the figures (plots.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .document import RunInfo


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class Content:
    title: str
    subtitle: str
    highlights: tuple[tuple[str, str], ...]
    tables: tuple[Table, ...]
    provenance: Table
    settings: tuple[tuple[str, str], ...]
    """The command's options as `--option value` pairs, part of the provenance."""


COMMAND_TITLES = {
    "compile": "compile report",
    "analyze": "sensitivity analysis",
    "energy": "energy estimate",
    "evaluate": "robustness evaluation",
}


def build_content(document: Mapping[str, Any], run: RunInfo) -> Content:
    names = ", ".join(model_labels([model["path"] for model in document["inputs"]["models"]]))
    command = document["command"]
    tables = [
        table
        for table in (
            *_audit_tables(document),
            _verification_table(document),
            _pareto_table(document),
            _layers_table(document),
            _totals_table(document),
            _accuracy_table(document),
            _outputs_table(document),
        )
        if table is not None
    ]
    return Content(
        title=f"{names}: {COMMAND_TITLES.get(command, command)}",
        subtitle=f"quanos {command}, {document['tool']['name']} {document['tool']['version']}",
        highlights=tuple(_highlights(document)),
        tables=tuple(tables),
        provenance=_provenance_table(document, run),
        settings=tuple((f"--{key.replace('_', '-')}", _setting(value)) for key, value in document["settings"].items()),
    )


def _highlights(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = [(f"verdict, {audit['model']}", audit["verdict"]) for audit in document.get("audits", [])]
    items += verification_highlights(document.get("verification"))
    summary = document.get("summary")
    if summary:
        items.append(("method", method_text(summary)))
        moved = summary.get("moved_from_eqn3")
        if moved:
            items.append(("moved from Eqn 3", moved_text(moved)))
        items.append(("average weight bits", f"{summary['average_weight_bits']:.2f} (parameter-weighted)"))
        items.append(("layers", f"{summary['quantized_layers']} quantized, {summary['float_layers']} float"))
        if summary.get("joins"):
            items.append(("residual joins", joins_text(summary["joins"])))
    energy = document.get("energy")
    if energy:
        for name, profile in energy["profiles"].items():
            ratios = ", ".join(f"{row['energy_ratio']:.2f}x of {row['bits']}-bit" for row in profile["vs_uniform"])
            items.append((f"energy, {name}", f"{_uj(profile['totals']['energy_pj'])} ({ratios})"))
        reference = next(iter(energy["profiles"].values()))
        ratios = ", ".join(f"{row['memory_ratio']:.2f}x of {row['bits']}-bit" for row in reference["vs_uniform"])
        items.append(("weight memory", f"{_kb(reference['totals']['weight_memory_bits'])} ({ratios})"))
    ans = document.get("ans")
    if ans:
        attack = _attack_name(ans["attack"])
        items.append(
            (
                "float model under the ANS attack",
                f"{attack} on {ans['samples']} samples of the calibration data: {_percent(ans['clean_accuracy'])} "
                f"clean, {_percent(ans['adversarial_accuracy'])} attacked (labels from {ans['labels']})",
            )
        )
        ranked = [row for row in document["layers"] if row["ans_mean"] is not None]
        if ranked:
            top = max(ranked, key=lambda row: row["ans_mean"])
            items.append(("most sensitive layer", f"{top['name']} (ANS {top['ans_mean']:.3f})"))
    evaluations = document["evaluations"]
    labels = model_labels([entry["model"]["path"] for entry in evaluations])
    for label, entry in zip(labels, evaluations):
        evaluation = entry["evaluation"]
        worst = min((a["accuracy"] for a in evaluation["attacks"]), default=None)
        text = f"{_percent(evaluation['clean_accuracy'])} clean on {evaluation['samples']} samples"
        if worst is not None and not document.get("audits"):
            text += f", {_percent(worst)} under the strongest attack"
        items.append((f"accuracy, {label}", text))
    return items


METHOD_NAMES = {
    "milp": "measured sensitivity + integer program (milp, the default)",
    "quanos": "the paper's Eqn 3 (--method eqn3)",
    "given": "a given plan (--plan)",
}


def method_text(summary: Mapping[str, Any]) -> str:
    """Which allocation ran: 'the paper's Eqn 3 (--method eqn3), k_init 16, k_min 2', ..."""
    method = summary["method"]
    if method.startswith("uniform-"):
        return f"uniform {method.split('-', 1)[1]}-bit (--bits)"
    text = METHOD_NAMES.get(method, method)
    if method == "quanos":
        text += f", k_init {summary['k_init']}, k_min {summary['k_min']}"
    if summary.get("how"):
        text += f": {summary['how']}"
    return text


def joins_text(joins: Mapping[str, Any]) -> str:
    """Which join rule the plan was written under: it changes the written model, not the
    bits or the energy (docs/quantization.md, "Residual joins")."""
    count = f"{joins['quantized']} quantized"
    if joins["operand_bits"] is None:
        return f"{count}, operands at the bits of the layer each join feeds (the paper's rule)"
    return (
        f"{count}, operands at {joins['operand_bits']} bits or more, each sum rounded once onto the grid of the "
        "layer it feeds (--join-operand-bits paper: the paper's rule)"
    )


def moved_text(moved: Mapping[str, Any]) -> str:
    """'7 of 19 layers differ; average weight bits 4.12 (this plan) against 2.05 (Eqn 3)'."""
    return (
        f"{moved['layers_changed']} of {moved['layers']} quantized layers have other bits than Eqn 3 gives on the "
        f"same ANS; average weight bits {moved['average_weight_bits']:.2f} (this plan) against "
        f"{moved['eqn3_average_bits']:.2f} (Eqn 3)"
    )


def verification_headline(verification: Mapping[str, Any]) -> str:
    """'compiled: clean 91.2% (float 91.6%, uniform 4: 66.3%, uniform 8: 91.3%); PGD-7 eps=0.05: ...'."""
    (metric, clean), *attacked = _verification_figures(verification)
    return "; ".join([f"compiled: {metric} {clean}", *(f"{label}: {text}" for label, text in attacked)])


def verification_highlights(verification: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The guard, the compiled model's accuracies beside the others', then the warnings."""
    if not verification:
        return []
    items = [("accuracy guard", guard_text(verification))]
    (metric, clean), *attacked = _verification_figures(verification)
    items += [(f"compiled model, {metric}", clean), *((f"compiled model, {label}", text) for label, text in attacked)]
    items += [("warning", warning) for warning in verification["warnings"]]
    return items


def guard_text(verification: Mapping[str, Any]) -> str:
    guard = verification["guard"]
    metric = "agreement" if verification["labels"] == "float model" else "clean accuracy"
    drop = f"{metric} {guard['accuracy_drop']:.1f} points below float on {verification['data']['samples']} evaluation samples"
    low, high = guard["accuracy_drop_interval"]
    drop += f" (95% interval {low:.1f} to {high:.1f})"
    if guard["max_accuracy_drop"] is None:
        return f"off (--max-accuracy-drop none); {drop}"
    verdict = "passed" if guard["passed"] else "FAILED"
    return f"{verdict}: {drop} (--max-accuracy-drop {guard['max_accuracy_drop']:g})"


def _verification_figures(verification: Mapping[str, Any]) -> list[tuple[str, str]]:
    models = verification["models"]
    from_float = verification["labels"] == "float model"
    compiled, others = models[0], models[1:]
    clean_others = [m for m in others if not (from_float and m["kind"] == "float")]
    metric = "agreement with float" if from_float else "clean"
    figures = [
        (
            metric,
            f"{_percent(compiled['clean_accuracy'])} ({_compared(clean_others, lambda m: m['clean_accuracy'])})",
        )
    ]
    for index, attack in enumerate(verification["attacks"]):
        figures.append(
            (
                _attack_name(attack),
                f"{_percent(compiled['attacks'][index]['accuracy'])} "
                f"({_compared(others, lambda m, i=index: m['attacks'][i]['accuracy'])})",
            )
        )
    return figures


def _compared(models: Sequence[Mapping[str, Any]], value: Any) -> str:
    return ", ".join(f"{m['name']}{':' if m['kind'] == 'uniform' else ''} {_percent(value(m))}" for m in models)


def _verification_table(document: Mapping[str, Any]) -> Table | None:
    verification = document.get("verification")
    if not verification:
        return None
    attacks = [_attack_name(attack) for attack in verification["attacks"]]
    profiles = list(verification["models"][0]["energy_pj"])
    metric = "agreement" if verification["labels"] == "float model" else "clean"
    columns = ("model", "avg weight bits", metric, *attacks, "weight memory", *(f"energy {p}" for p in profiles))
    rows = tuple(
        (
            model["name"],
            f"{model['average_weight_bits']:.2f}",
            _percent(model["clean_accuracy"]),
            *(_percent(result["accuracy"]) for result in model["attacks"]),
            _kb(model["weight_memory_bits"]),
            *(_uj(model["energy_pj"][p]) for p in profiles),
        )
        for model in verification["models"]
    )
    data = verification["data"]
    labels = (
        "labels are the float model's clean predictions, so accuracy is agreement with float"
        if verification["labels"] == "float model"
        else "labels from the data"
    )
    note = (
        f"{metric.capitalize()} accuracy on {data['samples']} samples of {data['source']} ({data['selection']}); "
        f"attacks on the first {data['robust_samples']}, white-box through each model's twin, counted by "
        f"onnxruntime; {labels}. Uniform models are calibrated and quantized as the compiled one. "
        f"Accuracy guard: {guard_text(verification)}."
    )
    return Table("verification", "Verification: the compiled model against float and uniform", columns, rows, note)


def _pareto_table(document: Mapping[str, Any]) -> Table | None:
    pareto = document.get("pareto")
    if not pareto:
        return None
    attacks = [_attack_name(attack) for attack in pareto["attacks"]]
    metric = "agreement" if pareto["labels"] == "float model" else "clean"
    columns = ("point", "avg weight bits", metric, *attacks, "weight memory", f"energy {pareto['profile']}",
               "search split", "dominated")
    rows = tuple(
        (
            point["name"],
            f"{point['average_weight_bits']:.2f}",
            _percent(point["clean_accuracy"]),
            *(_percent(result["accuracy"]) for result in point["attacks"]),
            _kb(point["weight_memory_bits"]),
            _uj(point["energy_pj"]),
            "-" if point["search_accuracy"] is None else _percent(point["search_accuracy"]),
            "yes" if point["dominated"] else "no",
        )
        for point in pareto["points"]
    )
    note = (
        f"Each plan's written model (the compile's PTQ) on the {pareto['samples']} held-out samples, attacks on the "
        f"first {pareto['robust_samples']}, as verification measures the compiled model. Search split: the accuracy the "
        "search judged the mixed plan by (lowered by its one-sided 95% bound). Dominated: another point has no more "
        "weight memory and no less clean accuracy."
    )
    return Table("pareto", "Pareto front: every plan written and measured", columns, rows, note)


def _layers_table(document: Mapping[str, Any]) -> Table | None:
    layers = document["layers"]
    if not layers:
        return None
    planned = any(row["keep_float"] is not None for row in layers)
    measured = any(row["ans_mean"] is not None for row in layers)
    columns = ["layer", "op", "params", "MACs"]
    columns += ["weight bits", "act bits"] if planned else []
    columns += ["ANS mean", "ANS std"] if measured else []
    lipschitz = any(row.get("lipschitz_bound") is not None for row in layers)
    columns += ["Lipschitz bound", "local Lipschitz"] if lipschitz else []
    tolerance = next((row["tolerance_kl"] for row in layers if row.get("tolerance_kl")), None)
    if tolerance is not None:
        columns += ["tolerance bits", "allocator bits", f"KL alone at {' / '.join(tolerance)} bits"]
    eqn3 = ((document.get("summary") or {}).get("moved_from_eqn3") or {}).get("eqn3_bits")
    columns += ["Eqn 3 bits"] if eqn3 else []
    rows = []
    for row in layers:
        cells = [row["name"], row["op"], f"{row['params']:,}", f"{row['macs']:,}"]
        if planned:
            cells += ["float", "float"] if row["keep_float"] else [str(row["weight_bits"]), str(row["act_bits"])]
        if measured:
            cells += [_number(row["ans_mean"]), _number(row["ans_std"])]
        if lipschitz:
            cells += [_number(row.get("lipschitz_bound")), _number(row.get("lipschitz_local"))]
        if tolerance is not None:
            cells += tolerance_cells(row)
        if eqn3:
            cells += [_bits(eqn3.get(row["name"]))]
        rows.append(tuple(cells))
    notes = []
    if tolerance is not None:
        notes.append(
            "Tolerance bits: the fewest bits at which the layer alone (every other layer float) keeps the float "
            "model's top-1 prediction on at least 99% of the samples, at every wider candidate too (>8: none does). "
            "Allocator bits: the default allocator's integer program on this KL table at the average bits of the "
            "plan with every layer at its tolerance (analysis.json has both plans' measured agreement)."
        )
    if eqn3:
        notes.append("Eqn 3 bits: what the paper's rule gives each layer from the same ANS measurement.")
    return Table("layers", "Layers", tuple(columns), tuple(rows), " ".join(notes))


def tolerance_cells(row: Mapping[str, Any]) -> list[str]:
    """A layer's tolerance, the allocator's bits and its KL per candidate ('-': not quantized,
    '>8': no candidate keeps the predictions)."""
    if row.get("tolerance_kl") is None:
        return ["-", "-", "-"]
    widest = max(int(b) for b in row["tolerance_kl"])
    bits = f">{widest}" if row["tolerance_bits"] is None else str(row["tolerance_bits"])
    return [bits, str(row["allocator_bits"]), " / ".join(f"{value:.2g}" for value in row["tolerance_kl"].values())]


def _totals_table(document: Mapping[str, Any]) -> Table | None:
    energy = document.get("energy")
    if not energy:
        return None
    rows = []
    for name, profile in energy["profiles"].items():
        totals = profile["totals"]
        cells = [name, _uj(totals["energy_pj"])]
        cells += [f"{_uj(row['energy_pj'])} ({row['energy_ratio']:.2f}x)" for row in profile["vs_uniform"]]
        cells += [_kb(totals["weight_memory_bits"])]
        cells += [f"{_kb(row['weight_memory_bits'])} ({row['memory_ratio']:.2f}x)" for row in profile["vs_uniform"]]
        rows.append(tuple(cells))
    bits = [row["bits"] for row in next(iter(energy["profiles"].values()))["vs_uniform"]]
    columns = ["profile", "energy (plan)", *(f"energy {b}-bit" for b in bits), "memory (plan)", *(f"memory {b}-bit" for b in bits)]
    note = f"Per image; bits from {energy['bits_from']}; (x) is the plan's figure relative to the uniform model."
    return Table("totals", "Energy and memory in total", tuple(columns), tuple(rows), note)


def _accuracy_table(document: Mapping[str, Any]) -> Table | None:
    evaluations = document["evaluations"]
    if not evaluations:
        return None
    rows = []
    for model, entry in zip(model_labels([e["model"]["path"] for e in evaluations]), evaluations):
        evaluation = entry["evaluation"]
        rows.append((model, "clean", "-", _percent(evaluation["clean_accuracy"]), "-"))
        for attack in evaluation["attacks"]:
            rows.append(
                (model, _attack_method(attack), f"{attack['eps']:.4g}", _percent(attack["accuracy"]), _percent(attack["adversarial_loss"]))
            )
    labels = sorted({entry["evaluation"]["labels"] for entry in evaluations})
    note = f"Labels from {' and '.join(labels)}; adversarial loss = clean accuracy - attacked accuracy."
    return Table("accuracy", "Accuracy under attack", ("model", "attack", "eps", "accuracy", "adversarial loss"), tuple(rows), note)


def _audit_tables(document: Mapping[str, Any]) -> list[Table]:
    """Per audited model: robust accuracy per attack and eps with the worst case, and the masking checks."""
    from .audit import accuracy_rows, check_rows

    tables = []
    for number, audit in enumerate(document.get("audits", [])):
        rows = accuracy_rows(audit["robustness"])
        tables.append(
            Table(
                f"robustness-{number}",
                f"Robust accuracy, {audit['model']}",
                tuple(rows[0].keys()),
                tuple(tuple("-" if value is None else str(value) for value in row.values()) for row in rows),
                "Counted by onnxruntime on the attacked inputs; worst case = correct under every attack at that eps.",
            )
        )
        checks = check_rows(audit["masking"])
        tables.append(
            Table(
                f"masking-{number}",
                f"Gradient-masking checks, {audit['model']}: {audit['masking']['verdict']}",
                ("check", "result", "evidence"),
                tuple((row["check"], str(row["flagged"]), str(row["evidence"])) for row in checks),
            )
        )
    return tables


def _outputs_table(document: Mapping[str, Any]) -> Table | None:
    outputs = document["outputs"]
    if not outputs:
        return None
    rows = tuple((entry["file"], entry["sha256"]) for entry in outputs)
    return Table("outputs", "Outputs", ("file", "sha256"), rows)


def _provenance_table(document: Mapping[str, Any], run: RunInfo) -> Table:
    inputs = document["inputs"]
    rows: list[tuple[str, str]] = [("tool", f"{document['tool']['name']} {document['tool']['version']}")]
    rows.append(("command line", " ".join(run.command_line)))
    for model in inputs["models"]:
        rows.append(("model", f"{model['path']}{_digest(model)}"))
    data = inputs.get("data")
    if data:
        digest = f", sha256 {data['sha256']}" if data["sha256"] else ""
        rows.append(("data", f"{data['path']} ({data['samples']} samples, {data['selection']}{digest})"))
    plan = inputs.get("plan")
    if plan:
        rows.append(("plan", f"{plan['path']}{_digest(plan)}"))
    rows.append(("seed", "-" if document["seed"] is None else str(document["seed"])))
    rows.append(("started", run.started_at))
    rows.append(("wall time", f"{run.wall_time_s:.1f} s"))
    if run.threads is not None:
        rows.append(("threads", f"{run.threads} (of {run.usable_cores} usable cores)"))
    return Table("provenance", "Provenance", ("", ""), tuple(rows))


def _attack_method(attack: Mapping[str, Any]) -> str:
    return f"PGD-{attack['steps']}" if attack["method"] == "pgd" else attack["method"].upper()


def _attack_name(attack: Mapping[str, Any]) -> str:
    return f"{_attack_method(attack)} eps={attack['eps']:.4g}"


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ",".join(str(item) for item in value)
    return "-" if value is None else str(value)


def model_labels(paths: Sequence[str]) -> list[str]:
    """File names, with as many parent folders as it takes to tell the models apart."""
    parts = [path.replace("\\", "/").split("/") for path in paths]
    deepest = max((len(p) for p in parts), default=1)
    for depth in range(1, deepest + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(paths)


def _digest(file: Mapping[str, Any]) -> str:
    return f" (sha256 {file['sha256']})" if file["sha256"] else ""


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _bits(value: int | None) -> str:
    return "float" if value is None else str(value)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _uj(picojoules: float) -> str:
    return f"{picojoules / 1e6:.4g} uJ"


def _kb(bits: float) -> str:
    return f"{bits / 8e3:.4g} kB"
