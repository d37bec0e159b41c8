"""The bit plan: the one piece of data that flows between the stages.

Allocation writes it, the residual-alignment pass makes it consistent, QDQ insertion
materializes it, the hardware model prices it and fine-tuning re-applies it. It is
versioned JSON so that a plan written today is read (or refused clearly) tomorrow.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import PlanError

PLAN_VERSION = 1
MIN_BITS = 2
MAX_BITS = 16


@dataclass(frozen=True)
class LayerPlan:
    """Bits for one layer's weights and its input activation (None when kept float)."""

    name: str
    weight_bits: int | None
    act_bits: int | None
    keep_float: bool = False
    group: str | None = None
    ans_mean: float | None = None
    ans_std: float | None = None

    @property
    def quantized(self) -> bool:
        return not self.keep_float


@dataclass(frozen=True)
class JoinPlan:
    """One shared activation quantizer for every operand of an Add/Concat join.

    `bits` is None when the join stays float. `downstream` is the layer whose bits the
    join takes (the paper: "the shortcut has the same precision as the layer into which
    it feeds").
    """

    name: str
    bits: int | None
    operands: tuple[str, ...]
    downstream: str | None


@dataclass(frozen=True)
class Plan:
    """Per-layer bits plus how they were made (k_init, k_min, method, free-form details).

    `joins` is filled by the residual-alignment pass; a plan without it is not yet
    consistent and QDQ insertion refuses it. `join_operand_bits`, when set, puts the shared
    quantizer of every quantized join's operands at no fewer than these bits; the join's
    result still reaches the layer it feeds through that layer's own k-bit input quantizer
    (the placement of BRECQ/QDrop, where a block's sum is quantized once; docs/quantization.md,
    "Residual joins"). None: the operands at the join's bits, the paper's rule.
    """

    layers: tuple[LayerPlan, ...]
    k_init: int = 16
    k_min: int = 2
    method: str = "given"
    details: Mapping[str, Any] = field(default_factory=dict)
    joins: tuple[JoinPlan, ...] = ()
    join_operand_bits: int | None = None

    def __post_init__(self) -> None:
        if self.join_operand_bits is not None:
            check_bits(self.join_operand_bits, "join operand bits")

    def operand_bits(self, join: JoinPlan) -> int | None:
        """The bits of the quantizer a join's operands share (None: the join stays float)."""
        if join.bits is None or self.join_operand_bits is None:
            return join.bits
        return max(join.bits, self.join_operand_bits)

    def layer(self, name: str) -> LayerPlan:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise PlanError(f"plan has no layer '{name}'")

    def by_name(self) -> dict[str, LayerPlan]:
        return {entry.name: entry for entry in self.layers}

    def with_layers(self, layers: Sequence[LayerPlan]) -> Plan:
        return replace(self, layers=tuple(layers))

    def with_details(self, **details: Any) -> Plan:
        return replace(self, details={**self.details, **details})

    @staticmethod
    def uniform(
        layers: Sequence[Any], bits: int, *, keep_output_float: bool = True
    ) -> Plan:
        """Every layer at `bits` (the paper's homogeneous baselines)."""
        check_bits(bits, "uniform bits")
        entries = tuple(
            _float_entry(layer.name)
            if keep_output_float and layer.is_output
            else LayerPlan(layer.name, bits, bits)
            for layer in layers
        )
        return Plan(entries, k_init=bits, k_min=bits, method=f"uniform-{bits}")

    def with_bits(self, names: Sequence[str], bits: int) -> Plan:
        """These layers at `bits` weights and activations, whatever the plan said (float included)."""
        check_bits(bits, "pinned bits")
        pinned = set(names)
        return self.with_layers(
            replace(e, weight_bits=bits, act_bits=bits, keep_float=False) if e.name in pinned else e for e in self.layers
        )

    def average_weight_bits(self, params: Mapping[str, int]) -> float:
        """Parameter-weighted average over quantized layers (the compression figure)."""
        quantized = [entry for entry in self.layers if entry.quantized]
        total = sum(params[entry.name] for entry in quantized)
        if total == 0:
            return 0.0
        return sum(params[e.name] * (e.weight_bits or 0) for e in quantized) / total

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "quanos-plan",
            "version": PLAN_VERSION,
            "k_init": self.k_init,
            "k_min": self.k_min,
            "method": self.method,
            "layers": [
                {
                    "name": e.name,
                    "weight_bits": e.weight_bits,
                    "act_bits": e.act_bits,
                    "keep_float": e.keep_float,
                    "group": e.group,
                    "ans_mean": e.ans_mean,
                    "ans_std": e.ans_std,
                }
                for e in self.layers
            ],
            "joins": [
                {
                    "name": j.name,
                    "bits": j.bits,
                    "operands": list(j.operands),
                    "downstream": j.downstream,
                }
                for j in self.joins
            ],
            "join_operand_bits": self.join_operand_bits,
            "details": dict(self.details),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"


def first_and_last_layers(layers: Sequence[Any], *, quantize_output: bool) -> tuple[str, ...]:
    """The layers BRECQ and QDrop keep at 8 bits: the first quantized layer in
    graph order and, when the output layer is quantized (`quantize_output`), the output
    layer(s). A float output layer is already wider than any bits, so it is not pinned and
    no other layer stands in for it (docs/quantization.md, "First and last layers")."""
    allocated = [layer for layer in layers if quantize_output or not layer.is_output]
    if not allocated:
        return ()
    return tuple(dict.fromkeys([allocated[0].name, *(layer.name for layer in allocated if layer.is_output)]))


@dataclass(frozen=True)
class FirstOutputBits:
    """The first layer's output quantized at `bits`: the layers that read it (`readers`,
    passes/points.output_readers) read it at `bits`, whatever their own bits.

    BRECQ's and QDrop's `set_first_last_layer_to_8bit` keeps the first layer's weights and its
    *output* at 8 bits; in a QDQ plan a layer's output is quantized by its readers' input
    quantizers, so this is their input bits (docs/quantization.md, "First and last layers")."""

    readers: tuple[str, ...]
    bits: int

    def __post_init__(self) -> None:
        check_bits(self.bits, "first layer's output bits")

    def apply(self, plan: Plan) -> Plan:
        """The plan with the readers' input at `bits` (their weights unchanged)."""
        readers = set(self.readers)
        return plan.with_layers(
            replace(e, act_bits=self.bits) if e.name in readers and e.quantized else e for e in plan.layers
        )


def with_act_bits(plan: Plan, bits: int) -> Plan:
    """The plan with every quantized layer's activations (its input quantizer) at `bits`,
    whatever its weight bits: mixed precision of the weights alone.

    QUANOS gives a layer one bit-width for its weights and its input. On onnxruntime's CPU
    kernels, activations under 8 bits save neither time nor memory (every layer up to 8 bits
    runs on the same uint8 kernels), only energy on precision-scalable hardware, and they
    cost accuracy: MobileNetV2's default 5-bit plan kept 78.1% of float's 82.4%, the same
    weight bits with 8-bit activations 81.6% (docs/benchmarks.md)."""
    check_bits(bits, "activation bits")
    return plan.with_layers(
        replace(e, act_bits=bits) if e.quantized and e.act_bits is not None else e for e in plan.layers
    ).with_details(act_bits={"bits": bits})


def with_activation_bits(
    plan: Plan,
    layers: Sequence[Any],
    *,
    act_bits: int | None = None,
    input_bits: int | None = None,
    first_output: FirstOutputBits | None = None,
) -> Plan:
    """The plan as a compile measures and writes it: the first layer's output at its bits
    (`first_output`, from --first-last-bits), every activation at `act_bits` (with_act_bits),
    then the model input capped at `input_bits` (with_input_bits); each left out when None."""
    if first_output is not None:
        plan = first_output.apply(plan)
    if act_bits is not None:
        plan = with_act_bits(plan, act_bits)
    return plan if input_bits is None else with_input_bits(plan, layers, input_bits)


def with_input_bits(plan: Plan, layers: Sequence[Any], bits: int) -> Plan:
    """The plan with the model input read at no more than `bits`: the input activation of
    the first layer in graph order, and of every layer reading the same tensor, is capped.

    A coarse input grid removes perturbations smaller than its step before any weight sees
    them (feature squeezing by bit depth, Xu et al., NDSS 2018): measured under the
    worst-case audit, it is most of what uniform low-bit models keep against small-eps
    attacks and accuracy-driven mixed plans lose (docs/benchmarks.md, "Allocation under the
    audit"). Weights and every other activation keep their bits."""
    check_bits(bits, "input bits")
    if not layers:
        return plan
    readers = {layer.name for layer in layers if layer.input == layers[0].input}
    capped = [
        replace(e, act_bits=min(e.act_bits, bits)) if e.name in readers and e.quantized and e.act_bits is not None else e
        for e in plan.layers
    ]
    if capped == list(plan.layers):
        return plan
    return plan.with_layers(capped).with_details(input_bits={"bits": bits, "layers": sorted(readers)})


def _float_entry(name: str) -> LayerPlan:
    return LayerPlan(name, None, None, keep_float=True)


def check_bits(bits: object, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise PlanError(f"{what}: bits must be an integer, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise PlanError(f"{what}: {bits} bits is outside {MIN_BITS}..{MAX_BITS}")
    return bits


def plan_from_json(data: Any, source: str = "<plan>") -> Plan:
    """Parse and check a plan document; every error names the source and the entry."""
    if not isinstance(data, dict) or data.get("format") != "quanos-plan":
        raise PlanError(f"{source}: not a quanos plan (missing \"format\": \"quanos-plan\")")
    version = data.get("version")
    if version != PLAN_VERSION:
        raise PlanError(
            f"{source}: plan version {version!r} is not supported (this tool reads {PLAN_VERSION})"
        )
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise PlanError(f"{source}: \"layers\" must be a non-empty list")
    entries = tuple(_layer_from_json(raw, f"{source}: layers[{i}]") for i, raw in enumerate(raw_layers))
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PlanError(f"{source}: layer '{duplicates[0]}' appears more than once")
    k_init = _int_field(data, "k_init", 16, source)
    k_min = _int_field(data, "k_min", 2, source)
    details = data.get("details") or {}
    if not isinstance(details, dict):
        raise PlanError(f"{source}: \"details\" must be an object")
    joins = tuple(_join_from_json(raw, f"{source}: joins[{i}]") for i, raw in enumerate(data.get("joins") or []))
    join_operand_bits = data.get("join_operand_bits")
    if join_operand_bits is not None:
        check_bits(join_operand_bits, f"{source}: \"join_operand_bits\"")
    return Plan(
        entries,
        k_init=k_init,
        k_min=k_min,
        method=str(data.get("method", "given")),
        details=details,
        joins=joins,
        join_operand_bits=join_operand_bits,
    )


def _join_from_json(raw: Any, where: str) -> JoinPlan:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise PlanError(f"{where}: each join needs a \"name\" string")
    bits = raw.get("bits")
    if bits is not None:
        check_bits(bits, f"{where} '{raw['name']}' bits")
    operands = raw.get("operands") or []
    if not isinstance(operands, list) or not all(isinstance(o, str) for o in operands):
        raise PlanError(f"{where}: \"operands\" must be a list of tensor names")
    downstream = raw.get("downstream")
    return JoinPlan(raw["name"], bits, tuple(operands), downstream if isinstance(downstream, str) else None)


def _int_field(data: Mapping[str, Any], key: str, default: int, source: str) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{source}: \"{key}\" must be an integer, got {value!r}")
    return value


def _layer_from_json(raw: Any, where: str) -> LayerPlan:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise PlanError(f"{where}: each layer needs a \"name\" string")
    name = raw["name"]
    keep_float = raw.get("keep_float", False)
    if not isinstance(keep_float, bool):
        raise PlanError(f"{where} '{name}': \"keep_float\" must be true or false (a JSON boolean), got {keep_float!r}")
    if keep_float:
        return _float_entry(name)
    weight_bits = raw.get("weight_bits", raw.get("bits"))
    act_bits = raw.get("act_bits", weight_bits)
    check_bits(weight_bits, f"{where} '{name}' weight_bits")
    check_bits(act_bits, f"{where} '{name}' act_bits")
    return LayerPlan(
        name=name,
        weight_bits=weight_bits,
        act_bits=act_bits,
        group=raw.get("group"),
        ans_mean=_optional_float(raw.get("ans_mean"), f"{where} ans_mean"),
        ans_std=_optional_float(raw.get("ans_std"), f"{where} ans_std"),
    )


def _optional_float(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def read_plan(path: str | os.PathLike[str]) -> Plan:
    """A plan file: a regular file of at most inputs.MAX_DOCUMENT_BYTES (docs/cli.md)."""
    from .inputs import read_document

    return plan_from_json(read_document(path, PlanError, "plan file"), str(path))


def validate_plan(plan: Plan, layers: Sequence[Any], source: str = "<plan>") -> Plan:
    """Check the plan against a model's layers and fill in layers the plan leaves out.

    A plan must not name layers the model lacks (a typo would silently quantize nothing);
    layers it does not mention are kept float, which is logged by the caller.
    """
    known = {layer.name for layer in layers}
    for entry in plan.layers:
        if entry.name not in known:
            raise PlanError(
                f"{source}: layer '{entry.name}' is not a quantizable layer of the model",
                hint="run `quanos layers MODEL` for the layer names",
            )
    given = plan.by_name()
    ordered = tuple(given.get(layer.name, _float_entry(layer.name)) for layer in layers)
    return plan.with_layers(ordered)
