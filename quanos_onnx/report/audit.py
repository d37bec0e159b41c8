"""The robustness audit in words: the verdict paragraph, what ANS implies for Eqn 3, the tables.

Works on the JSON of harness.robustness (RobustnessAudit.to_json) and harness.masking
(MaskingDiagnosis.to_json), so the terminal summary, report.md and report.html say the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..allocate import eqn3_bits
from ..harness.attacks import eps_text
from ..layers import Layer


def eqn3_implication(
    layers: Sequence[Layer], ans_layers: Sequence[Mapping[str, Any]], *, k_init: int = 16, k_min: int = 2
) -> dict[str, Any]:
    """The bits Eqn 3 gives each quantized layer from this ANS, and one sentence about it.

    Output layers stay float (the paper's and quanos-compile's default), so they are left out.
    """
    ans = {row["layer"]: row["ans_mean"] for row in ans_layers}
    quantized = [layer for layer in layers if not layer.is_output]
    bits = {layer.name: eqn3_bits(ans[layer.name], k_init, k_min) for layer in quantized}
    means = [ans[layer.name] for layer in quantized]
    mean = sum(means) / len(means) if means else 0.0
    at_floor = sum(1 for value in bits.values() if value == k_min)
    spread = ", ".join(f"{count} at {value}" for value, count in sorted(Counter(bits.values()).items()))
    sentence = (
        f"mean ANS {mean:.2f}: Eqn 3 from {k_init} bits gives {k_min} bits to {at_floor} of "
        f"{len(quantized)} quantized layers ({spread} bits; output layers stay float)"
    )
    if quantized and at_floor * 2 > len(quantized):
        sentence += (
            f"; with most layers at {k_min} bits the paper's rule leaves little accuracy (uniform 2-bit "
            "ResNet-20 is at chance, docs/results.md): use a budget or another allocator"
        )
    return {"k_init": k_init, "k_min": k_min, "mean_ans": mean, "bits": bits, "layers_at_k_min": at_floor,
            "quantized_layers": len(quantized), "sentence": sentence}


def tolerance_implication(tolerance: Mapping[str, Any]) -> str:
    """One sentence from harness.tolerance's JSON: which layers tolerate the fewest bits alone,
    which need the most, and what the two whole plans keep."""
    rows = tolerance["layers"]
    if not rows:
        return "no quantized layer to measure a tolerance for"
    measured = [row for row in rows if row["tolerance_bits"] is not None]
    untolerated = [row["layer"] for row in rows if row["tolerance_bits"] is None]
    rule = (f"quantization tolerance (each layer alone, the fewest bits keeping at least "
            f"{_percent(tolerance['min_agreement'])} of the float model's top-1 predictions on {tolerance['samples']} samples)")
    parts = []
    if measured:
        low = min(row["tolerance_bits"] for row in measured)
        high = max(row["tolerance_bits"] for row in measured)
        tolerant = [row["layer"] for row in measured if row["tolerance_bits"] == low]
        parts.append(f"{len(tolerant)} of {len(rows)} layers tolerate {low} bits alone ({_names(tolerant)})")
        if high > low:
            needy = [row["layer"] for row in measured if row["tolerance_bits"] == high]
            parts.append(f"{_names(needy)} {'needs' if len(needy) == 1 else 'need'} {high}")
    if untolerated:
        parts.append(f"{_names(untolerated)} {'keeps' if len(untolerated) == 1 else 'keep'} fewer even at "
                     f"{tolerance['bits'][-1]} bits")
    own, allocator = tolerance["tolerance_plan"], tolerance["allocator_plan"]
    parts.append(
        f"every layer at its own tolerance at once ({own['average_bits']:.2f} average bits) keeps "
        f"{_percent(own['agreement'])} of the predictions, the default allocator's integer program at the same "
        f"average bits {_percent(allocator['agreement'])}"
    )
    return f"{rule}: " + "; ".join(parts)


def _names(names: Sequence[str], shown: int = 3) -> str:
    listed = ", ".join(names[:shown])
    return listed if len(names) <= shown else f"{listed} and {len(names) - shown} more"


def audit_section(
    robustness: Mapping[str, Any],
    masking: Mapping[str, Any],
    eqn3: Mapping[str, Any] | None,
    *,
    model: str,
    kind: str,
    tolerance: str | None = None,
) -> dict[str, Any]:
    """The `audit` JSON of analyze and evaluate: the evidence and the verdict written from it.
    `tolerance` is tolerance_implication's sentence (analyze; None where not measured)."""
    section = {"model": model, "kind": kind, "robustness": dict(robustness), "masking": dict(masking),
               "eqn3": None if eqn3 is None else dict(eqn3), "tolerance": tolerance}
    return {"verdict": verdict(section), **section}


def verdict(section: Mapping[str, Any]) -> str:
    """One paragraph: clean and worst-case robust accuracy with intervals, masking, Eqn 3."""
    robustness, masking = section["robustness"], section["masking"]
    names = sorted({attack["name"] for attack in robustness["attacks"]}, key=_attack_order)
    clean = robustness["clean"]
    parts = [
        f"{section['model']} ({section['kind']}) classifies {_share(clean)} of {clean['samples']} samples correctly.",
        f"Robust accuracy, the worst case per sample over {', '.join(names)}: "
        + "; ".join(f"{_share(row)} at eps {eps_text(row['eps'])}" for row in robustness["worst_case"])
        + " (95% Wilson intervals).",
    ]
    flagged = [check for check in masking["checks"] if check["flagged"]]
    if flagged:
        evidence = "; ".join(f"{check['check']}: {check['evidence']}" for check in flagged)
        parts.append(
            f"Robustness likely overestimated: {len(flagged)} of {len(masking['checks'])} gradient-masking "
            f"checks flagged ({evidence}). Read these robust accuracies as upper bounds."
        )
    else:
        parts.append(
            f"None of the {len(masking['checks'])} gradient-masking checks (Carlini et al. 2019) flagged, "
            "so the attacks found the gradients they needed."
        )
    disagreements = robustness.get("twin_disagreements", 0)
    if disagreements:
        parts.append(
            f"{disagreements} attacked inputs fooled the torch twin but not onnxruntime (counted as robust)."
        )
    if section.get("eqn3"):
        parts.append(_capitalized(section["eqn3"]["sentence"]))
    if section.get("tolerance"):
        parts.append(_capitalized(section["tolerance"]))
    return " ".join(parts)


def _capitalized(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:] + "."


def accuracy_rows(robustness: Mapping[str, Any]) -> list[dict[str, object]]:
    """clean, each attack at each eps, the worst case per eps, and the two probes."""
    rows: list[dict[str, object]] = [_row("clean", None, robustness["clean"])]
    for eps in sorted({row["eps"] for row in robustness["worst_case"]}):
        rows += [_row(a["name"], eps, a) for a in robustness["attacks"] if a["eps"] == eps]
        effort = robustness.get("effort_check")
        if effort and effort["eps"] == eps:
            rows.append(_row(f"effort check: apgd-ce {effort['steps']} steps x{effort['restarts']}", eps, effort))
        rows += [_row("worst case", eps, w) for w in robustness["worst_case"] if w["eps"] == eps]
    large = robustness.get("large_eps_check")
    if large:
        rows.append(_row("apgd-ce (large-eps probe)", large["eps"], large))
    return rows


def check_rows(masking: Mapping[str, Any]) -> list[dict[str, object]]:
    return [{"check": c["check"], "flagged": "FLAGGED" if c["flagged"] else "ok", "evidence": c["evidence"]}
            for c in masking["checks"]]


def _row(attack: str, eps: float | None, share: Mapping[str, Any]) -> dict[str, object]:
    low, high = share["ci95"]
    return {"attack": attack, "eps": None if eps is None else eps_text(eps), "accuracy": _percent(share["accuracy"]),
            "95% CI": f"{_percent(low)}..{_percent(high)}", "n": share["samples"]}


def _share(share: Mapping[str, Any]) -> str:
    low, high = share["ci95"]
    return f"{_percent(share['accuracy'])} [{_percent(low)}, {_percent(high)}]"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _attack_order(name: str) -> int:
    order = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "transfer")
    return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order))

