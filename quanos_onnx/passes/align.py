"""Residual alignment: make a plan consistent before any node is inserted.

The paper: "the shortcut has the same precision as the layer into which it feeds". Every
operand of an Add/Concat join shares one quantizer at the bits of the first quantized
layer downstream of the join, and a projection-shortcut conv takes those bits too. Doing
this on the plan (as Brevitas does before inserting quantizers) keeps the graph pass a
plain materialization, and lets the plan, the report and the energy model agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..layers import Join, Layer
from ..plan import JoinPlan, LayerPlan, Plan


def align_plan(plan: Plan, layers: Sequence[Layer], joins: Sequence[Join]) -> Plan:
    """Return the plan with join bits set and projection shortcuts at their join's bits.

    A join with no quantized layer downstream (e.g. the last residual block before a float
    classifier) takes the highest bits among the quantized layers feeding it, so the
    layers before it stay fusable; with none of those either it stays float.
    """
    entries = {entry.name: entry for entry in plan.layers}
    join_plans: dict[str, JoinPlan] = {}
    for _ in range(len(joins) + 1):
        changed = False
        for join in joins:
            join_plan = _join_plan(join, entries, layers)
            join_plans[join.name] = join_plan
            if join_plan.bits is None:
                continue
            for name in join.shortcut_layers:
                entry = entries[name]
                if entry.quantized and (
                    entry.weight_bits != join_plan.bits or entry.act_bits != join_plan.bits
                ):
                    entries[name] = replace(
                        entry, weight_bits=join_plan.bits, act_bits=join_plan.bits, group=join.name
                    )
                    changed = True
        if not changed:
            break
    grouped = _group_names(entries, joins, join_plans)
    ordered = tuple(grouped[layer.name] for layer in layers if layer.name in grouped)
    return replace(plan, layers=ordered, joins=tuple(join_plans[j.name] for j in joins))


def _join_plan(join: Join, entries: dict[str, LayerPlan], layers: Sequence[Layer]) -> JoinPlan:
    for name in join.downstream_layers:
        entry = entries.get(name)
        if entry is not None and entry.quantized:
            return JoinPlan(join.name, entry.act_bits, join.inputs, name)
    feeding = {layer.block_output: layer.name for layer in layers}
    bits = [
        entries[feeding[t]].act_bits
        for t in join.inputs
        if t in feeding and entries[feeding[t]].quantized
    ]
    return JoinPlan(join.name, max(bits) if bits else None, join.inputs, None)


def _group_names(
    entries: dict[str, LayerPlan], joins: Sequence[Join], join_plans: dict[str, JoinPlan]
) -> dict[str, LayerPlan]:
    """Record which join sets a layer's bits (its residual group) for the report."""
    grouped = dict(entries)
    for join in joins:
        plan = join_plans[join.name]
        members = [*join.shortcut_layers, *([plan.downstream] if plan.downstream else [])]
        for name in members:
            entry = grouped[name]
            if entry.quantized and entry.group is None:
                grouped[name] = replace(entry, group=join.name)
    return grouped
