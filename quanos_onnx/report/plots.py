"""The report's figures, drawn with matplotlib's Agg canvas into PNG bytes.

Each figure answers one question a reader of the report has: which layers are sensitive
(ANS), what each layer got (bits), what it costs (energy and memory per layer and in
total, against the uniform 16- and 8-bit models) and how robust each model is (accuracy
against eps). Figures are built from the report document alone. matplotlib is imported
inside the functions so the CLI starts fast; Figure + FigureCanvasAgg avoid pyplot's
global state and any interactive backend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .content import model_labels

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
PLAN_COLOR = "#2563eb"
ACT_COLOR = "#f59e0b"
UNIFORM_COLORS = {16: "#9ca3af", 8: "#d1d5db"}
FLOAT_COLOR = "#e5e7eb"
MODEL_COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#be185d")
MAX_FIGURE_WIDTH = 16.0
TWO_COLUMN_LAYERS = 12
"""Up to this many layers the per-layer cost panels sit two abreast; more get full width."""


@dataclass(frozen=True)
class Plot:
    """One embedded figure: an anchor name, a heading, what to read from it, and the PNG."""

    key: str
    title: str
    caption: str
    png: bytes


def figures(document: Mapping[str, Any]) -> list[Plot]:
    """Every figure the document has data for, in reading order."""
    layers = document["layers"]
    plots = []
    if document.get("verification"):
        plots.append(verification_plot(document["verification"]))
    if document.get("pareto"):
        plots.append(pareto_plot(document["pareto"]))
    if any(row["ans_mean"] is not None for row in layers):
        plots.append(ans_plot(layers, document.get("ans")))
    if any(row["keep_float"] is not None for row in layers):
        plots.append(bits_plot(layers, document.get("summary") or {}))
    if document.get("energy"):
        plots.append(layer_cost_plot(document["energy"], document["baselines"]))
        plots.append(totals_plot(document["energy"]))
    if any(entry["evaluation"]["attacks"] for entry in document["evaluations"]):
        plots.append(accuracy_plot(document["evaluations"]))
    return plots


VERIFY_COLORS = {"compiled": PLAN_COLOR, "float": "#111827", "uniform": "#9ca3af"}
ATTACK_MARKERS = ("s", "^", "D", "v", "P", "X")


def verification_plot(verification: Mapping[str, Any]) -> Plot:
    """Accuracy against weight memory and against energy (first profile): the compiled model,
    float and the uniform models; filled = clean, open = under each attack."""
    models = verification["models"]
    profile = next(iter(models[0]["energy_pj"]))
    figure = _new_figure(10.0, 3.9)
    panels = figure.subplots(1, 2, sharey=True)
    costs = (
        ("weight memory, kB", lambda m: m["weight_memory_bits"] / 8e3),
        (f"energy per image on {profile}, uJ", lambda m: m["energy_pj"][profile] / 1e6),
    )
    attacks = [_describe_attack(attack) for attack in verification["attacks"]]
    for axes, (label, cost) in zip(panels, costs):
        names: dict[tuple[float, float], list[str]] = {}
        for model in reversed(models):  # the compiled model last, on top
            color = VERIFY_COLORS.get(model["kind"], "#9ca3af")
            x = cost(model)
            axes.scatter([x], [100 * model["clean_accuracy"]], s=60 if model["kind"] == "compiled" else 40, color=color, zorder=3)
            names.setdefault((x, 100 * model["clean_accuracy"]), []).insert(0, model["name"])
            for index, result in enumerate(model["attacks"]):
                axes.scatter([x], [100 * result["accuracy"]], s=36, facecolors="none", edgecolors=color,
                             marker=ATTACK_MARKERS[index % len(ATTACK_MARKERS)], zorder=3)
        for index, (point, same) in enumerate(sorted(names.items())):  # models at one point share a label
            offset = (4, 6) if index % 2 == 0 else (4, -14)  # neighbours alternate above and below
            axes.annotate(" = ".join(same), point, xytext=offset, textcoords="offset points", fontsize=8, color="#374151")
        axes.set_xlim(left=0, right=1.15 * max(cost(model) for model in models))
        axes.set_xlabel(label)
        axes.set_ylim(-2, 102)
        _style(axes, grid_x=True)
    metric = "agreement with float" if verification["labels"] == "float model" else "accuracy"
    panels[0].set_ylabel(f"{metric}, %")
    handles = [panels[0].scatter([], [], color="#4b5563", s=36, label="clean")]
    handles += [
        panels[0].scatter([], [], facecolors="none", edgecolors="#4b5563", s=36, marker=ATTACK_MARKERS[i % len(ATTACK_MARKERS)], label=name)
        for i, name in enumerate(attacks)
    ]
    figure.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=8, frameon=False)
    data = verification["data"]
    caption = (
        f"Each model at its cost: filled = clean {metric} on {data['samples']} held-out samples, open = under each "
        f"attack on the first {data['robust_samples']}. Up and to the left is better; the compiled model "
        "should sit above the uniform model of its size."
    )
    return Plot("verification", "Verification: accuracy against size and energy", caption, _png(figure))


FRONT_STYLES = {
    "mixed": (PLAN_COLOR, "o", "mixed (integer program)"),
    "uniform": ("#ea580c", "s", "uniform"),
    "compiled": ("#111827", "*", "compiled"),
}


def pareto_plot(pareto: Mapping[str, Any]) -> Plot:
    """Clean and robust accuracy of the front's written models against weight memory and
    against energy on the front's profile: mixed plans and uniform bit-widths as two lines,
    the compiled model as a star, float as a dashed line."""
    points = pareto["points"]
    profile = pareto["profile"]
    figure = _new_figure(10.0, 4.2)
    panels = figure.subplots(1, 2, sharey=True)
    costs = (
        ("weight memory, kB", "weight_memory_bits", 8e3),
        (f"energy per image on {profile}, uJ", "energy_pj", 1e6),
    )
    attacks = [_describe_attack(attack) for attack in pareto["attacks"]]
    float_point = next((p for p in points if p["kind"] == "float"), None)
    for axes, (label, key, unit) in zip(panels, costs):
        for kind, (color, marker, _) in FRONT_STYLES.items():
            chosen = sorted((p for p in points if p["kind"] == kind), key=lambda p: p[key])
            if not chosen:
                continue
            x = [p[key] / unit for p in chosen]
            line = "-" if kind != "compiled" else "none"
            size = 11 if kind == "compiled" else 6
            axes.plot(x, [100 * p["clean_accuracy"] for p in chosen], linestyle=line, marker=marker, color=color,
                      markersize=size, linewidth=1.2, zorder=3)
            for index in range(len(attacks)):
                axes.plot(x, [100 * p["attacks"][index]["accuracy"] for p in chosen], linestyle=":" if line == "-" else line,
                          marker=ATTACK_MARKERS[index % len(ATTACK_MARKERS)], color=color, markerfacecolor="none",
                          markersize=size - 1, linewidth=1.0, zorder=3)
            if kind == "uniform":
                for point, value in zip(chosen, x):
                    axes.annotate(f"{round(point['average_weight_bits'])}b", (value, 100 * point["clean_accuracy"]),
                                  xytext=(3, -11), textcoords="offset points", fontsize=7, color=color)
        if float_point is not None:
            axes.axhline(100 * float_point["clean_accuracy"], color="#6b7280", linestyle="--", linewidth=1)
        quantized = [p[key] / unit for p in points if p["kind"] != "float"]
        axes.set_xlim(left=0, right=1.08 * max(quantized))
        axes.set_xlabel(label)
        axes.set_ylim(-2, 102)
        _style(axes, grid_x=True)
    metric = "agreement with float" if pareto["labels"] == "float model" else "accuracy"
    panels[0].set_ylabel(f"{metric}, %")
    handles = [panels[0].plot([], [], color=color, marker=marker, linestyle="-", label=name)[0]
               for color, marker, name in FRONT_STYLES.values()]
    handles.append(panels[0].plot([], [], color="#6b7280", linestyle="--", label="float")[0])
    handles += [
        panels[0].plot([], [], color="#4b5563", linestyle=":", marker=ATTACK_MARKERS[i % len(ATTACK_MARKERS)],
                       markerfacecolor="none", label=name)[0]
        for i, name in enumerate(attacks)
    ]
    figure.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    caption = (
        f"Every plan of the front written with the compile's PTQ and measured like the compiled model: solid = clean "
        f"{metric} on {pareto['samples']} held-out samples, dotted and open = under each attack on the first "
        f"{pareto['robust_samples']}; mixed plans solved at each average-bits budget, uniform at each bit-width "
        "(labelled). Up and to the left is better."
    )
    return Plot("pareto", "Pareto front: accuracy against size and energy", caption, _png(figure))


def ans_plot(layers: Sequence[Mapping[str, Any]], ans: Mapping[str, Any] | None) -> Plot:
    names = [row["name"] for row in layers]
    means = [row["ans_mean"] or 0.0 for row in layers]
    stds = [row["ans_std"] or 0.0 for row in layers]
    figure, axes = _figure(len(names), height=3.4)
    positions = range(len(names))
    axes.bar(positions, means, yerr=stds, color=PLAN_COLOR, ecolor="#1e293b", capsize=3, width=0.65)
    _layer_axis(axes, names)
    axes.set_ylabel("ANS  ||a_adv - a|| / ||a||")
    axes.set_ylim(bottom=0)
    attack = _describe_attack(ans["attack"]) if ans else "the attack"
    samples = f" over {ans['samples']} samples" if ans else ""
    caption = (
        f"Adversarial noise sensitivity per layer under {attack}{samples}: bar = mean, "
        "whisker = one standard deviation. Higher means more sensitive, and Eqn 3 gives it fewer bits."
    )
    return Plot("ans", "Sensitivity (ANS) per layer", caption, _png(figure))


def bits_plot(layers: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> Plot:
    from matplotlib.ticker import MaxNLocator

    names = [row["name"] for row in layers]
    k_init = summary.get("k_init") or max((row["weight_bits"] or 0 for row in layers), default=16)
    top = max(k_init, *(row["weight_bits"] or 0 for row in layers), *(row["act_bits"] or 0 for row in layers))
    figure, axes = _figure(len(names), height=3.4)
    width = 0.38
    for index, row in enumerate(layers):
        if row["keep_float"]:
            axes.bar(index, top + 1, width=2 * width, color=FLOAT_COLOR, hatch="//", edgecolor="#9ca3af")
            axes.text(index, (top + 1) / 2, "float", ha="center", va="center", rotation=90, fontsize=8, color="#374151")
            continue
        axes.bar(index - width / 2, row["weight_bits"], width=width, color=PLAN_COLOR, label="weights" if index == _first_quantized(layers) else None)
        axes.bar(index + width / 2, row["act_bits"], width=width, color=ACT_COLOR, label="input activation" if index == _first_quantized(layers) else None)
        axes.text(index - width / 2, row["weight_bits"] + 0.2, str(row["weight_bits"]), ha="center", va="bottom", fontsize=7)
        axes.text(index + width / 2, row["act_bits"] + 0.2, str(row["act_bits"]), ha="center", va="bottom", fontsize=7)
    if summary.get("k_min"):
        axes.axhline(summary["k_min"], color="#6b7280", linestyle=":", linewidth=1)
    _layer_axis(axes, names)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("bits")
    axes.set_ylim(0, top + 2.5)
    if _first_quantized(layers) is not None:
        axes.legend(loc="upper right", fontsize=8, frameon=False, ncol=2)
    method = summary.get("method", "the plan")
    caption = (
        f"Bits per layer from {method} (k_init {summary.get('k_init', '-')}, k_min {summary.get('k_min', '-')}, "
        "dotted line): weights and the layer's input activation. Hatched layers stay float (32 bits)."
    )
    return Plot("bits", "Bits per layer", caption, _png(figure))


def layer_cost_plot(energy: Mapping[str, Any], baselines: Sequence[Mapping[str, Any]]) -> Plot:
    """Weight memory, then energy on each profile, per layer: the plan against uniform baselines."""
    profiles = list(energy["profiles"])
    first = energy["profiles"][profiles[0]]["layers"]
    names = [row["name"] for row in first]
    panels = 1 + len(profiles)
    columns = 2 if len(names) <= TWO_COLUMN_LAYERS and panels > 1 else 1
    rows = math.ceil(panels / columns)
    width = min(MAX_FIGURE_WIDTH, columns * max(4.6, 1.2 + 0.42 * len(names)))
    figure = _new_figure(width, 0.8 + 2.4 * rows)
    grid = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in grid[panels:]:
        unused.set_visible(False)
    series = [("plan", PLAN_COLOR, [row["weight_memory_bits"] / 8e3 for row in first])]
    series += [
        (f"uniform {b['bits']}-bit", UNIFORM_COLORS.get(b["bits"], "#d1d5db"), [row["weight_memory_bits"] / 8e3 for row in b["layers"]])
        for b in baselines
    ]
    _grouped_bars(grid[0], series)
    grid[0].set_title("weight memory, kB", fontsize=9)
    for axes, profile in zip(grid[1:panels], profiles):
        layer_rows = energy["profiles"][profile]["layers"]
        series = [("plan", PLAN_COLOR, [row["energy_pj"] / 1e6 for row in layer_rows])]
        series += [
            (f"uniform {b['bits']}-bit", UNIFORM_COLORS.get(b["bits"], "#d1d5db"), [row["energy_pj"][profile] / 1e6 for row in b["layers"]])
            for b in baselines
        ]
        _grouped_bars(axes, series)
        axes.set_title(f"energy on {profile}, uJ", fontsize=9)
    for axes in grid[:panels]:
        _layer_axis(axes, names)
    figure.legend(*grid[0].get_legend_handles_labels(), loc="outside upper center", ncol=len(series), fontsize=8, frameon=False)
    caption = (
        "Per layer and image: weight memory and energy on each hardware profile, for the plan "
        "and for the same model at uniform 16 and 8 bits (paper Section III, Eqns 4-5)."
    )
    return Plot("layer-cost", "Memory and energy per layer", caption, _png(figure))


def totals_plot(energy: Mapping[str, Any]) -> Plot:
    profiles = list(energy["profiles"])
    figure = _new_figure(min(MAX_FIGURE_WIDTH, 4.0 + 1.6 * len(profiles)), 3.6)
    energy_axes, memory_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [max(2, len(profiles)), 1.3]})
    baseline_bits = [row["bits"] for row in energy["profiles"][profiles[0]]["vs_uniform"]]
    labels = ["plan", *(f"uniform {bits}-bit" for bits in baseline_bits)]
    colors = [PLAN_COLOR, *(UNIFORM_COLORS.get(bits, "#d1d5db") for bits in baseline_bits)]
    width = 0.8 / len(labels)
    for position, profile in enumerate(profiles):
        figures_of = energy["profiles"][profile]
        values = [figures_of["totals"]["energy_pj"], *(row["energy_pj"] for row in figures_of["vs_uniform"])]
        for index, value in enumerate(values):
            x = position + (index - (len(labels) - 1) / 2) * width
            energy_axes.bar(x, value / 1e6, width=width, color=colors[index], label=labels[index] if position == 0 else None)
        ratios = ", ".join(f"{row['energy_ratio']:.2f}x of {row['bits']}-bit" for row in figures_of["vs_uniform"])
        energy_axes.annotate(ratios, (position, 0), xytext=(0, -26), textcoords="offset points", ha="center", fontsize=7, color="#374151", annotation_clip=False)
    energy_axes.set_xticks(range(len(profiles)), profiles)
    energy_axes.set_ylabel("energy per image, uJ")
    energy_axes.set_title("energy by hardware profile", fontsize=9)
    figure.legend(loc="outside upper center", ncol=len(labels), fontsize=8, frameon=False)
    _style(energy_axes)
    reference = energy["profiles"][profiles[0]]
    memory = [reference["totals"]["weight_memory_bits"], *(row["weight_memory_bits"] for row in reference["vs_uniform"])]
    memory_axes.bar(range(len(memory)), [value / 8e3 for value in memory], color=colors, width=0.7)
    for index, value in enumerate(memory):
        memory_axes.text(index, value / 8e3, f"{value / 8e3:.3g}", ha="center", va="bottom", fontsize=7)
    memory_axes.set_xticks(range(len(memory)), ["plan", *(f"{bits}-bit" for bits in baseline_bits)])
    memory_axes.set_ylabel("weight memory, kB")
    memory_axes.set_title("weight memory", fontsize=9)
    _style(memory_axes)
    caption = (
        "Totals per image: the plan's energy on each hardware profile and its weight memory, next to the "
        "uniform 16- and 8-bit models; the ratios under each group are the plan's energy relative to them."
    )
    return Plot("totals", "Energy and memory in total", caption, _png(figure))


def accuracy_plot(evaluations: Sequence[Mapping[str, Any]]) -> Plot:
    """Accuracy against eps, one panel per attack method, one line per model; eps 0 is clean."""
    methods = sorted({_method_key(a) for entry in evaluations for a in entry["evaluation"]["attacks"]})
    figure = _new_figure(min(MAX_FIGURE_WIDTH, 1.0 + 4.2 * len(methods)), 3.8)
    panels = figure.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    labels = model_labels([entry["model"]["path"] for entry in evaluations])
    for axes, method in zip(panels, methods):
        for index, (label, entry) in enumerate(zip(labels, evaluations)):
            evaluation = entry["evaluation"]
            points = sorted(
                (a["eps"], a["accuracy"]) for a in evaluation["attacks"] if _method_key(a) == method
            )
            if not points:
                continue
            eps = [0.0, *(p[0] for p in points)]
            accuracy = [100 * evaluation["clean_accuracy"], *(100 * p[1] for p in points)]
            axes.plot(eps, accuracy, marker="o", markersize=4, color=MODEL_COLORS[index % len(MODEL_COLORS)], label=label)
        axes.set_title(method, fontsize=9)
        axes.set_xlabel("eps (fraction of the input range)")
        axes.set_ylim(-2, 102)
        axes.set_xlim(left=0)
        _style(axes, grid_x=True)
    panels[0].set_ylabel("accuracy, %")
    panels[0].legend(fontsize=8, frameon=False, loc="upper right")
    samples = sorted({entry["evaluation"]["samples"] for entry in evaluations})
    caption = (
        f"Accuracy under attack against eps on {', '.join(map(str, samples))} samples "
        "(eps 0 is clean accuracy), counted by onnxruntime on each model."
    )
    return Plot("accuracy", "Accuracy against eps", caption, _png(figure))


def _method_key(attack: Mapping[str, Any]) -> str:
    if attack["method"] == "pgd":
        start = ", random start" if attack.get("random_start") else ""
        return f"PGD-{attack['steps']}{start}"
    return attack["method"].upper()


def _describe_attack(attack: Mapping[str, Any]) -> str:
    if attack["method"] == "pgd":
        return f"PGD-{attack['steps']} eps={attack['eps']:.4g}"
    return f"FGSM eps={attack['eps']:.4g}"


def _first_quantized(layers: Sequence[Mapping[str, Any]]) -> int | None:
    return next((index for index, row in enumerate(layers) if not row["keep_float"]), None)


def _grouped_bars(axes: Axes, series: Sequence[tuple[str, str, Sequence[float]]]) -> None:
    width = 0.8 / len(series)
    for index, (label, color, values) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        axes.bar([x + offset for x in range(len(values))], values, width=width, color=color, label=label)
    _style(axes)


def _width(count: int) -> float:
    return min(MAX_FIGURE_WIDTH, max(6.5, 1.8 + 0.42 * count))


def _figure(count: int, height: float) -> tuple[Figure, Axes]:
    figure = _new_figure(_width(count), height)
    return figure, figure.subplots()


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _layer_axis(axes: Axes, names: Sequence[str]) -> None:
    longest = max((len(name) for name in names), default=0)
    rotation = 0 if longest * len(names) < 70 else (45 if longest < 14 else 90)
    axes.set_xticks(range(len(names)), names, rotation=rotation, ha="right" if rotation == 45 else "center", fontsize=8)
    axes.set_xlim(-0.6, len(names) - 0.4)
    _style(axes)


def _style(axes: Axes, *, grid_x: bool = False) -> None:
    axes.spines[["top", "right"]].set_visible(False)
    axes.grid(axis="both" if grid_x else "y", color="#e5e7eb", linewidth=0.8)
    axes.set_axisbelow(True)
    axes.tick_params(labelsize=8)


def _png(figure: Figure) -> bytes:
    """PNG bytes without a timestamp or software tag, so equal figures give equal bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()
