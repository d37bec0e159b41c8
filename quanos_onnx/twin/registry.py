"""The op registry: one small torch function per ONNX op, chosen by domain, op type and opset.

An ONNX op can change meaning between opsets (Slice, Clip, Pad, Split, Squeeze and the
Reduce ops moved attributes to inputs). Each implementation is registered with the op
version it starts at; a node resolves to the newest registration not newer than its
model's opset, so an export at opset 10 and one at 21 each get the semantics they were
written for. Op versions below the oldest registration (pre-broadcast Add, say) resolve
to nothing and are reported as unsupported instead of being run with the wrong meaning.

An op function receives the node's attributes (decoded once, at build time, plus anything
its `prepare` hook derived from the node) and its input tensors (None for an omitted
optional input) and returns the node's outputs as a list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch

OpFunction = Callable[[Mapping[str, Any], Sequence[torch.Tensor | None]], list[torch.Tensor]]
"""(attributes, inputs) -> outputs."""

PrepareHook = Callable[[onnx.NodeProto, dict[str, Any], Sequence[int | None]], dict[str, Any]]
"""(node, decoded attributes, ONNX element type of each input or None) -> attributes to run with.

Runs once per node at build time: it rejects what the function cannot do (by raising
NotSupported) and resolves what depends on the node rather than on tensor values (the
number of outputs of Split, the integer container of QuantizeLinear)."""

MAX_OPSET = 25
"""The newest default-domain opset the registrations were checked against (onnx 1.23
defines new versions of QuantizeLinear, DequantizeLinear and Cast at 28 and of Range at 27)."""

DEFAULT_DOMAIN = ""


class NotSupported(Exception):
    """Raised by a prepare hook: this node uses a feature its implementation lacks."""


@dataclass(frozen=True)
class OpImpl:
    domain: str
    op_type: str
    since_version: int
    function: OpFunction
    prepare: PrepareHook | None = None


_REGISTRY: dict[tuple[str, str], list[OpImpl]] = {}


def canonical_domain(domain: str) -> str:
    return DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain


def register(
    *op_types: str, since: int = 1, domain: str = DEFAULT_DOMAIN, prepare: PrepareHook | None = None
) -> Callable[[OpFunction], OpFunction]:
    """Register the decorated function for the op types, from op version `since` on."""

    def decorate(function: OpFunction) -> OpFunction:
        for op_type in op_types:
            key = (canonical_domain(domain), op_type)
            entries = [e for e in _REGISTRY.get(key, []) if e.since_version != since]
            entries.append(OpImpl(key[0], op_type, since, function, prepare))
            _REGISTRY[key] = sorted(entries, key=lambda entry: entry.since_version)
        return function

    return decorate


def lookup(domain: str, op_type: str, opset: int) -> OpImpl | None:
    """The implementation for a node of this op in a model importing `opset` for its domain."""
    _load_ops()
    entries = _REGISTRY.get((canonical_domain(domain), op_type), [])
    if canonical_domain(domain) == DEFAULT_DOMAIN and opset > MAX_OPSET:
        return None
    usable = [entry for entry in entries if entry.since_version <= opset]
    return usable[-1] if usable else None


def supported_ops() -> list[tuple[str, str, int]]:
    """(domain, op type, first supported op version) for every registration, sorted."""
    _load_ops()
    return sorted((e.domain, e.op_type, e.since_version) for entries in _REGISTRY.values() for e in entries)


def _load_ops() -> None:
    """Import the op modules, whose decorators fill the registry."""
    from . import ops  # noqa: F401
